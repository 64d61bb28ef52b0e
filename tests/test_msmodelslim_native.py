"""msModelSlim-style W8A8 from the native pipeline (no msModelSlim library in the loop): asymmetric
static per-tensor int8 activations from min/max, msModelSlim's averaged min/max or a percentile
(--act-observer, --act-asym), W8A8_DYNAMIC, W4A4_DYNAMIC and W4A8_DYNAMIC (w4a8-int8) for MoE experts.

References are independent: layer 0's q/k/v inputs recomputed by hand from the embedding table and
input_layernorm's weight (no hooks, no pipeline), msModelSlim 26.1's own observer and
linear_quantization_params on those inputs, torch.quantile, and a float64 integer-arithmetic layer
built from the exported msModelSlim tensors (x_q, weight, quant_bias, deq_scale)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibrate import data as cdata
from calibrate import models as cmodels
from calibrate import observers
from exporters import read_checkpoint
from exporters.io import TensorDir
from qtensor import numerics as nm
from quantize_cli import api
from runtime.qlinear import QuantLinear

N, L = 4, 32  # samples x seqlen (the built-in data adds BOS: 33 tokens a row)
QKV = ("q_proj", "k_proj", "v_proj")
ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from calibrate.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("msn") / "llama", dtype=torch.float32)


def _samples(src: Path) -> torch.Tensor:
    """The samples api.quantize draws for --samples N --seqlen L (default data, seed 0)."""
    return cdata.calibration_samples(cmodels.load_tokenizer(src), None, N, L, 0, "text")


def _qkv_input(src: Path) -> torch.Tensor:
    """Layer 0's q/k/v input [N, S, H] by hand: embedding rows through RMSNorm (float32, as LlamaRMSNorm)."""
    td = TensorDir(src)
    eps = json.loads((src / "config.json").read_text())["rms_norm_eps"]
    e = td["model.embed_tokens.weight"].float()[_samples(src)]
    var = e.pow(2).mean(-1, keepdim=True)
    return td["model.layers.0.input_layernorm.weight"].float() * (e * torch.rsqrt(var + eps))


def _quantize(src, out, scheme="w8a8-int8-static", method="rtn", fmt="msmodelslim", **kw):
    return api.quantize(str(src), scheme, method=method, format=fmt, out=out, samples=N, seqlen=L, force=True, **kw)


def _msmodelslim_qparams(lo, hi):
    """msModelSlim 26.1's own scale/offset function (the installed library; its compiled quant_funcs)."""
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.quant_funcs import linear_quantization_params

    s, o = linear_quantization_params(8, lo.reshape(()), hi.reshape(()), integral_zero_point=True, q_signed=True, sym=False)
    return s.float().reshape(1), o.float().reshape(1)


def _offset(act) -> float:
    return 0.0 if act.offset is None else float(act.offset)


# ---- 1. static asymmetric activations: scale and offset ---------------------------------------------


def test_asym_minmax_equals_recomputation(llama, tmp_path):
    x = _qkv_input(llama)
    _quantize(llama, tmp_path / "m", act_asym=True)
    ck = read_checkpoint(tmp_path / "m")
    lo, hi = x.min(), x.max()
    scale = (torch.maximum(hi, torch.tensor(0.0)) - torch.minimum(lo, torch.tensor(0.0))) / 255
    offset = torch.round(-lo / scale) - 128
    ms_s, ms_o = _msmodelslim_qparams(lo, hi)
    assert torch.equal(ms_s, scale.reshape(1)) and float(ms_o) == float(offset)  # the formula is msModelSlim's
    assert float(offset) != 0  # a real offset: the input is not symmetric around 0
    for p in QKV:
        a = ck.qtensors[f"model.layers.0.self_attn.{p}"].act
        assert (a.kind, a.dtype, a.granularity) == ("static", "int8", "tensor")
        assert torch.equal(a.scale, scale.reshape(1)), p
        assert _offset(a) == float(offset), p
    # every static layer got an offset-capable range; the symmetric default differs (scale amax/127)
    _quantize(llama, tmp_path / "s", fmt="qtool")
    sym = read_checkpoint(tmp_path / "s").qtensors["model.layers.0.self_attn.q_proj"].act
    assert sym.offset is None and torch.equal(sym.scale, (torch.maximum(-lo, hi) / 127).reshape(1))
    assert json.loads((tmp_path / "m" / "qtool.json").read_text())["activations"] == {"observer": "minmax", "asym": True}


