"""GPTQ of an 8B-shaped random-weight model on 1 and K GPUs side by side (data-parallel through torchrun),
with the outputs checked to agree.

    python bench/multi_gpu.py --gpus 2                         # on a host with >= 2 GPUs
    python bench/multi_gpu.py --gpus 2 --device cpu --hidden 256 --layers 2 --samples 8 --seqlen 64   # CPU smoke (gloo)
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


def run(cmd, env):
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        raise SystemExit(1)
    return time.time() - t0


def main():
    from bench.quantize_speed import write_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dir", default="/tmp/qtool-mgpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    a = ap.parse_args()
    shape = {} if a.hidden is None else {"hidden_size": a.hidden, "intermediate_size": a.hidden * 7 // 2, "vocab_size": 1024}
    d = Path(a.dir)
    write_model(d, a.layers, "cuda" if a.device == "cuda" else "cpu", **shape)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["quantize", str(d), "--scheme", "w4a16", "--method", "gptq", "--format", "gptq", "--samples", str(a.samples),
            "--seqlen", str(a.seqlen), "--device", a.device, "--no-act-order", "--force"]
    t1 = run([sys.executable, "-m", "quantize_cli", *args, "--out", str(d) + "-1"], env)
    tk = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.gpus), "-m", "quantize_cli", *args,
              "--out", str(d) + f"-{a.gpus}"], env)
    from exporters import read_checkpoint

    x, y = read_checkpoint(Path(str(d) + "-1")), read_checkpoint(Path(str(d) + f"-{a.gpus}"))
    same = sum(int(torch.equal(x.qtensors[n].codes, y.qtensors[n].codes)) for n in x.qtensors)
    frac = sum(float((x.qtensors[n].codes == y.qtensors[n].codes).float().mean()) for n in x.qtensors) / len(x.qtensors)
    print(json.dumps({"device": a.device, "gpus": a.gpus, "seconds_1": round(t1, 1), f"seconds_{a.gpus}": round(tk, 1), "speedup": round(t1 / tk, 2),
                      "modules_identical": f"{same}/{len(x.qtensors)}", "codes_equal_fraction": round(frac, 6)}))


if __name__ == "__main__":
    main()
