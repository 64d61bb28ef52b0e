"""GPU kernel benchmark on Llama-3-8B linear shapes, every kernel beside torch's bf16 matmul in one process.

    python bench/kernels.py [--out results.json] [--ms 1,16,128,4096] [--quick]

For each kernel, shape (qkv 4096x6144, o 4096x4096, gate_up 4096x28672, down 14336x4096) and M:
time per call (mean of >= 20 back-to-back calls, cycling through enough weight copies that the
weights come from HBM, not L2; median of 3 such means), the ratio bf16 time / kernel time, and the
achieved bandwidth (weights + activations + output bytes / time) as a share of the card's peak.
Correctness first: each kernel against the torch reference (dequantize + fp32 matmul) at full size.
`--kernels ...,roofline,...` adds the speed of light for M <= 16: the fastest of READ_CONFIGS reading just the
int4 g128 weight bytes (and the bf16 ones) once, nothing else computed, timed the same way (rows read(...)).
Imports only torch, triton, qtensor and runtime (no transformers).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the script's own folder off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qtensor import ActQuant, QTensor  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import tuning, w8a8  # noqa: E402
from runtime.kernels.weight_only import _gdc_launch_dependents, _gdc_wait  # noqa: E402
from runtime.qlinear import fake_quant_act  # noqa: E402

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]  # (K, N)
L2_ROTATE = 256 << 20  # bytes of weight copies cycled per measurement
PEAK = {"H100": 3.35e12, "H200": 4.8e12}


def peak_bw(name: str) -> float:
    for k, v in PEAK.items():
        if k in name:
            return v
    return 3.35e12


def copy_bw() -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 10 / (s.elapsed_time(e) * 1e-3)


def time_calls(fns, calls: int = 20, rounds: int = 3) -> float:
    """Seconds per call: events around `calls` back-to-back calls cycling through fns; median of rounds."""
    n = max(calls, len(fns))
    for f in fns:
        f()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for i in range(n):
            fns[i % len(fns)]()
        e.record()
        torch.cuda.synchronize()
        means.append(s.elapsed_time(e) * 1e-3 / n)
    return statistics.median(means)


def time_graph(fns, calls: int = 20, rounds: int = 3) -> float:
    """As time_calls, but the back-to-back calls are captured once in a CUDA graph and replayed, so
    the number is GPU time without Python/launch overhead (how serving engines run decode)."""
    n = max(calls, len(fns))
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        means.append(s.elapsed_time(e) * 1e-3 / n)
    del g
    return statistics.median(means)


# ---- random quantized weights (codes and scales drawn directly; values do not change speed) -------


def rand_int(n, k, bits, group, sym, act_order=False, act=None, scale_dtype=torch.float16):
    dev = "cuda"
    ng = 1 if group <= 0 else k // group
    if sym:
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, device=dev)
        zeros = None
    else:
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=dev)
        zeros = torch.randint(0, 1 << bits, (n, ng), dtype=torch.uint8, device=dev)
    scales = (torch.rand(n, ng, device=dev) * 0.02 + 0.002).to(scale_dtype)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, device=dev) // group).to(torch.int32)
    return QTensor("int", bits, codes, scales, zeros, group, g_idx=g_idx, act=act or ActQuant())


def rand_fp4(n, k, nv: bool):
    dev = "cuda"
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
    if nv:
        bs = (torch.rand(n, k // 16, device=dev) * 400 + 1).to(torch.float8_e4m3fn)
        return QTensor("e2m1", 4, codes, bs, None, 16, global_scale=torch.tensor(1e-4, device=dev),
                       act=ActQuant("dynamic", "e2m1", "group", group_size=16))
    e = torch.randint(118, 126, (n, k // 32), dtype=torch.uint8, device=dev)
    return QTensor("e2m1", 4, codes, e, None, 32)


def rand_fp8(n, k, kind):
    dev = "cuda"
    codes = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    if kind == "block":
        s = torch.rand(n // 128, k // 128, device=dev) * 1e-4 + 1e-5
        return QTensor("fp8_e4m3", 8, codes, s, None, 128, block=(128, 128), act=ActQuant("dynamic", "fp8_e4m3", "group", group_size=128))
    if kind == "tensor":
        return QTensor("fp8_e4m3", 8, codes, torch.tensor([1e-4], device=dev), None, 0,
                       act=ActQuant("static", "fp8_e4m3", "tensor", scale=torch.tensor([0.01], device=dev)))
    return QTensor("fp8_e4m3", 8, codes, torch.rand(n, 1, device=dev) * 1e-4 + 1e-5, None, -1, act=ActQuant("dynamic", "fp8_e4m3", "token"))


KERNELS = {
    "w4a16-g128": lambda n, k: rand_int(n, k, 4, 128, True),
    "w4a16-g128-asym": lambda n, k: rand_int(n, k, 4, 128, False),
    "w4a16-g128-actorder": lambda n, k: rand_int(n, k, 4, 128, True, act_order=True),
    "w8a16-g128": lambda n, k: rand_int(n, k, 8, 128, True),
    "nvfp4(w only)": lambda n, k: rand_fp4(n, k, True),
    "nvfp4(+act fq)": lambda n, k: rand_fp4(n, k, True),
    "mxfp4": lambda n, k: rand_fp4(n, k, False),
    "fp8-rowwise": lambda n, k: rand_fp8(n, k, "token"),
    "fp8-tensor": lambda n, k: rand_fp8(n, k, "tensor"),
    "fp8-block": lambda n, k: rand_fp8(n, k, "block"),
    "int8-w8a8": lambda n, k: rand_int(n, k, 8, -1, True, act=ActQuant("dynamic", "int8", "token"), scale_dtype=torch.float32),
    "int8-w8a8(_int_mm)": lambda n, k: rand_int(n, k, 8, -1, True, act=ActQuant("dynamic", "int8", "token"), scale_dtype=torch.float32),
}


def call_of(name: str, prep):
    if name == "nvfp4(w only)":
        from runtime.kernels import weight_only

        f = lambda x: weight_only.matmul(x, prep.state)  # noqa: E731
        f.state = prep.state  # (path_rows forces other paths on the same weights)
        return f
    if name == "int8-w8a8(_int_mm)":
        return lambda x: w8a8.matmul(x, prep.state, "int_mm")
    return prep


def tinygemm(n, k, group=128):
    """torch's int4 weight-only kernel (tinygemm, torchao's int4 weight-only)."""
    u = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)
    wp = torch._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([torch.rand(k // group, n, device="cuda"), torch.rand(k // group, n, device="cuda")], -1).to(torch.bfloat16).contiguous()
    return (wp, sz), lambda x, wp=wp, sz=sz: torch._weight_int4pack_mm(x, wp, group, sz), wp.numel() * wp.element_size() + sz.numel() * 2


@triton.jit
def _read_kernel(src, out, nwords, BLOCK: tl.constexpr, PER: tl.constexpr, CG: tl.constexpr, PDL: tl.constexpr = False):
    """Each program reads PER x BLOCK int32 words (all loads independent) and stores their sum: the time to
    stream the bytes once, the ceiling of any kernel that must read them. PDL: launched as a programmatic
    dependent launch, the next call's programs start at once and read before they wait to store (as gemv16-pdl)."""
    if PDL:
        _gdc_launch_dependents()
    base = tl.program_id(0).to(tl.int64) * (BLOCK * PER)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in tl.static_range(PER):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        if CG:  # L2 only
            acc += tl.load(src + offs, mask=offs < nwords, other=0, cache_modifier=".cg")
        else:
            acc += tl.load(src + offs, mask=offs < nwords, other=0)
    if PDL:
        _gdc_wait()
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


