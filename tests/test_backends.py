"""Library backends (ModelOpt, AutoRound, GPTQModel) on a tiny Llama: the conversion into QTensors is
checked against each library's own output (ModelOpt's export_hf_checkpoint, AutoRound's in-memory
quantize-dequantized weights, GPTQModel's own loader), then qtool writes the result in two formats and
evaluates it."""

import glob
import math
from pathlib import Path

import pytest
import torch

from calibrate import models as cmodels
from calibrate.backends import autoround as bar
from calibrate.backends import gptqmodel as bgq
from calibrate.backends import modelopt as bmo
from calibrate.backends.common import take_options, work_dir
from exporters import read_checkpoint
from qtensor import get_scheme
from qtensor import numerics as nm
from qtensor import packing as pk
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec
from quantize_cli import api


def _samples(n=4, L=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 500, (n, L), generator=g)


def _modelopt_dequant(T: dict, name: str) -> torch.Tensor:
    """What ModelOpt's exported tensors mean, decoded independently of qtool's QTensor."""
    w, ws, ws2 = T[f"{name}.weight"], T.get(f"{name}.weight_scale"), T.get(f"{name}.weight_scale_2")
    if w.dtype == torch.float8_e4m3fn:
        if ws.dtype == torch.uint8:  # MXFP8
            return w.float() * torch.exp2(ws.float() - 127).repeat_interleave(w.shape[1] // ws.shape[1], 1)
        return w.float() * ws.float()
    if w.dtype == torch.int8:  # INT8 SmoothQuant, per-channel
        return w.float() * ws.float().reshape(-1, 1)
    if ws.dtype == torch.float32:  # INT4 AWQ: two codes per byte along the output dimension
        lo, hi = (w & 0xF).to(torch.int16), (w >> 4).to(torch.int16)
        q = torch.stack([lo, hi], 1).reshape(-1, w.shape[1])
        q = torch.where(q > 7, q - 16, q).float()
        return q * ws.repeat_interleave(w.shape[1] // ws.shape[1], 1)
    v = nm.e2m1_values(pk.unpack_nibbles_uint8(w, dim=1))
    if ws.dtype == torch.uint8:  # MXFP4
        return v * torch.exp2(ws.float() - 127).repeat_interleave(v.shape[1] // ws.shape[1], 1)
    return v * ws.float().repeat_interleave(v.shape[1] // ws.shape[1], 1) * ws2.float()


@pytest.mark.parametrize("scheme", ["fp8", "nvfp4", "w4a16", "w4a8", "w8a8-int8", "mxfp8", "mxfp4"])
def test_modelopt_qtensors_equal_modelopt_export(tiny_models, tmp_path, scheme):
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors import safe_open

    sch = get_scheme(scheme)
    spec = WeightSpec.of(sch)
    model = cmodels.load_model(tiny_models("llama"), torch.float32, "cpu")
    model = bmo.calibrate(model, sch, spec, _samples(), take_options("modelopt", {}, bmo.ModelOptBackend.OPTIONS), "cpu")
    qts = bmo.read_qtensors(model)
    assert len(qts) == 14  # 7 linears x 2 layers; lm_head stays unquantized
    with bmo.quiet_stdout():
        export_hf_checkpoint(model, export_dir=str(tmp_path / "mo"))
    T = {}
    for f in glob.glob(str(tmp_path / "mo" / "*.safetensors")):
        with safe_open(f, "pt") as s:
            T.update({k: s.get_tensor(k) for k in s.keys()})
    n_pre = 0
    for name, qt in qts.items():
        assert torch.equal(qt.dequantize(), _modelopt_dequant(T, name)), name
        if f"{name}.input_scale" in T and scheme not in ("mxfp8", "mxfp4"):
            ref = T[f"{name}.input_scale"].float().reshape(1)
            assert torch.equal(qt.act.scale.reshape(1), ref), name
        ps = T.get(f"{name}.pre_quant_scale")
        assert (ps is None) == (qt.pre_scale is None), name
        if ps is not None:
            n_pre += 1
            assert torch.equal(ps.float(), qt.pre_scale), name
    assert (n_pre > 0) == (scheme in ("w4a16", "w4a8", "w8a8-int8"))
    # AWQ folds its smoothing into the norms: the tensors qtool keeps are the ones ModelOpt exports
    sd = model.state_dict()
    for k in T:
        if k.endswith("layernorm.weight"):
            assert torch.equal(sd[k].float(), T[k].float()), k


def _eval_ok(path: Path) -> dict:
    r = api.evaluate(path, windows=2)
    assert all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))
    return r


@pytest.mark.parametrize("scheme", ["fp8", "w4a16"])
def test_modelopt_backend_to_formats_and_eval(tiny_models, tmp_path, scheme):
    md = tiny_models("llama")
    api.quantize(str(md), scheme, format="qtool", out=tmp_path / "q", samples=4, seqlen=32, backend="modelopt")
    ck = read_checkpoint(tmp_path / "q")
    assert ck.meta["backend"] == "modelopt" and len(ck.qtensors) == 14
    _eval_ok(tmp_path / "q")
    # export later to ModelOpt's own format, read back identically
    api.export(tmp_path / "q", "modelopt", tmp_path / "m")
    back = read_checkpoint(tmp_path / "m")
    for n, qt in ck.qtensors.items():
        assert torch.equal(back.qtensors[n].dequantize(), qt.dequantize()), n
    _eval_ok(tmp_path / "m")
    if scheme == "w4a16":  # o_proj/down_proj keep ModelOpt's pre_quant_scale: GPTQ cannot hold it, and says so
        with pytest.raises(QtoolError, match="pre_quant_scale"):
            api.export(tmp_path / "q", "gptq", tmp_path / "g")


def test_autoround_conversion_equals_its_quantized_weights(tiny_models):
    spec = WeightSpec.of(get_scheme("w4a16"))
    opts = take_options("autoround", {"iters": 2}, bar.AutoRoundBackend.OPTIONS)
    opts.update(bits=4, group_size=128, sym=True)
    with work_dir("qtool-test-ar-") as d, bar.quiet_stdout():
        ar = bar.build_autoround(Path(tiny_models("llama")), _samples(), opts, "cpu")
        ar.quantize()
        qdq = {n: m.weight.detach().float().clone() for n, m in ar.model.named_modules() if hasattr(m, "scale") and hasattr(m, "weight")}
        amp = ar.model.dtype  # AutoRound's working precision: bf16 where the CPU has bf16 instructions, else fp32
        ar.save_quantized(str(d / "o"), format="auto_gptq")
        ck = bar.decode_saved(next((d / "o").rglob("config.json")).parent)
    assert set(qdq) == set(ck.qtensors) and len(qdq) == 14
    for n, qt in ck.qtensors.items():
        if amp == torch.bfloat16:  # its quantize-dequantized weights at bf16 precision: the same values
            assert torch.equal(qt.dequantize().bfloat16().float(), qdq[n]), n
        else:  # fp32 (a CPU without bf16, e.g. AMD EPYC): its fp32 scales saved as fp16, so within fp16 rounding
            # of the scale (2^-11 relative); a code off by one would be a whole step (>= 1/8 of the group's max) away
            assert amp == torch.float32
            torch.testing.assert_close(qt.dequantize(), qdq[n], rtol=2.0 ** -10, atol=0, msg=n)


def test_autoround_backend_to_formats_and_eval(tiny_models, tmp_path):
    md = tiny_models("llama")
    api.quantize(str(md), "w4a16", format="gptq", out=tmp_path / "g", samples=4, seqlen=32, backend="autoround", options={"iters": "0"})
    ck = read_checkpoint(tmp_path / "g")
    assert ck.meta["options"]["iters"] == 0 and len(ck.qtensors) == 14
    _eval_ok(tmp_path / "g")
    api.export(tmp_path / "g", "qtool", tmp_path / "q")
    back = read_checkpoint(tmp_path / "q")
    assert all(back.qtensors[n].equal(q) for n, q in ck.qtensors.items())
    api.export(tmp_path / "g", "auto-round", tmp_path / "a")  # AutoRound's own format
    back = read_checkpoint(tmp_path / "a")
    assert all(torch.equal(back.qtensors[n].dequantize(), q.dequantize()) for n, q in ck.qtensors.items())


def test_gptqmodel_conversion_equals_its_own_loader(tiny_models):
    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND

    spec = WeightSpec.of(get_scheme("w4a16"))
    opts = take_options("gptqmodel", {}, bgq.GPTQModelBackend.OPTIONS)
    with work_dir("qtool-test-gq-") as d, bgq.quiet_stdout():
        bgq.run_gptqmodel(Path(tiny_models("llama")), spec, _samples(), opts, "cpu", d / "o")
        ck = bgq.decode_saved(d / "o")
        lm = GPTQModel.load(str(d / "o"), device="cpu", backend=BACKEND.TORCH)
        assert len(ck.qtensors) == 14
        for n, qt in ck.qtensors.items():
            ref = lm.model.get_submodule(n).dequantize_weight().float().t()  # GPTQModel returns [K, N]
            a = qt.dequantize()
            # GPTQModel dequantizes in bf16 (two roundings); a wrong code would be off by a whole scale step
            assert torch.allclose(a, ref, rtol=2**-6, atol=0), n


def test_gptqmodel_backend_to_formats_and_eval(tiny_models, tmp_path):
    md = tiny_models("llama")
    api.quantize(str(md), "w4a16", format="gptq", out=tmp_path / "g", samples=4, seqlen=32, backend="gptqmodel")
    ck = read_checkpoint(tmp_path / "g")
    assert ck.meta["backend"] == "gptqmodel" and len(ck.qtensors) == 14
    _eval_ok(tmp_path / "g")
    api.export(tmp_path / "g", "qtool", tmp_path / "q")
    assert all(read_checkpoint(tmp_path / "q").qtensors[n].equal(q) for n, q in ck.qtensors.items())
    _eval_ok(tmp_path / "q")


def test_gptqmodel_awq_failure_on_gemma3_is_reported(tiny_models, tmp_path):
    """GPTQModel 7.7's AWQ breaks on Gemma 3 (its rotary embedding call): a clear error, nothing written."""
    with pytest.raises(QtoolError, match=r"gptqmodel \S+ failed to run awq on this gemma3_text model"):
        api.quantize(str(tiny_models("gemma3")), "w4a16", format="qtool", out=tmp_path / "x", samples=4, seqlen=32,
                     backend="gptqmodel", options={"method": "awq"})
    assert not (tmp_path / "x").exists()


def test_backend_errors(cli, tiny_models, tmp_path):
    with pytest.raises(QtoolError, match="does not support the no_such_arch architecture"):
        bgq.check_architecture({"model_type": "no_such_arch"})
    md = tiny_models("llama")
    r = cli("quantize", md, "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "o", "--backend", "autoround", "--option", "itres=3")
    assert r.code == 2 and "does not take option(s) itres" in r.err
    r = cli("quantize", md, "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "o", "--backend", "autoround", "--option", "iters")
    assert r.code == 2 and "KEY=VALUE" in r.err
    r = cli("quantize", md, "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "o", "--option", "iters=0")
    assert r.code == 2 and "not an option of method rtn" in r.err and "--backend" in r.err
    r = cli("quantize", md, "--scheme", "w4a16", "--method", "awq", "--format", "qtool", "--out", tmp_path / "o", "--option", "n_grid=many")
    assert r.code == 2 and "n_grid=many: expected int" in r.err
    r = cli("quantize", md, "--scheme", "w8a16", "--format", "qtool", "--out", tmp_path / "o", "--backend", "modelopt")
    assert r.code == 2 and "backend modelopt with scheme w8a16" in r.err
    assert not (tmp_path / "o").exists()