def test_mean_minmax_is_msmodelslims_observer(llama, tmp_path):
    """msModelSlim's act_method=1 fed one sample per call (as its Calibrator does) gives the same range."""
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.quant_funcs import StatMinMaxObserver

    x = _qkv_input(llama)
    obs = StatMinMaxObserver(8, True, False)
    for i in range(x.shape[0]):
        obs.update(x[i : i + 1])
    lo, hi = obs.get_min_max("cpu")
    ms_s, ms_o = _msmodelslim_qparams(lo, hi)
    by_hand_lo = torch.stack([r.min() for r in x]).mean()
    assert torch.allclose(lo, by_hand_lo, rtol=1e-6, atol=0)
    _quantize(llama, tmp_path / "m", act_observer="mean-minmax", act_asym=True)
    for p in QKV:
        a = read_checkpoint(tmp_path / "m").qtensors[f"model.layers.0.self_attn.{p}"].act
        assert torch.allclose(a.scale, ms_s, rtol=1e-6, atol=0), p  # float64 vs float32 mean: within 1 ulp
        assert _offset(a) == float(ms_o), p
    # the averaged range is inside the global one
    mm = (x.max() - torch.minimum(x.min(), torch.tensor(0.0))) / 255
    assert float(ms_s) < float(mm)


@pytest.mark.parametrize("asym", [True, False])
def test_percentile_clips_and_equals_torch_quantile(llama, tmp_path, asym):
    """4 x 33 x 64 = 8448 values per linear fit the reservoir (2^18): the estimate is torch.quantile exactly."""
    x = _qkv_input(llama)
    assert x.numel() <= observers.RESERVOIR
    _quantize(llama, tmp_path / "p", fmt="qtool", act_observer="percentile:99", act_asym=asym)
    if asym:
        lo, hi = torch.quantile(x.reshape(-1), 0.01), torch.quantile(x.reshape(-1), 0.99)
        assert x.min() < lo < hi < x.max()  # clipped inside the min-max range
    else:
        hi = torch.quantile(x.abs().reshape(-1), 0.99)
        lo = -hi
        assert hi < x.abs().max()
    want_s, want_o = nm.int_act_qparams(lo, hi, 8, sym=not asym)
    full_s, _ = nm.int_act_qparams(x.min(), x.max(), 8, sym=not asym)
    for p in QKV:
        a = read_checkpoint(tmp_path / "p").qtensors[f"model.layers.0.self_attn.{p}"].act
        assert torch.equal(a.scale, want_s), p
        assert _offset(a) == (0.0 if want_o is None else float(want_o)), p
        assert float(a.scale) < float(full_s)