READ_CONFIGS = [(blk, per, w, cg) for blk in (512, 1024, 2048, 4096) for per in (1, 2, 4, 8, 16) for w in (4, 8)
                for cg in (False, True) if blk * per <= 32768 and blk >= 128 * w]


def read_time(nbytes: int, pdl: bool = False) -> tuple[float, tuple]:
    """The fastest time (CUDA graph, rotated copies past L2) over READ_CONFIGS to read nbytes once (pdl: as
    programmatic dependent launches, back-to-back calls overlapping)."""
    nw = nbytes // 4
    bufs = [torch.randint(0, 1 << 30, (nw,), dtype=torch.int32, device="cuda") for _ in range(max(2, math.ceil(L2_ROTATE / nbytes)))]
    best = (float("inf"), None)
    for blk, per, w, cg in READ_CONFIGS:
        grid = (triton.cdiv(nw, blk * per),)
        out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
        kw = dict(launch_pdl=True) if pdl else {}
        fns = [lambda b=b: _read_kernel[grid](b, out, nw, BLOCK=blk, PER=per, CG=cg, PDL=pdl, num_warps=w, **kw) for b in bufs]
        best = min(best, (time_graph(fns), (blk, per, w, cg)))
    del bufs
    return best


def rel_err_of(y, xs, qt) -> float:
    """Relative error of y against xs @ the dequantized weight (fp32 reference)."""
    rv = xs.float() @ qt.dequantize(torch.float32).t()
    return float((y.double() - rv.double()).norm() / rv.double().norm())


