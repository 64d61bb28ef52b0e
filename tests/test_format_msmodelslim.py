"""msModelSlim format: round trips, derived-tensor checks, and msModelSlim 26.1's own CPU quantizer."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import ActQuant, get_scheme
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]
F32 = torch.float32


def _static(name, g):
    a = (torch.rand(1, generator=g) * 0.05 + 0.01)
    off = torch.randint(-20, 20, (1,), generator=g).float()
    return ActQuant("static", "int8", "tensor", scale=a, offset=off)


def make(model_dir, kind, sym=True, group=-1):
    """A checkpoint of one msModelSlim layer type; scales float32 as Ascend kernels take them."""
    bits = 4 if kind in ("W4A4_DYNAMIC", "W4A8_DYNAMIC") else 8
    spec = replace(WeightSpec.of(get_scheme("w8a8-int8"), group, sym), bits=bits, scale_dtype=F32)
    ckpt = make_checkpoint(model_dir, spec)
    g = torch.Generator().manual_seed(3)
    acts = {"W8A8_DYNAMIC": ActQuant("dynamic", "int8", "token"), "W4A4_DYNAMIC": ActQuant("dynamic", "int4", "token"),
            "W4A8_DYNAMIC": ActQuant("dynamic", "int8", "token")}
    qts = {n: q.replace(act=_static(n, g) if kind == "W8A8" else acts[kind]) for n, q in ckpt.qtensors.items()}
    return replace(ckpt, qtensors=qts)


def check_roundtrip(ckpt, out):
    write_checkpoint(ckpt, "msmodelslim", out)
    back = read_checkpoint(out)
    assert back.format == "msmodelslim" and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        b = back.qtensors[name]
        assert b.equal(qt), name
        assert torch.equal(b.dequantize(), qt.dequantize()), name
    for key, t in ckpt.tensors.items():
        assert torch.equal(back.tensors[key].to(t.dtype), t), key
    return back


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,sym,group", [
    ("W8A8", True, -1), ("W8A8_DYNAMIC", True, -1), ("W8A8_DYNAMIC", False, -1),
    ("W4A4_DYNAMIC", True, -1), ("W4A4_DYNAMIC", False, 64), ("W4A8_DYNAMIC", True, -1),
])
def test_msmodelslim_roundtrip_bit_identical(tiny_models, tmp_path, arch, kind, sym, group):
    ckpt = make(tiny_models(arch), kind, sym, group)
    check_roundtrip(ckpt, tmp_path / "m")
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    td = TensorDir(tmp_path / "m")
    assert set(td) == {k for k in desc if k not in ("version", "model_quant_type", "metadata", "group_size", "optional")}
    assert desc["model_quant_type"] == (kind if kind != "W4A8_DYNAMIC" else "FLOAT")  # msModelSlim hides W4A8_DYNAMIC
    assert desc["group_size"] == (group if group > 0 else 0)
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert (tmp_path / "m" / "quant_model_weights-00001-of-00001.safetensors").is_file()
    assert (tmp_path / "m" / "quant_model_weights.safetensors.index.json").is_file()


def test_msmodelslim_mixed_and_float_layers(tiny_models, tmp_path):
    """Per-tensor types: static W8A8 attention, W8A8_DYNAMIC MLP, one down_proj left FLOAT."""
    d = tiny_models("qwen2")
    st, dy = make(d, "W8A8"), make(d, "W8A8_DYNAMIC")
    keep = "model.layers.1.mlp.down_proj"
    qts = {n: (dy.qtensors[n] if ".mlp." in n else q) for n, q in st.qtensors.items() if n != keep}
    tensors = dict(st.tensors)
    tensors[f"{keep}.weight"] = TensorDir(d)[f"{keep}.weight"]
    ckpt = replace(st, qtensors=qts, tensors=tensors)
    back = check_roundtrip(ckpt, tmp_path / "m")
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    assert desc[f"{keep}.weight"] == "FLOAT" and keep not in back.qtensors
    assert desc["model.layers.0.self_attn.q_proj.quant_bias"] == "W8A8"
    assert desc["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"  # qwen2 biases kept in float32
    assert desc["model.layers.0.mlp.up_proj.weight_offset"] == "W8A8_DYNAMIC"
    assert desc["model_quant_type"] == "W8A8"  # msModelSlim's priority: W8A8 over W8A8_DYNAMIC


def test_msmodelslim_static_derived_tensors(tiny_models, tmp_path):
    """deq_scale = fp32(input_scale * weight_scale) as float32 bits in int64 (non-bf16 models) and
    quant_bias = round(bias / deq_scale - input_offset * sum(w)); qwen2 q/k/v carry a real bias."""
    ckpt = make(tiny_models("qwen2"), "W8A8")
    write_checkpoint(ckpt, "msmodelslim", tmp_path / "m")
    td = TensorDir(tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj"
    qt = ckpt.qtensors[name]
    deq = td[f"{name}.deq_scale"]
    assert deq.dtype == torch.float32  # the tiny model is bf16: msModelSlim keeps float32 deq_scale then
    assert torch.equal(deq, (qt.act.scale * qt.scales).squeeze(1))
    bias = ckpt.tensors[f"{name}.bias"].double()
    want = torch.round(bias / deq.double() - qt.codes.double().sum(1) * qt.act.offset.double())
    assert (td[f"{name}.quant_bias"].double() - want).abs().max() <= 1  # float32 vs float64 rounding at .5
    assert td[f"{name}.bias"].dtype == F32
    # RTN scales are arbitrary float32: where fp32(a * s) loses s, weight_scale is written to stay exact
    canonical = nm.recover_factor((qt.act.scale * qt.scales).squeeze(1), qt.act.scale)
    exact = canonical is not None and torch.equal(canonical, qt.scales.squeeze(1))
    assert (f"{name}.weight_scale" in td) == (not exact)
    # fp32 model: deq_scale as int64 bit patterns
    cfg = dict(ckpt.config, torch_dtype="float32")
    cfg.pop("dtype", None)
    write_checkpoint(replace(ckpt, config=cfg), "msmodelslim", tmp_path / "f")
    d64 = TensorDir(tmp_path / "f")[f"{name}.deq_scale"]
    assert d64.dtype == torch.int64 and torch.equal(d64.to(torch.int32).view(F32), deq)


def test_msmodelslim_refuses(tiny_models, tmp_path):
    d = tiny_models("llama")
    cases = [
        (make_checkpoint(d, WeightSpec.of(get_scheme("fp8"))), "fp8"),
        (make_checkpoint(d, WeightSpec.of(get_scheme("w4a16"))), "float16 scales"),
        (make_checkpoint(d, replace(WeightSpec.of(get_scheme("w4a16")), scale_dtype=F32)), "activations"),
    ]
    asym_static = make(d, "W8A8_DYNAMIC", sym=False)
    asym_static = replace(asym_static, qtensors={n: q.replace(act=ActQuant("static", "int8", "tensor", scale=torch.tensor([0.02]))) for n, q in asym_static.qtensors.items()})
    cases.append((asym_static, "asymmetric"))
    w4a8 = make(d, "W4A8_DYNAMIC", sym=False)
    cases.append((w4a8, "W4A8_DYNAMIC needs symmetric"))
    for ckpt, match in cases:
        with pytest.raises(QtoolError, match=match):
            write_checkpoint(ckpt, "msmodelslim", tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_msmodelslim_malformed(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make(tiny_models("qwen2"), "W8A8")
    write_checkpoint(ckpt, "msmodelslim", tmp_path / "m")
    f = tmp_path / "m" / "quant_model_weights-00001-of-00001.safetensors"
    sd = load_file(f)
    name = "model.layers.0.self_attn.q_proj"

    def expect(bad, match):
        save_file(bad, f)
        with pytest.raises(QtoolError, match=match):
            read_checkpoint(tmp_path / "m")

    expect({**sd, f"{name}.quant_bias": sd[f"{name}.quant_bias"] + 1}, f"{name}.quant_bias")
    expect({**sd, f"{name}.deq_scale": sd[f"{name}.deq_scale"] * 3}, f"{name}.quant_bias|{name}.deq_scale")
    expect({k: v for k, v in sd.items() if k != f"{name}.input_offset"}, f"{name}.input_offset")
    expect({**sd, f"{name}.input_offset": torch.tensor([0.5])}, f"{name}.input_offset")
    expect({**sd, "stray.tensor": torch.zeros(1)}, "stray.tensor")
    save_file(sd, f)
    desc_f = tmp_path / "m" / "quant_model_description.json"
    desc = json.loads(desc_f.read_text())
    desc[f"{name}.weight"] = "W8A16"
    desc_f.write_text(json.dumps(desc))
    with pytest.raises(QtoolError, match="W8A16"):
        read_checkpoint(tmp_path / "m")


# ---- against msModelSlim 26.1 itself (pip install msmodelslim; CPU quantizer, fp32 model) -------

STATIC_YAML = """apiversion: modelslim_v1
spec:
  process:
  - type: linear_quant
    qconfig:
      act: {scope: per_tensor, dtype: int8, symmetric: false, method: minmax}
      weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}
    include: ['*']
  runner: model_wise
  save:
  - type: ascendv1_saver
    part_file_size: 4