def test_reservoir_estimator_tolerance():
    """Beyond the reservoir the estimate is a uniform sample's quantile: within the stated rank tolerance
    4 * sqrt(q (1 - q) / cap) of torch.quantile on all data; two ranks' samples merge into one."""
    torch.manual_seed(0)
    data = torch.distributions.StudentT(3.0).sample((300_000,)) * 0.1  # heavy tails
    cap, q = 8192, 0.99
    d = 4 * math.sqrt(q * (1 - q) / cap)
    r = observers.Reservoir(cap, seed=0)
    for chunk in data.split(7000):
        r.add(chunk)
    assert r.count == data.numel() and r.values.numel() == cap
    est = r.quantile(q)
    assert torch.quantile(data, q - d) <= est <= torch.quantile(data, q + d)
    assert est != torch.quantile(data, q)  # a sample, not the data: the bound above is what is promised
    a, b = observers.Reservoir(cap, seed=1), observers.Reservoir(cap, seed=2)
    a.add(data[: data.numel() // 2])
    b.add(data[data.numel() // 2 :])
    a.merge([(a.values, a.keys, a.count), (b.values, b.keys, b.count)])
    assert a.count == data.numel() and a.values.numel() == cap
    assert torch.quantile(data, q - d) <= a.quantile(q) <= torch.quantile(data, q + d)
    small = observers.Reservoir(cap, seed=0)  # all fits: exact
    small.add(data[:5000])
    small.add(data[5000:8000])
    assert torch.equal(small.quantile(q), torch.quantile(data[:8000], q))


# ---- 2. runtime and export ---------------------------------------------------------------------------


def test_asym_static_runtime_equals_float64_integer_layer(llama, tmp_path):
    """QuantLinear (fake-quant in float32) equals msModelSlim's integer W8A8 computed in float64 from the
    exported tensors: x_q = clamp(round(x / input_scale) + input_offset), y = (x_q @ W^T + quant_bias) * deq_scale."""
    _quantize(llama, tmp_path / "m", method="smoothquant", act_asym=True, options={"alpha": 0.5})  # (a fixed alpha: most inputs keep an offset)
    ck = read_checkpoint(tmp_path / "m")
    T = {}
    for f in (tmp_path / "m").glob("quant_model_weights-*.safetensors"):
        T.update(load_file(str(f)))
    x = _qkv_input(llama)  # realistic inputs (the smoothing changed the layer's own, so its range clips some)
    x = torch.cat([x, x * 3.0])  # beyond the calibrated range: the clamp is exercised
    offset = [n for n, qt in ck.qtensors.items() if qt.act.offset is not None]
    assert len(offset) >= 5
    for name in offset:
        qt = ck.qtensors[name]
        k = qt.shape[1]
        xi = x[..., :k] if x.shape[-1] >= k else x.repeat(1, 1, math.ceil(k / x.shape[-1]))[..., :k]
        s, o = T[f"{name}.input_scale"].to(F64), T[f"{name}.input_offset"].to(F64)
        xq = torch.clamp(torch.round(xi.to(F64) / s) + o, -128, 127)
        assert bool((xq == 127).any() or (xq == -128).any())
        deq = T[f"{name}.deq_scale"]
        deq = (deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq).to(F64)
        acc = xq.reshape(-1, k) @ T[f"{name}.weight"].to(F64).t() + T[f"{name}.quant_bias"].to(F64)
        ref = (acc * deq).reshape(*xi.shape[:-1], -1)
        # the same layer as dequantized weight x fake-quantized activation, in float64
        ref2 = ((xq - o) * s).reshape(-1, k) @ qt.dequantize(F64).t()
        with torch.no_grad():
            y = QuantLinear(qt)(xi.float()).to(F64)
        assert ((y - ref).norm() / ref.norm()) < 1e-5, name
        assert ((ref2.reshape(ref.shape) - ref).norm() / ref.norm()) < 1e-6, name


@pytest.mark.parametrize("method", ["smoothquant", "gptq"])
def test_asym_export_read_back_bit_identical(llama, tmp_path, method):
    """The same run written as qtool (lossless) and as msModelSlim reads back identical; msModelSlim's
    derived tensors are those of its saver: deq_scale = input_scale * weight_scale, quant_bias =
    round(-input_offset * sum_k w); qtool export msmodelslim -> qtool is the identity too."""
    kw = dict(method=method, act_observer="percentile:99.9", act_asym=True, compute_dtype="float32")
    if method == "smoothquant":  # alpha 0.5 leaves lopsided ranges (offsets) on most layers of this tiny model
        kw["options"] = {"alpha": 0.5}
    _quantize(llama, tmp_path / "q", fmt="qtool", **kw)
    _quantize(llama, tmp_path / "m", **kw)
    q, m = read_checkpoint(tmp_path / "q"), read_checkpoint(tmp_path / "m")
    assert m.format == "msmodelslim" and set(q.qtensors) == set(m.qtensors) and len(q.qtensors) == 14
    assert all(m.qtensors[n].equal(qt) for n, qt in q.qtensors.items())
    assert sum(qt.act.offset is not None for qt in q.qtensors.values()) >= 7
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8"
    T = {}
    for f in (tmp_path / "m").glob("quant_model_weights-*.safetensors"):
        T.update(load_file(str(f)))
    for n, qt in q.qtensors.items():
        assert desc[f"{n}.input_offset"] == "W8A8"
        deq = T[f"{n}.deq_scale"]
        deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
        assert torch.equal(deq, (qt.act.scale * qt.scales.reshape(-1)).float())
        assert torch.equal(T[f"{n}.input_scale"], qt.act.scale) and float(T[f"{n}.input_offset"]) == _offset(qt.act)
        want_qb = torch.round(-qt.codes.float().sum(1) * _offset(qt.act)).to(torch.int32)  # no bias in a Llama
        assert torch.equal(T[f"{n}.quant_bias"], want_qb), n
    api.export(tmp_path / "m", "qtool", tmp_path / "back")
    back = read_checkpoint(tmp_path / "back")
    assert all(back.qtensors[n].equal(qt) for n, qt in q.qtensors.items())
    r = api.evaluate(tmp_path / "m", windows=2)
    assert r["kl_divergence"] < 0.05 and all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))


# ---- 3. W8A8_DYNAMIC, W4A4_DYNAMIC, W4A8_DYNAMIC (MoE experts) ----------------------------------------


def _tensors(d: Path) -> dict:
    T = {}
    for f in d.glob("quant_model_weights-*.safetensors"):
        T.update(load_file(str(f)))
    return T


@pytest.mark.parametrize("scheme,method,kind", [("w8a8-int8", "smoothquant", "W8A8_DYNAMIC"), ("w4a4", "rtn", "W4A4_DYNAMIC")])
def test_dynamic_layouts_end_to_end(llama, tmp_path, scheme, method, kind):
    _quantize(llama, tmp_path / "q", scheme=scheme, method=method, fmt="qtool")
    _quantize(llama, tmp_path / "m", scheme=scheme, method=method)
    q, m = read_checkpoint(tmp_path / "q"), read_checkpoint(tmp_path / "m")
    assert len(q.qtensors) == 14 and all(m.qtensors[n].equal(qt) for n, qt in q.qtensors.items())
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == kind
    T = _tensors(tmp_path / "m")
    bits = 8 if kind == "W8A8_DYNAMIC" else 4
    for n, qt in q.qtensors.items():
        assert {k for k in desc if k.startswith(n + ".")} == {f"{n}.weight", f"{n}.weight_scale", f"{n}.weight_offset"}
        assert all(desc[f"{n}.{s}"] == kind for s in ("weight", "weight_scale", "weight_offset"))
        w = T[f"{n}.weight"]
        assert w.dtype == torch.int8 and list(w.shape) == list(qt.shape)  # int4: one code per int8 byte
        assert int(w.min()) >= -(1 << (bits - 1)) and int(w.max()) < (1 << (bits - 1))
        assert T[f"{n}.weight_scale"].dtype == torch.float32 and list(T[f"{n}.weight_scale"].shape) == [qt.shape[0], 1]
        assert not T[f"{n}.weight_offset"].any()
        assert torch.equal(w.float() * T[f"{n}.weight_scale"], qt.dequantize())
        assert (qt.act.kind, qt.act.dtype, qt.act.granularity) == ("dynamic", "int8" if bits == 8 else "int4", "token")
    r = api.evaluate(tmp_path / "m", windows=2)
    assert all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))
    assert r["kl_divergence"] < (0.05 if bits == 8 else 2.0)