def path_rows(paths, prep, xs, sname, m, t_bf, e_bf, io, peak, rows, checks, check, name="w4a16-g128"):
    """Time weight_only.matmul through each forced path on the rotated copies; with check, also its error (paths
    named -abl: bench-only ablations with wrong results, never checked)."""
    from runtime.kernels import weight_only

    copies, wbytes, qt, _ = prep
    st_copies = [c.state for c in copies]
    for path in paths:
        try:
            note = ""
            if check and "-abl" not in path:
                rel = rel_err_of(weight_only.matmul(xs, st_copies[0], path), xs, qt)
                checks.append(dict(kernel=f"{name}[{path}]", shape=sname, m=m, rel_err=rel, ok=rel < 1e-2))
                note = f"  err {rel:.1e}"
                if path in ("dot4", "dot4t", "dot4s", "dot4f"):
                    note += f"  (PTX decode {'on' if weight_only._ptx_ok(xs.device, path) else 'off: ' + weight_only._PTX_OK.get('why', '')})"
                if path == "gemv16":
                    note += f"  (packed-fp16 PTX {'on' if weight_only._h2_ok(xs.device) else 'off: ' + weight_only._H2_OK.get('why', '')})"
                if path in ("gemv16", "dot4t-clu", "dot4f-clu"):
                    note += f"  (cluster sums {'on' if weight_only._clu_ok(xs.device) else 'off: ' + str(weight_only._CLU_OK.get('why', ''))})"
            pf = [lambda s=s: weight_only.matmul(xs, s, path) for s in st_copies]
            te = time_calls(pf)
            t = time_graph(pf)
            rows.append(dict(kernel=f"{name}[{path}]", shape=sname, m=m, us=t * 1e6, ratio=t_bf / t, gbs=(wbytes + io) / t / 1e9,
                             peak_share=(wbytes + io) / t / peak, us_eager=te * 1e6, ratio_eager=e_bf / te))
            print(f"  {name + '[' + path + ']':<22} {sname:<8} M={m:<5} {t * 1e6:9.1f} us  x{t_bf / t:5.2f} bf16{note}", flush=True)
        except Exception as e:
            print(f"  {name} {path} M={m}: failed {str(e)[:300]}", flush=True)


def sweep_row(label: str, path: str, prep, xs, sname: str, m: int, t_bf: float) -> None:
    """One row of a tile sweep: the forced path at the config the caller put in the tuner's cache, its error and time."""
    from runtime.kernels import weight_only

    try:
        err = rel_err_of(weight_only.matmul(xs, prep[0][0].state, path), xs, prep[2])
        t = time_graph([lambda s=c.state: weight_only.matmul(xs, s, path) for c in prep[0]])
        print(f"  {label:<30} {sname:<8} M={m:<5} {t * 1e6:9.1f} us  x{t_bf / t:5.2f} bf16  err {err:.1e}", flush=True)
    except Exception as e:
        print(f"  {label}: failed {str(e)[:300]}", flush=True)


