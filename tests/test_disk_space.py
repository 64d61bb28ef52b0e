"""Free space on the --out file system is checked against the estimated output size before work starts."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from exporters import get_format, read_checkpoint
from exporters.base import checkpoint_size
from exporters.io import TensorDir
from qtensor import get_scheme
from qtensor.schemes import WeightSpec
from quantize_cli import api

Usage = namedtuple("Usage", "total used free")


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def _free(monkeypatch, free: int):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 50, (1 << 50) - free, free))


def _one_line_error(r, needle):
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (r.code, r.err)


@pytest.mark.parametrize("fmt,scheme", [("gptq", "w4a16"), ("qtool", "w4a16"), ("qtool", "fp8")])
def test_estimate_close_to_written_size(tiny_models, tmp_path, fmt, scheme):
    src = tiny_models("llama")
    need = api.estimate_quantized_size(TensorDir(src), WeightSpec.of(get_scheme(scheme)), get_format(fmt))
    api.quantize(str(src), scheme=scheme, method="rtn", format=fmt, out=tmp_path / "o", samples=1, seqlen=32)
    got = _dir_bytes(tmp_path / "o")
    assert 0.9 * got <= need <= 1.25 * got, (need, got)
    # export: the estimate of rewriting the decoded checkpoint in the other format
    other = "qtool" if fmt == "gptq" else "gptq"
    if scheme == "w4a16":
        ckpt = read_checkpoint(tmp_path / "o")
        need = checkpoint_size(ckpt, get_format(other))
        api.export(tmp_path / "o", other, tmp_path / "e")
        got = _dir_bytes(tmp_path / "e")
        assert 0.9 * got <= need <= 1.25 * got, (need, got)


def test_quantize_refuses_before_work_when_disk_is_short(cli, tiny_models, tmp_path, monkeypatch):
    src = tiny_models("llama")
    need = api.estimate_quantized_size(TensorDir(src), WeightSpec.of(get_scheme("w4a16")), get_format("gptq"))
    from calibrate import models as cmodels

    def no_work(*a, **k):
        raise AssertionError("the model was loaded although the output cannot fit")

    with monkeypatch.context() as m:
        _free(m, need - 1)
        m.setattr(cmodels, "load_model", no_work)
        m.setattr(cmodels, "load_tokenizer", no_work)
        r = cli("quantize", src, "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o", "--samples", "1", "--seqlen", "32")
    _one_line_error(r, "not enough free space")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary directory
    _free(monkeypatch, need)  # exactly enough: it runs
    r = cli("quantize", src, "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o", "--samples", "1", "--seqlen", "32")
    assert r.code == 0, r.err
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_export_refuses_when_disk_is_short(cli, tiny_models, tmp_path, monkeypatch):
    src = tmp_path / "src"
    api.quantize(str(tiny_models("llama")), scheme="w4a16", method="rtn", format="gptq", out=src, samples=1, seqlen=32)
    need = checkpoint_size(read_checkpoint(src), get_format("qtool"))
    _free(monkeypatch, need - 1)
    r = cli("export", src, "--format", "qtool", "--out", tmp_path / "o")
    _one_line_error(r, "not enough free space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    _free(monkeypatch, need)
    assert cli("export", src, "--format", "qtool", "--out", tmp_path / "o").code == 0
