"""The real model: Gemma-3-270M from the bundled GGUF, quantize -> eval under shared/EVAL.md (subset of windows)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_gemma_rtn_w4a16_g128(cli, gemma_dir, tmp_path):
    out = tmp_path / "gemma-rtn"
    r = cli("quantize", "gemma-3-270m", "--scheme", "w4a16", "--method", "rtn", "--group-size", "128", "--format", "gptq", "--out", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["modules"] == 18 * 7
    r = cli("eval", out, "--windows", "6", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    ref, ppl = m["reference_perplexity"], m["perplexity"]
    assert 5 < ref < 30  # bf16 Gemma-3-270M on pydoc text (11.41 over all 40 windows)
    assert ref < ppl < 3 * ref
    assert 0 < m["kl_divergence"] < 2 and 0.4 < m["top1_agreement"] < 0.95
    r = cli("inspect", out, "--json")
    info = json.loads(r.out)
    assert info["model_type"] == "gemma3_text" and info["quantized_modules"] == 126
    assert any(e["engine"] == "vllm" and e["loads"] for e in info["engines"])
