"""Data-parallel calibration: 2 processes (gloo, CPU) give the checkpoint of 1 process, whether started
by torchrun or by `qtool quantize --nproc 2`; --gpus/--nproc validation; resume across processes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ARGS = ["--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", "8", "--seqlen", "64"]


def qtool(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "quantize_cli", *map(str, args)], env=env or ENV, capture_output=True, text=True, timeout=600, **kw)


def same_codes(a_dir: Path, b_dir: Path, n: int) -> None:
    from exporters import read_checkpoint

    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    assert set(a.qtensors) == set(b.qtensors) and len(a.qtensors) == n
    for name in a.qtensors:
        qa, qb = a.qtensors[name], b.qtensors[name]
        assert torch.equal(qa.codes, qb.codes), name
        assert torch.allclose(qa.scales.float(), qb.scales.float()), name


def test_two_gloo_ranks_equal_one_process(tiny_models, tmp_path):
    src = tiny_models("llama")
    one = qtool("quantize", src, *ARGS, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "quantize_cli", "quantize", str(src), *ARGS,
                          "--out", str(tmp_path / "two")], env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    same_codes(tmp_path / "one", tmp_path / "two", 14)
    # the CLI launches the processes itself; rank 0 alone prints the result
    # CI=1: libraries that print on stdout in CI (logbar, through defuser) must not reach --json's stdout
    three = qtool("quantize", src, *ARGS, "--out", tmp_path / "three", "--nproc", "2", "--json", env={**ENV, "CI": "1"})
    assert three.returncode == 0, three.stderr[-3000:]
    lines = three.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["modules"] == 14
    assert "2 CPU process" in three.stderr and "rank 1" not in three.stderr
    same_codes(tmp_path / "one", tmp_path / "three", 14)
    assert json.loads((tmp_path / "three" / "qtool.json").read_text())["device"] == "cpu"
    assert not list(tmp_path.glob("*rank*")) and not list(tmp_path.glob(".*qtool-work"))


def test_error_in_the_processes_is_one_line_with_rank_0_exit_code(tiny_models, tmp_path):
    r = qtool("quantize", tiny_models("llama"), *ARGS, "--group-size", "96", "--out", tmp_path / "o", "--nproc", "2")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: model.layers.0.self_attn.q_proj: in_features 128 is not a multiple of group size 96 (choose another --group-size)"], r.stderr
    assert "Traceback" not in r.stderr and "exitcode" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0"], "--gpus must be at least 1, not 0"),
    (["--nproc", "-1"], "--nproc must be at least 1, not -1"),
    (["--gpus", "1", "--nproc", "2"], "--gpus and --nproc exclude each other"),
    (["--gpus", "2", "--device", "cpu"], "--gpus runs on CUDA; for processes on the CPU use --nproc K"),
    (["--nproc", "2", "--device", "cuda"], "--nproc runs CPU processes (gloo); on CUDA use --gpus K"),
    (["--nproc", "2", "--backend", "gptqmodel"], "--nproc runs qtool's native pipeline; --backend gptqmodel calibrates in one process"),
    (["--nproc", "2", "--method", "awq"], "method awq calibrates in one process only (drop --nproc)"),
    (["--nproc", "2", "--allow-pickle"], "--allow-pickle works in one process"),
    (["--nproc", "2", "--max-gpu-memory", "0"], "--max-gpu-memory must be a positive number of GiB, not 0.0"),
    (["--max-gpu-memory", "-1"], "--max-gpu-memory must be a positive number of GiB, not -1.0"),
])
def test_gpus_nproc_arguments_are_checked(extra, message, tiny_models, tmp_path, cli):
    r = cli("quantize", tiny_models("llama"), *ARGS, "--out", tmp_path / "o", *extra)
    assert r.code == 2, r.err
    lines = [l for l in r.err.splitlines() if l.strip() and not l.startswith("warning: --allow-pickle")]
    assert len(lines) == 1 and lines[0].startswith("error: " + message), r.err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*"))


def test_more_gpus_than_visible(tiny_models, tmp_path, cli):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    r = cli("quantize", tiny_models("llama"), *ARGS, "--out", tmp_path / "o", "--gpus", n + 1)
    assert r.code == 2 and r.err.strip() == f"error: --gpus {n + 1} asked for, but {n} CUDA device(s) are visible"


def test_gpus_refused_under_torchrun(tiny_models, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("quantize", tiny_models("llama"), *ARGS, "--out", tmp_path / "o", "--nproc", "2")
    assert r.code == 2 and "do not run it under torchrun" in r.err


def test_child_argv():
    from quantize_cli.launch import child_argv

    assert child_argv(["quantize", "m", "--gpus", "4", "--out", "o"], "cuda") == ["quantize", "m", "--out", "o", "--device", "cuda"]
    assert child_argv(["quantize", "m", "--nproc=2", "--device", "cpu"], "cpu") == ["quantize", "m", "--device", "cpu"]


def _sha(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


def test_kill_then_resume_two_processes(tmp_path):
    """Both processes keep work directories; killed mid-model, `--resume` continues from the layer
    every process saved and gives the bytes of an uninterrupted 2-process run."""
    from calibrate.tiny import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "m", layers=8)
    env = {**ENV, "QTOOL_CHECKPOINT_SECONDS": "0"}
    args = ["quantize", src, "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", "16", "--seqlen", "128", "--nproc", "2"]
    ref = qtool(*args, "--out", tmp_path / "ref", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    work = tmp_path / ".run.qtool-work"
    p = subprocess.Popen([sys.executable, "-m", "quantize_cli", *map(str, args), "--out", str(tmp_path / "run")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads((work / "manifest.json").read_text())["layers_done"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both processes
    p.wait()
    assert not (tmp_path / "run").exists()
    mans = [json.loads((d / "manifest.json").read_text()) for d in (work, tmp_path / ".run.rank1.qtool-work")]
    assert mans[0]["layers_done"] < 8 and min(m["hidden_at"] for m in mans) >= 1  # resumes mid-model
    # one process cannot resume the work of two
    bad = qtool(*args[:-2], "--out", tmp_path / "run", "--resume", env=env)
    assert bad.returncode == 2 and "world_size" in bad.stderr, bad.stderr[-2000:]
    r = qtool(*args, "--out", tmp_path / "run", "--resume", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _sha(tmp_path / "run") == _sha(tmp_path / "ref")
    assert not work.exists() and not (tmp_path / ".run.rank1.qtool-work").exists()
