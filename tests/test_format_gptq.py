import json

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

CASES = [
    (4, 128, True, False, True),
    (4, 128, False, False, True),
    (4, -1, True, False, True),
    (4, 32, True, True, False),  # act order without static groups: g_idx is a real permutation
    (4, 64, True, True, True),
    (8, 128, True, False, True),
    (8, 64, False, False, True),
    (3, 128, True, False, True),
    (2, 32, False, False, True),
]


@pytest.mark.parametrize("bits,group,sym,act_order,static", CASES)
def test_gptq_roundtrip_bit_identical(tiny_models, tmp_path, bits, group, sym, act_order, static):
    from dataclasses import replace

    spec = replace(WeightSpec.of(get_scheme("w4a16"), group, sym), bits=bits)
    ckpt = make_checkpoint(tiny_models("llama"), spec, act_order=act_order, static_groups=static)
    if not sym:  # GPTQ v1 cannot store a zero point of 0 (z-1 underflows): nudge those groups
        for qt in ckpt.qtensors.values():
            assert qt.zeros is not None
    try:
        write_checkpoint(ckpt, "gptq", tmp_path / "g")
    except QtoolError as e:
        assert "zero point of 0" in str(e)
        pytest.skip("random weights produced a zero point of 0, refused as documented")
    back = read_checkpoint(tmp_path / "g")
    assert back.format == "gptq"
    assert set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        b = back.qtensors[name]
        assert b.equal(qt), name
        assert torch.equal(b.dequantize(), qt.dequantize())
    if act_order and not static:
        assert any(q.act_order for q in back.qtensors.values())


def test_gptq_file_layout(tiny_models, tmp_path):
    ckpt = make_checkpoint(tiny_models("qwen2"), WeightSpec.of(get_scheme("w4a16"), 128))
    write_checkpoint(ckpt, "gptq", tmp_path / "g")
    td = TensorDir(tmp_path / "g")
    name = "model.layers.0.mlp.down_proj"
    n, k = 128, 256  # down_proj: in 256 (intermediate), out 128 (hidden)
    assert td[f"{name}.qweight"].dtype == torch.int32 and td.shape(f"{name}.qweight") == [k * 4 // 32, n]
    assert td[f"{name}.qzeros"].dtype == torch.int32 and td.shape(f"{name}.qzeros") == [k // 128, n * 4 // 32]
    assert td[f"{name}.scales"].dtype == torch.float16 and td.shape(f"{name}.scales") == [k // 128, n]
    assert td[f"{name}.g_idx"].dtype == torch.int32 and torch.equal(td[f"{name}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
    # symmetric 4-bit stores zero 8 as 7 in every nibble
    assert (td[f"{name}.qzeros"] == 0x77777777).all()
    # qwen2 q/k/v biases pass through
    assert "model.layers.0.self_attn.q_proj.bias" in td
    assert f"{name}.weight" not in td
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    for key, val in {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}.items():
        assert cfg[key] == val
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["bits"] == 4
    assert (tmp_path / "g" / "tokenizer.json").is_file() and (tmp_path / "g" / "qtool.json").is_file()


def test_gptq_refuses_fp8(tiny_models, tmp_path):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("fp8")))
    with pytest.raises(QtoolError, match="cannot hold"):
        write_checkpoint(ckpt, "gptq", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary directory left behind


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"])
@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8-int8", "fp8", "fp8-block", "nvfp4", "mxfp4", "mxfp8"])
def test_qtool_format_lossless(tiny_models, tmp_path, scheme, arch):
    ckpt = make_checkpoint(tiny_models(arch), WeightSpec.of(get_scheme(scheme)))
    write_checkpoint(ckpt, "qtool", tmp_path / "q")
    back = read_checkpoint(tmp_path / "q")
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name


def test_shards_and_index(tiny_models, tmp_path):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("w4a16")))
    write_checkpoint(ckpt, "gptq", tmp_path / "g", max_shard_bytes=100_000)
    idx = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    back = read_checkpoint(tmp_path / "g")
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3", "qwen3_moe"])
@pytest.mark.parametrize("scheme,group", [("w4a16", 128), ("w8a16", 64)])
def test_gptq_roundtrip_architectures(tiny_models, tmp_path, arch, scheme, group):
    ckpt = make_checkpoint(tiny_models(arch), WeightSpec.of(get_scheme(scheme), group))
    write_checkpoint(ckpt, "gptq", tmp_path / "g")
    back = read_checkpoint(tmp_path / "g")
    assert set(back.qtensors) == set(ckpt.qtensors)
    if arch == "qwen3_moe":
        assert any(".experts." in n for n in back.qtensors)
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
