"""The GEMV kernels compiled for sm_90 on this machine, no GPU needed: registers, stack, and the
instruction mix of the hot loop (the longest backward branch in the SASS), per word of weights.

    python bench/sass.py [--configs 128,4,1,4;16,1,8,2] [--keep DIR]
    python bench/sass.py --dot4 128,4,4;64,8,4      (M <= 16: dot4t (wgmma) and dot4 (x left, mma.sync), BN,SPLIT_K,warps;
                                                     env ABL, STAGES, TMA)

Uses the ptxas / cuobjdump that ship with Triton. A kernel that is instruction-bound shows it here
first: the count per packed word (eight int4 weights) is what the GPU must issue per eight weights."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from runtime.kernels import weight_only as wo  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);")


def loop_body(sass: str) -> collections.Counter:
    """Opcode counts between the target and the source of the longest backward branch."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(INS.match, sass.splitlines()) if m]
    best = None
    for a, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) < a and (best is None or a - int(t.group(1), 16) > best[1] - best[0]):
            best = (int(t.group(1), 16), a)
    return collections.Counter(op for a, op, _ in ins if best and best[0] <= a <= best[1])


def build(fn, signature: dict, constexprs: dict, num_warps: int, keep: str, name: str, num_stages: int = 3):
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t != "constexpr"}
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, **(
                           dict(maxnreg=int(os.environ["MAXNREG"])) if os.environ.get("MAXNREG") else {})))
    cub = os.path.join(keep, name + ".cubin")
    with open(cub, "wb") as f:
        f.write(k.asm["cubin"])
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(keep, f"{name}.{ext}"), "w") as f:
            f.write(k.asm[ext])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cub], capture_output=True, text=True).stdout
    with open(os.path.join(keep, name + ".sass"), "w") as f:
        f.write(sass)
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cub], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", res)), loop_body(sass)


GEMV16_SIG = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32", gblk_ptr="*i32", perm_ptr="*i32", out_ptr="*bf16",
                  part_ptr="*fp32", cnt_ptr="*i32", scr_ptr="*i32", N="i32", K="i32", stride_xm="i32", stride_om="i32", stride_ok="i32")


DOT4_SIG = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*i32", gblk_ptr="*i32", perm_ptr="*i32", out_ptr="*fp32",
                M="i32", N="i32", K="i32", stride_xm="i32", stride_om="i32", stride_ok="i32", res_ptr="*bf16", cnt_ptr="*i32")


def dot4(configs: str, keep: str):
    """The M <= 16 tensor-core kernel both ways round (BM = 16 tokens): per packed word, and where the decoded tile
    goes (STS in the loop would mean a trip through shared memory)."""
    print(f"# dot4t / dot4 (int4 g128 sym, bf16 x, 16 tokens) for sm_90, Triton {triton.__version__}; files in {keep}")
    for cfg in configs.split(";"):
        bn, sk, w = (int(v) for v in cfg.split(","))
        for xl in (False, True):
            tma = os.environ.get("TMA", "0") == "1"  # the word tiles by TMA through a descriptor
            c = dict(HAS_ZERO=False, HAS_PERM=False, FP16=False, PTX=True, INTERP=False, BM=16, BN=bn, SPLIT_K=sk, KU=1, GSH=0,
                     FUSED=False, PDL=0, CLU=False, XL=xl, ABL=int(os.environ.get("ABL", "0")), TRIG=True, TMA=tma, **({} if tma else dict(wdesc=None)))
            sig = dict(DOT4_SIG, wdesc=f"tensordesc<i32[16, {bn}]>") if tma else DOT4_SIG
            res, ops = build(wo._wo_dot4t_kernel, sig, c, w, keep, f"dot4{'' if xl else 't'}_{bn}_{sk}_{w}",
                             int(os.environ.get("STAGES", "3")))
            words = 16 * bn / (32 * w)  # packed words per thread per 128-channel block
            tot = sum(ops.values())
            print(f"{'dot4 ' if xl else 'dot4t'} BN={bn:<4} SPLIT_K={sk:<3} warps={w}: {res}; loop {tot} instructions, "
                  f"{tot / words:.1f} per word")
            print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(14)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="16,1,8,2;64,8,1,4;128,4,1,4;256,4,1,8", help="BN,SPLIT_K,KU,num_warps;...")
    ap.add_argument("--dot4", default="", help="BN,SPLIT_K,num_warps;... : the M <= 16 tensor-core kernels instead")
    ap.add_argument("--keep", default="", help="folder for the ttgir / ptx / cubin / sass (default: a temporary one)")
    a = ap.parse_args()
    keep = a.keep or tempfile.mkdtemp(prefix="qtool-sass-")
    os.makedirs(keep, exist_ok=True)
    if a.dot4:
        return dot4(a.dot4, keep)
    print(f"# gemv16 (int4 g128 sym, bf16 x) for sm_90, Triton {triton.__version__}; files in {keep}")
    for cfg in a.configs.split(";"):
        bn, sk, ku, w = (int(v) for v in cfg.split(","))
        for fp4 in (False, True):
            c = dict(HAS_ZERO=False, HAS_PERM=False, PTX=True, FUSED_REDUCE=sk > 1 and os.environ.get("CLU", "0") != "1", BN=bn, SPLIT_K=sk, KU=ku, XB=1024, PREFETCH=os.environ.get("PREFETCH", "1") == "1", FP4=fp4, SCAN=False, GSH=-1 if fp4 else int(os.environ.get("GSH", 0)), SPRE=os.environ.get("SPRE", "1") == "1", PDL=os.environ.get("PDL", "0") == "1",
                     REGX=os.environ.get("REGX", "0") == "1", EVF=os.environ.get("EVF", "0") == "1", ABL=int(os.environ.get("ABL", "0")),
                     CLU=os.environ.get("CLU", "0") == "1", FP4Q=os.environ.get("FP4Q", "0") == "1", SUB=os.environ.get("SUB", "0") == "1",
                     SPK=os.environ.get("SPK", "0") == "1")
            sig = dict(GEMV16_SIG, s_ptr="*i32" if c["SPK"] else "*u8", gs_ptr="*fp32") if fp4 else GEMV16_SIG
            if not fp4:
                c["gs_ptr"] = None
            res, ops = build(wo._wo_gemv16_kernel, sig, c, w, keep, f"gemv16{'_fp4' if fp4 else ''}_{bn}_{sk}_{ku}_{w}")
            words = ku * 16 * bn / (32 * w)  # packed words per thread per loop step
            tot = sum(ops.values())
            print(f"{'nvfp4' if fp4 else 'int4 '} BN={bn:<4} SPLIT_K={sk:<3} KU={ku:<2} warps={w}: {res}; loop {tot} instructions, "
                  f"{words:.0f} words per thread: {tot / words:.1f} per word ({tot / words / 8:.2f} per weight)")
            print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
