"""ModelOpt format: round trips, refusals, and checks against nvidia-modelopt 0.47 itself on CPU."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from exporters import FORMATS, read_checkpoint, write_checkpoint
from exporters.fused import fused_groups
from exporters.io import TensorDir
from qtensor import ActQuant, get_scheme
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def same_tensor(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def with_acts(ckpt, scheme):
    """Give the RTN checkpoint what a calibrated one has: static input scales (shared per fused group)
    and, for NVFP4, global weight scales shared by fused shards (re-quantized from the source weights)."""
    td = TensorDir(ckpt.source_dir)
    g = torch.Generator().manual_seed(1)
    shared = {}
    for group in fused_groups(ckpt.qtensors):
        for n in group:
            shared[n] = group
    qts = {}
    for name, qt in ckpt.qtensors.items():
        group = shared.get(name, [name])
        amax = torch.rand((), generator=g) * 4 + 1 if group[0] == name or group[0] not in qts else None
        if scheme == "fp8":
            scale = qts[group[0]].act.scale.clone() if amax is None else (amax / 448).reshape(1)
            qts[name] = qt.replace(act=ActQuant("static", "fp8_e4m3", "tensor", scale=scale))
        elif scheme == "nvfp4":
            w = td[f"{name}.weight"].float()
            wamax = max(td[f"{n}.weight"].float().abs().amax() for n in group)
            bs, gs = nm.nvfp4_qparams(w, 16, wamax)
            scale = qts[group[0]].act.scale.clone() if amax is None else (amax / (6 * 448)).reshape(1)
            qts[name] = qt.replace(codes=nm.nvfp4_quantize(w, bs, gs, 16), scales=bs, global_scale=gs,
                                   act=ActQuant("dynamic", "e2m1", "group", scale=scale, group_size=16))
        else:
            qts[name] = qt
    return replace(ckpt, qtensors=qts)


def make(arch_dir, scheme):
    if scheme == "w8a8-int8":  # INT8 SmoothQuant as ModelOpt exports it: static per-tensor int8 inputs and a
        # pre_quant_scale (model dtype) on every layer, both shared by fused shards
        ckpt = make_checkpoint(arch_dir, WeightSpec.of(get_scheme("w8a8-int8")))
        g = torch.Generator().manual_seed(3)
        qts = {}
        for group in fused_groups(ckpt.qtensors) + [[n] for n in ckpt.qtensors]:
            if group[0] in qts:
                continue
            k = ckpt.qtensors[group[0]].shape[1]
            scale = (torch.rand((), generator=g) * 4 + 1).reshape(1) / 127
            pre = (torch.rand(k, generator=g) + 0.5).to(ckpt.weight_dtype)
            for n in group:
                qts[n] = ckpt.qtensors[n].replace(act=ActQuant("static", "int8", "tensor", scale=scale.clone()), pre_scale=pre.clone())
        return replace(ckpt, qtensors=qts)
    if scheme == "w4a8":  # W4A8_AWQ: int4 + fp8 second level (shared by fused shards) + static fp8 inputs
        ckpt = make(arch_dir, "w4a16")
        fp8 = with_acts(ckpt, "fp8")
        qts = {}
        for group in fused_groups(ckpt.qtensors) + [[n] for n in ckpt.qtensors]:
            if group[0] in qts:
                continue
            gs = max(float(ckpt.qtensors[n].dequantize().abs().amax()) for n in group) / 448
            for n in group:
                qts[n] = ckpt.qtensors[n].replace(global_scale=torch.tensor(gs, dtype=torch.float32), act=fp8.qtensors[n].act)
        return replace(ckpt, qtensors=qts)
    if scheme == "w4a16":
        spec = replace(WeightSpec.of(get_scheme("w4a16"), 128), scale_dtype=torch.float32)
        ckpt = make_checkpoint(arch_dir, spec)
        g = torch.Generator().manual_seed(2)
        for name, qt in ckpt.qtensors.items():  # AWQ leaves pre_quant_scale (model dtype) on o_proj / down_proj only
            if name.endswith(("o_proj", "down_proj")):
                ckpt.qtensors[name] = qt.replace(pre_scale=(torch.rand(qt.shape[1], generator=g) + 0.5).to(ckpt.weight_dtype))
        return ckpt
    return with_acts(make_checkpoint(arch_dir, WeightSpec.of(get_scheme(scheme))), scheme)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["fp8", "nvfp4", "w4a16", "w4a8", "w8a8-int8"])
def test_modelopt_roundtrip_bit_identical(tiny_models, tmp_path, arch, scheme):
    ckpt = make(tiny_models(arch), scheme)
    write_checkpoint(ckpt, "modelopt", tmp_path / "m")
    back = read_checkpoint(tmp_path / "m")
    assert back.format == "modelopt" and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        b = back.qtensors[name]
        assert b.equal(qt), name
        assert torch.equal(b.dequantize(), qt.dequantize()), name
    hf = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())
    algo = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16": "W4A16_AWQ", "w4a8": "W4A8_AWQ", "w8a8-int8": "W8A8_SQ_PER_CHANNEL"}[scheme]
    assert hf["producer"]["name"] == "modelopt" and hf["quantization"]["quant_algo"] == algo
    assert "lm_head" in hf["quantization"]["exclude_modules"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    # the flattened config.json block is exactly what ModelOpt derives from hf_quant_config
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    assert cfg["quantization_config"] == convert_hf_quant_config_format(hf)


def test_modelopt_int4_layout(tiny_models, tmp_path):
    """INT4_AWQ packs two signed nibbles along the OUTPUT dim, exactly like ModelOpt's pack_int4_in_uint8."""
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    ckpt = make(tiny_models("llama"), "w4a16")
    write_checkpoint(ckpt, "modelopt", tmp_path / "m")
    td = TensorDir(tmp_path / "m")
    name = "model.layers.0.mlp.down_proj"
    qt = ckpt.qtensors[name]
    ref = pack_int4_in_uint8(qt.dequantize(), qt.scales, 128)
    assert td.shape(f"{name}.weight") == [qt.shape[0] // 2, qt.shape[1]]
    assert torch.equal(td[f"{name}.weight"], ref)


def test_modelopt_mixed_precision(tiny_models, tmp_path):
    fp8 = make(tiny_models("llama"), "fp8")
    int4 = make(tiny_models("llama"), "w4a16")
    mixed = replace(fp8, qtensors={n: (int4.qtensors[n] if ".mlp." in n else q) for n, q in fp8.qtensors.items()})
    write_checkpoint(mixed, "modelopt", tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert hf["quantization"]["quantized_layers"]["model.layers.0.mlp.up_proj"]["quant_algo"] == "W4A16_AWQ"
    back = read_checkpoint(tmp_path / "m")
    for name, qt in mixed.qtensors.items():
        assert back.qtensors[name].equal(qt), name


def test_modelopt_mixed_fp8_int8_sq(tiny_models, tmp_path):
    """FP8 attention + INT8 SmoothQuant MLP: MIXED_PRECISION, config.json exactly as ModelOpt derives it."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    fp8 = make(tiny_models("llama"), "fp8")
    int8 = make(tiny_models("llama"), "w8a8-int8")
    mixed = replace(fp8, qtensors={n: (int8.qtensors[n] if ".mlp." in n else q) for n, q in fp8.qtensors.items()})
    write_checkpoint(mixed, "modelopt", tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quantized_layers"]["model.layers.0.mlp.down_proj"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert cfg == convert_hf_quant_config_format(hf)
    back = read_checkpoint(tmp_path / "m")
    assert all(back.qtensors[n].equal(qt) for n, qt in mixed.qtensors.items())


@pytest.mark.parametrize("scheme,match", [
    ("fp8-block", "per-tensor"), ("mxfp4", "NVFP4"), ("w8a8-int8", "int8 weight-only"), ("fp8-dynamic", "per-tensor"),
    ("w8a16", "per output channel"),
])
def test_modelopt_refuses(tiny_models, tmp_path, scheme, match):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme(scheme)))
    with pytest.raises(QtoolError, match=match):
        write_checkpoint(ckpt, "modelopt", tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_modelopt_refuses_unfused_scales(tiny_models, tmp_path):
    # fp8 without activation scales: ModelOpt FP8 needs input_scale
    raw = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("fp8")))
    with pytest.raises(QtoolError, match="input_scale"):
        write_checkpoint(raw, "modelopt", tmp_path / "m")
    # asymmetric int4
    asym = make_checkpoint(tiny_models("llama"), replace(WeightSpec.of(get_scheme("w4a16"), 128, sym=False), scale_dtype=torch.float32))
    with pytest.raises(QtoolError, match="asymmetric"):
        write_checkpoint(asym, "modelopt", tmp_path / "m")
    # fp16 scales are not float32: exact conversion impossible without --requantize
    with pytest.raises(QtoolError, match="float32"):
        write_checkpoint(make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("w4a16"))), "modelopt", tmp_path / "m")
    # NVFP4 q/k/v with their own global scales: the engine keeps one weight_scale_2 per fused tensor
    ok = make(tiny_models("llama"), "nvfp4")
    qts = dict(ok.qtensors)
    k = "model.layers.0.self_attn.k_proj"
    qts[k] = qts[k].replace(global_scale=qts[k].global_scale * 2)
    with pytest.raises(QtoolError, match="weight_scale_2"):
        write_checkpoint(replace(ok, qtensors=qts), "modelopt", tmp_path / "m")
    # FP8 gate/up with different input scales
    ok = make(tiny_models("llama"), "fp8")
    qts = dict(ok.qtensors)
    u = "model.layers.1.mlp.up_proj"
    qts[u] = qts[u].replace(act=replace(qts[u].act, scale=qts[u].act.scale * 2))
    with pytest.raises(QtoolError, match="input_scale"):
        write_checkpoint(replace(ok, qtensors=qts), "modelopt", tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_modelopt_malformed(tiny_models, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    # a config that contradicts the tensors: NVFP4 declared over FP8 tensors
    write_checkpoint(make(tiny_models("llama"), "fp8"), "modelopt", tmp_path / "c")
    hf = json.loads((tmp_path / "c" / "hf_quant_config.json").read_text())
    hf["quantization"].update(quant_algo="NVFP4", group_size=16)
    (tmp_path / "c" / "hf_quant_config.json").write_text(json.dumps(hf))
    r = cli("inspect", tmp_path / "c")
    assert r.code == 2 and "quant_algo 'NVFP4'" in r.err and "'FP8'" in r.err and len(r.err.strip().splitlines()) == 1
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "NVFP4"  # config_groups still say FP8's 8 bits
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    r = cli("inspect", tmp_path / "c")
    assert r.code == 2 and "config_groups.group_0" in r.err and "num_bits is 8" in r.err
    from exporters.modelopt import config_block

    cfg["quantization_config"] = config_block(hf)  # both files fully agree now, the tensors do not
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    r = cli("inspect", tmp_path / "c")
    assert r.code == 2 and "model.layers." in r.err and ".weight" in r.err and len(r.err.strip().splitlines()) == 1
    write_checkpoint(make(tiny_models("llama"), "nvfp4"), "modelopt", tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.self_attn.q_proj"
    bad = dict(sd)
    del bad[f"{name}.weight_scale_2"]
    save_file(bad, f)
    with pytest.raises(QtoolError, match=f"{name}.weight_scale_2"):
        read_checkpoint(tmp_path / "m")
    bad = dict(sd)
    bad[f"{name}.weight_scale"] = sd[f"{name}.weight_scale"].float()
    save_file(bad, f)
    with pytest.raises(QtoolError, match=f"{name}.weight_scale"):
        read_checkpoint(tmp_path / "m")


# ---- against nvidia-modelopt itself -------------------------------------------------------------

MO_CFGS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG", "w4a16": "INT4_AWQ_CFG", "w4a8": "W4A8_AWQ_BETA_CFG",
           "w8a8-int8": "INT8_SMOOTHQUANT_CFG"}


def _emulated_block_quant(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
    """CPU stand-in for ModelOpt's CUDA-only NVFP4 fake-quant op, built from ModelOpt's own NVFP4QTensor."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    assert (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4), "only NVFP4 is emulated"
    shape = inputs.shape
    x = inputs.float().reshape(-1, shape[-1])
    wsf2 = amax.float().amax() / (6.0 * 448.0)
    q, bs, s2 = NVFP4QTensor.quantize(x, block_size, None, wsf2)
    out = q.dequantize(dtype=torch.float32, scale=bs, double_scale=s2, block_sizes={-1: block_size})
    return out.reshape(shape).to(inputs.dtype)


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A float32 tiny Llama. In bf16, ModelOpt's export divides weight / scale in bf16 (a 0-dim float32
    scale does not promote), so a tie can round to a different fp8 code than its own fake-quant model
    uses; in float32 the export and the fake-quant model agree, which the logits test needs."""
    from calibrate.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("llama32"), dtype=torch.float32)


@pytest.fixture(scope="module")
def modelopt_exports(llama32, tmp_path_factory):
    """{scheme: (export dir, ModelOpt fake-quant logits, input ids)} produced by nvidia-modelopt on CPU."""
    import modelopt.torch.quantization as mtq
    import modelopt.torch.quantization.tensor_quant as tq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import AutoModelForCausalLM

    src = llama32
    base = tmp_path_factory.mktemp("modelopt")
    orig = tq.dynamic_block_quantize_op
    tq.dynamic_block_quantize_op = _emulated_block_quant
    out = {}
    try:
        for scheme, cfg_name in MO_CFGS.items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                plain = model(ids).logits.float()
            cfg = copy.deepcopy(getattr(mtq, cfg_name))
            cfg["quant_cfg"] = cfg["quant_cfg"] + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
            calib = [torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]

            def loop(m):
                for x in calib:
                    m(x)

            model = mtq.quantize(model, cfg, loop)
            with torch.no_grad():  # what export_hf_checkpoint does first: resmooth/fuse shared-input layers
                requantize_resmooth_fused_llm_layers(model)
            if scheme == "w8a8-int8":  # what ModelOpt's INT8 SmoothQuant left on each input quantizer
                out["w8a8-int8 input quantizers"] = {
                    n: {"axis": m.input_quantizer.axis, "dynamic": m.input_quantizer._dynamic, "amax": m.input_quantizer.amax.detach().clone()}
                    for n, m in model.named_modules() if isinstance(getattr(m, "input_quantizer", None), TensorQuantizer) and m.input_quantizer.is_enabled}
            fq = copy.deepcopy(model)
            # the FP8 KV-cache quantizers stay on: qtool's runtime applies the exported k_scale / v_scale too
            with torch.no_grad():
                logits = fq(ids).logits.float()
            d = base / scheme
            export_hf_checkpoint(model, export_dir=d)
            out[scheme] = (d, logits, ids, plain)
    finally:
        tq.dynamic_block_quantize_op = orig
    return out


@pytest.mark.parametrize("scheme", list(MO_CFGS))
def test_modelopt_export_read_convert_back(modelopt_exports, tmp_path, scheme):
    d = modelopt_exports[scheme][0]
    ckpt = read_checkpoint(d)
    assert ckpt.format == "modelopt" and len(ckpt.qtensors) == 14
    assert set(ckpt.kv_scales) == {"model.layers.0.self_attn", "model.layers.1.self_attn"} and ckpt.kv_cache_dtype == "fp8_e4m3"
    assert not any(k.endswith((".k_scale", ".v_scale")) for k in ckpt.tensors)  # FP8 KV-cache scales: read into kv_scales
    write_checkpoint(ckpt, "qtool", tmp_path / "q")
    mid = read_checkpoint(tmp_path / "q")
    for name, qt in ckpt.qtensors.items():
        assert mid.qtensors[name].equal(qt), name
    write_checkpoint(mid, "modelopt", tmp_path / "m")
    back = read_checkpoint(tmp_path / "m")
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
    # every tensor and both config files come back byte-identical to ModelOpt's own export
    a, b = TensorDir(d), TensorDir(tmp_path / "m")
    assert set(a) == set(b)
    for k in a:
        assert same_tensor(a[k], b[k]), k
    assert json.loads((d / "hf_quant_config.json").read_text()) == json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())
    assert json.loads((d / "config.json").read_text())["quantization_config"] == json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    if scheme in ("w4a16", "w4a8"):  # pre_quant_scale and float32 amax/7 scales: GPTQ refuses instead of rounding
        with pytest.raises(QtoolError, match="cannot hold"):  # (without its KV-cache scales, which GPTQ refuses first)
            write_checkpoint(replace(ckpt, kv_scales={}, kv_cache_dtype=None), "gptq", tmp_path / "g")
    if scheme == "w8a8-int8":  # compressed-tensors W8A8 has no pre_quant_scale: refused, not dropped
        with pytest.raises(QtoolError, match="cannot hold"):
            write_checkpoint(ckpt, "compressed-tensors", tmp_path / "ct")


def test_modelopt_int8_sq_is_static_per_tensor(modelopt_exports):
    """ModelOpt 0.47's INT8 SmoothQuant: SmoothQuant collects per-channel input amax only to compute the
    smoothing, then leaves ONE static amax per input quantizer (axis None, not dynamic), keeps the
    smoothing as a separate pre_quant_scale on every linear (q/k/v and gate/up sharing one), and its
    export writes int8 weights, weight_scale [N] = amax/127 per row, input_scale [] = amax/127.
    qtool reads that as static per-tensor int8 activations after pre_scale."""
    d = modelopt_exports["w8a8-int8"][0]
    quantizers = modelopt_exports["w8a8-int8 input quantizers"]
    assert len(quantizers) == 14
    for name, q in quantizers.items():
        assert q["axis"] is None and not q["dynamic"] and q["amax"].numel() == 1, name
    hf = json.loads((d / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert "config_groups" not in json.loads((d / "config.json").read_text())["quantization_config"]
    td = TensorDir(d)
    ckpt = read_checkpoint(d)
    for name, qt in ckpt.qtensors.items():
        n, k = qt.shape
        assert (td[f"{name}.weight"].dtype, td.shape(f"{name}.weight")) == (torch.int8, [n, k])
        assert (td[f"{name}.weight_scale"].dtype, td.shape(f"{name}.weight_scale")) == (torch.float32, [n])
        assert (td[f"{name}.input_scale"].dtype, td.shape(f"{name}.input_scale")) == (torch.float32, [])
        assert td.shape(f"{name}.pre_quant_scale") == [k], name
        assert (qt.act.kind, qt.act.dtype, qt.act.granularity) == ("static", "int8", "tensor")
        assert torch.equal(qt.act.scale, (quantizers[name]["amax"].float() / 127).reshape(1)), name
        assert qt.group_size == -1 and qt.scales.shape == (n, 1) and qt.pre_scale is not None
    for group in fused_groups(ckpt.qtensors):
        assert all(torch.equal(ckpt.qtensors[m].pre_scale, ckpt.qtensors[group[0]].pre_scale) for m in group), group


@pytest.mark.parametrize("scheme", list(MO_CFGS))
def test_modelopt_structure_matches_producer(modelopt_exports, llama32, tmp_path, scheme):
    d = modelopt_exports[scheme][0]
    ours = make(llama32, scheme)
    ours.kv_scales, ours.kv_cache_dtype = read_checkpoint(d).kv_scales, "fp8_e4m3"  # from calibration, which RTN has not run
    write_checkpoint(ours, "modelopt", tmp_path / "m")
    a, b = TensorDir(d), TensorDir(tmp_path / "m")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a.shape(k)) == (b[k].dtype, b.shape(k)), k
    ha, hb = (json.loads((p / "hf_quant_config.json").read_text()) for p in (d, tmp_path / "m"))
    assert ha == hb
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (d, tmp_path / "m"))
    assert ca["quantization_config"] == cb["quantization_config"]


# Tolerances, relative to the quantization effect itself (mean |ModelOpt fake-quant - unquantized|):
# NVFP4 and INT4_AWQ agree to float32 rounding (measured ~4e-7 of it), so 1e-4 leaves only summation
# order. FP8 differs inside ModelOpt itself: its fake quant computes fp8(x * (448/amax)) * (1/(448/amax))
# while its export stores fp8(w / (amax/448)) with scale amax/448, so an occasional tie rounds to the
# neighbouring code and the dequant scale is one ulp apart; on this random 2-layer model that single
# flipped weight code moves the logits by ~2% of the FP8 quantization effect (measured 0.019 with the FP8
# KV cache off on both sides). The exports carry FP8 KV-cache scales, which both ModelOpt's fake quant
# and qtool's runtime apply; the flipped code's small change to K/V then moves some K/V elements across
# fp8 codes too: measured 0.065 (the KV cache's own effect agrees: 0.03209 vs 0.03209), hence 10%.
# NVFP4 / INT4_AWQ / W4A8 agree to float32 rounding with the KV cache on (measured <= 2.2e-7 absolute).
# W4A8_AWQ's second level goes through the same fp8 rounding path (no tie hit here), so it gets 5%.
# INT8 SmoothQuant (static per-tensor int8 inputs after pre_quant_scale) agrees to float32 rounding as
# well (measured ~1e-6 of the quantization effect), hence 1e-4.
TOL = {"fp8": 0.1, "nvfp4": 1e-4, "w4a16": 1e-4, "w4a8": 0.05, "w8a8-int8": 1e-4}


@pytest.mark.parametrize("scheme", list(MO_CFGS))
def test_modelopt_logits_match_fake_quant(modelopt_exports, scheme):
    from runtime.loader import load_quantized

    d, ref, ids, plain = modelopt_exports[scheme]
    model, _ = load_quantized(d)
    with torch.no_grad():
        got = model(ids).logits.float()
    diff = (got - ref).abs().mean().item()
    qerr = (ref - plain).abs().mean().item()
    print(f"{scheme}: mean |qtool - modelopt| {diff:.3g}, max {(got - ref).abs().max().item():.3g}; "
          f"mean |modelopt - unquantized| {qerr:.3g}")
    assert diff < TOL[scheme] * qerr
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


# ---- INT8 SmoothQuant through qtool's own workflows ---------------------------------------------

def _same_dirs(a_dir, b_dir):
    a, b = TensorDir(a_dir), TensorDir(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert same_tensor(a[k], b[k]), k
    for f in ("hf_quant_config.json",):
        assert json.loads((a_dir / f).read_text()) == json.loads((b_dir / f).read_text())


def test_modelopt_int8_sq_backend_and_native_both_ways(tiny_models, tmp_path):
    """`--backend modelopt --scheme w8a8-int8` writes the modelopt format directly; qtool -> modelopt ->
    qtool -> modelopt is lossless and byte-stable. qtool's own SmoothQuant with static per-tensor int8
    activations (w8a8-int8-static) goes there too (smoothing folded into the norms: no pre_quant_scale);
    its dynamic per-token w8a8-int8 has no ModelOpt layout and is refused, naming why."""
    import math

    from quantize_cli import api

    md = tiny_models("llama")
    api.quantize(str(md), "w8a8-int8", format="modelopt", out=tmp_path / "m", samples=4, seqlen=32, backend="modelopt")
    ck = read_checkpoint(tmp_path / "m")
    assert ck.format == "modelopt" and len(ck.qtensors) == 14
    hf = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    for name, qt in ck.qtensors.items():
        assert (qt.act.kind, qt.act.dtype, qt.bits, qt.group_size) == ("static", "int8", 8, -1) and qt.pre_scale is not None, name
    api.export(tmp_path / "m", "qtool", tmp_path / "q")
    q = read_checkpoint(tmp_path / "q")
    assert all(q.qtensors[n].equal(qt) for n, qt in ck.qtensors.items())
    api.export(tmp_path / "q", "modelopt", tmp_path / "m2")
    _same_dirs(tmp_path / "m", tmp_path / "m2")
    r = api.evaluate(tmp_path / "m", windows=2)
    assert all(math.isfinite(r[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))
    engines = {e["engine"]: e for e in api.inspect(tmp_path / "m")["engines"]}
    assert engines["tensorrt-llm"]["loads"] and not engines["vllm"]["loads"] and not engines["sglang"]["loads"]
    assert "W8A8_SQ_PER_CHANNEL" in engines["vllm"]["note"]

    api.quantize(str(md), "w8a8-int8-static", method="smoothquant", format="qtool", out=tmp_path / "nq", samples=4, seqlen=32)
    nq = read_checkpoint(tmp_path / "nq")
    api.export(tmp_path / "nq", "modelopt", tmp_path / "nm")
    nm_ = read_checkpoint(tmp_path / "nm")
    assert nm_.format == "modelopt" and all(nm_.qtensors[n].equal(qt) for n, qt in nq.qtensors.items())
    assert not any(k.endswith(".pre_quant_scale") for k in TensorDir(tmp_path / "nm"))
    trt = next(why for e, ok, why in FORMATS["modelopt"].engines(nm_) if e == "tensorrt-llm")
    assert "14 int8 layers have no pre_quant_scale" in trt
    api.export(tmp_path / "nm", "qtool", tmp_path / "nq2")
    assert all(read_checkpoint(tmp_path / "nq2").qtensors[n].equal(qt) for n, qt in nq.qtensors.items())
    # --option pre_scale=true: GQA's v -> o keeps its own per-channel pre_quant_scale, which ModelOpt's layout holds
    api.quantize(str(md), "w8a8-int8-static", method="smoothquant", format="modelopt", out=tmp_path / "pq", samples=4, seqlen=32,
                 options={"pre_scale": "true"})
    pre = sorted(k for k in TensorDir(tmp_path / "pq") if k.endswith(".pre_quant_scale"))
    assert pre == [f"model.layers.{i}.self_attn.o_proj.pre_quant_scale" for i in range(2)]
    pq = read_checkpoint(tmp_path / "pq")
    assert all(pq.qtensors[n].pre_scale.dtype == torch.float32 for n in pq.qtensors if n.endswith("o_proj"))
    r = api.evaluate(tmp_path / "pq", windows=2)
    assert r["kl_divergence"] < 0.05, r
    dyn = replace(nq, qtensors={n: qt.replace(act=ActQuant("dynamic", "int8", "token")) for n, qt in nq.qtensors.items()})
    with pytest.raises(QtoolError, match="dynamic per-token activations"):
        write_checkpoint(dyn, "modelopt", tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("tensor,bad,match", [
    ("weight_scale", lambda t: t.bfloat16(), "dtype torch.bfloat16"),
    ("weight_scale", lambda t: t.reshape(-1, 1), r"shape \[128, 1\], expected \[128\]"),
    ("weight_scale", lambda t: t * 0, "not positive"),
    ("input_scale", lambda t: t.half(), "dtype torch.float16"),
    ("input_scale", lambda t: t.reshape(1).repeat(2), "expected a scalar"),
    ("input_scale", lambda t: -t, "not positive"),
    ("weight", lambda t: t.view(torch.uint8), "dtype torch.uint8"),
    ("pre_quant_scale", lambda t: t[:-1], r"shape \[127\]"),
])
def test_modelopt_int8_sq_malformed(tiny_models, tmp_path, cli, tensor, bad, match):
    from safetensors.torch import load_file, save_file

    write_checkpoint(make(tiny_models("llama"), "w8a8-int8"), "modelopt", tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    key = f"model.layers.1.self_attn.o_proj.{tensor}"
    sd[key] = bad(sd[key]).contiguous()
    save_file(sd, f)
    r = cli("inspect", tmp_path / "m")
    assert r.code == 2 and key in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert __import__("re").search(match, r.err), r.err