def test_moe_experts_w4a8_rest_w8a8_dynamic(tiny_models, tmp_path):
    """--rules maps the experts to w4a8-int8 (int4 weights, int8 per-token activations: msModelSlim's
    W4A8_DYNAMIC), the rest w8a8-int8: one mixed msModelSlim checkpoint, read back equal, evaluated."""
    src = tiny_models("qwen3_moe")
    rules = tmp_path / "rules.yaml"
    rules.write_text("- match: 'experts'\n  scheme: w4a8-int8\n")
    _quantize(src, tmp_path / "q", scheme="w8a8-int8", fmt="qtool", rules=rules)
    _quantize(src, tmp_path / "m", scheme="w8a8-int8", rules=rules)
    q, m = read_checkpoint(tmp_path / "q"), read_checkpoint(tmp_path / "m")
    assert set(q.qtensors) == set(m.qtensors) and all(m.qtensors[n].equal(qt) for n, qt in q.qtensors.items())
    experts = [n for n in q.qtensors if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and len(q.qtensors) == len(experts) + 2 * 4  # 2 layers x 4 experts x 3 + q/k/v/o
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"  # W4A8_DYNAMIC never names the model (msModelSlim)
    T = _tensors(tmp_path / "m")
    for n, qt in q.qtensors.items():
        if n in experts:
            assert desc[f"{n}.weight"] == "W4A8_DYNAMIC" and qt.bits == 4 and qt.act.dtype == "int8" and qt.act.kind == "dynamic"
            w = T[f"{n}.weight"]
            assert w.dtype == torch.int8 and list(w.shape) == [qt.shape[0] // 2, qt.shape[1]]  # two per byte along N
            lo = (w.view(torch.uint8) & 0xF).to(torch.int16)
            assert torch.equal(torch.where(lo > 7, lo - 16, lo), qt.codes[0::2].to(torch.int16))  # row 2i: low nibble
            sb = T[f"{n}.scale_bias"]
            deq = qt.dequantize()
            if n.endswith("down_proj"):
                want = 8 * deq.reshape(qt.shape[0], 16, -1).sum(-1)
            else:
                want = 8 * deq.sum(1, keepdim=True)
            assert torch.allclose(sb, want, rtol=1e-5, atol=1e-6), n
        else:
            assert desc[f"{n}.weight"] == "W8A8_DYNAMIC" and qt.bits == 8
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"
    r = api.evaluate(tmp_path / "m", windows=2)
    assert all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement")) and r["kl_divergence"] < 1.0
    # the runtime computes int4 x int8-per-token: an expert's output is its fake-quantized float64 product
    n = experts[0]
    qt = m.qtensors[n]
    x = torch.randn(5, qt.shape[1], generator=torch.Generator().manual_seed(0))
    s = x.to(F64).abs().amax(-1, keepdim=True) / 127
    ref = (torch.round(x.to(F64) / s).clamp(-128, 127) * s) @ qt.dequantize(F64).t()
    with torch.no_grad():
        y = QuantLinear(qt)(x).to(F64)
    assert (y - ref).norm() / ref.norm() < 1e-5


# ---- 4. data-parallel reduction and errors -----------------------------------------------------------


def test_two_processes_reduce_min_max(llama, tmp_path):
    """--nproc 2: global min/max reduce with MIN/MAX, per-sample sums and counts add, reservoirs merge:
    layer 0's q/k/v (inputs computed row-wise from the embeddings) get the one-process scale and offset."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outs = {}
    for obs in ("minmax", "mean-minmax", "percentile:99"):
        for nproc in (1, 2):
            out = tmp_path / f"{obs.replace(':', '')}-{nproc}"
            args = [sys.executable, "-m", "quantize_cli", "quantize", str(llama), "--scheme", "w8a8-int8-static", "--format", "qtool",
                    "--samples", str(N), "--seqlen", str(L), "--act-observer", obs, "--act-asym", "--out", str(out)]
            if nproc == 2:
                args += ["--nproc", "2"]
            r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            outs[obs, nproc] = read_checkpoint(out)
        one, two = outs[obs, 1], outs[obs, 2]
        for name, qa in one.qtensors.items():
            qb = two.qtensors[name]
            assert torch.equal(qa.codes, qb.codes), name
            if ".layers.0.self_attn." in name and name.rsplit(".", 1)[-1] in QKV:
                if obs == "mean-minmax":  # float64 sums in another order
                    assert torch.allclose(qa.act.scale, qb.act.scale, rtol=1e-6, atol=0) and _offset(qa.act) == _offset(qb.act), name
                else:
                    assert torch.equal(qa.act.scale, qb.act.scale) and _offset(qa.act) == _offset(qb.act), (obs, name)
            else:  # later layers see batches of another size: float summation order
                assert torch.allclose(qa.act.scale, qb.act.scale, rtol=1e-4, atol=0) and abs(_offset(qa.act) - _offset(qb.act)) <= 1, (obs, name)


def test_invalid_flag_combinations(cli, llama, tmp_path):
    def err(*args):
        r = cli("quantize", llama, "--out", tmp_path / "o", "--samples", N, "--seqlen", L, *args)
        lines = [l for l in r.err.splitlines() if l.strip()]
        assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.err
        assert not (tmp_path / "o").exists()
        return lines[0]

    assert "scheme w4a16 has no static activations" in err("--scheme", "w4a16", "--format", "qtool", "--act-asym")
    assert "scheme w8a8-int8 has no static activations" in err("--scheme", "w8a8-int8", "--format", "msmodelslim", "--act-observer", "percentile:99.9")
    assert "int8 only" in err("--scheme", "fp8", "--method", "fp8", "--format", "qtool", "--act-asym")
    assert "format compressed-tensors cannot store it" in err("--scheme", "w8a8-int8-static", "--format", "compressed-tensors", "--act-asym")
    assert "choose minmax, mean-minmax or percentile:P" in err("--scheme", "w8a8-int8-static", "--format", "qtool", "--act-observer", "absmax")
    assert "percentile must lie in [50, 100)" in err("--scheme", "w8a8-int8-static", "--format", "qtool", "--act-observer", "percentile:100")
    assert "needs a number" in err("--scheme", "w8a8-int8-static", "--format", "qtool", "--act-observer", "percentile:x")
    assert "not --backend msmodelslim" in err("--scheme", "w8a8-int8-static", "--format", "qtool", "--backend", "msmodelslim", "--act-asym")
    # fp8 static with a percentile observer is fine (symmetric): amax from the percentile
    r = cli("quantize", llama, "--scheme", "fp8", "--method", "fp8", "--format", "qtool", "--out", tmp_path / "f", "--samples", N, "--seqlen", L,
            "--act-observer", "percentile:99")
    assert r.code == 0, r.err
    a = read_checkpoint(tmp_path / "f").qtensors["model.layers.0.self_attn.q_proj"].act
    x = _qkv_input(llama)
    assert torch.equal(a.scale, (torch.quantile(x.abs().reshape(-1), 0.99) / nm.FP8_MAX).clamp(min=1e-12).reshape(1))
