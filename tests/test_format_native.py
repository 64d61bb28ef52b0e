"""SGLang/vLLM native layouts: block fp8 (`fp8`), `w8a8-int8`, `w8a8-fp8`."""

import json
from dataclasses import replace

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import ActQuant, get_scheme
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]
# format -> (scheme, activation the engine applies)
CASES = {
    "fp8": ("fp8-block", ActQuant("dynamic", "fp8_e4m3", "group", group_size=128)),
    "w8a8-int8": ("w8a8-int8", ActQuant("dynamic", "int8", "token")),
    "w8a8-fp8": ("fp8-dynamic", ActQuant("dynamic", "fp8_e4m3", "token")),
}


def make(model_dir, fmt):
    scheme, act = CASES[fmt]
    ckpt = make_checkpoint(model_dir, WeightSpec.of(get_scheme(scheme)))
    return replace(ckpt, qtensors={n: q.replace(act=act) for n, q in ckpt.qtensors.items()})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", list(CASES))
def test_native_roundtrip_bit_identical(tiny_models, tmp_path, arch, fmt):
    ckpt = make(tiny_models(arch), fmt)
    write_checkpoint(ckpt, fmt, tmp_path / "o")
    back = read_checkpoint(tmp_path / "o")
    assert back.format == fmt and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        b = back.qtensors[name]
        assert b.equal(qt), name
        assert b.act.granularity == qt.act.granularity
        assert torch.equal(b.dequantize(), qt.dequantize()), name


def test_native_layouts(tiny_models, tmp_path):
    name = "model.layers.0.mlp.down_proj"  # [128, 256]
    for fmt in CASES:
        write_checkpoint(make(tiny_models("qwen2"), fmt), fmt, tmp_path / fmt)
        td = TensorDir(tmp_path / fmt)
        qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        assert "model.layers.0.self_attn.q_proj.bias" in td  # qwen2 biases pass through
        if fmt == "fp8":
            assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
            assert td[f"{name}.weight"].dtype == torch.float8_e4m3fn and td.shape(f"{name}.weight") == [128, 256]
            s = td[f"{name}.weight_scale_inv"]
            assert s.dtype == torch.float32 and list(s.shape) == [1, 2]
            # the scale multiplies: each 128x128 block's amax maps to 448 (RTN), i.e. s = amax / 448
            w = TensorDir(tiny_models("qwen2"))[f"{name}.weight"].float()
            amax = torch.stack([w[:, :128].abs().amax(), w[:, 128:].abs().amax()]).reshape(1, 2)
            assert torch.allclose(s, amax / 448)
        else:
            assert qc == {"quant_method": fmt.replace("-", "_")}
            want = torch.int8 if fmt == "w8a8-int8" else torch.float8_e4m3fn
            assert td[f"{name}.weight"].dtype == want and td.shape(f"{name}.weight") == [128, 256]
            assert td[f"{name}.weight_scale"].dtype == torch.float32 and td.shape(f"{name}.weight_scale") == [128, 1]
            assert not any(k.endswith("input_scale") for k in td)


@pytest.mark.parametrize("fmt,scheme,match", [
    ("fp8", "fp8", "block"), ("fp8", "w4a16", "block"), ("w8a8-int8", "w4a16", "int4"),
    ("w8a8-int8", "fp8-dynamic", "fp8_e4m3"), ("w8a8-fp8", "fp8", "per output channel"), ("w8a8-fp8", "w8a8-int8", "int8"),
])
def test_native_refuses(tiny_models, tmp_path, fmt, scheme, match):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme(scheme)))
    with pytest.raises(QtoolError, match=match):
        write_checkpoint(ckpt, fmt, tmp_path / "o")
    assert not list(tmp_path.iterdir())