"""


W4A8_YAML = """apiversion: modelslim_v1
spec:
  process:
  - type: linear_quant
    qconfig:
      act: {scope: per_token, dtype: int8, symmetric: true, method: minmax}
      weight: {scope: per_channel, dtype: int4, symmetric: true, method: minmax}
    include: ['*']
  runner: model_wise
  save:
  - type: ascendv1_saver
    part_file_size: 4
"""


@pytest.fixture(scope="module")
def msmodelslim_outputs(tmp_path_factory):
    """{"W8A8_DYNAMIC" | "W8A8" | "W4A8_DYNAMIC": (output dir, fp32 source dir)} written by msModelSlim's
    own CLI on CPU. (`--quant_type w4a8/w4a4` with model_type default silently falls back to its W8A8
    config, and a per-token int4 activation config is refused on CPU ("No implementation found for
    AutoActQuantizer ... int4"), so W4A4_DYNAMIC has no producer check here.)"""
    from calibrate.tiny import make_tiny_model

    base = tmp_path_factory.mktemp("msmodelslim")
    src = make_tiny_model("llama", base / "llama32", dtype=torch.float32)  # msModelSlim's CPU path wants fp32
    (base / "static.yaml").write_text(STATIC_YAML)
    (base / "w4a8.yaml").write_text(W4A8_YAML)
    exe = Path(sys.executable).with_name("msmodelslim")
    out = {}
    for kind, extra in (("W8A8_DYNAMIC", ["--quant_type", "w8a8"]), ("W8A8", ["--config_path", str(base / "static.yaml")]),
                        ("W4A8_DYNAMIC", ["--config_path", str(base / "w4a8.yaml")])):
        d = base / kind
        cmd = [str(exe), "quant", "--model_type", "default", "--model_path", str(src), "--save_path", str(d), "--device", "cpu", *extra]
        r = subprocess.run(cmd, input="y\n" * 8, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and (d / "quant_model_description.json").is_file(), r.stdout[-2000:] + r.stderr[-2000:]
        out[kind] = (d, src)
    return out


@pytest.mark.parametrize("kind", ["W8A8_DYNAMIC", "W8A8", "W4A8_DYNAMIC"])
def test_msmodelslim_output_read_convert_back(msmodelslim_outputs, tmp_path, kind):
    d, src = msmodelslim_outputs[kind]
    ckpt = read_checkpoint(d)
    assert ckpt.format == "msmodelslim" and len(ckpt.qtensors) == 14
    if kind != "W8A8_DYNAMIC":  # no smoothing in these configs: our reading of the codes (nibble order,
        w = TensorDir(src)  # scale recovered from deq_scale) must give the source weight within half a step
        for name, qt in ckpt.qtensors.items():
            err = (qt.dequantize() - w[f"{name}.weight"].float()).abs()
            assert bool((err <= qt.scales.float() * 0.5001 + 1e-7).all()), name
    assert {q.act.kind for q in ckpt.qtensors.values()} == {"static" if kind == "W8A8" else "dynamic"}
    write_checkpoint(ckpt, "qtool", tmp_path / "q")
    mid = read_checkpoint(tmp_path / "q")
    for name, qt in ckpt.qtensors.items():
        assert mid.qtensors[name].equal(qt), name
    write_checkpoint(mid, "msmodelslim", tmp_path / "m")
    a, b = TensorDir(d), TensorDir(tmp_path / "m")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    da, db = (json.loads((p / "quant_model_description.json").read_text()) for p in (d, tmp_path / "m"))
    assert da == db
    if kind == "W8A8_DYNAMIC":  # per-channel int8 + per-token int8: the same model as compressed-tensors W8A8
        write_checkpoint(ckpt, "compressed-tensors", tmp_path / "ct")
        ct = read_checkpoint(tmp_path / "ct")
        for name, qt in ckpt.qtensors.items():
            assert ct.qtensors[name].equal(qt), name


@pytest.mark.parametrize("kind", ["W8A8_DYNAMIC", "W8A8", "W4A8_DYNAMIC"])
def test_msmodelslim_structure_matches_producer(msmodelslim_outputs, tmp_path, kind):
    d, src = msmodelslim_outputs[kind]
    ours = make(src, kind)
    if kind == "W8A8":
        # msModelSlim 26.1 stores only deq_scale = input_scale * weight_scale. A producer targeting it picks
        # float32 weight scales that survive the product (numerics.recover_factor); then the layout is
        # exactly msModelSlim's. RTN's raw scales need the extra weight_scale/weight_offset (checked above).
        qts = {}
        w = TensorDir(src)
        for n, q in ours.qtensors.items():
            s = nm.recover_factor((q.act.scale * q.scales).squeeze(1), q.act.scale).reshape(-1, 1)
            qts[n] = q.replace(scales=s, codes=nm.int_quantize(w[f"{n}.weight"].float(), s, None, 8, -1))
        ours = replace(ours, qtensors=qts)
    write_checkpoint(ours, "msmodelslim", tmp_path / "m")
    a, b = TensorDir(d), TensorDir(tmp_path / "m")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a.shape(k)) == (b[k].dtype, b.shape(k)), k
    da, db = (json.loads((p / "quant_model_description.json").read_text()) for p in (d, tmp_path / "m"))
    assert da == db  # same keys and the same type for every tensor, same model_quant_type/group_size/version
    assert sorted(p.name for p in d.glob("quant_model_weights*")) == sorted(p.name for p in (tmp_path / "m").glob("quant_model_weights*"))
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (d, tmp_path / "m"))
    assert "quantization_config" not in ca and "quantization_config" not in cb


def test_msmodelslim_static_layer_matches_its_ir(msmodelslim_outputs):
    """qtool's QuantLinear on a msModelSlim W8A8 layer equals msModelSlim's own W8A8 static fake-quant
    linear built from the same parameters, and the Ascend integer form deq * (W_q @ x_q + quant_bias)."""
    from msmodelslim.ir.api import fake_quantize
    from msmodelslim.ir.qal import QDType, QParam, QScheme, QScope, QStorage

    from runtime.qlinear import QuantLinear, fake_quant_act

    d, _ = msmodelslim_outputs["W8A8"]
    ckpt = read_checkpoint(d)
    td = TensorDir(d)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 2
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        qt = ckpt.qtensors[name]
        a, o = td[f"{name}.input_scale"], td[f"{name}.input_offset"]
        p = QParam(scheme=QScheme(scope=QScope.PER_TENSOR, dtype=QDType.INT8, symmetric=False), ext={"scale": a, "offset": o})
        ref_x = fake_quantize(QStorage(QDType.FLOAT, x), p).value
        assert torch.equal(fake_quant_act(x, qt.act), ref_x)
        got = QuantLinear(qt)(x)
        xq = torch.clamp(torch.round(x / a) + o, -128, 127)
        deq = td[f"{name}.deq_scale"].to(torch.int32).view(F32)
        ascend = deq * (xq.double() @ td[f"{name}.weight"].double().T + td[f"{name}.quant_bias"].double()).float()
        assert torch.allclose(got, ascend, rtol=1e-5, atol=1e-5)
