"""Mixed precision: `qtool quantize --rules FILE` and the default full-precision modules."""

import json
import os

import pytest
import torch

from exporters import read_checkpoint
from exporters.io import TensorDir

from .test_e2e_tiny import independent_gptq_dequant

RULES = """\
# layer 0 stays in full precision; every down_proj gets 8 bits; the rest the command's w4a16
rules:
  - match: 'layers\\.0\\.'
    skip: true
  - match: 'mlp\\.down_proj$'
    scheme: w8a16
"""
FAST = ("--samples", "4", "--seqlen", "64")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture
def rules_file(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return p


def _err(r):
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.code, r.err)
    return lines[0]


# ---- parsing and validation -------------------------------------------------------------------------


@pytest.mark.parametrize("text,ext,want", [
    ("- match: 'q_proj'\n  scheme: w5a16\n", "yaml", "rule 1 (match 'q_proj'): unknown scheme 'w5a16'"),
    ("- match: 'q_proj('\n  scheme: w8a16\n", "yaml", "rule 1: 'match' 'q_proj(' is not a valid regex"),
    ("- match: 'q_proj'\n  scheme: w8a16\n  grup_size: 64\n", "yaml", "rule 1: unknown key 'grup_size'"),
    ("- match: 'q_proj'\n  skip: true\n  scheme: w8a16\n", "yaml", "'skip: true' takes no 'scheme'"),
    ("- match: 'q_proj'\n", "yaml", "needs 'scheme: NAME' or 'skip: true'"),
    ("- scheme: w8a16\n", "yaml", "rule 1: 'match' must be a non-empty regex string"),
    ("- match: 'q_proj'\n  scheme: w8a8-int8\n  bits: 4\n", "yaml", "bits 4 is not valid for scheme w8a8-int8"),
    ("- match: 'q_proj'\n  scheme: w8a16\n  group_size: -5\n", "yaml", "group_size -5 is invalid"),
    ("rules: {match: x}\n", "yaml", "expected a list of rules"),
    ("other: []\n", "yaml", "unknown top-level key 'other'"),
    ("- match: [unclosed\n", "yaml", "invalid YAML"),
    ('[{"match": "q_proj", "scheme": "w8a16"', "json", "invalid JSON"),
    # checked against the model, the method and the format before any calibration
    ("- match: 'down_proj'\n  scheme: w8a8-int8\n", "yaml", "rule 1 (match 'down_proj'): model.layers.0.mlp.down_proj: format gptq cannot hold scheme w8a8-int8"),
    ("- match: 'down_proj'\n  scheme: nvfp4\n", "yaml", "model.layers.0.mlp.down_proj: method gptq cannot produce scheme nvfp4"),
    ("- match: 'o_proj'\n  scheme: w4a16\n  group_size: 96\n", "yaml", "model.layers.0.self_attn.o_proj: in_features 128 is not a multiple of group size 96"),
])
def test_bad_rules_one_line_exit_2(cli, tiny_models, tmp_path, text, ext, want):
    p = tmp_path / f"r.{ext}"
    p.write_text(text)
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "o", "--rules", p, *FAST)
    assert want in _err(r)
    assert not (tmp_path / "o").exists()


def test_rules_file_missing_and_other_backend(cli, tiny_models, tmp_path, rules_file):
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o", "--rules", tmp_path / "nope.yaml")
    assert "rules file not found" in _err(r)
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o", "--rules", rules_file, "--backend", "autoround")
    assert "--rules works with the native backend only" in _err(r)


def test_unused_rule_warns_json_rules(cli, tiny_models, tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"match": r"mlp\.down_proj$", "scheme": "w8a16", "group_size": -1}, {"match": "no_such_module", "skip": True}]))
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "o", "--rules", p, "--json", *FAST)
    assert r.code == 0, r.err
    notes = json.loads(r.out)["notes"]
    assert "warning: rule 2 (match 'no_such_module') matches no decoder linear" in notes
    qts = read_checkpoint(tmp_path / "o").qtensors
    assert all((q.bits, q.group_size) == ((8, -1) if n.endswith("down_proj") else (4, 128)) for n, q in qts.items())
    assert json.loads((tmp_path / "o" / "qtool.json").read_text())["rules"][0] == {"match": r"mlp\.down_proj$", "scheme": "w8a16", "bits": 8, "group_size": -1, "sym": True}