def test_native_refuses_activation_and_skipped(tiny_models, tmp_path):
    # weight-only fp8 block: the engines would still quantize activations, so it is not the same model
    raw = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("fp8-block")))
    with pytest.raises(QtoolError, match="activations"):
        write_checkpoint(raw, "fp8", tmp_path / "o")
    # static int8 activations cannot be written as w8a8_int8 (dynamic only)
    ck = make(tiny_models("llama"), "w8a8-int8")
    static = {n: q.replace(act=ActQuant("static", "int8", "tensor", scale=torch.tensor([0.01]))) for n, q in ck.qtensors.items()}
    with pytest.raises(QtoolError, match="dynamic per-token"):
        write_checkpoint(replace(ck, qtensors=static), "w8a8-int8", tmp_path / "o")
    # a decoder linear left in bf16: SGLang's w8a8 configs quantize every linear
    name = "model.layers.0.mlp.down_proj"
    qts = dict(ck.qtensors)
    del qts[name]
    tensors = dict(ck.tensors)
    tensors[f"{name}.weight"] = TensorDir(tiny_models("llama"))[f"{name}.weight"]
    with pytest.raises(QtoolError, match=name):
        write_checkpoint(replace(ck, qtensors=qts, tensors=tensors), "w8a8-int8", tmp_path / "o")
    # ... but a MoE router left in bf16 is what SGLang expects (its gate has no quant config)
    moe = make(tiny_models("qwen3_moe"), "w8a8-int8")
    router = "model.layers.0.mlp.gate"
    rq = {n: q for n, q in moe.qtensors.items() if n != router}
    rt = dict(moe.tensors, **{f"{router}.weight": TensorDir(tiny_models("qwen3_moe"))[f"{router}.weight"]})
    write_checkpoint(replace(moe, qtensors=rq, tensors=rt), "w8a8-int8", tmp_path / "moe")
    assert router not in read_checkpoint(tmp_path / "moe").qtensors
    # fp8 block lists it in ignored_layers instead
    fp = make(tiny_models("llama"), "fp8")
    qts = dict(fp.qtensors)
    del qts[name]
    write_checkpoint(replace(fp, qtensors=qts, tensors=tensors), "fp8", tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]["ignored_layers"] == [name]
    assert name not in read_checkpoint(tmp_path / "f").qtensors


def test_native_malformed(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(make(tiny_models("llama"), "w8a8-int8"), "w8a8-int8", tmp_path / "o")
    f = tmp_path / "o" / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.self_attn.v_proj"
    bad = dict(sd)
    bad[f"{name}.weight_scale"] = sd[f"{name}.weight_scale"].reshape(-1)
    save_file(bad, f)
    with pytest.raises(QtoolError, match=f"{name}.weight_scale"):
        read_checkpoint(tmp_path / "o")
    bad = dict(sd)
    bad[f"{name}.weight"] = sd[f"{name}.weight"].to(torch.float8_e4m3fn)
    save_file(bad, f)
    with pytest.raises(QtoolError, match=f"{name}.weight"):
        read_checkpoint(tmp_path / "o")
    # config contradicting the tensors: block size other than 128
    write_checkpoint(make(tiny_models("llama"), "fp8"), "fp8", tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QtoolError, match="weight_block_size"):
        read_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("fmt", ["w8a8-int8", "w8a8-fp8", "fp8"])
def test_native_converts_through_compressed_tensors(tiny_models, tmp_path, fmt):
    """native -> compressed-tensors -> native is exact, and CT's own decompressor agrees on the weights."""
    ckpt = make(tiny_models("llama"), fmt)
    write_checkpoint(ckpt, fmt, tmp_path / "a")
    write_checkpoint(read_checkpoint(tmp_path / "a"), "compressed-tensors", tmp_path / "ct")
    write_checkpoint(read_checkpoint(tmp_path / "ct"), fmt, tmp_path / "b")
    back = read_checkpoint(tmp_path / "b")
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
    a, b = TensorDir(tmp_path / "a"), TensorDir(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x, y.view(torch.uint8) if y.element_size() == 1 else y), k


def test_fp8_block_loads_in_transformers(tiny_models, tmp_path):
    """transformers' FineGrainedFP8 loader (dequantize=True runs on CPU) reads our block fp8 to exactly
    QTensor.dequantize(): block orientation and the multiplying `weight_scale_inv` are as the engines read them."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    ckpt = make(tiny_models("llama"), "fp8")
    write_checkpoint(ckpt, "fp8", tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    for name, qt in ckpt.qtensors.items():
        assert torch.equal(model.get_submodule(name).weight.detach().float(), qt.dequantize()), name
