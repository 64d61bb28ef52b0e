"""FP8 KV cache (--kv-cache fp8): calibrated scales, formats, runtime arithmetic, refusals, eval."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from calibrate import data as cdata
from calibrate import models as cmodels
from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec
from quantize_cli import api

from .helpers import make_checkpoint

SAMPLES, SEQLEN = 4, 64


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x, cos, sin):
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _fp8_roundtrip(x, s):
    """Reference fp8 e4m3 store/load of a KV-cache tensor, in float64: saturate to +-448, round to e4m3."""
    return (x / s).clamp(-448, 448).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64) * s


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def kv_ckpt(llama, tmp_path_factory):
    """w8a16 RTN with calibrated FP8 KV-cache scales, written as qtool (lossless)."""
    out = tmp_path_factory.mktemp("kv") / "q"
    api.quantize(str(llama), "w8a16", "rtn", "qtool", out, samples=SAMPLES, seqlen=SEQLEN, kv_cache="fp8",
                 compute_dtype="float32")  # exact fp32 forwards: compared with a float64 recomputation below
    return out


def _dense_model(ckpt_dir):
    """The checkpoint's dequantized model without KV quantization (the reference's weights)."""
    from runtime.loader import model_from_checkpoint

    ckpt = read_checkpoint(ckpt_dir)
    ckpt.kv_scales, ckpt.kv_cache_dtype = {}, None
    return model_from_checkpoint(ckpt).double(), read_checkpoint(ckpt_dir)


def test_scales_equal_independent_amax(llama, kv_ckpt):
    """k_scale / v_scale = amax/448 of keys after RoPE and values after v_proj, recomputed by hand: a
    float64 forward of the dequantized model over the same calibration samples, with the keys built from
    the layer input (input_layernorm -> k_proj -> heads -> rotary) outside any attention code."""
    meta = json.loads((kv_ckpt / "qtool.json").read_text())
    assert meta["kv_cache"] == {"dtype": "fp8_e4m3", "modules": 2}
    ckpt, ka, va = _kv_amax(kv_ckpt, llama, "llama", SAMPLES)
    amax = {i: (k, v) for i, (k, v) in enumerate(zip(ka, va))}
    assert set(ckpt.kv_scales) == {f"model.layers.{i}.self_attn" for i in amax}
    for i, (ak, av) in amax.items():
        ks, vs = ckpt.kv_scales[f"model.layers.{i}.self_attn"]
        assert ks.dtype == vs.dtype == torch.float32 and ks.dim() == 0
        assert float(ks) == pytest.approx(ak / 448, rel=1e-5)
        assert float(vs) == pytest.approx(av / 448, rel=1e-5)


def test_keys_before_rope_differ(llama, kv_ckpt):
    """Guard for the test above: the pre-RoPE key amax is not what was recorded (so RoPE placement is checked)."""
    model, ckpt = _dense_model(kv_ckpt)
    tok = cmodels.load_tokenizer(llama)
    ids = cdata.calibration_samples(tok, None, SAMPLES, SEQLEN, 0, "text")
    layer = model.model.layers[0]
    pre = 0.0
    with torch.no_grad():
        for row in ids:
            out = model(input_ids=row[None], output_hidden_states=True, use_cache=False)
            pre = max(pre, float(layer.self_attn.k_proj(layer.input_layernorm(out.hidden_states[0])).abs().max()))
    # RoPE rotates pairs, so the two maxima are close; they differ well beyond the 1e-5 the test above allows
    assert float(ckpt.kv_scales["model.layers.0.self_attn"][0]) != pytest.approx(pre / 448, rel=1e-4)


def test_runtime_attention_matches_float64(kv_ckpt):
    """One attention module of the loaded checkpoint against float64: dequantized weights, RoPE, K and V
    through fp8 e4m3 with the checkpoint's scales, GQA, causal softmax attention, o_proj."""
    from runtime.loader import load_quantized

    model, ckpt = load_quantized(kv_ckpt)
    attn = model.model.layers[1].self_attn
    got = {}

    def grab(m, args, kwargs, out):
        got["h"], got["kw"], got["out"] = (args[0] if args else kwargs["hidden_states"]), kwargs, out[0]

    hk = attn.register_forward_hook(grab, with_kwargs=True)
    ids = torch.randint(4, 500, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hk.remove()
    cfg = model.config
    nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    W = {n: ckpt.qtensors[f"model.layers.1.self_attn.{n}"].dequantize().double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    h = got["h"].double()[0]
    S = h.shape[0]
    cos, sin = (t.double()[0] for t in got["kw"]["position_embeddings"])
    q = (h @ W["q_proj"].T).view(S, nh, hd).transpose(0, 1)
    k = (h @ W["k_proj"].T).view(S, kvh, hd).transpose(0, 1)
    v = (h @ W["v_proj"].T).view(S, kvh, hd).transpose(0, 1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    ks, vs = (float(t) for t in ckpt.kv_scales["model.layers.1.self_attn"])

    def attend(k, v):
        rep = nh // kvh
        kk, vv = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = q @ kk.transpose(1, 2) / hd**0.5
        s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
        o = (s.softmax(-1) @ vv).transpose(0, 1).reshape(S, nh * hd)
        return o @ W["o_proj"].T

    ref = attend(_fp8_roundtrip(k, ks), _fp8_roundtrip(v, vs))
    plain = attend(k, v)
    out = got["out"].double()[0]
    err, kv_effect = (out - ref).abs().max(), (plain - ref).abs().max()
    assert err < 1e-4 * ref.abs().max()
    assert kv_effect > 100 * err  # the fp8 KV cache visibly changes the output; the runtime follows it


def _fp8_ckpt(llama):
    """An FP8 static checkpoint (per-tensor weights and input scales) with KV-cache scales."""
    ckpt = make_checkpoint(llama, WeightSpec.of(get_scheme("fp8")))
    from qtensor import ActQuant

    for n, qt in ckpt.qtensors.items():  # one input scale for all: fused shards must share it
        ckpt.qtensors[n] = qt.replace(act=ActQuant("static", "fp8_e4m3", "tensor", scale=torch.tensor([0.02])))
    g = torch.Generator().manual_seed(5)
    ckpt.kv_scales = {f"model.layers.{i}.self_attn": tuple(torch.rand((), generator=g) * 0.05 + 0.001 for _ in range(2)) for i in range(2)}
    ckpt.kv_cache_dtype = "fp8_e4m3"
    return ckpt


NAMES = {
    "compressed-tensors": ("model.layers.{i}.self_attn.k_scale", "model.layers.{i}.self_attn.v_scale", [1]),
    "modelopt": ("model.layers.{i}.self_attn.k_proj.k_scale", "model.layers.{i}.self_attn.v_proj.v_scale", []),
    "qtool": ("model.layers.{i}.self_attn.k_scale", "model.layers.{i}.self_attn.v_scale", []),
}


@pytest.mark.parametrize("fmt", list(NAMES))
def test_round_trip(llama, tmp_path, fmt):
    ckpt = _fp8_ckpt(llama)
    d = write_checkpoint(ckpt, fmt, tmp_path / fmt)
    td = TensorDir(d)
    kn, vn, shape = NAMES[fmt]
    for i in range(2):
        ks, vs = ckpt.kv_scales[f"model.layers.{i}.self_attn"]
        for name, want in ((kn.format(i=i), ks), (vn.format(i=i), vs)):
            assert td[name].dtype == torch.float32 and td.shape(name) == shape
            assert torch.equal(td[name].reshape(()), want)
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert cfg["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}
    elif fmt == "modelopt":
        assert json.loads((d / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
        assert cfg["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    else:
        assert cfg["kv_cache"] == {"dtype": "fp8_e4m3"}
    assert json.loads((d / "qtool.json").read_text())["kv_cache"] == {"dtype": "fp8_e4m3", "modules": 2}
    back = read_checkpoint(d)
    assert back.kv_cache_dtype == "fp8_e4m3" and set(back.kv_scales) == set(ckpt.kv_scales)
    for n, (k, v) in ckpt.kv_scales.items():
        assert torch.equal(back.kv_scales[n][0], k) and torch.equal(back.kv_scales[n][1], v)
    assert not any(k.endswith(("k_scale", "v_scale")) for k in back.tensors)
    # and on to the other formats, scales unchanged
    for other in NAMES:
        again = read_checkpoint(write_checkpoint(back, other, tmp_path / f"{fmt}-{other}"))
        assert {n: (float(k), float(v)) for n, (k, v) in again.kv_scales.items()} == {n: (float(k), float(v)) for n, (k, v) in ckpt.kv_scales.items()}


def test_compressed_tensors_reads_model_dtype_scales(llama, tmp_path):
    """LLM Compressor stores k_scale/v_scale in the model dtype ([1] bf16): read as float32 values."""
    from safetensors.torch import load_file, save_file

    d = write_checkpoint(_fp8_ckpt(llama), "compressed-tensors", tmp_path / "c")
    f = next(d.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.0.self_attn.k_scale"] = torch.tensor([0.0125], dtype=torch.bfloat16)
    save_file(t, f, metadata={"format": "pt"})
    back = read_checkpoint(d)
    assert back.kv_scales["model.layers.0.self_attn"][0].dtype == torch.float32
    assert float(back.kv_scales["model.layers.0.self_attn"][0]) == float(torch.tensor(0.0125, dtype=torch.bfloat16))


def test_kv_scales_malformed(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = write_checkpoint(_fp8_ckpt(llama), "compressed-tensors", tmp_path / "c")
    f = next(d.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.1.self_attn.v_scale"] = torch.tensor([-1.0])
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(QtoolError, match="model.layers.1.self_attn.v_scale"):
        read_checkpoint(d)
    del t["model.layers.1.self_attn.v_scale"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(QtoolError, match="missing tensor model.layers.1.self_attn.v_scale"):
        read_checkpoint(d)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "auto-round", "gguf", "msmodelslim", "fp8", "w8a8-int8"])
def test_formats_without_kv_cache_refuse(llama, tmp_path, fmt):
    ckpt = make_checkpoint(llama, WeightSpec.of(get_scheme("w4a16"), 128))  # refused before any module is looked at
    ckpt.kv_scales, ckpt.kv_cache_dtype = {"model.layers.0.self_attn": (torch.tensor(0.01), torch.tensor(0.01))}, "fp8_e4m3"
    with pytest.raises(QtoolError, match=f"format {fmt} has no fp8_e4m3 KV-cache scales") as e:
        write_checkpoint(ckpt, fmt, tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_cli_refuses_before_work(llama, tmp_path, cli):
    r = cli("quantize", llama, "--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--kv-cache", "fp8", "--out", tmp_path / "o")
    assert r.code == 2 and "format gptq has no fp8_e4m3 KV-cache scales" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("quantize", llama, "--scheme", "fp8", "--method", "fp8", "--format", "qtool", "--kv-cache", "int8", "--out", tmp_path / "o")
    assert r.code == 2 and "unknown --kv-cache 'int8'" in r.err
    r = cli("quantize", llama, "--scheme", "fp8", "--backend", "modelopt", "--format", "qtool", "--kv-cache", "fp8", "--out", tmp_path / "o")
    assert r.code == 2 and "native backend" in r.err
    assert not (tmp_path / "o").exists()


def test_modelopt_real_export_scales(tmp_path_factory):
    """nvidia-modelopt 0.47 on CPU: FP8 + FP8 KV cache, export_hf_checkpoint. qtool reads the scales it
    wrote, and qtool's own recorder on the same float model and batches measures the same K/V amax
    (ModelOpt also quantizes K/V at the attention interface: keys after RoPE)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from calibrate import kvcache
    from calibrate.tiny import make_tiny_model

    src = make_tiny_model("llama", tmp_path_factory.mktemp("l32"), dtype=torch.float32)
    calib = [torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    kvcache.wrap_attention(ref)
    with torch.no_grad(), kvcache.Recorder() as rec:
        for x in calib:
            ref(x)
    ours = rec.named(ref.model, "model")

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = cfg["quant_cfg"] + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])

    def loop(m):
        for x in calib:
            m(x)

    model = mtq.quantize(model, cfg, loop)
    d = tmp_path_factory.mktemp("mo") / "export"
    export_hf_checkpoint(model, export_dir=d)
    ckpt = read_checkpoint(d)
    td = TensorDir(d)
    assert ckpt.format == "modelopt" and ckpt.kv_cache_dtype == "fp8_e4m3"
    assert set(ckpt.kv_scales) == set(ours) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for n, (k, v) in ckpt.kv_scales.items():
        assert torch.equal(k, td[f"{n}.k_proj.k_scale"].float().reshape(()))
        assert torch.equal(v, td[f"{n}.v_proj.v_scale"].float().reshape(()))
        mod = model.get_submodule(n)
        assert float(k) == pytest.approx(float(mod.k_bmm_quantizer.amax) / 448, rel=1e-6)
        assert float(k) == pytest.approx(float(ours[n][0]) / 448, rel=1e-5)
        assert float(v) == pytest.approx(float(ours[n][1]) / 448, rel=1e-5)
    # qtool's modelopt writer gives ModelOpt's KV tensors and config back unchanged
    out = write_checkpoint(ckpt, "modelopt", tmp_path_factory.mktemp("mo2") / "m")
    for n in ckpt.kv_scales:
        for key in (f"{n}.k_proj.k_scale", f"{n}.v_proj.v_scale"):
            b = TensorDir(out)[key]
            assert b.dtype == td[key].dtype and b.shape == td[key].shape and torch.equal(b, td[key])
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == \
        json.loads((d / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"


def test_eval_kv_fp8_close_but_different(llama, tmp_path):
    """qtool eval of the same w8a16 checkpoint with and without the FP8 KV cache: close, not equal."""
    api.quantize(str(llama), "w8a16", "rtn", "qtool", tmp_path / "plain", samples=SAMPLES, seqlen=SEQLEN)
    api.quantize(str(llama), "w8a16", "rtn", "compressed-tensors", tmp_path / "kv", samples=SAMPLES, seqlen=SEQLEN, kv_cache="fp8")
    a = api.evaluate(tmp_path / "plain", windows=4)
    b = api.evaluate(tmp_path / "kv", windows=4)
    assert a["perplexity"] != b["perplexity"] and b["kl_divergence"] > a["kl_divergence"]
    assert abs(b["perplexity"] / a["perplexity"] - 1) < 0.05 and b["top1_agreement"] > 0.7
    meta = json.loads((tmp_path / "kv" / "qtool.json").read_text())
    assert meta["kv_cache"]["dtype"] == "fp8_e4m3" and "eval" in meta


def _kv_amax(ckpt_dir, model_dir, arch, samples=2):
    """Per layer amax |K| and |V| recomputed in float64 from the dequantized checkpoint over the calibration
    samples, outside any attention code: keys from the layer input (input_layernorm -> k_proj -> heads ->
    k_norm where the model has one -> RoPE), values after v_proj."""
    model, ckpt = _dense_model(ckpt_dir)
    n = model.config.num_hidden_layers
    tok = cmodels.load_tokenizer(model_dir)
    ids = cdata.calibration_samples(tok, None, samples, SEQLEN, 0, "text")
    cfg = model.config
    kvh = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ka, va = [0.0] * n, [0.0] * n
    with torch.no_grad():
        for row in ids:
            out = model(input_ids=row[None], output_hidden_states=True, use_cache=False)
            pos = torch.arange(row.numel())[None]
            for i, layer in enumerate(model.model.layers):
                h = layer.input_layernorm(out.hidden_states[i])
                k = layer.self_attn.k_proj(h).view(1, -1, kvh, hd)
                if getattr(layer.self_attn, "k_norm", None) is not None:
                    k = layer.self_attn.k_norm(k)
                v = layer.self_attn.v_proj(h)
                lt = cfg.layer_types[i] if arch == "gemma3" else None
                cos, sin = model.model.rotary_emb(h, pos, lt) if lt else model.model.rotary_emb(h, pos)
                ka[i] = max(ka[i], float(_rope(k.transpose(1, 2), cos.double(), sin.double()).abs().max()))
                va[i] = max(va[i], float(v.abs().max()))
    return ckpt, ka, va


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe"])
def test_other_architectures(tiny_models, tmp_path, arch):
    """Gemma 3 (k_norm before RoPE, sliding layers) and Qwen3-MoE (k_norm): one scale pair per attention
    module, equal to the float64 recomputation of keys after k_norm and RoPE; the runtime loads and runs."""
    d = tiny_models(arch)
    api.quantize(str(d), "w8a16", "rtn", "qtool", tmp_path / "w", samples=2, seqlen=SEQLEN, kv_cache="fp8", compute_dtype="float32")
    ckpt, amax, _ = _kv_amax(tmp_path / "w", d, arch)
    assert set(ckpt.kv_scales) == {f"model.layers.{i}.self_attn" for i in range(len(amax))}
    for i, a in enumerate(amax):
        assert float(ckpt.kv_scales[f"model.layers.{i}.self_attn"][0]) == pytest.approx(a / 448, rel=1e-5)
    # static FP8 activations: k_proj sees its fp8-quantized input when K is recorded (layer 0 has the
    # engine's exact input; later layers get the pipeline's hidden states, computed without activation
    # quantization)
    out = tmp_path / "m"
    api.quantize(str(d), "fp8", "fp8", "modelopt", out, samples=2, seqlen=SEQLEN, kv_cache="fp8", compute_dtype="float32")
    ckpt, amax, _ = _kv_amax(out, d, arch)
    assert float(ckpt.kv_scales["model.layers.0.self_attn"][0]) == pytest.approx(amax[0] / 448, rel=1e-5)
    assert api.evaluate(out, windows=1, no_reference=True)["perplexity"] > 1
    assert api.inspect(out)["kv_cache"]["attention_modules"] == len(amax)
