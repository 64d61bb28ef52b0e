import torch

from calibrate.algorithms.rtn import quantize_weight
from qtensor import get_scheme
from qtensor import numerics as nm
from qtensor.schemes import WeightSpec


def test_int_sym_matches_textbook_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    qt = quantize_weight(w, WeightSpec.of(get_scheme("w4a16"), 128))
    # independent reference: GPTQ's quantizer, scale = 2*absmax/15 (fp16), q = clamp(round(w/s), -8, 7)
    wg = w.reshape(16, 2, 128)
    s = (2 * wg.abs().amax(-1) / 15).to(torch.float16).float()
    q = torch.clamp(torch.round(wg / s[..., None]), -8, 7)
    assert torch.equal(qt.codes.reshape(16, 2, 128).float(), q)
    assert torch.equal(qt.scales.float(), s)
    assert torch.allclose(qt.dequantize(), (q * s[..., None]).reshape(16, 256))


def test_int_asym_zero_point():
    w = torch.rand(8, 128) + 0.5  # all positive: min clamps to 0
    spec = WeightSpec.of(get_scheme("w4a16"), 128, sym=False)
    qt = quantize_weight(w, spec)
    assert qt.zeros is not None and qt.codes.dtype == torch.uint8
    err = (qt.dequantize() - w).abs().max()
    assert err <= qt.scales.float().max() / 2 + 1e-3


def test_e2m1_round_is_nearest():
    x = torch.linspace(-7, 7, 2001)
    codes = nm.e2m1_round(x)
    vals = nm.e2m1_values(codes)
    brute = nm.E2M1_VALUES[(x[:, None].clamp(-6, 6) - nm.E2M1_VALUES[None]).abs().argmin(1)]
    xc = x.clamp(-6, 6)
    assert torch.allclose((vals - xc).abs(), (brute - xc).abs())  # as near as the brute-force nearest (ties may differ)
    assert torch.equal(nm.e2m1_values(nm.e2m1_round(torch.tensor([0.25, 1.75, 5.0]))), torch.tensor([0.0, 2.0, 4.0]))  # ties to even


def test_fp8_block_and_nvfp4_dequant_close():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 256, generator=g)
    for name, tol in (("fp8-block", 0.07), ("fp8", 0.07), ("nvfp4", 0.2), ("mxfp8", 0.07), ("mxfp4", 0.3)):
        qt = quantize_weight(w, WeightSpec.of(get_scheme(name)))
        rel = (qt.dequantize() - w).norm() / w.norm()
        assert 0 < rel < tol, (name, rel)
