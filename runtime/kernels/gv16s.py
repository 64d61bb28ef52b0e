"""gemv16's arithmetic for one row of x (M = 1) with each program's words staged in shared memory (Gluon, cp.async).

Why: gemv16 (weight_only.py) holds a program's words in registers (240-255 a thread), so a programmatic dependent
launch's next kernel cannot become resident until this one's programs exit, and each call's arithmetic (about 1.2 us
on o at 17 instructions a word) runs after its words arrived with no memory traffic under it. Capping the registers
(`maxnreg`) spills (session 22: slower everywhere). Here the words go to shared memory by cp.async (16-byte copies, no
registers held), all of a program's K range issued before the dependent-launch wait, in CH-block groups; the
arithmetic reads each 128-channel block back (one warp a word row, a lane a column: conflict-free) and runs gemv16's
SUB decode (int4 codes as fp16 subnormals, one PTX call per word pair, _H2S_ASM). The program then needs few registers,
and with about 80 KB of shared memory two programs fit an SM: the next call's copies go out under this call's
arithmetic.

x (after the wait): the program's blocks' pairs (x[j 16 + r], x[(j + 4) 16 + r]) prescaled by a power of two per
block, the same values gemv16's packing pass makes, into shared memory once, with each row pair's sum for the zero
point (8: symmetric int4 only) and the inverse prescale. Split-K (long K) writes fp32 partials that weight_only's
reduce kernel sums. int4 (symmetric, groups of 128 channels) or NVFP4 (its block scales packed two words a block and
column, weight_only._spk, gemv16's FP4 decode); no act order; N a multiple of BN (`fits`).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .launch import cdiv, next_pow2
from .weight_only import WTYPE_INT, WTYPE_NVFP4, WeightOnlyState, _fp4_asm, _h2_asm, _spk

_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (Triton 3.6 / 3.8)
_acopy = getattr(async_copy, "async_copy_global_to_shared", None) or async_copy.async_load
_H2S = gl.constexpr(_h2_asm(True))
_FP4 = gl.constexpr(_fp4_asm())
SMEM_MAX = 112 << 10  # two programs an SM (H100: 227 KiB)


def fits(st: WeightOnlyState, x: torch.Tensor) -> str | None:
    """None when gv16s can run this weight and input, else why not."""
    if st.wtype == WTYPE_NVFP4:
        pass
    elif st.wtype != WTYPE_INT or st.bits != 4:
        return "int4 or NVFP4 only"
    elif st.zeros is not None:
        return "symmetric only"
    elif st.gshift != 0:
        return "groups of 128 channels only"
    if st.perm is not None:
        return "act order"
    if st.k % 128:
        return "K not a multiple of 128"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return "x must be fp16 or bf16"
    if x.shape[0] != 1:
        return "one row of x"
    return None


def smem_bytes(k: int, bn: int, sk: int, fp4: bool = False) -> int:
    """Shared memory of a program: its words, scales (NVFP4: two packed words a block and column), x pairs and
    per-row sums."""
    nbs = cdiv(k // 128, sk)
    nbp = next_pow2(nbs)
    return nbp * 16 * bn * 4 + nbp * bn * (8 if fp4 else 2) + nbp * 64 * 4 + 2 * nbp * 8 * 4


def default_config(n: int, k: int, fp4: bool = False) -> dict:
    """32 columns on 8 warps (a warp a word row), the K range in the fewest equal splits that keep a program's shared
    memory under SMEM_MAX."""
    nb = k // 128
    sk = next(d for d in range(1, nb + 1) if nb % d == 0 and smem_bytes(k, 32, d, fp4) <= SMEM_MAX)
    return dict(BN=32, NW=8, SPLIT_K=sk, CH=4)


@gluon.jit
def _gdc(ASM: gl.constexpr):
    gl.inline_asm_elementwise(ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pack(a, b):
    """Two fp32 tensors -> one int32 of fp16 halves (a low), rounded to nearest."""
    return gl.inline_asm_elementwise(asm="cvt.rn.f16x2.f32 $0, $2, $1;", constraints="=r,r,r", args=[a, b],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _fmax(a, b):
    return gl.maximum(a, b)


@gluon.jit
def _fadd(a, b):
    return a + b


@gluon.jit
def _bc(v, like):
    """v [8] (a row's value) broadcast over like's columns."""
    a, _ = gl.broadcast(v[:, None], like)
    return a


@gluon.jit
def _e4m3x2(w, HI: gl.constexpr):
    """The e4m3 pair in w's low (HI False) or high half-word as an fp16 pair, exactly."""
    if HI:
        return gl.inline_asm_elementwise(asm="{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.rn.f16x2.e4m3x2 $0, h; }",
                                         constraints="=r,r", args=[w], dtype=gl.int32, is_pure=True, pack=1)
    else:
        return gl.inline_asm_elementwise(asm="{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.rn.f16x2.e4m3x2 $0, l; }",
                                         constraints="=r,r", args=[w], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _bcc(v, like):
    """v [BN] (a column's value) broadcast over like's rows."""
    a, _ = gl.broadcast(v[None, :], like)
    return a


@gluon.jit
def _gvs_kernel(x_ptr, qw_ptr, s_ptr, out_ptr, N, stride_ok,
                NBS: gl.constexpr, NBP: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr, CH: gl.constexpr,
                SPLIT_K: gl.constexpr, PDL: gl.constexpr, EVF: gl.constexpr, FP4: gl.constexpr = False, gs_ptr=None):
    """out [N] (SPLIT_K 1) or fp32 partials [SPLIT_K, N] = x . W^T over program (0)'s BN columns and program (1)'s NBS
    blocks. PDL: launched as a programmatic dependent launch: the next kernel may launch at once, and this one's
    copies of words and scales go out before it waits for the previous kernel. FP4 (NVFP4): s_ptr holds the block
    scales packed two words a block and column (weight_only._spk), gs_ptr the global scale; gemv16's FP4 decode."""
    if PDL:
        _gdc("griddepcontrol.launch_dependents; // $0")
    n0 = gl.program_id(0) * BN
    b0 = gl.program_id(1) * NBS
    NCH: gl.constexpr = NBS // CH  # (the launcher: CH, a power of two, divides NBS)
    # (written at the buffer's rank; read back through a view whose layout has one rank less, so that .index(i) is
    # a row: Triton 3.6 and 3.8 both compile that, not a write through such a view)
    flat1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    flat2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    wsm = gl.allocate_shared_memory(gl.int32, [NBP * 16, BN], flat2)  # (power-of-two shapes)
    # the copies: scales (group 0), then the words in NCH groups of CH blocks
    cw: gl.constexpr = gl.BlockedLayout([1, 4], [128 // BN, BN // 4], [NW, 1], [1, 0])
    if FP4:  # [2 NBP, BN] int32: block b's two packed words at rows 2 b, 2 b + 1
        ssm = gl.allocate_shared_memory(gl.int32, [NBP * 2, BN], flat2)
        sr = gl.arange(0, NBP * 2, layout=gl.SliceLayout(1, cw))
        sn = gl.arange(0, BN, layout=gl.SliceLayout(0, cw))
        _acopy(ssm, s_ptr + (b0 * 2 + sr)[:, None] * N + (n0 + sn)[None, :], mask=(sr < NBS * 2)[:, None] & (sn < BN)[None, :])
    else:  # [NBP, BN] 16-bit floats
        ssm = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [NBP, BN], flat2)
        cs: gl.constexpr = gl.BlockedLayout([1, 8], [256 // BN, BN // 8], [NW, 1], [1, 0])
        sr = gl.arange(0, NBP, layout=gl.SliceLayout(1, cs))
        sn = gl.arange(0, BN, layout=gl.SliceLayout(0, cs))
        _acopy(ssm, s_ptr + (b0 + sr)[:, None] * N + (n0 + sn)[None, :], mask=(sr < NBS)[:, None] & (sn < BN)[None, :])
    async_copy.commit_group()
    cr = gl.arange(0, CH * 16, layout=gl.SliceLayout(1, cw))
    cn = gl.arange(0, BN, layout=gl.SliceLayout(0, cw))
    wofs = (b0 * 16 + cr)[:, None] * N + (n0 + cn)[None, :]
    for c in gl.static_range(NCH):
        if EVF:
            _acopy(wsm.slice(c * CH * 16, CH * 16), qw_ptr + c * CH * 16 * N + wofs, eviction_policy="evict_first")
        else:
            _acopy(wsm.slice(c * CH * 16, CH * 16), qw_ptr + c * CH * 16 * N + wofs)
        async_copy.commit_group()
    if PDL:  # x only after the kernel before this one is done
        _gdc("griddepcontrol.wait; // $0")

    # x pairs of the program's blocks: pair q of row r of block b at xq[q NBP + b, r] (gemv16's a0..a3, c0..c3), rows
    # r and r + 8's sum of x times 8 (the zero point) and the inverse prescale times 2^24 at aux[b, r] / aux[NBP + b, r]
    xl: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [NW, 1], [1, 0])
    xb = gl.arange(0, NBP, layout=gl.SliceLayout(1, xl))
    xr = gl.arange(0, 8, layout=gl.SliceLayout(0, xl))
    kb = (b0 + xb)[:, None] * 128 + xr[None, :]
    mb = (xb < NBS)[:, None] & (xr < 8)[None, :]
    l0 = gl.load(x_ptr + kb, mask=mb, other=0.0).to(gl.float32)
    h0 = gl.load(x_ptr + kb + 64, mask=mb, other=0.0).to(gl.float32)
    l1 = gl.load(x_ptr + kb + 16, mask=mb, other=0.0).to(gl.float32)
    h1 = gl.load(x_ptr + kb + 80, mask=mb, other=0.0).to(gl.float32)
    l2 = gl.load(x_ptr + kb + 32, mask=mb, other=0.0).to(gl.float32)
    h2 = gl.load(x_ptr + kb + 96, mask=mb, other=0.0).to(gl.float32)
    l3 = gl.load(x_ptr + kb + 48, mask=mb, other=0.0).to(gl.float32)
    h3 = gl.load(x_ptr + kb + 112, mask=mb, other=0.0).to(gl.float32)
    u0 = gl.load(x_ptr + kb + 8, mask=mb, other=0.0).to(gl.float32)
    v0 = gl.load(x_ptr + kb + 72, mask=mb, other=0.0).to(gl.float32)
    u1 = gl.load(x_ptr + kb + 24, mask=mb, other=0.0).to(gl.float32)
    v1 = gl.load(x_ptr + kb + 88, mask=mb, other=0.0).to(gl.float32)
    u2 = gl.load(x_ptr + kb + 40, mask=mb, other=0.0).to(gl.float32)
    v2 = gl.load(x_ptr + kb + 104, mask=mb, other=0.0).to(gl.float32)
    u3 = gl.load(x_ptr + kb + 56, mask=mb, other=0.0).to(gl.float32)
    v3 = gl.load(x_ptr + kb + 120, mask=mb, other=0.0).to(gl.float32)
    am = gl.maximum(gl.maximum(gl.maximum(gl.abs(l0), gl.abs(h0)), gl.maximum(gl.abs(l1), gl.abs(h1))),
                    gl.maximum(gl.maximum(gl.abs(l2), gl.abs(h2)), gl.maximum(gl.abs(l3), gl.abs(h3))))
    am = gl.maximum(am, gl.maximum(gl.maximum(gl.maximum(gl.abs(u0), gl.abs(v0)), gl.maximum(gl.abs(u1), gl.abs(v1))),
                                   gl.maximum(gl.maximum(gl.abs(u2), gl.abs(v2)), gl.maximum(gl.abs(u3), gl.abs(v3)))))
    amax = gl.reduce(am, 1, _fmax)  # (not gl.max / gl.sum: their combine functions are Triton's, interpreted ones
    # where the interpreter is on in the same process, as in the CPU test suite)
    # the prescale 2^(fb - 127) with |x| up < 2^15 (weight_only._prescale_bits at SUB's 269; NVFP4's 267), its inverse
    UPX: gl.constexpr = 267 if FP4 else 269
    fb = gl.minimum(gl.maximum(UPX - ((amax.to(gl.int32, bitcast=True) >> 23) & 255), 1), 253)
    up = (fb << 23).to(gl.float32, bitcast=True)[:, None]
    if FP4:
        uo = up
        dnm = ((254 - fb) << 23).to(gl.float32, bitcast=True)[:, None]
    else:
        uo = up * 0.0625  # the 0x00F0 nibbles' pairs (j = 1, 3) / 16
        dnm = ((254 - fb) << 23).to(gl.float32, bitcast=True)[:, None] * 16777216.0
    sx = ((((l0 + h0) + (l1 + h1)) + ((l2 + h2) + (l3 + h3))) + (((u0 + v0) + (u1 + v1)) + ((u2 + v2) + (u3 + v3)))) \
        * (up * 5.960464477539063e-08)
    xq = gl.allocate_shared_memory(gl.int32, [8 * NBP, 8], flat2)
    xq.slice(0 * NBP, NBP).store(_pack(l0 * up, h0 * up))
    xq.slice(1 * NBP, NBP).store(_pack(l1 * uo, h1 * uo))
    xq.slice(2 * NBP, NBP).store(_pack(l2 * up, h2 * up))
    xq.slice(3 * NBP, NBP).store(_pack(l3 * uo, h3 * uo))
    xq.slice(4 * NBP, NBP).store(_pack(u0 * up, v0 * up))
    xq.slice(5 * NBP, NBP).store(_pack(u1 * uo, v1 * uo))
    xq.slice(6 * NBP, NBP).store(_pack(u2 * up, v2 * up))
    xq.slice(7 * NBP, NBP).store(_pack(u3 * uo, v3 * uo))
    aux = gl.allocate_shared_memory(gl.float32, [2 * NBP, 8], flat2)
    aux.slice(0, NBP).store(sx * 8.0)
    dnb, _ = gl.broadcast(dnm, sx)
    aux.slice(NBP, NBP).store(dnb)

    # the blocks: [8 rows, BN columns] of each half (word rows r and r + 8), a warp a row, a lane a column
    lw: gl.constexpr = gl.BlockedLayout([8 // NW, BN // 32], [1, 32], [NW, 1], [1, 0])
    lr: gl.constexpr = gl.SliceLayout(1, lw)
    lc: gl.constexpr = gl.SliceLayout(0, lw)
    w3 = wsm._reinterpret(gl.int32, [NBP * 2, 8, BN], flat2)
    xr1 = xq._reinterpret(gl.int32, [8 * NBP, 8], flat1)
    ar1 = aux._reinterpret(gl.float32, [2 * NBP, 8], flat1)
    sr1 = ssm._reinterpret(gl.int32 if FP4 else s_ptr.dtype.element_ty, [NBP * 2 if FP4 else NBP, BN], flat1)
    acc = gl.zeros([8, BN], gl.float32, layout=lw)
    for c in gl.static_range(NCH):
        async_copy.wait_group(NCH - 1 - c)  # this thread's copies of chunk c are in (and the scales)
        _barrier()  # everyone's (and, the first time, the x pairs)
        for j in gl.static_range(CH):
            b = c * CH + j
            ca = w3.index(2 * b).load(lw)
            cb = w3.index(2 * b + 1).load(lw)
            q0, q1 = _bc(xr1.index(0 * NBP + b).load(lr), ca), _bc(xr1.index(1 * NBP + b).load(lr), ca)
            q2, q3 = _bc(xr1.index(2 * NBP + b).load(lr), ca), _bc(xr1.index(3 * NBP + b).load(lr), ca)
            q4, q5 = _bc(xr1.index(4 * NBP + b).load(lr), ca), _bc(xr1.index(5 * NBP + b).load(lr), ca)
            q6, q7 = _bc(xr1.index(6 * NBP + b).load(lr), ca), _bc(xr1.index(7 * NBP + b).load(lr), ca)
            dn = ar1.index(NBP + b).load(lr)
            if FP4:  # the scale pairs (j, j + 4) of each column: (e0, e4) (e1, e5) in word A, (e2, e6) (e3, e7) in B
                pa = sr1.index(2 * b).load(lc)
                pb = sr1.index(2 * b + 1).load(lc)
                part = gl.inline_asm_elementwise(
                    asm=_FP4, constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                    args=[ca, cb, q0, q1, q2, q3, q4, q5, q6, q7, _bcc(_e4m3x2(pa, False), ca), _bcc(_e4m3x2(pa, True), ca),
                          _bcc(_e4m3x2(pb, False), ca), _bcc(_e4m3x2(pb, True), ca)],
                    dtype=gl.float32, is_pure=True, pack=1)
                acc += part * dn[:, None]
            else:
                part = gl.inline_asm_elementwise(asm=_H2S, constraints="=r,r,r,r,r,r,r,r,r,r,r",
                                                 args=[ca, cb, q0, q1, q2, q3, q4, q5, q6, q7],
                                                 dtype=gl.float32, is_pure=True, pack=1)
                zsx = ar1.index(b).load(lr)
                s = sr1.index(b).load(lc).to(gl.float32)
                acc += (part - zsx[:, None]) * (dn[:, None] * s[None, :])
    y = gl.reduce(acc, 0, _fadd)
    if FP4:  # the decode's 2^-14 and the global scale
        y = y * (gl.load(gs_ptr) * 16384.0)
    on = n0 + gl.arange(0, BN, layout=lc)
    if SPLIT_K == 1:
        gl.store(out_ptr + on, y.to(out_ptr.dtype.element_ty))
    else:
        gl.store(out_ptr + gl.program_id(1) * stride_ok + on, y)


def matmul(x2: torch.Tensor, st: WeightOnlyState, cfg: dict | None = None, pdl: int | None = None) -> torch.Tensor:
    """x2 [1, K] . W^T -> [1, N] in x's dtype. pdl: as a programmatic dependent launch (default: weight_only's rule,
    _pdl_for); the split-K partials summed by weight_only's reduce kernel (a dependent launch where those run)."""
    from .weight_only import _pdl_dev, _pdl_for, _reduce

    why = fits(st, x2)
    if why:
        raise ValueError(f"gv16s: {why}")
    n, k = st.n, st.k
    fp4 = st.wtype == WTYPE_NVFP4
    cfg = cfg or default_config(n, k, fp4)
    bn, nw, sk, ch = cfg["BN"], cfg.get("NW", 8), cfg.get("SPLIT_K", 1), cfg.get("CH", 4)
    nb = k // 128
    if n % bn or bn not in (32, 64, 128) or 8 % nw or nb % sk:
        raise ValueError(f"gv16s: N {n} / BN {bn} / {nw} warps / {nb} blocks in {sk} splits do not fit the tile")
    nbs = nb // sk
    ch = min(next_pow2(ch), next_pow2(nbs))
    while nbs % ch:  # a power of two dividing the split's blocks
        ch //= 2
    if smem_bytes(k, bn, sk, fp4) > 200 << 10:
        raise ValueError(f"gv16s: {smem_bytes(k, bn, sk, fp4)} bytes of shared memory (raise SPLIT_K)")
    x2 = x2.contiguous()
    out = torch.empty(1, n, dtype=x2.dtype, device=x2.device)
    dst = out if sk == 1 else torch.empty(sk, 1, n, dtype=torch.float32, device=x2.device)
    pdl = _pdl_for(st, x2) if pdl is None else pdl
    _gvs_kernel[(n // bn, sk)](x2, st.qw, _spk(st) if fp4 else st.scales, dst, n, n, NBS=nbs, NBP=next_pow2(nbs), BN=bn,
                               NW=nw, CH=ch, SPLIT_K=sk, PDL=bool(pdl), EVF=cfg.get("EVF", False), FP4=fp4,
                               gs_ptr=st.global_scale if fp4 else None, num_warps=nw, **(dict(launch_pdl=True) if pdl else {}))
    if sk > 1:
        _reduce(dst, out, n, sk, pdl=_pdl_dev(x2))
    return out
