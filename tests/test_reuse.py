"""Replaying module outputs between calibration passes (calibrate/reuse.py) changes no bit of the result
and skips work: the same checkpoint with and without it, with fewer linear forwards."""

import pytest
import torch
from safetensors.torch import load_file

from calibrate import pipeline


def _quantize(cli, src, out, method, scheme, reuse, monkeypatch):
    calls = [0]
    orig = torch.nn.Linear.forward

    def counting(self, x):
        calls[0] += 1
        return orig(self, x)

    monkeypatch.setattr(pipeline, "REUSE", reuse)
    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    r = cli("quantize", src, "--scheme", scheme, "--method", method, "--format", "qtool", "--out", out,
            "--samples", "20", "--seqlen", "32", "--json")
    monkeypatch.setattr(torch.nn.Linear, "forward", orig)
    assert r.code == 0, r.err
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors, calls[0]


@pytest.mark.parametrize("arch,method,scheme", [("llama", "gptq", "w4a16"), ("gemma3", "gptq", "w4a16"), ("qwen3_moe", "gptq", "w4a16"),
                                                ("gemma3", "fp8", "fp8")])
def test_replay_gives_the_same_checkpoint_with_fewer_forwards(cli, tiny_models, tmp_path, monkeypatch, arch, method, scheme):
    src = tiny_models(arch)
    a, n_reuse = _quantize(cli, src, tmp_path / "a", method, scheme, True, monkeypatch)
    b, n_plain = _quantize(cli, src, tmp_path / "b", method, scheme, False, monkeypatch)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert n_reuse < 0.8 * n_plain, (n_reuse, n_plain)


def test_replay_respects_the_memory_budget(cli, tiny_models, tmp_path, monkeypatch):
    """With no memory for outputs nothing is replayed (and the result is still the same)."""
    src = tiny_models("llama")
    a, n_reuse = _quantize(cli, src, tmp_path / "a", "gptq", "w4a16", True, monkeypatch)
    monkeypatch.setattr(pipeline, "REUSE_BUDGET", 0)
    b, n_none = _quantize(cli, src, tmp_path / "b", "gptq", "w4a16", True, monkeypatch)
    _, n_plain = _quantize(cli, src, tmp_path / "c", "gptq", "w4a16", False, monkeypatch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert n_none >= n_plain > n_reuse  # (>=: the order trace runs one sample through each layer)
