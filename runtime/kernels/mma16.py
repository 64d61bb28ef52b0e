"""int4 weight-only GEMM for 1 <= M <= 16 in Gluon: the words loaded straight into the tensor cores' operand
registers (no trip through shared memory), as Marlin does.

Plain Triton chooses its layouts itself and sends a register-loaded weight tile through shared memory before
mma (session 17); Gluon (`triton.experimental.gluon`) states them. Here the weight tile of one 16-channel slot,
[16 (K), BN (N)], is `mma.sync` m16n8k16's right operand in `DotOperandLayout(1, k_width=2)`: lane (g, c) of a
warp holds K rows 2c, 2c + 1, 2c + 8, 2c + 9 of column g of each 8-column subtile. The words are repacked once
per weight (`repack`) so that those four words sit in two 8-byte pairs, each warp instruction reading 256
contiguous bytes, and so that the slot's decode (one PTX call per K pair, the `dot4` decode: q - z exact in
16-bit floats) gives the operand pairs in place. x is the left operand, read from L1/L2 per slot.

Word (r, n) of 128-channel block b holds the eight slots i = 0..7 of channel b * 128 + 16 i + r, as in
`WeightOnlyState.qw`; only the order of the words in memory changes:
    [b][n // 8][r // 8][n % 8][r % 8]   (int32, N / 8 * 128 words a block)
The group scales multiply each block's fp32 result (groups of 128 channels or more: `st.gshift >= 0`).

Switches (`_mma16_kernel`'s docstring; bench letters): x staged in shared memory (XS), the weights the left operand
(WA), the decode's offset taken off through x's row sums (BIAS), two blocks ahead (PF), evict-first (EVF). Sessions
20-21 (H100): right, but slower than dot4-tma at M=16 and gemv16 at M=1 in every shape (runtime/kernels/NOTES.md); a
forced path, `QTOOL_MMA16=1` makes it the default for M <= 16 (at `default_config`, XS + WA). A cp.async ring of the
words in shared memory (Marlin's streaming, a wait and a barrier a block) was 20-60% slower still and is gone
(session 21).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .launch import cdiv, next_pow2
from .weight_only import _DEC4Z_BF16, _DEC4Z_F16, WTYPE_INT, WeightOnlyState, _dec4z_asm


def repack(qw: torch.Tensor) -> torch.Tensor:
    """[K / 8, N] words (block b's word row r at row 16 b + r) -> the mma16 order, flat int32."""
    k8, n = qw.shape
    nb = k8 // 16
    t = qw.reshape(nb, 2, 8, n // 8, 8)  # b, r // 8, r % 8, n // 8, n % 8
    return t.permute(0, 3, 1, 4, 2).contiguous().reshape(-1)


def unpack(qm: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The inverse of repack (tests)."""
    nb = k // 128
    return qm.reshape(nb, n // 8, 2, 8, 8).permute(0, 2, 4, 1, 3).reshape(k // 8, n)


def words(st: WeightOnlyState) -> torch.Tensor:
    """The repacked words of a weight, made once and kept on the state."""
    qm = st.__dict__.get("_mma16")
    if qm is None:
        qm = st.__dict__["_mma16"] = repack(st.qw)
    return qm


def fits(st: WeightOnlyState, x: torch.Tensor) -> str | None:
    """None when mma16 can run this weight and input, else why not."""
    if st.wtype != WTYPE_INT or st.bits != 4:
        return "int4 only"
    if st.gshift < 0:
        return "groups narrower than 128 channels"
    if st.perm is not None:
        return "act order"
    if st.n % 8:
        return "N not a multiple of 8"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return "x must be fp16 or bf16"
    if x.shape[0] > 16:
        return "more than 16 rows"
    return None


@gluon.jit
def _dec(words, magic, zneg, i: gl.constexpr, FP16: gl.constexpr):
    """Slot i of a word tile, as 16-bit floats q - z (the K pairs of the operand layout, one PTX call each)."""
    if FP16:
        return gl.inline_asm_elementwise(asm=_DEC4Z_F16[i], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                         dtype=gl.float16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(asm=_DEC4Z_BF16[i], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)


# MAGIC + q only (BIAS: the offset MAGIC + z comes off per block through x's row sums)
_DEC4B = gl.constexpr(tuple(_dec4z_asm(False, i, raw=True) for i in range(8)))


@gluon.jit
def _decb(words, magic, i: gl.constexpr, FP16: gl.constexpr):
    if FP16:
        return gl.inline_asm_elementwise(asm=_DEC4B[i], constraints="=r,r,r,r,r", args=[words, magic],
                                         dtype=gl.float16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(asm=_DEC4B[i], constraints="=r,r,r,r,r", args=[words, magic],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)


_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (Triton 3.6 / 3.8)


@gluon.jit
def _wload(ptr, EVF: gl.constexpr):
    if EVF:
        return gl.load(ptr, eviction_policy="evict_first")
    else:
        return gl.load(ptr)


@gluon.jit
def _mma16_kernel(x_ptr, qm_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_ok,
                  BN: gl.constexpr, SPLIT_K: gl.constexpr, NW: gl.constexpr, GSH: gl.constexpr,
                  HAS_ZERO: gl.constexpr, FP16: gl.constexpr, KB: gl.constexpr = 1, XS: gl.constexpr = False,
                  PF: gl.constexpr = 1, EVF: gl.constexpr = False, TRIG: gl.constexpr = False, WA: gl.constexpr = False,
                  BM: gl.constexpr = 16, BIAS: gl.constexpr = False, KBP: gl.constexpr = 1):
    """out [M, N] (or fp32 partials [SPLIT_K, M, N]) = x [M, K] . W^T over program (0)'s BN columns and program
    (1)'s share of the 128-channel blocks (at most KB); the words of the next PF (1 or 2) blocks are loaded before
    this one's are decoded. XS: the program's x [BM, KB * 128] (KBP: KB to a power of two) read once into shared memory (then one ldmatrix a
    slot) instead of from L1 per slot. EVF: the words read evict-first. TRIG: the split-K sum (a programmatic dependent
    launch) may start at once; it waits for this kernel's writes. WA (weights the left operand): out^T [BN, BM] =
    W . x^T, the decoded [BN, 16] slot tile mma's m16 side and x^T [16, BM] its n8 side (BM = 8: M <= 8 in half the
    mma.sync and x loads); the same repacked words, read as [BN, 16] (the operand's K pairs are again two adjacent
    words). BIAS (with XS): the slots decoded as MAGIC + q only (two instructions a K pair, not three) and
    (MAGIC + z) times x's row sum over the block taken off each block's result (the sums made as x is staged)."""
    if TRIG:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    if WA:
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        WSH: gl.constexpr = [BN, 16]
    else:
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        WSH: gl.constexpr = [16, BN]
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    lw: gl.constexpr = la if WA else lb  # the weights' operand
    lx: gl.constexpr = lb if WA else la  # x's
    MAGIC16: gl.constexpr = 0x6400 if FP16 else 0x4300
    ZNEG8: gl.constexpr = (0xE408E408 if FP16 else 0xC308C308) - (1 << 32)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    nblk = K // 128
    b0 = pid_k * KB
    b1 = gl.minimum(b0 + KB, nblk)

    # the words: element (r, n) (or (n, r) with WA) at (r // 8) * 64 + r % 8 + (n // 8) * 128 + (n % 8) * 8 of a block
    if WA:
        r = gl.arange(0, 16, layout=gl.SliceLayout(0, lw))
        nw = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, lw))
        wofs = ((r // 8) * 64 + r % 8)[None, :] + ((nw // 8) * 128 + (nw % 8) * 8)[:, None]
        zofs = nw[:, None] + 0 * r[None, :]
    else:
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, lw))
        nw = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, lw))
        wofs = ((r // 8) * 64 + r % 8)[:, None] + ((nw // 8) * 128 + (nw % 8) * 8)[None, :]
        zofs = nw[None, :] + 0 * r[:, None]
    wstep = N * 16
    magic = gl.full(WSH, MAGIC16 * 65537, gl.int32, layout=lw)
    if not HAS_ZERO or BIAS:
        zneg = gl.full(WSH, ZNEG8, gl.int32, layout=lw)

    if XS:  # x [8 slots, BM, 16] tiles of each block into shared memory, once (static slices)
        xl3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 16, 2], [NW, 1, 1], [2, 1, 0])
        xsm3 = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [KBP * 8, BM, 16], gl.SwizzledSharedLayout(8, 4, 2, [2, 1, 0]))
        t0 = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, xl3)))
        t1 = gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, xl3)))
        t2 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, xl3)))
        x3 = t0[:, None, None] * 16 + t1[None, :, None] * stride_xm + t2[None, None, :]
        m3 = (t1 < M)[None, :, None] & (t2 < 16)[None, None, :] & (t0 < 8)[:, None, None]
        if BIAS:
            xsum = gl.allocate_shared_memory(gl.float32, [KBP, BM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        for j in gl.static_range(KB):
            xt = gl.load(x_ptr + (b0 + j) * 128 + x3, mask=m3 & (b0 + j < b1), other=0.0)
            xsm3.slice(j * 8, 8).store(xt)
            if BIAS:
                xsum.index(j).store(gl.sum(gl.sum(xt.to(gl.float32), axis=2), axis=0))
        xsm = xsm3._reinterpret(x_ptr.dtype.element_ty, [KBP * 8, BM, 16], gl.SwizzledSharedLayout(8, 4, 2, [1, 0]))
        _barrier()
    elif WA:  # x^T [16, BM]
        xk = gl.arange(0, 16, layout=gl.SliceLayout(1, lx))
        xm = gl.arange(0, BM, layout=gl.SliceLayout(0, lx))
        xofs = xm[None, :] * stride_xm + xk[:, None]
        xmask = (xm < M)[None, :] & (xk < 16)[:, None]
    else:
        xm = gl.arange(0, 16, layout=gl.SliceLayout(1, lx))
        xk = gl.arange(0, 16, layout=gl.SliceLayout(0, lx))
        xofs = xm[:, None] * stride_xm + xk[None, :]
        xmask = (xm < M)[:, None] & (xk < 16)[None, :]

    if WA:
        on = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        om = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        acc = gl.zeros([BN, BM], gl.float32, layout=mma)
    else:
        on = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        om = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
        acc = gl.zeros([16, BN], gl.float32, layout=mma)

    w_n1 = _wload(qm_ptr + b0 * wstep + wofs, EVF)
    if PF == 2:
        w_n2 = _wload(qm_ptr + gl.minimum(b0 + 1, b1 - 1) * wstep + wofs, EVF)
    for b in range(b0, b1):
        w = w_n1
        if PF == 2:
            w_n1 = w_n2
            w_n2 = _wload(qm_ptr + gl.minimum(b + 2, b1 - 1) * wstep + wofs, EVF)
        else:
            w_n1 = _wload(qm_ptr + gl.minimum(b + 1, b1 - 1) * wstep + wofs, EVF)
        s = gl.load(s_ptr + (b >> GSH) * N + on).to(gl.float32)
        if HAS_ZERO and not BIAS:
            zt = gl.load(z_ptr + (b >> GSH) * N + zofs).to(gl.float32)
            zneg = (-(zt + (1024.0 if FP16 else 128.0))).to(gl.float16 if FP16 else gl.bfloat16).to(gl.int16, bitcast=True)
            zneg = (zneg.to(gl.int32) & 0xFFFF) * 65537
        if BIAS:  # (MAGIC + z) per column, x's row sums over the block
            if HAS_ZERO:
                zc = gl.load(z_ptr + (b >> GSH) * N + on).to(gl.float32) + (1024.0 if FP16 else 128.0)
            else:
                zc = gl.full([BN], (1024.0 if FP16 else 128.0) + 8.0, gl.float32, layout=gl.SliceLayout(1 if WA else 0, mma))
            if WA:
                xr = xsum.index(b - b0).load(gl.SliceLayout(0, mma))
            else:
                xr = xsum.index(b - b0).load(gl.SliceLayout(1, mma))
        blk = gl.zeros_like(acc)
        for i in gl.static_range(8):
            if XS:
                if WA:
                    xs = xsm.index((b - b0) * 8 + i).permute([1, 0]).load(lx)
                else:
                    xs = xsm.index((b - b0) * 8 + i).load(lx)
            else:
                xs = gl.load(x_ptr + xofs + (b * 128 + 16 * i), mask=xmask, other=0.0)
            if BIAS:
                wd = _decb(w, magic, i, FP16)
            else:
                wd = _dec(w, magic, zneg, i, FP16)
            if WA:
                blk = mma_v2(wd, xs, blk)
            else:
                blk = mma_v2(xs, wd, blk)
        if BIAS:
            if WA:
                blk -= zc[:, None] * xr[None, :]
            else:
                blk -= xr[:, None] * zc[None, :]
        if WA:
            acc += blk * s[:, None]
        else:
            acc += blk * s[None, :]

    if WA:
        omask = (om < M)[None, :] & (on < N)[:, None]
        oofs = om[None, :] * stride_om + on[:, None]
    else:
        omask = (om < M)[:, None] & (on < N)[None, :]
        oofs = om[:, None] * stride_om + on[None, :]
    if SPLIT_K == 1:
        gl.store(out_ptr + oofs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        gl.store(out_ptr + pid_k * stride_ok + oofs, acc, mask=omask)


def default_config(n: int, k: int, m: int = 16) -> dict:
    """128 columns on four warps, split-K 8, x staged in shared memory, the weights the left operand: the fastest
    mma16 tile of sessions 20-21's sweeps for qkv, o and down (H100, M=16: qkv 9.6 us, o 8.0, gate_up 37.1, down 20.7
    against dot4-tma's 9.1 / 7.3 / 28.7 / 15.9; gate_up's best, 256 x 4 on 8 warps XS WA BIAS PF 2 EVF, 35.8 us).
    More splits where K passes 32 blocks a split (x's staging in shared memory: at most 128 KiB)."""
    return dict(BN=128, SPLIT_K=max(8, cdiv(k // 128, 32)), NW=4, XS=True, WA=True)


def matmul(x2: torch.Tensor, st: WeightOnlyState, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M <= 16, K] . W^T -> [M, N] in x's dtype (the split-K partials summed by weight_only's reduce kernel)."""
    from .weight_only import _pdl_dev, _reduce

    why = fits(st, x2)
    if why:
        raise ValueError(f"mma16: {why}")
    m, n, k = x2.shape[0], st.n, st.k
    cfg = cfg or default_config(n, k, m)
    bn, sk, nw = cfg["BN"], cfg["SPLIT_K"], cfg["NW"]
    if n % bn:
        raise ValueError(f"mma16: N {n} not a multiple of BN {bn}")
    x2 = x2.contiguous()
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    zeros = st.zeros if st.zeros is not None else st.scales
    kb = cdiv(k // 128, sk)
    sk = cdiv(k // 128, kb)  # (no empty split)
    dst = out if sk == 1 else torch.empty(sk, m, n, dtype=torch.float32, device=x2.device)
    wa = cfg.get("WA", False)
    bias = cfg.get("BIAS", False)
    if bias and not cfg.get("XS", False):
        raise ValueError("mma16: BIAS needs XS (x's row sums are made as x is staged)")
    if wa and bn % (16 * nw):
        raise ValueError(f"mma16: BN {bn} not a multiple of 16 x {nw} warps (WA)")
    bm = 8 if wa and m <= 8 else 16
    smem = (next_pow2(kb) * 8 * bm * 16 * x2.element_size() if cfg.get("XS", False) else 0)
    if smem > 160 << 10:
        raise ValueError(f"mma16: x staged for {kb} blocks needs more than 160 KiB of shared memory (raise SPLIT_K)")
    trig = sk > 1 and cfg.get("TRIG", True) and _pdl_dev(x2)  # the sum as a dependent launch (weight_only's rule)
    _mma16_kernel[(n // bn, sk)](x2, words(st), st.scales, zeros, dst, m, n, k, x2.stride(0), n, m * n,
                                BN=bn, SPLIT_K=sk, NW=nw, GSH=st.gshift, HAS_ZERO=st.zeros is not None,
                                FP16=x2.dtype == torch.float16, KB=kb, XS=cfg.get("XS", False), PF=cfg.get("PF", 1),
                                EVF=cfg.get("EVF", False), TRIG=trig, WA=wa, BM=bm,
                                BIAS=bias, KBP=next_pow2(kb), num_warps=nw)
    if sk > 1:
        _reduce(dst, out, m * n, sk, pdl=trig)
    return out