def test_resolver_first_match_wins_and_default_skips():
    from calibrate.rules import Resolver, default_skip, parse_rules
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    sch = get_scheme("w4a16")
    res = Resolver(sch, WeightSpec.of(sch, 64, False), parse_rules([
        {"match": r"layers\.3\.mlp", "skip": True},
        {"match": "mlp", "scheme": "w4a16", "bits": 3},
        {"match": "o_proj", "scheme": "w8a16", "sym": False},
    ]))
    assert res("model.layers.3.mlp.up_proj") is None
    s, sp = res("model.layers.1.mlp.up_proj")
    assert (sp.bits, sp.group_size, sp.sym) == (3, 64, False)  # the command's scheme keeps --group-size/--asym
    s, sp = res("model.layers.1.self_attn.o_proj")
    assert (s.name, sp.bits, sp.group_size, sp.sym) == ("w8a16", 8, 128, False)  # another scheme: its own defaults
    assert res("model.layers.1.self_attn.q_proj")[1] == WeightSpec.of(sch, 64, False)
    for name, what in [("lm_head", "lm_head"), ("model.embed_tokens", "embeddings"), ("model.layers.0.mlp.gate", "MoE router"),
                       ("model.layers.0.mlp.shared_expert_gate", "MoE router"), ("model.visual.blocks.0.mlp.fc1", "vision tower / multimodal projector"),
                       ("model.vision_tower.encoder.layers.0.self_attn.q_proj", "vision tower / multimodal projector"),
                       ("model.multi_modal_projector.linear_1", "vision tower / multimodal projector")]:
        assert default_skip(name) == what and res(name) is None, name
    assert default_skip("model.layers.0.mlp.gate_proj") is None


def test_decoder_layers_never_a_vision_tower():
    """A vision tower's block list that is as long as the text model's and has a shorter name is not taken."""
    from torch import nn

    from calibrate.pipeline import find_decoder_layers

    class Cfg:
        num_hidden_layers = 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.visual = nn.Module()
            self.visual.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
            self.language_model = nn.Module()
            self.language_model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    assert find_decoder_layers(M())[0] == "language_model.layers"


# ---- tiny llama: per-module schemes into every int format, checked against independent references ----------


