"""The eval gate both ways: a good checkpoint passes, the same checkpoint with one layer's scales x4 fails.

The good checkpoint is an 8-bit GPTQ one of the tiny Llama (KL ~6e-5, top-1 ~0.97 on 2 windows); the
corrupted copy has the fp16 scales of model.layers.0.mlp.down_proj multiplied by 4 in its safetensors
file (KL ~0.09, top-1 ~0.1, perplexity +5%). The thresholds sit well between the two.
"""

import json
import shutil

import pytest
import torch

from exporters.io import TensorDir
from tests.helpers import corrupt_scales

LAYER = "model.layers.0.mlp.down_proj"
GATE = ("--max-kl", "0.01", "--min-top1", "0.9", "--max-ppl-increase", "2")
METRICS = {"--max-kl": ("0.01", "KL divergence"), "--min-top1": ("0.9", "top-1 agreement"), "--max-ppl-increase": ("2", "perplexity increase")}


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory):
    from quantize_cli import api

    base = tmp_path_factory.mktemp("gate")
    good = base / "good"
    api.quantize(str(tiny_models("llama")), scheme="w8a16", method="rtn", format="gptq", out=good)
    bad = base / "bad"
    shutil.copytree(good, bad)
    corrupt_scales(bad, LAYER, 4.0)
    return good, bad


def _fresh(src, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def test_corruption_is_exactly_one_layer_times_four(ckpts):
    good, bad = ckpts
    a, b = TensorDir(good), TensorDir(bad)
    assert set(a) == set(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == [f"{LAYER}.scales"]
    assert torch.equal(b[f"{LAYER}.scales"].float(), a[f"{LAYER}.scales"].float() * 4)


def test_good_checkpoint_passes(cli, ckpts, tmp_path):
    good = _fresh(ckpts[0], tmp_path, "good")
    r = cli("eval", good, "--windows", "2", *GATE, "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["passed"] is True and m["failed"] == []
    assert m["kl_divergence"] < 0.01 and m["top1_agreement"] > 0.9 and m["ppl_increase_pct"] < 2
    assert json.loads((good / "qtool.json").read_text())["eval"]["passed"] is True


def test_corrupted_checkpoint_fails_naming_every_metric(cli, ckpts, tmp_path):
    bad = _fresh(ckpts[1], tmp_path, "bad")
    r = cli("eval", bad, "--windows", "2", *GATE, "--json")
    assert r.code == 1, r.err
    assert "eval gate failed" in r.err
    m = json.loads(r.out)  # still one JSON object on stdout
    assert m["passed"] is False and len(m["failed"]) == 3
    for _, name in METRICS.values():
        assert name in r.err
    saved = json.loads((bad / "qtool.json").read_text())["eval"]
    assert saved["passed"] is False and saved["failed"] == m["failed"]


@pytest.mark.parametrize("flag", list(METRICS))
def test_each_threshold_alone(cli, ckpts, tmp_path, flag):
    value, name = METRICS[flag]
    good = _fresh(ckpts[0], tmp_path, "good")
    bad = _fresh(ckpts[1], tmp_path, "bad")
    r = cli("eval", good, "--windows", "2", flag, value)
    assert r.code == 0, r.err
    r = cli("eval", bad, "--windows", "2", flag, value)
    assert r.code == 1
    failed_line = [l for l in r.err.splitlines() if "eval gate failed" in l]
    assert failed_line and name in r.err and flag in r.err
    others = [n for f, (_, n) in METRICS.items() if f != flag]
    assert not any(n in r.err for n in others)  # only the metric asked for is named


def test_no_reference(cli, ckpts, tmp_path):
    good = _fresh(ckpts[0], tmp_path, "good")
    r = cli("eval", good, "--windows", "1", "--no-reference", "--json")
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["reference"] is None and m["kl_divergence"] is None and m["perplexity"] > 1
    r = cli("eval", good, "--windows", "1", "--no-reference", "--max-kl", "1")
    assert r.code == 2 and r.err.startswith("error:") and "reference" in r.err
    r = cli("eval", good, "--windows", "1", "--no-reference", "--reference", str(good))
    assert r.code == 2 and r.err.startswith("error:")