def nbytes_of(prep) -> int:
    return prep.state.nbytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--ms", default="1,16,128,4096")
    ap.add_argument("--kernels", default=",".join(["bf16", "tinygemm", *KERNELS]))
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--gemv16-configs", default="", help="BN,SPLIT_K,KU,warps[,REP[,MAXNREG]];... : gemv16 (M = 1) at each (R: x from registers, E: weights evict-first, P: NVFP4 scales packed, S: int4 codes as subnormals, Q: scales a step ahead (before a dependent launch's wait); MAXNREG: registers a thread may use; -s18 rows: session 18's tiles)")
    ap.add_argument("--w4-paths", default="", help="the w4a16-g128 paths timed beside the default (instead of those of its M)")
    ap.add_argument("--tc-configs", default="", help="BN,SPLIT_K,KU,warps,stages;... : the int4 tensor-core paths (1 < M <= 16) at each")
    ap.add_argument("--gvs-configs", default="", help="BN,warps,SPLIT_K,CH[,E];... : the Gluon gv16s kernel (int4 sym g128 and NVFP4, M = 1, the words staged in shared memory by cp.async, CH blocks a group) at each")
    ap.add_argument("--mma16-configs", default="", help="BN,SPLIT_K,warps[,XE2];... : the Gluon mma16 kernel (int4, M <= 16) at each (X: x through shared memory, E: words evict-first, 2: two blocks ahead, W: weights the left operand, B: the offset through x's row sums, with X)")
    ap.add_argument("--tc-paths", default="dot4,dot4t", help="the paths the --tc-configs sweep runs")
    ap.add_argument("--gemv16-paths", default="gemv16", help="the gemv16 paths the config sweep runs (e.g. gemv16,gemv16-regx)")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",")]
    names = a.kernels.split(",")
    tuning.enable(not a.no_tune)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    peak = peak_bw(dev)
    cbw = copy_bw()
    print(f"# {dev}  datasheet peak {peak / 1e12:.2f} TB/s, measured copy {cbw / 1e12:.2f} TB/s  torch {torch.__version__}", flush=True)
    from runtime.kernels import weight_only

    for kind in ("int4", "nvfp4"):
        ok = weight_only._h2_ok(torch.device("cuda"), kind)
        print(f"# packed-fp16 GEMV (M = 1) for {kind}: {'on' if ok else 'off: ' + weight_only._H2_OK.get('why', '')}", flush=True)
    pdl = weight_only._pdl_ok(torch.device("cuda"))
    print(f"# gemv16 (M = 1) as programmatic dependent launches: {'on' if pdl and weight_only.PDL_DEFAULT else 'off: ' + weight_only._PDL_OK.get('why', 'QTOOL_PDL=0')}", flush=True)
    rows, checks = [], []
    for sname, k, n in SHAPES:
        # bf16 baseline copies
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        nb = max(2, math.ceil(L2_ROTATE / (n * k * 2)))
        bf16_copies = [wb.clone() for _ in range(nb)]
        preps = {}
        for name in names:
            if name in ("bf16", "roofline"):
                continue
            try:
                if name == "tinygemm":
                    keep, fn, wbytes = tinygemm(n, k)
                    copies = [tinygemm(n, k) for _ in range(max(1, math.ceil(L2_ROTATE / wbytes)))]
                    preps[name] = ([c[1] for c in copies], wbytes, None, None)
                    continue
                qt = KERNELS[name](n, k)
                prep = kernels.prepare(qt)
                assert prep is not None, "no kernel"
                wbytes = nbytes_of(prep)
                copies = []
                for _ in range(max(1, math.ceil(L2_ROTATE / wbytes))):
                    p2 = copy.copy(prep)
                    p2.state = prep.state.clone()
                    copies.append(call_of(name, p2))
                preps[name] = (copies, wbytes, qt, call_of(name, prep))
            except Exception as e:  # report and go on
                print(f"  {name} {sname}: setup failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        # correctness at full size (M = 1, 16, 128): against dequantize + fp32 matmul
        for name, (copies, wbytes, qt, fn) in preps.items():
            if qt is None:
                continue
            try:
                wref = qt.dequantize(torch.float32)
                for m in (1, 16, 128):
                    if "_int_mm" in name and m <= 16:  # torch._int_mm needs M > 16
                        continue
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    act = ActQuant() if name == "nvfp4(w only)" else qt.act
                    ref = fake_quant_act(x.float(), act) @ wref.t()
                    y = fn(x)
                    err = float((y.double() - ref.double()).norm() / ref.double().norm())
                    checks.append(dict(kernel=name, shape=sname, m=m, rel_err=err, ok=bool(err < 1e-2 and torch.isfinite(y).all())))
                del wref
            except Exception as e:
                checks.append(dict(kernel=name, shape=sname, m=-1, rel_err=float("nan"), ok=False, error=str(e)[:200]))
        bad = [c for c in checks if c["shape"] == sname and not c["ok"]]
        print(f"  correctness {sname}: {sum(c['ok'] for c in checks if c['shape'] == sname)} ok, {len(bad)} bad {bad[:3]}", flush=True)
        for m in ms:
            xs = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            io = m * k * 2 + m * n * 2
            bf_fns = [lambda w=w: torch.nn.functional.linear(xs, w) for w in bf16_copies]
            e_bf = time_calls(bf_fns)
            t_bf = time_graph(bf_fns)
            rows.append(dict(kernel="bf16", shape=sname, m=m, us=t_bf * 1e6, ratio=1.0, gbs=(n * k * 2 + io) / t_bf / 1e9,
                             peak_share=(n * k * 2 + io) / t_bf / peak, us_eager=e_bf * 1e6, ratio_eager=1.0))
            for name, (copies, wbytes, qt, fn) in preps.items():
                try:
                    fns = [lambda c=c: c(xs) for c in copies]
                    te = time_calls(fns, rounds=1 if m >= 4096 and name == "tinygemm" else 3)
                    try:
                        t = time_graph(fns, rounds=1 if m >= 4096 and name == "tinygemm" else 3)
                    except Exception as e:
                        print(f"  {name} {sname} M={m}: graph capture failed ({str(e)[:100]}), eager time used", flush=True)
                        t = te
                except Exception as e:
                    print(f"  {name} {sname} M={m}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                rows.append(dict(kernel=name, shape=sname, m=m, us=t * 1e6, ratio=t_bf / t, gbs=(wbytes + io) / t / 1e9,
                                 peak_share=(wbytes + io) / t / peak, us_eager=te * 1e6, ratio_eager=e_bf / te))
            for r in [r for r in rows if r["shape"] == sname and r["m"] == m]:
                print(f"  {r['kernel']:<22} {sname:<8} M={m:<5} {r['us']:9.1f} us  x{r['ratio']:5.2f} bf16  "
                      f"{r['gbs']:7.0f} GB/s  {100 * r['peak_share']:5.1f}% peak | eager {r['us_eager']:8.1f} us x{r['ratio_eager']:5.2f}", flush=True)
            for name in ("fp8-rowwise", "fp8-tensor"):  # without fast accumulation, and the activation quantizer alone
                if name in preps and m >= 128:
                    copies, wbytes, qt, fn = preps[name]
                    try:
                        from runtime.kernels import act_quant

                        st0 = copies[0].state
                        sst = st0.act_static
                        def unhinted(c):  # the same call without the quantizer's cache hints
                            was, act_quant.HINTS = act_quant.HINTS, False
                            try:
                                return c(xs)
                            finally:
                                act_quant.HINTS = was

                        def hinted(c):  # the same call with the hints at any size (the default: codes up to 32 MiB)
                            was, act_quant.HINT_CODES_MAX = act_quant.HINT_CODES_MAX, 1 << 62
                            try:
                                return c(xs)
                            finally:
                                act_quant.HINT_CODES_MAX = was

                        for label, fns in ((f"{name}[precise]", [lambda c=c: w8a8.matmul(xs, c.state, "precise") for c in copies]),
                                           (f"{name}[quant hints always]", [lambda c=c: hinted(c) for c in copies]),
                                           (f"{name}[no quant hints]", [lambda c=c: unhinted(c) for c in copies]),
                                           (f"{name}[act quant]", [lambda: act_quant.quantize(xs, "fp8_e4m3", static_scale=sst)]),
                                           (f"{name}[act quant no hints]", [lambda: act_quant.quantize(xs, "fp8_e4m3", static_scale=sst, hints=False)]),
                                           (f"{name}[act quant 4096-chunks]", [lambda: act_quant.quantize(xs, "fp8_e4m3", static_scale=sst, block=4096)])):
                            t = time_graph(fns)
                            rows.append(dict(kernel=label, shape=sname, m=m, us=t * 1e6, ratio=t_bf / t, gbs=(wbytes + io) / t / 1e9,
                                             peak_share=(wbytes + io) / t / peak, us_eager=t * 1e6, ratio_eager=e_bf / t))
                            print(f"  {label:<22} {sname:<8} M={m:<5} {t * 1e6:9.1f} us  x{t_bf / t:5.2f} bf16", flush=True)
                    except Exception as e:
                        print(f"  {name} extra rows M={m}: failed {str(e)[:300]}", flush=True)
            if "roofline" in names and m == ms[0]:  # reading the weight bytes once, nothing else (any M: the same bytes)
                i4 = n * k // 2 + n * k // 128 * 2
                for label, nbytes, pdl in (("read(int4 g128 bytes)", i4, False), ("read(bf16 bytes)", n * k * 2, False),
                                           ("read(int4 g128, pdl)", i4, True)):
                    try:
                        t, cfg = read_time(nbytes, pdl)
                    except Exception as e:
                        print(f"  {label} failed: {str(e)[:200]}", flush=True)
                        continue
                    rows.append(dict(kernel=label, shape=sname, m=m, us=t * 1e6, ratio=t_bf / t, gbs=nbytes / t / 1e9,
                                     peak_share=nbytes / t / peak, us_eager=t * 1e6, ratio_eager=e_bf / t))
                    print(f"  {label:<22} {sname:<8} any M {t * 1e6:9.1f} us  x{t_bf / t:5.2f} bf16 (M={m})  {nbytes / t / 1e12:5.2f} TB/s"
                          f"  (BLOCK, PER, warps, .cg) {cfg}", flush=True)
            if "w4a16-g128" in preps:  # other paths of the same weights beside the default one
                # M = 1: the default, session 12's defaults (-s12), plain launches, and the default's time without the
                # split-K sum (-abl2; also -abl1 without x, -abl3 without both, -regx / -evf forced: session 13's rows)
                # -noclu: the default with the split-K sum through global memory instead of the tile's cluster; dot4t-clu:
                # dot4t summing through the cluster (not the default: slower on an H100, session 15)
                paths = (("gemv16", "gemv16-s18", "gemv16-s16", "gemv16-noclu", "gemv16-s12", "gemv16-nopdl", "gemv16-abl2", "gemv16-s15", "gemv16-sub-abl4")
                         if m == 1 else ("dot4t", "dot4", "dot4t-nopdl", "dot4-nopdl", "dot4t-clu", "dot4t-fr") if m <= 16
                         else ("dequant", "dequant-nohint", "dequant-hint", "dot4t") if m >= 4096
                         else ("tiled", "dequant", "dot4t") if m >= 128 else ())
                if a.w4_paths:
                    paths = tuple(a.w4_paths.split(","))
                path_rows(paths, preps["w4a16-g128"], xs, sname, m, t_bf, e_bf, io, peak, rows, checks, check=True)
                if m >= 4096:  # the dequantize kernel alone (the dequant path's overhead over cuBLAS)
                    from runtime.kernels import weight_only

                    cps = preps["w4a16-g128"][0]
                    # the slot-by-slot store (v0) and the row-contiguous one (the default) at a few tile sizes
                    for rws, bn, nw in ((False, 64, 4), (True, 64, 4), (True, 32, 4), (True, 64, 8), (True, 128, 8)):
                        t = time_graph([lambda c=c: weight_only.dequantize(c.state, torch.bfloat16, rws, bn, nw) for c in cps])
                        label = f"dequant{'' if rws else '-v0'} alone BN={bn} w={nw}"
                        print(f"  {label:<32} {sname:<8} M={m:<5} {t * 1e6:9.1f} us  "
                              f"{(preps['w4a16-g128'][1] + n * k * 2) / t / 1e9:7.0f} GB/s", flush=True)
            for name in ("w4a16-g128", "nvfp4(w only)"):
                if m == 1 and a.gemv16_configs and name in preps:  # gemv16 paths at other tile configs (set in the tuner's cache)
                    st0 = preps[name][0][0].state
                    for gp in a.gemv16_paths.split(","):
                        key = weight_only._key(st0, gp, 1)
                        for c in a.gemv16_configs.split(";"):
                            bn, sk, ku, w, *fl = c.split(",")  # a fifth field's letters: R REGX, E EVF, P SPK (NVFP4), S SUB, Q SPRE;
                            mr = int(fl[1]) if len(fl) > 1 else 0  # a sixth: the registers a thread may use (maxnreg)
                            fl = fl[0].upper() if fl else ""
                            tuning._cache[key] = dict(BN=int(bn), SPLIT_K=int(sk), KU=int(ku), num_warps=int(w),
                                                      REGX="R" in fl, EVF="E" in fl, SPK="P" in fl, SUB="S" in fl, MAXNREG=mr,
                                                      **({"SPRE": True} if "Q" in fl else {}))
                            pf = [lambda s=s_.state: weight_only.matmul(xs, s, gp) for s_ in preps[name][0]]
                            try:
                                note = ""
                                if gp != "gemv16":  # its error, as path_rows checks
                                    note = f"  err {rel_err_of(weight_only.matmul(xs, st0, gp), xs, preps[name][2]):.1e}"
                                t = time_graph(pf)
                                print(f"  {name[:5] + ' ' + gp + ' ' + c:<30} {sname:<8} M={m:<5} {t * 1e6:9.1f} us  x{t_bf / t:5.2f} bf16{note}",
                                      flush=True)
                            except Exception as e:
                                print(f"  {gp} {c}: failed {str(e)[:200]}", flush=True)
                        tuning._cache.pop(key, None)
            if 1 < m <= 16 and a.tc_configs and "w4a16-g128" in preps:  # the M <= 16 tensor-core paths at other tiles
                st0 = preps["w4a16-g128"][0][0].state
                for tp in a.tc_paths.split(","):
                    key = weight_only._key(st0, tp, m)
                    for c in a.tc_configs.split(";"):
                        bn, sk, ku, w, ns = (int(v) for v in c.split(","))
                        tuning._cache[key] = dict(BN=bn, SPLIT_K=sk, KU=ku, num_warps=w, num_stages=ns)
                        sweep_row(f"int4 {tp} {c}", tp, preps["w4a16-g128"], xs, sname, m, t_bf)
                    tuning._cache.pop(key, None)
            for name in ("w4a16-g128", "nvfp4(w only)"):  # the Gluon gv16s kernel (words staged by cp.async), M = 1
                if m == 1 and a.gvs_configs and name in preps:
                    key = weight_only._key(preps[name][0][0].state, "gv16s", m)
                    for c in a.gvs_configs.split(";"):
                        bn, nw, sk, ch, *fl = c.split(",")  # a fifth field's letters: E evict-first
                        tuning._cache[key] = dict(BN=int(bn), NW=int(nw), SPLIT_K=int(sk), CH=int(ch), EVF="E" in (fl[0].upper() if fl else ""))
                        sweep_row(f"{name[:5]} gv16s {c}", "gv16s", preps[name], xs, sname, m, t_bf)
                    tuning._cache.pop(key, None)
            if m <= 16 and a.mma16_configs and "w4a16-g128" in preps:  # the Gluon mma16 kernel at other tiles (any M <= 16)
                st0 = preps["w4a16-g128"][0][0].state
                key = weight_only._key(st0, "mma16", m)
                for c in a.mma16_configs.split(";"):
                    bn, sk, w, *fl = c.split(",")  # a fourth field's letters: X x through shared memory, 2 two blocks ahead, E EVF, W, B
                    fl = fl[0].upper() if fl else ""
                    tuning._cache[key] = dict(BN=int(bn), SPLIT_K=int(sk), NW=int(w), XS="X" in fl, PF=2 if "2" in fl else 1, EVF="E" in fl,
                                              WA="W" in fl, BIAS="B" in fl)
                    sweep_row(f"int4 mma16 {c}", "mma16", preps["w4a16-g128"], xs, sname, m, t_bf)
                tuning._cache.pop(key, None)
            # -fp4q: the pair-summed NVFP4 word sum (session 15); -abl4 / -fp4q-abl4: without the sign's own move, -abl8 without the
            # block scales' loads, -abl2 without the split-K sum (wrong values); -spk: the scales packed (_spk)
            if "nvfp4(w only)" in preps and m <= 16:  # NVFP4 through tensor cores (dot4f, the default at 2..16), gemv16 at 1
                path_rows(("gemv16", "gemv16-s18", "gemv16-s16", "gemv16-noclu", "gemv16-fp4q", "gemv16-abl4", "gemv16-fp4q-abl4", "gemv16-abl8", "gemv16-abl2", "gemv16-spk") if m == 1 else ("dot4f", "dot4f-nopdl", "dot4f-clu"), preps["nvfp4(w only)"], xs, sname, m,
                          t_bf, e_bf, io, peak, rows, checks, check=True, name="nvfp4(w only)")
            if m >= 128:  # bf16 again after the kernels: drift of the card's clocks over the shape's rows (not in any ratio)
                t2 = time_graph(bf_fns)
                print(f"  {'bf16 (again, after)':<22} {sname:<8} M={m:<5} {t2 * 1e6:9.1f} us  x{t_bf / t2:5.2f} the first", flush=True)
        del preps, bf16_copies
        torch.cuda.empty_cache()
    # summary: geometric mean over the four shapes of the ratio to bf16
    kn = sorted({r["kernel"] for r in rows}, key=lambda s: [r["kernel"] for r in rows].index(s))
    summary = {}
    for key, what in (("ratio_eager", "eager calls (Python launch overhead included)"), ("ratio", "CUDA-graph replay (GPU time)")):
        print(f"\n# summary on {dev}, {what}: geometric mean over the 4 shapes of bf16 time / kernel time")
        print(f"{'kernel':<24}" + "".join(f"{'M=' + str(m):>10}" for m in ms))
        for name in kn:
            line = f"{name:<24}"
            for m in ms:
                rs = [r[key] for r in rows if r["kernel"] == name and r["m"] == m]
                if len(rs) == len(SHAPES):
                    g = math.exp(sum(math.log(v) for v in rs) / len(rs))
                    summary[f"{key}:{name}@{m}"] = g
                    line += f"{g:10.2f}"
                else:
                    line += f"{'-':>10}"
            print(line)
    nbad = sum(not c["ok"] for c in checks)
    print(f"# correctness: {len(checks) - nbad}/{len(checks)} checks under 1e-2 relative error; max "
          f"{max((c['rel_err'] for c in checks if c['rel_err'] == c['rel_err']), default=float('nan')):.2e}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=dev, peak=peak, copy_bw=cbw, torch=torch.__version__, rows=rows, checks=checks,
                           summary=summary, tuned={str(k): v for k, v in tuning.chosen().items()}), f, indent=1)


if __name__ == "__main__":
    main()
