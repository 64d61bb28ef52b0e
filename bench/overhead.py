"""CPU time per eager call of the quantized linears on the GPU (what decode without CUDA graphs pays):
QuantLinear forward, weight_only.matmul, and bf16 F.linear side by side, each timed as back-to-back calls
with one synchronize at the end (the CPU cost when it exceeds the GPU time), plus a cProfile of the
QuantLinear calls (top functions by own time).

    python bench/overhead.py [--calls 2000] [--profile 20]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from bench.kernels import rand_fp8, rand_int  # noqa: E402
from runtime.kernels import weight_only  # noqa: E402
from runtime.qlinear import QuantLinear  # noqa: E402


def per_call(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", type=int, default=20, help="rows of the profile to print (0: none)")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  python {sys.version.split()[0]}")
    for m in (1, 16):
        for name, (n, k) in (("qkv", (6144, 4096)), ("o", (4096, 4096))):
            qt = rand_int(n, k, 4, 128, True)
            lin = QuantLinear(qt).cuda()
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
            lin(x)
            st = lin._kernel_prep.state
            fp8 = QuantLinear(rand_fp8(n, k, "token")).cuda()
            rows = [("bf16 F.linear", lambda: torch.nn.functional.linear(x, w)),
                    ("QuantLinear", lambda: lin(x)),
                    ("QuantLinear fp8", lambda: fp8(x)),
                    ("weight_only.matmul", lambda: weight_only.matmul(x, st)),
                    ("torch.empty x1", lambda: torch.empty((m, n), dtype=x.dtype, device=x.device))]
            for label, fn in rows:
                print(f"  {name:<4} M={m:<3} {label:<20} {per_call(fn, a.calls) * 1e6:8.1f} us per call", flush=True)
    if a.profile:
        qt = rand_int(6144, 4096, 4, 128, True)
        lin = QuantLinear(qt).cuda()
        x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
        per_call(lambda: lin(x), 100)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            lin(x)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
