"""GPTQ of an 8B-shaped random-weight model on 1 and K GPUs side by side (`qtool quantize --gpus K`,
which launches the data-parallel processes itself), with the outputs checked to agree.

    python bench/multi_gpu.py --gpus 2                         # on a host with >= 2 GPUs (goal: >= 1.7x)
    python bench/multi_gpu.py --gpus 2 --max-gpu-memory 1.5    # force each layer to be split over the GPUs
    python bench/multi_gpu.py --nproc 2 --hidden 256 --layers 2 --samples 8 --seqlen 64   # CPU smoke (gloo)

The 1-GPU run is `--gpus 1` (one process, no launcher); the K run prints which layout the launcher
chose (processes x GPUs per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the script's own folder off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def run(cmd, env):
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(1)
    return time.time() - t0, r.stderr


def main():
    from bench.quantize_speed import write_model

    ap = argparse.ArgumentParser()
    k = ap.add_mutually_exclusive_group()
    k.add_argument("--gpus", type=int, help="K GPUs (CUDA)")
    k.add_argument("--nproc", type=int, help="K CPU processes (gloo): a smoke run of the same path")
    ap.add_argument("--dir", default="/tmp/qtool-mgpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-gpu-memory", type=float, default=None, help="passed to both runs (GiB per GPU)")
    a = ap.parse_args()
    cuda = a.nproc is None
    n = a.gpus if cuda else a.nproc
    n = 2 if n is None else n
    shape = {} if a.hidden is None else {"hidden_size": a.hidden, "intermediate_size": a.hidden * 7 // 2, "vocab_size": 1024}
    d = Path(a.dir)
    write_model(d, a.layers, "cuda" if cuda else "cpu", **shape)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["quantize", str(d), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", str(a.samples),
            "--seqlen", str(a.seqlen), "--no-act-order", "--force"]
    if a.max_gpu_memory is not None:
        args += ["--max-gpu-memory", str(a.max_gpu_memory)]
    flag = "--gpus" if cuda else "--nproc"
    t1, _ = run([sys.executable, "-m", "quantize_cli", *args, flag, "1", "--out", str(d) + "-1"], env)
    tk, err = run([sys.executable, "-m", "quantize_cli", *args, flag, str(n), "--out", str(d) + f"-{n}"], env)
    layout = next((l.split("calibrating in ", 1)[1] for l in err.splitlines() if "calibrating in " in l), "1 process")
    from exporters import read_checkpoint

    x, y = read_checkpoint(Path(str(d) + "-1")), read_checkpoint(Path(str(d) + f"-{n}"))
    same = sum(int(torch.equal(x.qtensors[m].codes, y.qtensors[m].codes)) for m in x.qtensors)
    frac = sum(float((x.qtensors[m].codes == y.qtensors[m].codes).float().mean()) for m in x.qtensors) / len(x.qtensors)
    dev = torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": dev, flag[2:]: n, "layout": layout, "seconds_1": round(t1, 1), f"seconds_{n}": round(tk, 1), "speedup": round(t1 / tk, 2),
                      "modules_identical": f"{same}/{len(x.qtensors)}", "codes_equal_fraction": round(frac, 6)}))


if __name__ == "__main__":
    main()
