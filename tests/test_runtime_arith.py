"""QuantLinear computes what the engines compute, for every scheme of the registry.

Each case builds a QTensor with known codes (round-to-nearest of a random weight), wraps it in
runtime.qlinear.QuantLinear and compares its output with an independent float64 computation written
here: dequantize by hand from codes / scales / zeros / g_idx / global scale, fake-quantize the
activations by hand as the scheme says, then matmul in float64. Nothing from qtensor.numerics or
qtensor.packing is used on the reference side.
"""

import pytest
import torch

from calibrate.algorithms.rtn import quantize_weight
from qtensor import ActQuant, QTensor
from qtensor.schemes import SCHEMES, WeightSpec
from runtime.qlinear import QuantLinear

F64 = torch.float64
E2M1_MAG = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)


# ---- independent reference ------------------------------------------------------------------------


def scale_values(qt: QTensor) -> torch.Tensor:
    s = qt.scales
    if s.dtype == torch.uint8:  # e8m0 shared exponents
        return torch.pow(torch.tensor(2.0, dtype=F64), s.to(F64) - 127)
    return s.to(torch.float32).to(F64)  # fp16 / bf16 / fp32 / e4m3 -> exact


def per_element(s: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """Scales (or zeros) of shape [N, groups] / [N, 1] / [1] / blocks -> [N, K]."""
    n, k = qt.codes.shape
    if qt.block is not None:
        bn, bk = qt.block
        rows = torch.arange(n) // bn
        cols = torch.arange(k) // bk
        return s[rows][:, cols]
    if s.numel() == 1:
        return s.reshape(1, 1).expand(n, k)
    if s.shape[1] == 1:
        return s.expand(n, k)
    if qt.g_idx is not None:
        cols = qt.g_idx.long()
    else:
        cols = torch.tensor([c // qt.group_size for c in range(k)])
    return s[:, cols]


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    c = codes.long()
    mag = E2M1_MAG[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def dequantize_by_hand(qt: QTensor) -> torch.Tensor:
    if qt.dtype == "int":
        q = qt.codes.to(F64)
        if qt.zeros is not None:
            q = q - per_element(qt.zeros.to(F64), qt)
        w = q * per_element(scale_values(qt), qt)
    elif qt.dtype in ("fp8_e4m3", "mxfp8"):
        w = qt.codes.to(torch.float32).to(F64) * per_element(scale_values(qt), qt)
    elif qt.dtype == "e2m1":
        w = e2m1_decode(qt.codes) * per_element(scale_values(qt), qt)
    else:
        raise AssertionError(qt.dtype)
    if qt.global_scale is not None:
        w = w * qt.global_scale.to(F64)
    return w


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code (IEEE round-half-even on the 1-bit mantissa)."""
    a = y.abs().clamp(max=6.0)
    d = (a[..., None] - E2M1_MAG).abs()
    d = d + (torch.arange(8) % 2).to(F64) * 1e-12  # at a tie the even code wins
    mag = E2M1_MAG[d.argmin(-1)]
    return torch.where(y < 0, -mag, mag)


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-448.0, 448.0).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float32).to(F64)


def fake_quant_by_hand(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """x: float64 [T, K] -> the values the engine's kernel multiplies."""
    if act.kind == "none":
        return x
    if act.dtype in ("int8", "int4"):
        qmax = 127 if act.dtype == "int8" else 7
        if act.kind == "static":  # per tensor, optional zero point (msModelSlim input_offset)
            s = act.scale.to(F64).reshape(())
            off = act.offset.to(F64).reshape(()) if act.offset is not None else torch.tensor(0.0, dtype=F64)
            q = (torch.round(x / s) + off).clamp(-qmax - 1, qmax)
            return (q - off) * s
        s = x.abs().amax(-1, keepdim=True) / qmax  # per token, symmetric
        return torch.round(x / s).clamp(-qmax - 1, qmax) * s
    if act.dtype == "fp8_e4m3":
        if act.kind == "static":
            s = act.scale.to(F64).reshape(())
            return to_e4m3(x / s) * s
        if act.granularity == "group":  # per token, per 128 input channels
            t, k = x.shape
            g = x.reshape(t, k // 128, 128)
            s = g.abs().amax(-1, keepdim=True) / 448.0
            return (to_e4m3(g / s) * s).reshape(t, k)
        s = x.abs().amax(-1, keepdim=True) / 448.0
        return to_e4m3(x / s) * s
    if act.dtype == "e2m1":  # NVFP4: global scale over the tensor, e4m3 scale per 16 channels
        t, k = x.shape
        gs = act.scale.to(F64).reshape(()) if act.scale is not None else x.abs().max() / (6.0 * 448.0)
        g = x.reshape(t, k // 16, 16)
        bs = to_e4m3(g.abs().amax(-1, keepdim=True) / 6.0 / gs)
        s = bs * gs
        return (round_e2m1(g / s) * s).reshape(t, k)
    raise AssertionError(act.dtype)


def reference_output(qt: QTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xd = x.to(F64).reshape(-1, x.shape[-1])
    if qt.pre_scale is not None:
        xd = xd * qt.pre_scale.to(F64)
    y = fake_quant_by_hand(xd, qt.act) @ dequantize_by_hand(qt).t()
    if bias is not None:
        y = y + bias.to(F64)
    return y.reshape(*x.shape[:-1], -1)


# ---- the cases -------------------------------------------------------------------------------------


def build(scheme: str, n: int = 192, k: int = 256, seed: int = 0, **spec_kw) -> tuple[QTensor, torch.Tensor]:
    """A QTensor from round-to-nearest of a random weight; activation scheme as the pipeline sets it."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    sch = SCHEMES[scheme]
    if "bits" in spec_kw:
        sch = replace(sch, weight_bits=spec_kw.pop("bits"))
    spec = WeightSpec.of(sch, **spec_kw)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] *= 8  # an outlier column, so groups and channels differ
    qt = quantize_weight(w, spec)
    x = torch.randn(3, 5, k, generator=g)
    x[..., 7] *= 20  # an outlier channel in the activations
    amax = x.abs().amax()
    if sch.act_kind == "dynamic":
        qt.act = ActQuant("dynamic", sch.act_dtype, sch.act_granularity, group_size=16 if sch.act_dtype == "e2m1" else 0)
    elif sch.act_kind == "static":
        qmax = 448.0 if sch.act_dtype == "fp8_e4m3" else 127.0
        qt.act = ActQuant("static", sch.act_dtype, "tensor", scale=(amax * 0.7 / qmax).reshape(1))  # clips the outliers
    return qt, x


def check(qt: QTensor, x: torch.Tensor, bias: torch.Tensor | None = None, rtol: float = 2e-5):
    mod = QuantLinear(qt, bias)
    with torch.no_grad():
        y = mod(x)
    ref = reference_output(qt, x, bias)
    assert y.shape == ref.shape
    err = (y.to(F64) - ref).norm() / ref.norm()
    assert err < rtol, f"relative error {err:.2e}"
    return y, ref


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_matches_float64_reference(scheme):
    qt, x = build(scheme)
    y, ref = check(qt, x)
    # the activation quantization really happened (the reference without it differs)
    if qt.act.kind != "none":
        plain = x.to(F64).reshape(-1, x.shape[-1]) @ dequantize_by_hand(qt).t()
        assert (plain.reshape(ref.shape) - ref).norm() / ref.norm() > 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_weight_only_int_variants(bits, group_size, sym):
    qt, x = build("w4a16", bits=bits, group_size=group_size, sym=sym)
    assert (qt.zeros is None) == sym
    check(qt, x)


def test_act_order_g_idx():
    """GPTQ desc_act: input channels visit the groups in a permuted order."""
    qt, x = build("w4a16", group_size=32)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    g_idx = (torch.arange(256) // 32)[perm].to(torch.int32)
    qt = qt.replace(g_idx=g_idx)
    assert qt.act_order
    check(qt, x)
    asym, _ = build("w4a16", group_size=32, sym=False)
    check(asym.replace(g_idx=g_idx), x)


def test_bias_pre_scale_and_unpacked_width():
    """AWQ pre_quant_scale, a bias, and in_features that is not a multiple of 32 (codes kept unpacked)."""
    qt, x = build("w4a16")
    g = torch.Generator().manual_seed(2)
    qt = qt.replace(pre_scale=torch.rand(256, generator=g) + 0.5)
    check(qt, x, bias=torch.randn(192, generator=g))
    for scheme in ("w8a8-int8", "fp8-dynamic", "w4a4"):
        qt, x = build(scheme, n=40, k=48)
        assert not QuantLinear(qt).packed or qt.dtype != "int"
        check(qt, x, bias=torch.randn(40, generator=g))


def test_static_int8_with_offset():
    """msModelSlim W8A8 static: asymmetric per-tensor activations with an integer input_offset."""
    qt, x = build("w8a8-int8-static")
    x = x + 0.8  # shifted activations, where a zero point pays
    lo, hi = float(x.min()), float(x.max())
    scale = torch.tensor([(hi - lo) / 255.0])
    offset = torch.tensor([float(round(-128 - lo / scale.item()))])
    qt.act = ActQuant("static", "int8", "tensor", scale=scale, offset=offset)
    y, ref = check(qt, x)
    sym = qt.replace(act=ActQuant("static", "int8", "tensor", scale=scale))
    y2, _ = check(sym, x)
    assert not torch.allclose(y, y2)  # the offset changes what is computed


def test_static_fp8_clips():
    qt, x = build("fp8")
    qt.act = ActQuant("static", "fp8_e4m3", "tensor", scale=(x.abs().amax() * 0.1 / 448.0).reshape(1))  # saturating
    check(qt, x)


def test_nvfp4_with_static_global_activation_scale():
    qt, x = build("nvfp4")
    qt.act = ActQuant("dynamic", "e2m1", "group", scale=(x.abs().amax() / (6.0 * 448.0)).reshape(()), group_size=16)
    check(qt, x)
    assert qt.global_scale is not None and qt.scales.dtype == torch.float8_e4m3fn


def test_reference_catches_a_wrong_scale():
    """The comparison can fail: one scale off by a factor of 2 is detected."""
    qt, x = build("w4a16")
    bad = qt.scales.clone()
    bad[3, 1] *= 2
    with pytest.raises(AssertionError):
        mod = QuantLinear(qt.replace(scales=bad))
        ref = reference_output(qt, x, None)
        err = (mod(x).to(F64) - ref).norm() / ref.norm()
        assert err < 2e-5
