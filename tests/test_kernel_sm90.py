"""The GEMV kernels compiled for sm_90 (Hopper) on this machine, no GPU needed: ptxas and cuobjdump ship with
Triton. What the CPU tests under the interpreter cannot see: the order of instructions in the SASS."""

import os
import subprocess

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from runtime.kernels import weight_only as wo  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIG = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32", gblk_ptr="*i32", perm_ptr="*i32", out_ptr="*bf16",
           part_ptr="*fp32", cnt_ptr="*i32", scr_ptr="*i32", N="i32", K="i32", stride_xm="i32", stride_om="i32", stride_ok="i32")


def sass_of(pdl: bool, tmp_path) -> list[str]:
    c = dict(HAS_ZERO=False, HAS_PERM=False, PTX=True, FUSED_REDUCE=True, BN=64, SPLIT_K=8, KU=1, XB=512, PREFETCH=True,
             FP4=False, SCAN=False, GSH=0, SPRE=False, PDL=pdl, gs_ptr=None)
    names = list(SIG)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in SIG}
    k = triton.compile(ASTSource(fn=wo._wo_gemv16_kernel, signature=dict(SIG, **{n: "constexpr" for n in c}), constexprs=c,
                                 attrs=attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    cub = tmp_path / f"g{int(pdl)}.cubin"
    cub.write_bytes(k.asm["cubin"])
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", str(cub)], capture_output=True, text=True, check=True).stdout
    ops = []
    for ln in out.splitlines():
        if "/*0" in ln and "*/" in ln and ";" in ln:  # "/*00a0*/  @!P0 LDG.E ... ;": the opcode after any predicate
            ops += [t for t in ln.split("*/")[1].split(";")[0].split() if not t.startswith("@")][:1]
    return ops


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="Triton without its CUDA tools")
def test_gemv16_dependent_launch_loads_weights_before_the_wait(tmp_path):
    """gemv16-pdl: `griddepcontrol.launch_dependents` (SASS PREEXIT) first, the first words' loads (LDG) before
    `griddepcontrol.wait` (ACQBULK), and no store before it (x, the scratch row, outputs and counters may still be
    in use by the previous kernel until then). Without PDL neither instruction is there."""
    ops = sass_of(True, tmp_path)
    assert ops.count("PREEXIT") == 1 and ops.count("ACQBULK") == 1
    wait = ops.index("ACQBULK")
    assert ops.index("PREEXIT") < wait
    before = ops[:wait]
    assert sum(op.startswith("LDG") for op in before) >= 2  # the two word tiles (rows r and r + 8) of the first step
    assert not any(op.startswith(("STG", "ATOM", "RED", "STS")) for op in before)
    plain = sass_of(False, tmp_path)
    assert "PREEXIT" not in plain and "ACQBULK" not in plain
