"""The GEMV kernels compiled for sm_90 (Hopper) on this machine, no GPU needed: ptxas and cuobjdump ship with
Triton. What the CPU tests under the interpreter cannot see: the order of instructions in the SASS. The compile
runs in a child process without TRITON_INTERPRET (the kernel tests of this session set it before importing the
kernels, and a module imports once per process)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# triton located, not imported: importing it here, before tests/test_kernels.py sets TRITON_INTERPRET, would
# fix triton's settings for this process without the interpreter
_SPEC = importlib.util.find_spec("triton")
BIN = os.path.join(os.path.dirname(_SPEC.origin), "backends", "nvidia", "bin") if _SPEC else ""

COMPILE = r'''
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from runtime.kernels import weight_only as wo

pdl, bn, ku = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
sig = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32", gblk_ptr="*i32", perm_ptr="*i32", out_ptr="*bf16",
           part_ptr="*fp32", cnt_ptr="*i32", scr_ptr="*i32", N="i32", K="i32", stride_xm="i32", stride_om="i32", stride_ok="i32")
c = dict(HAS_ZERO=False, HAS_PERM=False, PTX=True, FUSED_REDUCE=True, BN=bn, SPLIT_K=8, KU=ku, XB=512, PREFETCH=True,
         FP4=False, SCAN=False, GSH=0, SPRE=False, PDL=pdl, gs_ptr=None, REGX=False, EVF=False, ABL=0)
names = list(sig)
k = triton.compile(ASTSource(fn=wo._wo_gemv16_kernel, signature=dict(sig, **{n: "constexpr" for n in c}), constexprs=c,
                             attrs={(names.index(n),): [["tt.divisibility", 16]] for n in sig}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
with tempfile.TemporaryDirectory() as d:
    cub = os.path.join(d, "k.cubin")
    open(cub, "wb").write(k.asm["cubin"])
    sass = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
                           "-sass", cub], capture_output=True, text=True, check=True).stdout
ops = []
for ln in sass.splitlines():
    if "/*0" in ln and "*/" in ln and ";" in ln:  # "/*00a0*/  @!P0 LDG.E ... ;": the opcode after any predicate
        ops += [t for t in ln.split("*/")[1].split(";")[0].split() if not t.startswith("@")][:1]
print(" ".join(ops))
'''


def sass_ops(pdl: bool, bn: int = 64, ku: int = 1) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", COMPILE, "1" if pdl else "0", str(bn), str(ku)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="no Triton, or Triton without its CUDA tools")
@pytest.mark.parametrize("bn,ku", [(64, 1), (128, 4)])
def test_gemv16_dependent_launch_loads_weights_before_the_wait(bn, ku):
    """gemv16-pdl: `griddepcontrol.launch_dependents` (SASS PREEXIT) first, the first words' loads (LDG) before
    `griddepcontrol.wait` (ACQBULK), and no store before it (x, the scratch row, outputs and counters may still be
    in use by the previous kernel until then). Without PDL neither instruction is there. (128, 4): the default
    for o-sized weights, four blocks per step, all of a program's range loaded before the wait."""
    ops = sass_ops(True, bn, ku)
    assert ops.count("PREEXIT") == 1 and ops.count("ACQBULK") == 1
    wait = ops.index("ACQBULK")
    assert ops.index("PREEXIT") < wait
    before = ops[:wait]
    assert sum(op.startswith("LDG") for op in before) >= 2  # the two word tiles (rows r and r + 8) of the first step
    assert not any(op.startswith(("STG", "ATOM", "RED", "STS")) for op in before)
    plain = sass_ops(False)
    assert "PREEXIT" not in plain and "ACQBULK" not in plain and any(op.startswith("LDG") for op in plain)
