"""Every bad input: one line naming the problem, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest


def _one_line_error(r, needle):
    assert r.code == 2, (r.code, r.err)
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error:"), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.err


def test_missing_model(cli, tmp_path):
    r = cli("quantize", tmp_path / "nope", "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "model not found")
    assert not (tmp_path / "o").exists()


def test_directory_not_a_model(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "readme.txt").write_text("hi")
    r = cli("quantize", tmp_path / "m", "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "no config.json")
    assert not (tmp_path / "o").exists()


def test_pickle_only_model_refused(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    r = cli("quantize", tmp_path / "m", "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "pickle")


@pytest.mark.parametrize("content,needle", [(b"", "holds no text"), (b"\xff\xfe\x80" * 9, "not UTF-8")])
def test_bad_calibration_file(cli, tiny_models, tmp_path, content, needle):
    p = tmp_path / "calib.txt"
    p.write_bytes(content)
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "o", "--calib", p)
    _one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_unreadable_data_file(cli, tiny_models, tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("some text")
    p.chmod(0)
    import os

    if os.access(p, os.R_OK):  # root reads anything: use a directory in its place instead
        p.chmod(0o644)
        p.unlink()
        p.mkdir()
        needle = "cannot read data"
    else:
        needle = "cannot read"
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "o", "--calib", p)
    _one_line_error(r, needle)


def test_existing_output_without_force(cli, tiny_models, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "exists (pass --force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_unknown_scheme_and_format_and_method(cli, tiny_models, tmp_path):
    m = tiny_models("llama")
    _one_line_error(cli("quantize", m, "--scheme", "w5a5", "--format", "gptq", "--out", tmp_path / "o"), "unknown scheme 'w5a5'")
    _one_line_error(cli("quantize", m, "--scheme", "w4a16", "--format", "onnx", "--out", tmp_path / "o"), "unknown format 'onnx'")
    _one_line_error(cli("quantize", m, "--scheme", "w4a16", "--method", "magic", "--format", "gptq", "--out", tmp_path / "o"), "unknown method 'magic'")
    _one_line_error(cli("export", m, "--format", "onnx", "--out", tmp_path / "o"), "unknown format 'onnx'")
    assert not (tmp_path / "o").exists()


def test_unbuilt_combination_lists_working_ones(cli, tiny_models, tmp_path):
    r = cli("quantize", tiny_models("llama"), "--scheme", "fp8", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "working combinations")
    assert "native/rtn --scheme w4a16 --format gptq" in r.err


def test_unquantized_dir_for_export(cli, tiny_models, tmp_path):
    r = cli("export", tiny_models("llama"), "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "not a quantized checkpoint")


def test_eval_and_inspect_missing_path(cli, tmp_path):
    _one_line_error(cli("eval", tmp_path / "none"), "path not found")
    _one_line_error(cli("inspect", tmp_path / "none"), "path not found")


def test_usage_error_is_one_line(cli):
    r = cli("quantize", "x", "--scheme")
    _one_line_error(r, "--scheme")


def test_offline_hub_id(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("quantize", "someorg/somemodel", "--scheme", "w4a16", "--format", "gptq", "--out", tmp_path / "o")
    _one_line_error(r, "hub id")


def test_console_script_exit_code(tmp_path):
    """The installed entry point, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "quantize_cli", "inspect", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: path not found") and "Traceback" not in r.stderr


@pytest.mark.parametrize("method", ["smoothquant", "smoothquant-gptq"])
def test_smoothing_methods_refuse_weight_only_schemes_up_front(cli, tiny_models, tmp_path, method):
    """SmoothQuant's migration needs quantized activations: a weight-only scheme is refused before any
    work (one line, exit 2), so no work directory or output is left behind."""
    out = tmp_path / "q"
    r = cli("quantize", tiny_models("llama"), "--scheme", "w4a16", "--method", method, "--format", "qtool", "--out", out, "--samples", "2", "--seqlen", "32")
    assert r.code == 2 and f"method {method} with scheme w4a16" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
