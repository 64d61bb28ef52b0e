import json

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt,scheme,group,sym", [
    ("auto-round", "w4a16", 128, True),
    ("auto-round", "w4a16", 32, False),
    ("auto-round", "w8a16", 64, True),
    ("auto-round-awq", "w4a16", 128, False),
    ("auto-round-awq", "w4a16", 64, True),
])
def test_auto_round_roundtrip_bit_identical(tiny_models, tmp_path, arch, fmt, scheme, group, sym):
    ckpt = make_checkpoint(tiny_models(arch), WeightSpec.of(get_scheme(scheme), group, sym))
    write_checkpoint(ckpt, fmt, tmp_path / "r")
    back = read_checkpoint(tmp_path / "r")
    assert back.format == "auto-round"
    assert set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
        assert torch.equal(back.qtensors[name].dequantize(), qt.dequantize())
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "auto-round" and cfg["data_type"] == "int"
    assert cfg["packing_format"] == ("auto_round:auto_awq" if fmt == "auto-round-awq" else "auto_round:auto_gptq")
    assert cfg["block_name_to_quantize"] == "model.layers"
    if arch == "qwen3_moe":  # MoE routers stay in full precision: extra_config says bits 16
        assert cfg["extra_config"] and all(k.endswith("mlp.gate") and v["bits"] == 16 for k, v in cfg["extra_config"].items())
    else:
        assert "extra_config" not in cfg
    assert (cfg["bits"], cfg["group_size"], cfg["sym"]) == (get_scheme(scheme).weight_bits, group, sym)
    td = TensorDir(tmp_path / "r")
    assert not [k for k in td if k.endswith(".g_idx")]  # AutoRound's packers write no g_idx


def test_auto_round_extra_config_overrides(tiny_models, tmp_path):
    """Per-module bits/group/sym overrides and an in-block linear left unquantized (bits 16)."""
    base = make_checkpoint(tiny_models("qwen2"), WeightSpec.of(get_scheme("w4a16"), 128, True))
    w8 = make_checkpoint(tiny_models("qwen2"), WeightSpec.of(get_scheme("w8a16"), 32, False))
    base.qtensors["model.layers.1.mlp.down_proj"] = w8.qtensors["model.layers.1.mlp.down_proj"]
    keep = "model.layers.0.self_attn.o_proj"
    del base.qtensors[keep]
    from exporters.io import TensorDir as TD

    base.tensors = dict(base.tensors)
    base.tensors[f"{keep}.weight"] = TD(tiny_models("qwen2"))[f"{keep}.weight"]
    write_checkpoint(base, "auto-round", tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert cfg["extra_config"] == {"model.layers.1.mlp.down_proj": {"bits": 8, "group_size": 32, "sym": False},
                                   keep: {"bits": 16, "data_type": "float"}}
    back = read_checkpoint(tmp_path / "r")
    assert keep not in back.qtensors and f"{keep}.weight" in back.tensors
    for name, qt in base.qtensors.items():
        assert back.qtensors[name].equal(qt), name
    assert back.qtensors["model.layers.1.mlp.down_proj"].bits == 8


@pytest.mark.parametrize("fmt,scheme,kw,reason", [
    ("auto-round", "w4a16", {"act_order": True, "static_groups": False}, "act order"),
    ("auto-round", "fp8", {}, "integer weights"),
    ("auto-round-awq", "w8a16", {}, "4-bit only"),
])
def test_auto_round_refuses(tiny_models, tmp_path, cli, fmt, scheme, kw, reason):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme(scheme)), **kw)
    write_checkpoint(ckpt, "qtool", tmp_path / "src")
    r = cli("export", tmp_path / "src", "--format", fmt, "--out", tmp_path / "r")
    assert r.code == 2 and reason in r.err
    assert not (tmp_path / "r").exists()
