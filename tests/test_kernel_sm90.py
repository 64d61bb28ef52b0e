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
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from runtime.kernels import weight_only as wo

pdl, bn, ku, clu, fp4 = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
sub = sys.argv[6] == "1"
sig = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32", gblk_ptr="*i32", perm_ptr="*i32", out_ptr="*bf16",
           part_ptr="*fp32", cnt_ptr="*i32", scr_ptr="*i32", N="i32", K="i32", stride_xm="i32", stride_om="i32", stride_ok="i32")
c = dict(HAS_ZERO=False, HAS_PERM=False, PTX=True, FUSED_REDUCE=not clu, BN=bn, SPLIT_K=8, KU=ku, XB=512, PREFETCH=True,
         FP4=False, SCAN=False, GSH=0, SPRE=False, PDL=pdl, gs_ptr=None, REGX=False, EVF=False, ABL=0, CLU=clu, FP4Q=fp4 == 2,
         SUB=sub, SPK=False)
if fp4:  # NVFP4 (2: the pair-summed asm)
    sig.update(s_ptr="*u8", gs_ptr="*fp32")
    del c["gs_ptr"]
    c.update(FP4=True, GSH=-1)
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
    m = re.match(r"\s*/\*[0-9a-f]{4,}\*/(.*?);", ln)  # "/*00a0*/  @!P0 LDG.E ... ;": the opcode after any predicate
    if m:
        ops += [t for t in m.group(1).split() if not t.startswith("@")][:1]
print(" ".join(ops))
'''


def sass_ops(pdl: bool, bn: int = 64, ku: int = 1, clu: bool = False, fp4: int = 0, sub: bool = False) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", COMPILE, "1" if pdl else "0", str(bn), str(ku), "1" if clu else "0", str(fp4),
                        "1" if sub else "0"], cwd=ROOT, env=env, capture_output=True,
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


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="no Triton, or Triton without its CUDA tools")
def test_gemv16_cluster_sum_uses_shared_memory_not_global_partials():
    """gemv16 with CLU (split-K sum through the cluster, runtime/kernels/cluster.py): two cluster barriers (SASS
    UCGABAR_ARV / UCGABAR_WAIT: partials stored, then read; all read before any program leaves), the partial
    stored to shared memory before the first, loads from the peers (generic LD of mapa addresses) between them,
    no atomic (no tile counter) and from the first barrier on one global store, the output's (no partials).
    The global-memory sum (FUSED_REDUCE) has the atomic and no cluster barrier."""
    ops = sass_ops(True, 64, 1, clu=True)
    assert ops.count("UCGABAR_ARV") == 2 and ops.count("UCGABAR_WAIT") == 2
    first, second = ops.index("UCGABAR_ARV"), len(ops) - 1 - ops[::-1].index("UCGABAR_ARV")
    assert any(op.startswith("STS") for op in ops[first - 12:first])
    assert sum(op.startswith("LD.") or op == "LD" for op in ops[first:second]) >= 8  # 8 ranks' slices
    assert not any(op.startswith(("ATOM", "RED")) for op in ops)
    assert sum(op.startswith("STG") for op in ops[first:]) == 1 and any(op.startswith("STG") for op in ops[first:second])
    plain = sass_ops(True, 64, 1)
    assert "UCGABAR_ARV" not in plain and any(op.startswith(("ATOM", "RED")) for op in plain)


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="no Triton, or Triton without its CUDA tools")
def test_nvfp4_pair_summed_asm_has_fewer_fp16_operations():
    """gemv16's NVFP4 word sum with the two words' pair j summed before their common scale pair (_FP4Q_ASM, bench
    row gemv16-fp4q): per step 4 of the 16 fp16 pair products / fmas a word pair costs are gone in the SASS
    (HMUL2 / HFMA2, either pipe), the decode (LOP3, shifts) is unchanged, and the kernel is shorter."""
    def fp16(ops):
        return sum(op.startswith(("HFMA2", "HMUL2")) for op in ops)
    old, new = sass_ops(True, 128, 1, fp4=1), sass_ops(True, 128, 1, fp4=2)
    words = 1 * 16 * 128 // (32 * 4) // 2  # word pairs per thread per step (KU 1, BN 128, 4 warps)
    assert fp16(old) - fp16(new) >= 4 * words
    assert sum(op.startswith("LOP3") for op in new) <= sum(op.startswith("LOP3") for op in old)
    assert len(new) < len(old)


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="no Triton, or Triton without its CUDA tools")
def test_int4_subnormal_decode_has_fewer_fp16_operations():
    """gemv16 with SUB (int4 codes as fp16 subnormals, _H2S_ASM): per word pair 8 fp16 pair operations (the x
    products) instead of 16 (the zero point's HADD2 and the 0x00F0 nibbles' HFMA2 are gone), and the kernel is
    shorter."""
    def fp16(ops):
        return sum(op.startswith(("HFMA2", "HMUL2", "HADD2")) for op in ops)
    old, new = sass_ops(True, 256, 2), sass_ops(True, 256, 2, sub=True)
    words = 2 * 8 * 256 // (32 * 4)  # word pairs per thread per step (KU 2, 8 row pairs, BN 256, 4 warps)
    assert fp16(old) - fp16(new) >= 8 * words
    assert fp16(new) >= 8 * words
    assert len(new) < len(old)
