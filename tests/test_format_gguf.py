"""GGUF format: Q8_0 / Q4_0 round trips, the gguf package's own codec, and transformers' GGUF loader."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import QTensor, get_scheme
from qtensor import packing as pk
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def make(model_dir, bits):
    return make_checkpoint(model_dir, replace(WeightSpec.of(get_scheme("w4a16"), 32), bits=bits))


def gguf_file(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]["gguf_file"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_gguf_roundtrip_and_transformers_load(tiny_models, tmp_path, arch, bits):
    from transformers import AutoModelForCausalLM

    ckpt = make(tiny_models(arch), bits)
    write_checkpoint(ckpt, "gguf", tmp_path / "g")
    f = gguf_file(tmp_path / "g")
    assert f == f"model-Q{bits}_0.gguf" and (tmp_path / "g" / f).is_file()
    assert not list((tmp_path / "g").glob("*.safetensors"))
    back = read_checkpoint(tmp_path / "g")
    assert back.format == "gguf" and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
    for key, t in ckpt.tensors.items():
        assert torch.equal(back.tensors[key], t), key
    # transformers' own GGUF loader (its dequantization, name map and q/k un-permutation)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=f, dtype=torch.float32)
    # a Mistral GGUF is a llama-architecture file (as llama.cpp writes it): transformers loads it as Llama
    assert model.config.model_type == {"gemma3": "gemma3_text", "mistral": "llama"}.get(arch, arch)
    for name, qt in ckpt.qtensors.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), qt.dequantize()), name
    sd = model.state_dict()
    for key, t in ckpt.tensors.items():
        assert torch.equal(sd[key], t.float()), key


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gguf_runtime_matches_transformers(tiny_models, tmp_path, arch):
    """qtool's runtime on the .gguf gives the logits of transformers' dequantized GGUF model."""
    from transformers import AutoModelForCausalLM

    from runtime.loader import load_quantized

    write_checkpoint(make(tiny_models(arch), 4), "gguf", tmp_path / "g")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_file(tmp_path / "g"), dtype=torch.float32).eval()
    ours, _ = load_quantized(tmp_path / "g")
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_blocks_match_llama_cpp_codec(kind):
    """Blocks produced by the gguf package's quantizer (llama.cpp's: Q4_0 d = max / -8, negative)
    decode into codes/scales whose QTensor.dequantize() is the package's dequantize, and re-pack to
    the same bytes."""
    import gguf

    t = getattr(gguf.GGMLQuantizationType, kind)
    w = (torch.randn(8, 128, generator=torch.Generator().manual_seed(0)) * 0.05).numpy().astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(w, t).copy())
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), t).copy())
    if kind == "Q8_0":
        codes, d = pk.unpack_gguf_q8_0(raw)
        again = pk.pack_gguf_q8_0(codes, d)
        bits = 8
    else:
        q, d = pk.unpack_gguf_q4_0(raw)
        codes = pk.offset_to_signed(q, 4)
        again = pk.pack_gguf_q4_0(q, d)
        bits = 4
        assert (d < 0).any()  # llama.cpp's sign convention survives: qtool keeps d as stored
    assert torch.equal(again, raw)
    qt = QTensor("int", bits, codes, d, None, 32)
    assert torch.equal(qt.dequantize(), ref)


@pytest.mark.parametrize("spec,match", [
    (replace(WeightSpec.of(get_scheme("w4a16"), 128), bits=4), "group size 128"),
    (replace(WeightSpec.of(get_scheme("w4a16"), 32, sym=False), bits=4), "asymmetric"),
    (WeightSpec.of(get_scheme("fp8")), "fp8"),
    (replace(WeightSpec.of(get_scheme("w4a16"), 32), bits=2), "int2"),
])
def test_gguf_refuses(tiny_models, tmp_path, spec, match):
    with pytest.raises(QtoolError, match=match):
        write_checkpoint(make_checkpoint(tiny_models("llama"), spec), "gguf", tmp_path / "g")
    assert not list(tmp_path.iterdir())


def test_gguf_refuses_arch_and_malformed(tiny_models, tmp_path):
    ck = make(tiny_models("llama"), 8)
    cfg = dict(ck.config, model_type="phi3")
    with pytest.raises(QtoolError, match="phi3"):
        write_checkpoint(replace(ck, config=cfg), "gguf", tmp_path / "x")
    # MoE: GGUF stacks experts into one 3-D tensor per projection, which qtool does not write yet
    with pytest.raises(QtoolError, match="qwen3_moe"):
        write_checkpoint(make(tiny_models("qwen3_moe"), 8), "gguf", tmp_path / "moe")
    write_checkpoint(ck, "gguf", tmp_path / "g")
    f = tmp_path / "g" / gguf_file(tmp_path / "g")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(QtoolError, match="gguf"):
        read_checkpoint(tmp_path / "g")
    f.unlink()
    with pytest.raises(QtoolError, match="missing"):
        read_checkpoint(tmp_path / "g")


def test_gguf_tokenizer_metadata(tiny_models, tmp_path):
    """Byte-level BPE tokenizers go into tokenizer.ggml.* (gpt2 model, tokens, types, merges); the
    tokenizer transformers builds from the file alone has the same vocabulary ids, special tokens
    and merges. (Its split regex for llama.cpp's "default" pre-tokenizer is not GPT-2's byte-level
    one in transformers 5.24, so whole-text encodings can differ around whitespace: not asserted.)"""
    import shutil

    from transformers import AutoTokenizer

    src = tiny_models("qwen2")
    write_checkpoint(make(src, 8), "gguf", tmp_path / "g")
    only = tmp_path / "only"
    only.mkdir()
    f = gguf_file(tmp_path / "g")
    shutil.copyfile(tmp_path / "g" / f, only / f)  # no tokenizer.json beside it: everything from the .gguf
    ours = AutoTokenizer.from_pretrained(only, gguf_file=f)
    ref = AutoTokenizer.from_pretrained(src)
    vocab = ref.get_vocab()
    got = ours.get_vocab()
    assert {t: got.get(t) for t in vocab} == vocab  # (transformers' GPT2Tokenizer adds its own <|endoftext|> after them)
    for t in ("<eos>", "<bos>", "<pad>"):
        assert ours.convert_tokens_to_ids(t) == vocab[t]
        assert ours.tokenize(f"a{t}b")[1] == t  # control tokens stay whole
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    built = json.loads(ours.backend_tokenizer.to_str())["model"]["merges"]
    assert [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in built] == [tuple(m) for m in merges]


def test_gguf_bare_file_from_llama_cpp_codec(tiny_models, tmp_path):
    """A bare .gguf (no config.json beside it) whose Q4_0 blocks come from the gguf package's own
    quantizer (llama.cpp's: negative d) is read from its metadata alone, converts to gptq and back
    exactly, and its QTensors dequantize to what transformers loads from it."""
    import gguf
    from transformers import AutoModelForCausalLM

    from exporters import Checkpoint

    src = tiny_models("llama")
    base = make(src, 4)
    qts = {}
    for name in base.qtensors:
        w = TensorDir(src)[f"{name}.weight"].float().numpy()
        raw = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0).copy())
        q, d = pk.unpack_gguf_q4_0(raw)
        qts[name] = QTensor("int", 4, pk.offset_to_signed(q, 4), d, None, 32)
    write_checkpoint(Checkpoint(base.config, qts, base.tensors, src), "gguf", tmp_path / "g")
    bare = tmp_path / "bare"
    bare.mkdir()
    (tmp_path / "g" / gguf_file(tmp_path / "g")).rename(bare / "llama-Q4_0.gguf")
    ckpt = read_checkpoint(bare / "llama-Q4_0.gguf")
    assert ckpt.format == "gguf" and ckpt.config["model_type"] == "llama"
    assert any((q.scales < 0).any() for q in ckpt.qtensors.values())
    for name, qt in qts.items():
        assert ckpt.qtensors[name].equal(qt), name
    write_checkpoint(ckpt, "gptq", tmp_path / "q")
    back = read_checkpoint(tmp_path / "q")
    for name, qt in qts.items():
        assert back.qtensors[name].equal(qt), name
    model = AutoModelForCausalLM.from_pretrained(bare, gguf_file="llama-Q4_0.gguf", dtype=torch.float32)
    for name, qt in qts.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), qt.dequantize()), name
