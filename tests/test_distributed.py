"""Data-parallel calibration: 2 processes (gloo, CPU) give the checkpoint of 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_ranks_equal_one_process(tiny_models, tmp_path):
    from exporters import read_checkpoint

    src = tiny_models("llama")
    args = ["quantize", str(src), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", "8", "--seqlen", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "quantize_cli", *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "quantize_cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert set(a.qtensors) == set(b.qtensors) and len(a.qtensors) == 14
    for n in a.qtensors:
        qa, qb = a.qtensors[n], b.qtensors[n]
        assert torch.equal(qa.codes, qb.codes), n
        assert torch.allclose(qa.scales.float(), qb.scales.float())
    assert not list(tmp_path.glob("*rank*")) and not list(tmp_path.glob(".*qtool-work"))
