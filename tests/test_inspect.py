"""`qtool inspect`: engine warnings, size by module type, the per-layer table, one JSON object."""

import json

import pytest

from calibrate.models import load_config
from exporters import write_checkpoint
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.schemes import WeightSpec
from tests.helpers import make_checkpoint


def _inspect(cli, path):
    r = cli("inspect", path, "--json")
    assert r.code == 0, r.err
    assert r.out.strip().count("\n") == 0  # one object on one line
    return json.loads(r.out)


def test_clean_4bit_gptq_has_no_warnings(cli, tiny_models, tmp_path):
    src = tiny_models("llama")
    write_checkpoint(make_checkpoint(src, WeightSpec.of(get_scheme("w4a16"), 128)), "gptq", tmp_path / "g")
    info = _inspect(cli, tmp_path / "g")
    assert info["warnings"] == []
    # size by module type adds up, and the unquantized embeddings are what the files hold
    kinds = info["size_by_kind"]
    assert set(kinds) <= {"attention", "mlp", "experts", "embeddings", "other"}
    assert sum(v["quantized"] for v in kinds.values()) == info["size_bytes"]["quantized"]
    assert sum(v["unquantized"] for v in kinds.values()) == info["size_bytes"]["unquantized"]
    td = TensorDir(src)
    emb = sum(td[k].numel() * td[k].element_size() for k in td if "embed_tokens" in k or "lm_head" in k)
    assert kinds["embeddings"]["unquantized"] == emb and kinds["embeddings"]["quantized"] == 0
    cfg = load_config(src)
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    assert kinds["mlp"]["quantized"] == L * 3 * h * i // 2 + L * 3 * (h * i // 128) * 2  # int4 codes + fp16 scales
    # the layer table: model order inside a layer, module type, bytes
    names = [l["name"] for l in info["layers"]]
    assert names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.1.mlp.up_proj")
    assert all(l["kind"] in ("attention", "mlp") and l["bytes"] > 0 for l in info["layers"])
    # and the human form prints the tables
    r = cli("inspect", tmp_path / "g")
    assert r.code == 0 and "size by module type" in r.err and "layers.0.self_attn.q_proj" in r.err


def test_3bit_gptq_warns_no_marlin(cli, tiny_models, tmp_path):
    assert cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--bits", "3", "--format", "gptq", "--out", tmp_path / "g3").code == 0
    info = _inspect(cli, tmp_path / "g3")
    assert any("Marlin" in w and "3-bit" in w and "14 layer" in w for w in info["warnings"]), info["warnings"]
    assert any(e["engine"] == "vllm" and e["loads"] for e in info["engines"])
    r = cli("inspect", tmp_path / "g3")
    assert "warning:" in r.err and "Marlin" in r.err


def test_qtool_format_warns_engines_refuse_and_names_conversions(cli, tiny_models, tmp_path):
    write_checkpoint(make_checkpoint(tiny_models("qwen2"), WeightSpec.of(get_scheme("w4a16"), 128)), "qtool", tmp_path / "q")
    info = _inspect(cli, tmp_path / "q")
    assert any(w.startswith("vllm will refuse") for w in info["warnings"])
    assert any(c["format"] == "gptq" and "vllm" in c["engines"] for c in info["convert_to"])


def test_mixed_precision_inside_fused_shards(cli, tiny_models, tmp_path):
    """k_proj left unquantized while q_proj / v_proj are int4: vLLM refuses the fused qkv_proj."""
    src = tiny_models("llama")
    ck = make_checkpoint(src, WeightSpec.of(get_scheme("w4a16"), 128))
    td = TensorDir(src)
    name = "model.layers.1.self_attn.k_proj"
    del ck.qtensors[name]
    ck.tensors[f"{name}.weight"] = td[f"{name}.weight"]
    write_checkpoint(ck, "qtool", tmp_path / "q")
    info = _inspect(cli, tmp_path / "q")
    fused = [w for w in info["warnings"] if "fused shards" in w]
    assert len(fused) == 1 and "model.layers.1.self_attn" in fused[0] and "unquantized" in fused[0]
    assert info["size_by_kind"]["attention"]["unquantized"] >= td[f"{name}.weight"].numel() * 2


@pytest.mark.parametrize("name,kind", [
    ("model.layers.3.self_attn.q_proj", "attention"), ("model.layers.3.mlp.down_proj", "mlp"),
    ("model.layers.3.mlp.experts.7.up_proj", "experts"), ("model.embed_tokens", "embeddings"),
    ("lm_head", "embeddings"), ("model.layers.3.input_layernorm.weight", "other"),
    ("model.language_model.layers.0.self_attn.o_proj", "attention"), ("model.layers.0.block_sparse_moe.experts.1.w2", "experts"),
])
def test_module_kind(name, kind):
    from exporters.inspect import module_kind

    assert module_kind(name) == kind