def _check_mixed(ckpt, src):
    """Layer 1: down_proj 8-bit, the rest 4-bit; layer 0 plain weights equal to the source (orig dtype)."""
    td = TensorDir(src)
    assert sorted(ckpt.qtensors) == sorted(f"model.layers.1.{l}" for l in LINEARS)
    for n, q in ckpt.qtensors.items():
        assert (q.bits, q.group_size, q.sym) == ((8 if n.endswith("down_proj") else 4), 128, True), n
    for l in LINEARS:
        k = f"model.layers.0.{l}.weight"
        assert ckpt.tensors[k].dtype == torch.bfloat16 and torch.equal(ckpt.tensors[k], td[k]), k


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_llama_all_int_formats(cli, tiny_models, tmp_path, rules_file, method):
    from calibrate.models import load_model
    from runtime.loader import load_quantized

    src = tiny_models("llama")
    r = cli("quantize", src, "--scheme", "w4a16", "--method", method, "--format", "gptq", "--out", tmp_path / "gptq", "--rules", rules_file, "--json", *FAST)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["modules"] == 7
    assert any(n.startswith("full precision (rule 1 (match 'layers\\\\.0\\\\.')): 7 linear(s)") for n in res["notes"]), res["notes"]
    assert any(n.startswith("full precision outside the decoder layers: embeddings, lm_head") for n in res["notes"])
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["dynamic"] == {
        "+:^model\\.layers\\.1\\.mlp\\.down_proj$": {"bits": 8, "group_size": 128, "sym": True},
        **{f"-:^model\\.layers\\.0\\.{l.replace('.', chr(92) + '.')}$": {} for l in LINEARS}}
    base = read_checkpoint(tmp_path / "gptq")
    _check_mixed(base, src)

    # the runtime computes what the fp model with independently dequantized weights computes (layer 0 untouched)
    qmodel, _ = load_quantized(tmp_path / "gptq")
    ref = load_model(src, torch.float32)
    td = TensorDir(tmp_path / "gptq")
    for l in LINEARS:
        n = f"model.layers.1.{l}"
        ref.get_submodule(n).weight.data = independent_gptq_dequant(td, n, bits=8 if l.endswith("down_proj") else 4)
    assert "model.layers.0.self_attn.q_proj.qweight" not in td
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(qmodel(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    # the same run straight into each format, and exports between them: the same modules, bit for bit
    for fmt in ("qtool", "auto-round", "compressed-tensors"):
        r = cli("quantize", src, "--scheme", "w4a16", "--method", method, "--format", fmt, "--out", tmp_path / fmt, "--rules", rules_file, *FAST)
        assert r.code == 0, r.err
        got = read_checkpoint(tmp_path / fmt)
        _check_mixed(got, src)
        assert all(got.qtensors[n].equal(q) for n, q in base.qtensors.items()), fmt
        assert cli("export", tmp_path / fmt, "--format", "gptq", "--out", tmp_path / f"{fmt}-gptq").code == 0
        back = read_checkpoint(tmp_path / f"{fmt}-gptq")
        _check_mixed(back, src)
        assert all(back.qtensors[n].equal(q) for n, q in base.qtensors.items()), fmt
    ar = json.loads((tmp_path / "auto-round" / "config.json").read_text())["quantization_config"]
    assert ar["extra_config"] == {"model.layers.1.mlp.down_proj": {"bits": 8}, **{f"model.layers.0.{l}": {"bits": 16, "data_type": "float"} for l in LINEARS}}
    ct = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert ct["ignore"] == ["lm_head", *sorted(f"model.layers.0.{l}" for l in LINEARS)]
    groups = {g["weights"]["num_bits"]: g["targets"] for g in ct["config_groups"].values()}
    assert groups == {4: sorted(f"model.layers.1.{l}" for l in LINEARS if l != "mlp.down_proj"), 8: ["model.layers.1.mlp.down_proj"]}

    # inspect shows the mix and the full-precision linears
    info = json.loads(cli("inspect", tmp_path / "gptq", "--json").out)
    assert info["schemes"] == {"int4 g128 sym": 6, "int8 g128 sym": 1}
    assert info["unquantized_linears"] == sorted(f"model.layers.0.{l}" for l in LINEARS)
    assert any(e["engine"] == "transformers" and not e["loads"] and "dynamic" in e["note"] for e in info["engines"])


def test_awq_method_with_rules(cli, tiny_models, tmp_path, rules_file):
    """AWQ's layer-level search quantizes each linear with its own spec and leaves skipped ones alone."""
    src = tiny_models("llama")
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "awq", "--format", "qtool", "--out", tmp_path / "a", "--rules", rules_file, *FAST)
    assert r.code == 0, r.err
    ck = read_checkpoint(tmp_path / "a")
    assert sorted(ck.qtensors) == sorted(f"model.layers.1.{l}" for l in LINEARS)
    assert ck.qtensors["model.layers.1.mlp.down_proj"].bits == 8 and ck.qtensors["model.layers.1.mlp.up_proj"].bits == 4


# ---- the real loaders (CPU) ------------------------------------------------------------------------------


def test_mixed_loads_in_real_loaders(cli, tiny_models, tmp_path, rules_file, monkeypatch):
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    from .test_real_loaders import IDS, assert_logits_close, hf_logits, qtool_logits

    src = tiny_models("llama")
    for fmt in ("gptq", "auto-round", "compressed-tensors"):
        r = cli("quantize", src, "--scheme", "w4a16", "--method", "rtn", "--format", fmt, "--out", tmp_path / fmt, "--rules", rules_file, *FAST)
        assert r.code == 0, r.err
    # GPTQModel honours `dynamic`: plain Linear for layer 0, an 8-bit kernel for down_proj
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes ./logs
    m = GPTQModel.load(str(tmp_path / "gptq"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "gptqmodel" in type(m.model.layers[1].mlp.down_proj).__module__ and m.model.layers[1].mlp.down_proj.bits == 8
    assert m.model.layers[1].self_attn.q_proj.bits == 4
    with torch.no_grad():
        assert_logits_close(m(IDS).logits.float(), qtool_logits(tmp_path / "gptq"))
    # AutoRound's loader honours extra_config
    out, m = hf_logits(tmp_path / "auto-round", quantization_config=AutoRoundConfig(backend="torch"))
    assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear and "auto_round" in type(m.model.layers[1].mlp.down_proj).__module__
    assert m.model.layers[1].mlp.down_proj.bits == 8
    assert_logits_close(out, qtool_logits(tmp_path / "auto-round"))
    # compressed-tensors decompresses every module with its own config group (transformers' dequantize=True path
    # would use one dense group for all: transformers 5.24 limitation, so the default compressed-tensors path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32, device_map="cpu")
    with torch.no_grad():  # compressed-tensors decompresses on the first forward
        assert torch.equal(m(IDS).logits.float(), qtool_logits(tmp_path / "compressed-tensors"))
    ours = read_checkpoint(tmp_path / "compressed-tensors")
    for n, q in ours.qtensors.items():
        assert torch.equal(m.get_submodule(n).weight.detach(), q.dequantize().float()), n
    td = TensorDir(src)
    for l in LINEARS:
        assert torch.equal(m.get_submodule(f"model.layers.0.{l}").weight.detach(), td[f"model.layers.0.{l}.weight"].float())


# ---- formats with activation schemes: msModelSlim per-tensor types, ModelOpt mixed / exclude_modules ------------


def test_msmodelslim_mixed(cli, tiny_models, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- match: 'layers\\.0\\.self_attn'\n  skip: true\n- match: 'down_proj$'\n  scheme: w8a8-int8-static\n")
    src = tiny_models("llama")
    r = cli("quantize", src, "--scheme", "w8a8-int8", "--method", "rtn", "--format", "msmodelslim", "--out", tmp_path / "m", "--rules", p, *FAST)
    assert r.code == 0, r.err
    desc = json.loads((tmp_path / "m" / "quant_model_description.json").read_text())
    assert desc["model.layers.1.mlp.down_proj.weight"] == "W8A8" and desc["model.layers.0.mlp.down_proj.weight"] == "W8A8"
    assert desc["model.layers.1.mlp.up_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "FLOAT" and desc["model.layers.1.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    ck = read_checkpoint(tmp_path / "m")
    assert len(ck.qtensors) == 10 and ck.qtensors["model.layers.1.mlp.down_proj"].act.kind == "static"
    assert ck.qtensors["model.layers.1.mlp.up_proj"].act.kind == "dynamic"
    td = TensorDir(src)
    assert torch.equal(ck.tensors["model.layers.0.self_attn.o_proj.weight"], td["model.layers.0.self_attn.o_proj.weight"])
    assert cli("export", tmp_path / "m", "--format", "qtool", "--out", tmp_path / "q").code == 0
    assert cli("export", tmp_path / "q", "--format", "msmodelslim", "--out", tmp_path / "m2").code == 0
    again = read_checkpoint(tmp_path / "m2")
    assert all(again.qtensors[n].equal(q) for n, q in ck.qtensors.items())


def test_modelopt_mixed_and_exclude(cli, tiny_models, tmp_path):
    src = tiny_models("llama")
    p = tmp_path / "r.yaml"
    p.write_text("- match: 'layers\\.0\\.'\n  skip: true\n")
    r = cli("quantize", src, "--scheme", "fp8", "--method", "fp8", "--format", "modelopt", "--out", tmp_path / "u", "--rules", p, *FAST)
    assert r.code == 0, r.err
    hf = json.loads((tmp_path / "u" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "FP8" and set(hf["exclude_modules"]) == {"lm_head", "model.embed_tokens", *(f"model.layers.0.{l}" for l in LINEARS)}
    # the native pipeline makes no ModelOpt-ready int4/NVFP4 layer (fp32 int4 scales, NVFP4 input scales): mix one in
    from dataclasses import replace as dc_replace

    from calibrate.algorithms.rtn import quantize_weight
    from exporters import write_checkpoint
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    ck = read_checkpoint(tmp_path / "u")
    down = "model.layers.1.mlp.down_proj"
    spec = dc_replace(WeightSpec.of(get_scheme("w4a16"), 128), scale_dtype=torch.float32)
    mixed = dc_replace(ck, qtensors={**ck.qtensors, down: quantize_weight(TensorDir(src)[f"{down}.weight"].float(), spec)})
    write_checkpoint(mixed, "modelopt", tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "MIXED_PRECISION"
    assert {k: v["quant_algo"] for k, v in hf["quantized_layers"].items()} == {f"model.layers.1.{l}": ("W4A16_AWQ" if l == "mlp.down_proj" else "FP8") for l in LINEARS}
    back = read_checkpoint(tmp_path / "m")
    assert sorted(back.qtensors) == sorted(mixed.qtensors) and all(back.qtensors[n].equal(q) for n, q in mixed.qtensors.items())
    td = TensorDir(src)
    assert all(torch.equal(back.tensors[f"model.layers.0.{l}.weight"], td[f"model.layers.0.{l}.weight"]) for l in LINEARS)


def test_format_that_cannot_mix_refuses(cli, tiny_models, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- match: 'down_proj$'\n  scheme: w4a16\n  group_size: 64\n")
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "awq", "--out", tmp_path / "a", "--rules", p, *FAST)
    assert "format awq has one bits/group_size/zero_point for the whole model" in _err(r)
    p.write_text("- match: 'layers\\.0\\.self_attn\\.o_proj$'\n  skip: true\n")
    r = cli("quantize", tiny_models("llama"), "--scheme", "w8a8-int8", "--format", "w8a8-int8", "--out", tmp_path / "w", "--rules", p, *FAST)
    assert "model.layers.0.self_attn.o_proj is unquantized (SGLang quantizes every decoder linear)" in _err(r)


# ---- default skips: MoE routers, vision towers --------------------------------------------------------------


def test_moe_router_default_skip(cli, tiny_models, tmp_path):
    src = tiny_models("qwen3_moe")
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "g", "--json", *FAST)
    assert r.code == 0, r.err
    notes = json.loads(r.out)["notes"]
    assert any(n.startswith("full precision (default skip: MoE router): 2 router(s): model.layers.0.mlp.gate") for n in notes), notes
    ck = read_checkpoint(tmp_path / "g")
    assert not any(n.endswith(".mlp.gate") for n in ck.qtensors) and "model.layers.0.mlp.gate.weight" in ck.tensors
    assert "dynamic" not in json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]  # routers need no '-:'


def _tiny_gemma3_multimodal(out):
    """Gemma 3 with a SigLIP vision tower of as many layers as the text model, saved under the module names."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibrate.tiny import make_tokenizer, tiny_config

    out.mkdir()
    make_tokenizer(out)
    tc = {k: v for k, v in tiny_config("gemma3").to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = AutoConfig.for_model("gemma3", text_config=tc, mm_tokens_per_image=4, image_token_index=500, boi_token_index=501, eoi_token_index=502,
                               vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    m.config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_vision_tower_default_skip(cli, tmp_path):
    src = _tiny_gemma3_multimodal(tmp_path / "mm")
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "gptq", "--format", "compressed-tensors", "--out", tmp_path / "c", "--json", *FAST)
    assert r.code == 0, r.err
    notes = json.loads(r.out)["notes"]
    assert "full precision outside the decoder layers: embeddings, lm_head, vision tower / multimodal projector" in notes
    ck = read_checkpoint(tmp_path / "c")
    assert len(ck.qtensors) == 14 and all(n.startswith("model.language_model.layers.") for n in ck.qtensors)
    td = TensorDir(src)
    vision = [k for k in td if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert vision and all(torch.equal(ck.tensors[k], td[k]) for k in vision)
    # a rule cannot pull a vision linear in: it matches no decoder linear
    p = tmp_path / "r.yaml"
    p.write_text("- match: 'vision_tower'\n  scheme: w8a16\n")
    r = cli("quantize", src, "--scheme", "w4a16", "--format", "qtool", "--out", tmp_path / "q", "--rules", p, "--json", *FAST)
    assert r.code == 0, r.err
    assert "warning: rule 1 (match 'vision_tower') matches no decoder linear" in json.loads(r.out)["notes"]
