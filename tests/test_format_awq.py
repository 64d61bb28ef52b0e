import json

import pytest
import torch

from exporters import read_checkpoint, write_checkpoint
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .helpers import make_checkpoint

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "qwen3_moe"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("group,sym", [(128, True), (128, False), (32, True), (64, False)])
def test_awq_roundtrip_bit_identical(tiny_models, tmp_path, arch, group, sym):
    ckpt = make_checkpoint(tiny_models(arch), WeightSpec.of(get_scheme("w4a16"), group, sym))
    write_checkpoint(ckpt, "awq", tmp_path / "a")
    back = read_checkpoint(tmp_path / "a")
    assert back.format == "awq" and set(back.qtensors) == set(ckpt.qtensors)
    for name, qt in ckpt.qtensors.items():
        assert back.qtensors[name].equal(qt), name
        assert back.qtensors[name].sym == sym
        assert torch.equal(back.qtensors[name].dequantize(), qt.dequantize())
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg["zero_point"] is (not sym) and cfg["group_size"] == group and cfg["version"] == "gemm"
    assert "lm_head" in cfg["modules_to_not_convert"]  # tied (gemma3) or not, lm_head stays a plain Linear


def test_awq_layout_matches_gptqmodel_unpacker(tiny_models, tmp_path):
    """Independent reference: GPTQModel's own AWQ dequantizer reads our tensors to the same weights."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    for sym in (True, False):
        ckpt = make_checkpoint(tiny_models("qwen2"), WeightSpec.of(get_scheme("w4a16"), 64, sym))
        out = tmp_path / f"a{sym}"
        write_checkpoint(ckpt, "awq", out)
        td = TensorDir(out)
        name = "model.layers.0.mlp.down_proj"
        n, k = 128, 256
        assert td[f"{name}.qweight"].dtype == torch.int32 and td.shape(f"{name}.qweight") == [k, n // 8]
        assert td.shape(f"{name}.qzeros") == [k // 64, n // 8] and td[f"{name}.scales"].dtype == torch.float16
        assert f"{name}.g_idx" not in td
        if sym:  # zero_point false: codes offset by 8 and every qzeros nibble 8, as GPTQModel writes it
            assert (td[f"{name}.qzeros"] == torch.tensor(0x88888888 - 2**32, dtype=torch.int32)).all()
        ref = dequantize_gemm(td[f"{name}.qweight"], td[f"{name}.qzeros"], td[f"{name}.scales"], 4, 64)
        assert torch.equal(ref.t(), ckpt.qtensors[name].dequantize().half())


@pytest.mark.parametrize("scheme,kw,reason", [
    ("w8a16", {}, "4-bit only"),
    ("fp8", {}, "integer weights"),
    ("w4a16", {"act_order": True, "static_groups": False}, "act order"),
])
def test_awq_refuses(tiny_models, tmp_path, cli, scheme, kw, reason):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme(scheme)), **kw)
    write_checkpoint(ckpt, "qtool", tmp_path / "src")
    r = cli("export", tmp_path / "src", "--format", "awq", "--out", tmp_path / "a")
    assert r.code == 2 and reason in r.err and "cannot hold" in r.err
    assert not (tmp_path / "a").exists()


def test_awq_refuses_mixed_group_sizes(tiny_models, tmp_path):
    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("w4a16"), 128))
    other = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("w4a16"), 64))
    name = "model.layers.0.mlp.down_proj"
    ckpt.qtensors[name] = other.qtensors[name]
    with pytest.raises(QtoolError, match="one bits/group_size"):
        write_checkpoint(ckpt, "awq", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_awq_malformed(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tiny_models("llama"), WeightSpec.of(get_scheme("w4a16")))
    write_checkpoint(ckpt, "awq", tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.self_attn.q_proj.scales"] = t["model.layers.1.self_attn.q_proj.scales"][:, :64].contiguous()
    save_file(t, f)
    with pytest.raises(QtoolError, match=r"model\.layers\.1\.self_attn\.q_proj\.scales has shape"):
        read_checkpoint(tmp_path / "a")
