"""One weight-only kernel call on a Llama-3-8B shape, for Nsight Compute (warp stall reasons, occupancy):

    ncu --kernel-name regex:dot4t --launch-count 1 \\
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio' \\
        --section Occupancy --section SchedulerStats python bench/stalls.py --path dot4t --cfg BN=64,SPLIT_K=2

The first call of each --cfg (';' between configs) is a plain launch (what `--launch-count 1` profiles); then
the call's GPU time is printed (CUDA graph, cold L2).
Session 8 used it to find dot4t's top stall ("long scoreboard": the group-scale load, now read a block ahead).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from qtensor import QTensor  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import tuning  # noqa: E402
from runtime.kernels import weight_only as wo  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gate_up", choices=list(SHAPES))
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--path", default="dot4t", help="gemv16 | dot4 | dot4t | dot4s")
    ap.add_argument("--cfg", default="BN=64,SPLIT_K=2", help="KEY=VALUE,...;KEY=VALUE,...")
    ap.add_argument("--asym", action="store_true")
    a = ap.parse_args()
    k, n = SHAPES[a.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    if a.asym:
        codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
        zeros = torch.randint(0, 16, (n, k // 128), device="cuda", dtype=torch.uint8, generator=g)
    else:
        codes, zeros = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8, generator=g), None
    scales = (torch.rand(n, k // 128, device="cuda", generator=g) * 0.02 + 0.002).half()
    st = kernels.prepare(QTensor("int", 4, codes, scales, zeros, 128)).state
    x = torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    for text in a.cfg.split(";"):
        cfg = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in text.split(",") if kv}
        if a.path.startswith("gemv16"):
            run = lambda cfg=cfg: wo._launch_gemv16(x, st, dict(dict(KU=1, num_warps=4), **cfg), True)  # noqa: E731
        else:
            run = lambda cfg=cfg: wo._launch_dot4(x, st, cfg, kind=a.path)  # noqa: E731
        run()
        torch.cuda.synchronize()
        print(f"{a.path} {a.shape} M={a.m} {cfg}: {tuning.graph_time(run, 40) * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
