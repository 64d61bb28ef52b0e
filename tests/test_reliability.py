"""Resume after SIGKILL gives a bit-identical checkpoint; same arguments give the same bytes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sha(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


def qtool(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "QTOOL_CHECKPOINT_SECONDS": "0"}
    return subprocess.Popen([sys.executable, "-m", "quantize_cli", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    from calibrate.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("deep") / "m", layers=8)


def test_determinism_same_bytes(deep_model, tmp_path, cli):
    args = ["quantize", deep_model, "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", "8", "--seqlen", "64"]
    assert cli(*args, "--out", tmp_path / "a").code == 0
    assert cli(*args, "--out", tmp_path / "b").code == 0
    assert sha(tmp_path / "a") == sha(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / "qtool.json").read_text())
    for key in ("source_sha256", "scheme", "method", "calibration", "options", "qtool_version"):
        assert key in meta
    assert meta["calibration"]["seed"] == 0 and meta["calibration"]["tokens_sha256"]


def test_sigkill_then_resume_is_bit_identical(deep_model, tmp_path):
    args = ["quantize", deep_model, "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", "16", "--seqlen", "128"]
    ref = qtool(*args, "--out", tmp_path / "ref")
    assert ref.wait(300) == 0, ref.stderr.read()
    work = tmp_path / ".run.qtool-work"
    p = qtool(*args, "--out", tmp_path / "run")
    # kill as soon as some (not all) layers are finished
    deadline = time.time() + 300
    while time.time() < deadline:
        man = work / "manifest.json"
        if man.exists():
            try:
                done = json.loads(man.read_text())["layers_done"]
            except ValueError:
                done = 0
            if done >= 3:
                break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "run").exists()
    done = json.loads((work / "manifest.json").read_text())["layers_done"]
    assert 3 <= done < 8
    assert json.loads((work / "manifest.json").read_text())["hidden_at"] >= 1  # resumes mid-model, not from scratch
    # a different run's arguments are refused
    bad = qtool(*[a if a != "128" else "64" for a in args], "--out", tmp_path / "run", "--resume")
    assert bad.wait(300) == 2
    err = bad.stderr.read()
    assert "different run" in err and "Traceback" not in err
    r = qtool(*args, "--out", tmp_path / "run", "--resume")
    assert r.wait(300) == 0, r.stderr.read()
    assert sha(tmp_path / "run") == sha(tmp_path / "ref")
    assert not work.exists()


def test_nan_in_source_weight_names_the_layer(tmp_path, cli):
    """A NaN in a source weight ends with one error line naming the layer, exit 2, nothing written."""
    import torch
    from safetensors.torch import load_file, save_file

    from calibrate.tiny import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "m")
    f = src / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    r = cli("quantize", src, "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--out", tmp_path / "o", "--samples", "4", "--seqlen", "32")
    assert r.code == 2, r.err
    assert "model.layers.1.mlp.up_proj" in r.err and "non-finite" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()


def test_indefinite_hessian_raises_damping_and_reports():
    import torch

    from calibrate.algorithms.gptq import gptq_quantize
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    H = 2 * x.t() @ x / 64
    H[0, 1] = H[1, 0] = 10 * float(H.diagonal().max())  # not positive definite at the default damping
    r = gptq_quantize(torch.randn(32, 128, generator=g), H, WeightSpec.of(get_scheme("w4a16"), 64))
    assert r.damp > 0.01 and "damping raised" in r.note
    assert torch.isfinite(r.qtensor.dequantize()).all()


def test_nan_hessian_is_an_error():
    import pytest
    import torch

    from calibrate.algorithms.gptq import gptq_quantize
    from qtensor import get_scheme
    from qtensor.schemes import WeightSpec

    H = torch.eye(64)
    H[2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        gptq_quantize(torch.randn(8, 64), H, WeightSpec.of(get_scheme("w4a16"), 64))
