"""Weight-only GEMM: int4/int8 (GPTQ/AWQ groups, sym/asym, act order), NVFP4 and MXFP4 weights.

Layout (repacked once from the QTensor, like Marlin): `qw` int32 [K / PER, N] with PER = 32 / bits
codes per word, N contiguous. K is cut into blocks of 16 * PER codes; word-row r of block b holds,
in slot i, the code of input channel k = b * 16 * PER + i * 16 + r. Slot i of a [16, BN] word tile
is therefore the weight of 16 *consecutive* channels, so one 16-wide slice of x multiplies it:
no reshape in the kernel, one group scale per slice (groups are multiples of 16).

Scales are stored transposed, [n_groups, N], in their storage dtype (fp16/bf16; NVFP4 e4m3 and
MX e8m0 as raw bytes); `gblk[j]` is the group of the 16-channel run j. Act order (GPTQ desc_act)
is handled by sorting K by g_idx at load time and gathering x through the same permutation.

Paths: M = 1 the packed-fp16 GEMV (`gemv16`: int4 with one group per 128-channel block, NVFP4; inline
PTX decodes two codes per instruction) or the fp32 GEMV (the other layouts); 2 <= M <= 16 int4 through
wgmma with the decoded weights as its register operand (`dot4t`: out^T = W x^T, also wide-N layers at
64 < M <= 128), else a fused dequant + tl.dot kernel (split-K for small M); M >= 128 a dequantize kernel
followed by cuBLAS. `dot4` (x as the left operand: the decoded tile goes through shared memory), `dot4s`
(the scale in the decode) are kept as measured alternatives (bench/kernels.py rows); `tc4`/`tc4t` (one
K=128 dot per block, slower: NOTES.md, sessions 5-6) were removed in session 8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtensor import QTensor
from qtensor import packing as pk

from . import cluster, tuning
from .launch import cdiv, launch, next_pow2

WTYPE_INT, WTYPE_NVFP4, WTYPE_MXFP4 = 0, 1, 2
RUN = 16  # consecutive input channels per slot


@dataclass
class WeightOnlyState:
    qw: torch.Tensor  # int32 [K/PER, N]
    scales: torch.Tensor  # [NG, N]
    zeros: torch.Tensor | None  # uint8 [NG, N] (asym int)
    gblk: torch.Tensor  # int32 [K/16]
    perm: torch.Tensor | None  # int32 [K] (act order) or None
    global_scale: torch.Tensor  # float32 [1]
    n: int
    k: int
    bits: int
    wtype: int
    uniform: bool = False  # int weights whose every 16*PER-channel block lies in one group (g >= 128, per channel)
    gshift: int = -1  # uniform int weights whose block b is group b >> gshift (no gblk lookup in the kernels), else -1

    def nbytes(self) -> int:
        b = self.qw.numel() * 4 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            b += self.zeros.numel()
        return b

    def clone(self) -> "WeightOnlyState":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return WeightOnlyState(self.qw.clone(), self.scales.clone(), c(self.zeros), self.gblk, self.perm, self.global_scale, self.n, self.k, self.bits, self.wtype, self.uniform, self.gshift)


def supports(qt: QTensor) -> str | None:
    """None when a weight-only kernel can run this weight, else the reason."""
    n, k = qt.shape
    if qt.act.kind != "none" and qt.dtype == "int":
        return "activation quantization"
    if qt.dtype == "int":
        if qt.bits not in (4, 8):
            return f"{qt.bits}-bit"
        if qt.group_size > 0 and qt.group_size % RUN:
            return f"group size {qt.group_size}"
    elif qt.dtype == "e2m1":
        if qt.group_size not in (16, 32):
            return "e2m1 group size"
    else:
        return qt.dtype
    per = 32 // qt.bits
    if k % (RUN * per):
        return f"in_features {k} not a multiple of {RUN * per}"
    return None


def prepare(qt: QTensor) -> WeightOnlyState | None:
    """Repack one weight for the kernels (on the weight's device). None when the layout does not fit."""
    if supports(qt) is not None:
        return None
    n, k = qt.shape
    dev = qt.codes.device
    bits = qt.bits
    per = 32 // bits
    perm = None
    if qt.dtype == "int":
        u = pk.signed_to_offset(qt.codes, bits) if qt.sym else qt.codes.to(torch.uint8)
        if qt.group_size == 0:  # per tensor
            scales = qt.scales.reshape(1, 1).expand(1, n)
            zeros = None if qt.zeros is None else qt.zeros.reshape(1, 1).expand(1, n)
            g = torch.zeros(k, dtype=torch.long, device=dev)
        else:
            scales = qt.scales.reshape(n, -1).t()
            zeros = None if qt.zeros is None else qt.zeros.reshape(n, -1).t()
            g = qt.column_groups().to(dev)
        if qt.g_idx is not None and bool((g[1:] < g[:-1]).any()):
            p = torch.argsort(g, stable=True)
            u, g, perm = u[:, p], g[p], p.to(torch.int32)
        runs = g.reshape(-1, RUN)
        if not bool((runs == runs[:, :1]).all()):
            return None  # groups not aligned to 16-channel runs: the torch path handles it
        gblk = runs[:, 0].to(torch.int32).contiguous()
        wtype = WTYPE_INT
        gs = torch.ones(1, dtype=torch.float32, device=dev)
    else:
        u = qt.codes.to(torch.uint8)
        gsz = qt.group_size
        if qt.scales.dtype == torch.uint8:  # MX e8m0
            wtype, scales = WTYPE_MXFP4, qt.scales.t()
        else:
            wtype, scales = WTYPE_NVFP4, qt.scales.view(torch.uint8).t()
        zeros = None
        gblk = (torch.arange(k // RUN, device=dev) * RUN // gsz).to(torch.int32)
        gs = (qt.global_scale.float().reshape(1) if qt.global_scale is not None else torch.ones(1)).to(dev)
    nb = k // (RUN * per)
    t = u.reshape(n, nb, per, RUN).permute(1, 3, 2, 0).reshape(k, n)  # [b, r, i] along dim 0
    qw = pk.pack_int32(t.contiguous(), bits, dim=0)
    uniform = wtype == WTYPE_INT and bool((gblk.reshape(-1, per) == gblk.reshape(-1, per)[:, :1]).all())
    return WeightOnlyState(
        qw.contiguous(), scales.contiguous(), None if zeros is None else zeros.to(torch.uint8).contiguous(),
        gblk, perm, gs.float().contiguous(), n, k, bits, wtype, uniform, _group_shift(gblk, per) if uniform else -1,
    )


def _group_shift(gblk: torch.Tensor, per: int) -> int:
    """s where block b (16 * per channels) is group b >> s for every block: 0 for g128 (act order too, once
    sorted into equal groups), 1 for g256, 30 for one group per channel; -1 (the table) for unequal groups."""
    gb = gblk.reshape(-1, per)[:, 0].long()
    if not bool(gb.any()):
        return 30
    idx = torch.arange(gb.numel(), device=gb.device)
    return next((sh for sh in range(16) if torch.equal(gb, idx >> sh)), -1)


@triton.jit
def _group(gblk_ptr, b, GSH: tl.constexpr):
    """The group of 128-channel block b (a scalar or a tensor of them): b >> GSH, or gblk's entry when GSH < 0
    (one dependent load fewer on the kernels' critical path, and their scale loads become affine in b)."""
    if GSH >= 0:
        return b >> GSH
    else:
        return tl.load(gblk_ptr + b * 8)


@triton.jit
def _int_code(words, i: tl.constexpr, BITS: tl.constexpr):
    """Code of slot i as fp32 without an int->float conversion (a quarter-rate instruction): the code
    is OR-ed into the mantissa of 2^23 and 2^23 subtracted, both exact."""
    return _code_f32((words >> (i * BITS)) & ((1 << BITS) - 1))


@triton.jit
def _code_f32(q):
    """Unsigned codes (int32, < 2^23) as fp32, OR-ed into the mantissa of 2^23 and 2^23 subtracted (exact)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _e2m1_f32(q):
    """e2m1 codes (int32, 0..15) -> value * 2^-14 as fp32: the three low bits placed at fp16 bits 9..11 and
    the sign at 15 (sign<<15 | e<<10 | m<<9), exact for subnormals too."""
    h = ((q & 7) << 9) | ((q & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_f32(bits):
    """e4m3 bits (int32) -> fp32 value, plain Triton."""
    e = (bits >> 3) & 15
    m = (bits & 7).to(tl.float32)
    v = tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2(e.to(tl.float32) - 10.0))
    return tl.where((bits & 128) != 0, -v, v)


@triton.jit
def _dequant_slot(words, i: tl.constexpr, s_ptr, z_ptr, gs, g, offs_n, mask_n, N,
                  BITS: tl.constexpr, WTYPE: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_AFTER: tl.constexpr):
    """Slot i of a [16, BN] word tile -> (values [16, BN] fp32, scale [BN] fp32, zero [BN] fp32).

    With SCALE_AFTER the values are the raw codes (int) and the caller applies (v - zero) * scale after
    its reduction; otherwise the values are already dequantized."""
    if WTYPE == 0:
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        else:
            z = tl.zeros_like(s) + (1 << (BITS - 1))
        v = _int_code(words, i, BITS)
    else:
        v = _e2m1_f32((words >> (i * BITS)) & ((1 << BITS) - 1))
        b = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        if WTYPE == 1:  # e4m3 block scale * global scale
            s = _e4m3_f32(b) * 16384.0  # the global scale is applied by the caller
        else:  # e8m0
            s = tl.exp2(b.to(tl.float32) - 127.0) * 16384.0
        z = tl.zeros_like(s)
    if not SCALE_AFTER:
        v = (v - z[None, :]) * s[None, :]
    return v, s, z


@triton.jit
def _wo_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, gs_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    BITS: tl.constexpr, WTYPE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    BLK: tl.constexpr = 16 * PER
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_m = offs_m < M
    mask_n = offs_n < N
    nblk = K // BLK
    per_split = tl.cdiv(nblk, SPLIT_K)
    b0 = pid_k * per_split
    b1 = tl.minimum(b0 + per_split, nblk)
    gs = tl.load(gs_ptr)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((16, BN), dtype=tl.float32)  # GEMV (BM == 1): reduced over the 16 rows once, at the end
    for b in range(b0, b1):
        words = tl.load(qw_ptr + (b * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        for i in tl.static_range(PER):
            g = tl.load(gblk_ptr + b * PER + i)
            kk = b * BLK + i * 16 + offs_r
            if HAS_PERM:
                kk = tl.load(perm_ptr + kk)
            if DOT:
                xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0)
                w, s, z = _dequant_slot(words, i, s_ptr, z_ptr, gs, g, offs_n, mask_n, N, BITS, WTYPE, HAS_ZERO, False)
                acc += tl.dot(xs, w.to(xs.dtype))
            else:
                w, s, z = _dequant_slot(words, i, s_ptr, z_ptr, gs, g, offs_n, mask_n, N, BITS, WTYPE, HAS_ZERO, False)
                xcol = tl.load(x_ptr + pid_m * stride_xm + kk).to(tl.float32)
                acc2 += w * xcol[:, None]
    if not DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    if WTYPE == 1:
        acc = acc * gs
    optrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(optrs, acc, mask=omask)


@triton.jit
def _wo_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, gs_ptr, out_ptr,
    N, K, stride_xm, stride_om, stride_ok,
    BITS: tl.constexpr, WTYPE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BN: tl.constexpr, SPLIT_K: tl.constexpr, KU: tl.constexpr,
):
    """One row of x (program axis 0) times W: KU packed blocks ([KU, 16, BN] words) per loop step so
    that more bytes are in flight; products accumulated elementwise, reduced once at the end."""
    PER: tl.constexpr = 32 // BITS
    BLK: tl.constexpr = 16 * PER
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    offs_u = tl.arange(0, KU)
    mask_n = offs_n < N
    nblk = K // BLK
    per_split = tl.cdiv(nblk, SPLIT_K)
    b0 = pid_k * per_split
    b1 = tl.minimum(b0 + per_split, nblk)
    gs = tl.load(gs_ptr)
    acc = tl.zeros((KU, 16, BN), dtype=tl.float32)
    for b in range(b0, b1, KU):
        ub = b + offs_u  # [KU] block indices
        mu = ub < b1
        wrow = (ub[:, None] * 16 + offs_r[None, :])  # [KU, 16]
        m3 = mu[:, None, None] & mask_n[None, None, :]
        words = tl.load(qw_ptr + wrow[:, :, None] * N + offs_n[None, None, :], mask=m3, other=0)
        for i in tl.static_range(PER):
            g = tl.load(gblk_ptr + ub * PER + i, mask=mu, other=0)  # [KU]
            q = (words >> (i * BITS)) & ((1 << BITS) - 1)
            if WTYPE == 0:
                s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mu[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mu[:, None] & mask_n[None, :], other=0).to(tl.float32)
                else:
                    z = tl.zeros_like(s) + (1 << (BITS - 1))
                v = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            else:
                v = _e2m1_f32(q)
                bsc = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mu[:, None] & mask_n[None, :], other=0).to(tl.int32)
                if WTYPE == 1:
                    s = _e4m3_f32(bsc) * 16384.0
                else:
                    s = tl.exp2(bsc.to(tl.float32) - 127.0) * 16384.0
                z = tl.zeros_like(s)
            kk = ub[:, None] * BLK + i * 16 + offs_r[None, :]  # [KU, 16]
            if HAS_PERM:
                kk = tl.load(perm_ptr + kk, mask=mu[:, None], other=0)
            xv = tl.load(x_ptr + row * stride_xm + kk, mask=mu[:, None], other=0.0).to(tl.float32)
            acc += (v - z[:, None, :]) * (s[:, None, :] * xv[:, :, None])
    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    if WTYPE == 1:
        y = y * gs
    optrs = out_ptr + row * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:  # fp32 partial sums [SPLIT_K, M, N], summed by _splitk_reduce (no memset, no atomics)
        tl.store(optrs + pid_k * stride_ok, y, mask=mask_n)


@triton.jit
def _uslot(src, SH: tl.constexpr, x_ptr, perm_ptr, kk, mu, blk, sx, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr):
    """One slot of the uniform GEMV: the code sits at bit SH of `src` (SH + BITS <= 23)."""
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk, mask=mu[:, None], other=0)
    xv = tl.load(x_ptr + kk, mask=mu[:, None], other=0.0).to(tl.float32)
    q = src & (((1 << BITS) - 1) << SH)
    if HAS_ZERO:
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        sx += xv
    else:  # (code - 2^(BITS-1)) * 2^SH, exactly
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + (1 << (BITS - 1)) * (1 << SH))
    blk += f * (xv * (1.0 / (1 << SH)))[:, :, None]
    return blk, sx


@triton.jit
def _wo_gemv_uniform_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, out_ptr,
    N, K, stride_xm, stride_om, stride_ok,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BN: tl.constexpr, SPLIT_K: tl.constexpr, KU: tl.constexpr,
):
    """GEMV for int weights whose 16*PER-channel blocks each lie in one group (the common g128 and
    per-channel cases). Per weight: one AND+OR (the code ORed into the mantissa of 2^23, no int->float
    conversion), one FSUB (2^23 and, when symmetric, the zero point subtracted exactly), one FMA with
    x pre-scaled by 2^-(slot shift); the group scale is applied once per block, not per weight."""
    PER: tl.constexpr = 32 // BITS
    BLK: tl.constexpr = 16 * PER
    LOW: tl.constexpr = 23 // BITS  # slots 0..LOW-1 sit below bit 23: masked in place, no shift
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    offs_u = tl.arange(0, KU)
    mask_n = offs_n < N
    nblk = K // BLK
    per_split = tl.cdiv(nblk, SPLIT_K)
    b0 = pid_k * per_split
    b1 = tl.minimum(b0 + per_split, nblk)
    acc = tl.zeros((KU, 16, BN), dtype=tl.float32)
    for b in range(b0, b1, KU):
        ub = b + offs_u
        mu = ub < b1
        wrow = ub[:, None] * 16 + offs_r[None, :]
        words = tl.load(qw_ptr + wrow[:, :, None] * N + offs_n[None, None, :], mask=mu[:, None, None] & mask_n[None, None, :], other=0)
        hi = words >> (LOW * BITS)
        blk = tl.zeros((KU, 16, BN), dtype=tl.float32)
        sx = tl.zeros((KU, 16), dtype=tl.float32)
        for i in tl.static_range(LOW):  # slots in place
            blk, sx = _uslot(words, i * BITS, x_ptr + row * stride_xm, perm_ptr, ub[:, None] * BLK + i * 16 + offs_r[None, :], mu,
                             blk, sx, BITS, HAS_ZERO, HAS_PERM)
        for j in tl.static_range(PER - LOW):  # the slots above bit 23, shifted down once per word
            blk, sx = _uslot(hi, j * BITS, x_ptr + row * stride_xm, perm_ptr, ub[:, None] * BLK + (LOW + j) * 16 + offs_r[None, :], mu,
                             blk, sx, BITS, HAS_ZERO, HAS_PERM)
        g = tl.load(gblk_ptr + ub * PER, mask=mu, other=0)
        m2 = mu[:, None] & mask_n[None, :]
        sc = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += blk * sc[:, None, :]
        if HAS_ZERO:
            zs = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0).to(tl.float32) * sc
            acc -= zs[:, None, :] * sx[:, :, None]
    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    optrs = out_ptr + row * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:  # fp32 partial sums [SPLIT_K, M, N], summed by _splitk_reduce (no memset, no atomics)
        tl.store(optrs + pid_k * stride_ok, y, mask=mask_n)


# ---- int4 GEMV in packed fp16 arithmetic (M = 1) ---------------------------------------------------
# The fp32 GEMV above spends four CUDA-core instructions per weight and is instruction-bound at M = 1.
# Here one word (eight codes of one column: slots i and i + 4 share a half-word position) is decoded
# two codes per instruction into fp16 pairs, exactly (Marlin's trick): lop3 (w & 0x000F000F) | 0x6400
# gives (1024 + q) in each half, one HSUB2 takes 1024 + z off; the 0x00F0 nibbles give 1024 + 16 q and
# one HFMA2 (x 1/16, - 64 - z) gives q - z. Four HFMA2 multiply the pairs by x pairs (x_i, x_i+4) and
# one fp32 add joins the two halves: about two instructions per weight. The group scale is applied
# once per word in fp32 (one group per 128-channel block: `uniform` weights). x is multiplied by a
# power of two (from the program's largest |x|) so that every fp16 product and partial sum stays
# under 2^15: products keep fp16's 11-bit precision, sums leave the word in fp32.

def _int4_word_asm(w: str, xs: list, first: bool, sub: bool = False) -> str:
    """PTX for one word: its four code pairs decoded to (q - z) fp16 pairs ($11: 1024 + z, $12: -(64 + z))
    and multiplied into the running fp16 pair sum p by the x pairs xs. sub: the codes as fp16 subnormals instead
    (w & 0x000F000F is q * 2^-24 in each half, exactly; the 0x00F0 nibbles 16 q * 2^-24, their x pairs packed
    / 16), times x into p, one instruction a pair: sum q x * 2^-24, the zero point taken off per block after."""
    out = ""
    for half, x in zip(("a", "t"), (xs[:2], xs[2:])):
        src = w if half == "a" else "t"
        if half == "t":
            out += f"    shr.u32 t, {w}, 8;\n"
        acc = "mul.f16x2 p, a, " + x[0] if (first and half == "a") else "fma.rn.f16x2 p, a, " + x[0] + ", p"
        if sub:
            out += (f"    and.b32 a, {src}, 0x000F000F;\n    {acc};\n"
                    f"    and.b32 b, {src}, 0x00F000F0;\n    fma.rn.f16x2 p, b, {x[1]}, p;\n")
            continue
        out += (f"    lop3.b32 a, {src}, 0x000F000F, 0x64006400, 0xEA;\n    sub.f16x2 a, a, $11;\n    {acc};\n"
                f"    lop3.b32 b, {src}, 0x00F000F0, 0x64006400, 0xEA;\n    fma.rn.f16x2 b, b, c, $12;\n"
                f"    fma.rn.f16x2 p, b, {x[1]}, p;\n")
    return out


def _h2_asm(sub: bool = False) -> str:
    return ("{\n    .reg .b32 a, b, t, p" + ("" if sub else ", c") + ";\n    .reg .f16 h0, h1;\n"
            + ("" if sub else "    mov.b32 c, 0x2C002C00;\n")
            + _int4_word_asm("$1", ["$3", "$4", "$5", "$6"], True, sub) + _int4_word_asm("$2", ["$7", "$8", "$9", "$10"], False, sub)
            + "    mov.b32 {h0, h1}, p;\n    add.f16 h0, h0, h1;\n    cvt.f32.f16 $0, h0;\n}")


_H2_ASM = tl.constexpr(_h2_asm())
_H2S_ASM = tl.constexpr(_h2_asm(True))  # SUB: subnormal codes, sum q x * 2^-24 (the zero point after, per block)

# NVFP4: e2m1 codes become fp16 by placing their three low bits at bits 9..11 and the sign at bit 15
# (value * 2^-14, exact, subnormals included); x pairs are prescaled under 2^14 and the fp16 block scales
# (e4m3 -> f16x2, one cvt per pair of groups, outside the asm) multiply each pair: sixteen products of at
# most 6 * 448 * 2^14 * 2^-14 summed in fp16 stay finite.
def _fp4_decode_asm(w: str, j: int, v: str, light: bool = False) -> str:
    """PTX decoding pair j of word w (nibbles at bits 4j and 16 + 4j) into the fp16 pair v: its three low bits
    shifted to 9..11 (a), its sign to 15 (b), joined by one lop3. light (bench only, wrong values: ABL bit 2): one
    rotation and one and per pair instead, the cost of a decode whose sign and magnitude move together."""
    if light:
        return (f"    and.b32 {v}, {w}, 0x8E008E00;\n" if j == 0 else
                f"    shf.r.wrap.b32 a, {w}, {w}, {4 * j};\n    and.b32 {v}, a, 0x8E008E00;\n")
    ma, mb = (("shl.b32 a, {w}, 9", "shl.b32 b, {w}, 12"), ("shl.b32 a, {w}, 5", "shl.b32 b, {w}, 8"),
              ("shl.b32 a, {w}, 1", "shl.b32 b, {w}, 4"), ("shr.u32 a, {w}, 3", "mov.b32 b, {w}"))[j]
    return (f"    {ma.format(w=w)};\n    and.b32 a, a, 0x0E000E00;\n    {mb.format(w=w)};\n"
            f"    lop3.b32 {v}, b, 0x80008000, a, 0xEA;\n")


def _fp4_word_asm(w: str, xs: list, first: bool, light: bool = False) -> str:
    """PTX for one word of e2m1 codes: each pair j decoded, times the x pair, times the scale pair $11 + j, into p."""
    out = ""
    for j in range(4):
        acc = f"mul.f16x2 p, t, ${11 + j}" if (first and j == 0) else f"fma.rn.f16x2 p, t, ${11 + j}, p"
        out += _fp4_decode_asm(w, j, "v", light) + f"    mul.f16x2 t, v, {xs[j]};\n    {acc};\n"
    return out


def _fp4_asm(light: bool = False) -> str:
    return ("{\n    .reg .b32 a, b, v, t, p;\n    .reg .f16 h0, h1;\n"
            + _fp4_word_asm("$1", ["$3", "$4", "$5", "$6"], True, light) + _fp4_word_asm("$2", ["$7", "$8", "$9", "$10"], False, light)
            + "    mov.b32 {h0, h1}, p;\n    add.f16 h0, h0, h1;\n    cvt.f32.f16 $0, h0;\n}")


_FP4_ASM = tl.constexpr(_fp4_asm())
_FP4L_ASM = tl.constexpr(_fp4_asm(True))  # bench only (ABL bit 2): the light decode, wrong values


def _fp4_pairs_asm(light: bool = False) -> str:
    """PTX for two words of e2m1 codes summed pair by pair: pair j of both words (same slots, so the same scale
    pair $11 + j) decoded, times their x pairs, added (mul, fma), then times the scale pair into p (fma): 12 fp16
    pair operations for 16 weights instead of _FP4_ASM's 16, and four products into p instead of eight."""
    out = ""
    for j in range(4):
        out += _fp4_decode_asm("$1", j, "v", light) + _fp4_decode_asm("$2", j, "u", light)
        acc = f"mul.f16x2 p, t, ${11 + j}" if j == 0 else f"fma.rn.f16x2 p, t, ${11 + j}, p"
        out += f"    mul.f16x2 t, v, ${3 + j};\n    fma.rn.f16x2 t, u, ${7 + j}, t;\n    {acc};\n"
    return out


# (session 15; bench row gemv16-fp4q, not the default: slower on an H100 in session 16, 1.93x against 2.13x bf16)
def _fp4q_asm(light: bool = False) -> str:
    return ("{\n    .reg .b32 a, b, v, u, t, p;\n    .reg .f16 h0, h1;\n"
            + _fp4_pairs_asm(light) + "    mov.b32 {h0, h1}, p;\n    add.f16 h0, h0, h1;\n    cvt.f32.f16 $0, h0;\n}")


_FP4Q_ASM = tl.constexpr(_fp4q_asm())
_FP4QL_ASM = tl.constexpr(_fp4q_asm(True))  # bench only (ABL bit 2)


@triton.jit
def _e4m3x2_f16x2(lo, hi):
    """Two e4m3 bytes (int32 tensors) -> their f16 pair (lo in the low half), exactly."""
    v = (lo & 0xFF) | ((hi & 0xFF) << 8)
    return tl.inline_asm_elementwise(asm="{ .reg .b16 s; cvt.u16.u32 s, $1; cvt.rn.f16x2.e4m3x2 $0, s; }",
                                     constraints="=r,r", args=[v], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _fp4_plain(w, x0, x1, x2, x3, x4, x5, x6, x7, s0, s1, s2, s3, s4, s5, s6, s7):
    """The FP4 PTX word sum in plain Triton: e2m1 value * 2^-14 * block scale * x, fp32."""
    return (_e2m1_h(w, 0) * s0 * x0[:, :, None] + _e2m1_h(w, 1) * s1 * x1[:, :, None]
            + _e2m1_h(w, 2) * s2 * x2[:, :, None] + _e2m1_h(w, 3) * s3 * x3[:, :, None]
            + _e2m1_h(w, 4) * s4 * x4[:, :, None] + _e2m1_h(w, 5) * s5 * x5[:, :, None]
            + _e2m1_h(w, 6) * s6 * x6[:, :, None] + _e2m1_h(w, 7) * s7 * x7[:, :, None])


@triton.jit
def _e2m1_h(w, i: tl.constexpr):
    return _e2m1_f32((w >> (4 * i)) & 15)


@triton.jit
def _h2_pack(xa, xb, PTX: tl.constexpr):
    """Two fp32 tensors (in fp16 range) as one int32 of fp16 halves, rounded to nearest: xa low, xb high."""
    if PTX:  # one instruction for both
        return tl.inline_asm_elementwise(asm="cvt.rn.f16x2.f32 $0, $2, $1;", constraints="=r,r,r", args=[xa, xb],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo = xa.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = xb.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _h2_words(qw_ptr, b, b1, offs_u, offs_r, offs_n, mask_n, N, EVF: tl.constexpr = False):
    """[KU, 8, BN] words of rows offs_r of blocks b .. b + KU - 1 (EVF: loaded evict-first, a stream read once)."""
    ub = b + offs_u
    mu = ub < b1
    wrow = ub[:, None] * 16 + offs_r[None, :]
    ptrs = qw_ptr + wrow[:, :, None] * N + offs_n[None, None, :]
    if EVF:
        return tl.load(ptrs, mask=mu[:, None, None] & mask_n[None, None, :], other=0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, mask=mu[:, None, None] & mask_n[None, None, :], other=0)


@triton.jit
def _prescale_bits(amax, UPX: tl.constexpr):
    """The exponent field of gemv16's power-of-two prescale of x for a largest |x| of amax (|x| * up under 2^(UPX - 254)):
    up = bits << 23, 1 / up = (254 - bits) << 23, both exact."""
    return tl.minimum(tl.maximum(UPX - ((amax.to(tl.int32, bitcast=True) >> 23) & 255), 1), 253)


@triton.jit
def _x_at(xrow, perm_ptr, kk, m, HAS_PERM: tl.constexpr):
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk, mask=m, other=0)
    return tl.load(xrow + kk, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _h2_xpairs(xrow, perm_ptr, ub, mu, offs_r, UPX: tl.constexpr, HAS_PERM: tl.constexpr, PTX: tl.constexpr,
               SUB: tl.constexpr = False):
    """gemv16's x pairs of blocks ub straight from x (REGX: no scratch row, no barrier): a_j / c_j [KU, 8] are
    the pairs (x[j*16 + r], x[(j+4)*16 + r]) of rows r / r + 8, prescaled by the block's power of two, and dn
    [KU] its inverse; the same values the packing pass stores. SUB: the odd pairs / 16, and sx [KU, 8] the sum of
    the sixteen prescaled x of rows r and r + 8 times 2^-24 (else sx is dn)."""
    kb = ub[:, None] * 128 + tl.arange(0, 8)[None, :]
    m2 = mu[:, None]
    l0, h0 = _x_at(xrow, perm_ptr, kb, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 64, m2, HAS_PERM)
    l1, h1 = _x_at(xrow, perm_ptr, kb + 16, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 80, m2, HAS_PERM)
    l2, h2 = _x_at(xrow, perm_ptr, kb + 32, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 96, m2, HAS_PERM)
    l3, h3 = _x_at(xrow, perm_ptr, kb + 48, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 112, m2, HAS_PERM)
    u0, v0 = _x_at(xrow, perm_ptr, kb + 8, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 72, m2, HAS_PERM)
    u1, v1 = _x_at(xrow, perm_ptr, kb + 24, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 88, m2, HAS_PERM)
    u2, v2 = _x_at(xrow, perm_ptr, kb + 40, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 104, m2, HAS_PERM)
    u3, v3 = _x_at(xrow, perm_ptr, kb + 56, m2, HAS_PERM), _x_at(xrow, perm_ptr, kb + 120, m2, HAS_PERM)
    am = tl.maximum(tl.maximum(tl.maximum(tl.abs(l0), tl.abs(h0)), tl.maximum(tl.abs(l1), tl.abs(h1))),
                    tl.maximum(tl.maximum(tl.abs(l2), tl.abs(h2)), tl.maximum(tl.abs(l3), tl.abs(h3))))
    am = tl.maximum(am, tl.maximum(tl.maximum(tl.maximum(tl.abs(u0), tl.abs(v0)), tl.maximum(tl.abs(u1), tl.abs(v1))),
                                   tl.maximum(tl.maximum(tl.abs(u2), tl.abs(v2)), tl.maximum(tl.abs(u3), tl.abs(v3)))))
    fb = _prescale_bits(tl.max(am, axis=1), UPX)
    up = (fb << 23).to(tl.float32, bitcast=True)[:, None]
    dn = ((254 - fb) << 23).to(tl.float32, bitcast=True)
    if SUB:
        sx = ((((l0 + h0) + (l1 + h1)) + ((l2 + h2) + (l3 + h3))) + (((u0 + v0) + (u1 + v1)) + ((u2 + v2) + (u3 + v3)))) * (up * 5.960464477539063e-08)
        uo = up * 0.0625
    else:
        sx = dn
        uo = up
    return (_h2_pack(l0 * up, h0 * up, PTX), _h2_pack(l1 * uo, h1 * uo, PTX), _h2_pack(l2 * up, h2 * up, PTX),
            _h2_pack(l3 * uo, h3 * uo, PTX), _h2_pack(u0 * up, v0 * up, PTX), _h2_pack(u1 * uo, v1 * uo, PTX),
            _h2_pack(u2 * up, v2 * up, PTX), _h2_pack(u3 * uo, v3 * uo, PTX), dn, sx)


@triton.jit
def _h2_sz(s_ptr, z_ptr, gblk_ptr, b, b1, offs_u, offs_n, mask_n, N, HAS_ZERO: tl.constexpr, GSH: tl.constexpr):
    """[KU, BN] scales (as stored) and zero points (int32; 8 when symmetric) of blocks b .. b + KU - 1."""
    ub = b + offs_u
    mu = ub < b1
    g = _group(gblk_ptr, tl.where(mu, ub, 0), GSH)
    m2 = mu[:, None] & mask_n[None, :]
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0).to(tl.int32)
    else:
        z = tl.zeros_like(offs_u)[:, None] + tl.zeros_like(offs_n)[None, :] + 8
    return s, z


@triton.jit
def _h2_e8(s_ptr, b, b1, offs_u, offs_n, mask_n, N):
    """NVFP4: the eight e4m3 group scales (int32 bits, [KU, BN] each) of blocks b .. b + KU - 1 (slot j of
    block b is group b * 8 + j)."""
    ub = b + offs_u
    m2 = (ub < b1)[:, None] & mask_n[None, :]
    gp = s_ptr + (ub[:, None] * 8) * N + offs_n[None, :]
    return (tl.load(gp, mask=m2, other=0).to(tl.int32), tl.load(gp + N, mask=m2, other=0).to(tl.int32),
            tl.load(gp + 2 * N, mask=m2, other=0).to(tl.int32), tl.load(gp + 3 * N, mask=m2, other=0).to(tl.int32),
            tl.load(gp + 4 * N, mask=m2, other=0).to(tl.int32), tl.load(gp + 5 * N, mask=m2, other=0).to(tl.int32),
            tl.load(gp + 6 * N, mask=m2, other=0).to(tl.int32), tl.load(gp + 7 * N, mask=m2, other=0).to(tl.int32))


@triton.jit
def _h2_e8p(s_ptr, b, b1, offs_u, offs_n, mask_n, N):
    """_h2_e8 from the packed scales (_spk: two int32 per column and block, (e0, e4, e1, e5) and (e2, e6, e3, e7) from
    the low byte up): two loads instead of eight, each pair (j, j + 4) one half-word."""
    ub = b + offs_u
    m2 = (ub < b1)[:, None] & mask_n[None, :]
    gp = s_ptr + (ub[:, None] * 2) * N + offs_n[None, :]
    wa = tl.load(gp, mask=m2, other=0)
    wb = tl.load(gp + N, mask=m2, other=0)
    return (wa & 0xFF, (wa >> 16) & 0xFF, wb & 0xFF, (wb >> 16) & 0xFF,
            (wa >> 8) & 0xFF, (wa >> 24) & 0xFF, (wb >> 8) & 0xFF, (wb >> 24) & 0xFF)


@triton.jit
def _h2_e8x(s_ptr, b, b1, offs_u, offs_n, mask_n, N, SPK: tl.constexpr):
    if SPK:
        return _h2_e8p(s_ptr, b, b1, offs_u, offs_n, mask_n, N)
    else:
        return _h2_e8(s_ptr, b, b1, offs_u, offs_n, mask_n, N)


@triton.jit
def _h2_plain(w, x0, x1, x2, x3, x4, x5, x6, x7, zf):
    """The PTX word sum in plain Triton (fp32 products)."""
    return (((w & 15).to(tl.float32) - zf) * x0[:, :, None] + (((w >> 4) & 15).to(tl.float32) - zf) * x1[:, :, None]
            + (((w >> 8) & 15).to(tl.float32) - zf) * x2[:, :, None] + (((w >> 12) & 15).to(tl.float32) - zf) * x3[:, :, None]
            + (((w >> 16) & 15).to(tl.float32) - zf) * x4[:, :, None] + (((w >> 20) & 15).to(tl.float32) - zf) * x5[:, :, None]
            + (((w >> 24) & 15).to(tl.float32) - zf) * x6[:, :, None] + (((w >> 28) & 15).to(tl.float32) - zf) * x7[:, :, None])


@triton.jit
def _h2_unpack(pk, lo: tl.constexpr):
    """The fp32 value of one fp16 half of a packed pair."""
    h = (pk & 0xFFFF) if lo else ((pk >> 16) & 0xFFFF)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gdc_launch_dependents():
    """Programmatic dependent launch (Hopper): the next kernel may launch once every program has run this."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gdc_wait():
    """Wait for the previous kernel to finish, its writes visible (a no-op without a dependent launch)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wo_gemv16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr, scr_ptr,
    N, K, stride_xm, stride_om, stride_ok,
    HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, PTX: tl.constexpr, FUSED_REDUCE: tl.constexpr,
    BN: tl.constexpr, SPLIT_K: tl.constexpr, KU: tl.constexpr, XB: tl.constexpr, PREFETCH: tl.constexpr,
    FP4: tl.constexpr = False, gs_ptr=None, SCAN: tl.constexpr = False, GSH: tl.constexpr = -1, SPRE: tl.constexpr = False,
    PDL: tl.constexpr = 0, REGX: tl.constexpr = False, EVF: tl.constexpr = False, ABL: tl.constexpr = 0,
    CLU: tl.constexpr = False, FP4Q: tl.constexpr = False, SUB: tl.constexpr = False, SPK: tl.constexpr = False,
):
    """int4 (FP4 False) or NVFP4 (FP4 True: group 16, e4m3 scales raw in s_ptr, global scale at gs_ptr).
    Word rows r and r + 8 of each 128-channel block go through one PTX call: sixteen fp16 products per
    column summed in fp16, one conversion to fp32. The x pairs each word needs are packed once per program
    into a scratch row (`scr`, [M, K/2 + K/128 + K/16] int32: pair j of row r of block b at b * 64 + r * 4 + j) and read
    back in the loop: programs of the same row and K range write the same values there. GSH: group of block b
    is b >> GSH (else the gblk table); SPRE: the next step's scales (and zero points) loaded with its words.
    PDL (launched as a programmatic dependent launch, Hopper): the next kernel may launch once every program has
    started, and this one's first weight loads go out before it waits for the previous kernel (griddepcontrol):
    only the weights, which no kernel writes, are touched before the wait. REGX: each step's x pairs computed from
    x in registers (`_h2_xpairs`) instead of the scratch row (no packing pass, no barrier: for programs of one
    step). EVF: weight words loaded evict-first. ABL (bench only, wrong results, for a time breakdown): bit 0 skips
    x (constant pairs), bit 1 the split-K sum (each program stores its partial as the output), bit 2 (NVFP4) the
    sign's separate move in the decode (two instructions a pair: what a sign-beside-magnitude layout would cost),
    (int4) nothing (SUB's word sum without its zero-point term), bit 3 (NVFP4) the block scales (1.0 each, not read). SUB (int4): the codes decoded as fp16 subnormals, one
    instruction a pair (_H2S_ASM), the word pair's sum q x then less z times the sum of its sixteen x (packed with the
    pairs: at K/2 + K/128 + 8 b + r of the scratch row, or from x in registers), in fp32, per block. CLU: the SPLIT_K
    programs of a tile are one cluster (grid axis 0 the split) and sum their partials through distributed shared
    memory (cluster.py) instead of the partials buffer and the tile counter. SPK (NVFP4): s_ptr holds the block scales
    packed two int32 per column and 128-channel block (_spk, _h2_e8p)."""
    if PDL:
        _gdc_launch_dependents()
    if CLU:
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        row = tl.program_id(2)
    else:
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 8)
    offs_u = tl.arange(0, KU)
    mask_n = offs_n < N
    nblk = K // 128
    per_split = tl.cdiv(nblk, SPLIT_K)
    b0 = pid_k * per_split
    b1 = tl.minimum(b0 + per_split, nblk)
    xrow = x_ptr + row * stride_xm
    srow = scr_ptr + row * (K // 2 + K // 128 + K // 16)  # a row: pairs, 1 / prescale per block, (SUB) x sums
    if PREFETCH:  # the first words in flight while x is scanned and packed
        wa = _h2_words(qw_ptr, b0, b1, offs_u, offs_r, offs_n, mask_n, N, EVF)
        wb = _h2_words(qw_ptr, b0, b1, offs_u, offs_r + 8, offs_n, mask_n, N, EVF)
    if SPRE and not FP4:
        sa, za = _h2_sz(s_ptr, z_ptr, gblk_ptr, b0, b1, offs_u, offs_n, mask_n, N, HAS_ZERO, GSH)
    if SPRE and FP4:  # (n: next; the plain decode below uses f0..f7)
        n0, n1, n2, n3, n4, n5, n6, n7 = _h2_e8x(s_ptr, b0, b1, offs_u, offs_n, mask_n, N, SPK)
    if PDL:  # x, the scratch, the outputs and the counters only after the previous kernel is done
        _gdc_wait()
    # prescale: a power of two 2^(7 - e) from the largest |x| (|x| * up < 256, so a sum of sixteen products
    # of at most 15 in magnitude stays under fp16's 65504; 2^(13 - e) and 2^14 for FP4), one per 128-channel
    # block taken in the packing pass (SCAN False) or one for the program's whole range from a scan first
    UPX: tl.constexpr = 267 if FP4 else 269 if SUB else 261  # (SUB: |x| * up < 2^15, products q x up 2^-24 < 2^-5)
    NB: tl.constexpr = XB // 128  # blocks per packing step
    XPASS: tl.constexpr = not REGX and (ABL & 1) == 0  # the packing pass into the scratch row
    if SCAN and XPASS:  # (XB: the launcher sizes it to the program's whole range up to 4096, so that this is one load)
        amax = tl.zeros((XB,), dtype=tl.float32)
        for c in range(b0 * 128, b1 * 128, XB):
            kk = c + tl.arange(0, XB)
            mk = kk < b1 * 128
            if HAS_PERM:
                kk = tl.load(perm_ptr + kk, mask=mk, other=0)
            amax = tl.maximum(amax, tl.abs(tl.load(xrow + kk, mask=mk, other=0.0).to(tl.float32)))
        f_all = _prescale_bits(tl.max(amax, axis=0), UPX)  # the prescale's exponent field
    # pack the pairs (x[b*128 + j*16 + r], x[b*128 + (j+4)*16 + r]) * up of the program's blocks; the inverse
    # prescale of each block after the pairs, at K/2 + b
    if XPASS:
        for c in range(b0 * 64, b1 * 64, XB // 2):
            t = c + tl.arange(0, XB // 2)
            mt = t < b1 * 64
            lo = (t // 64) * 128 + (t % 4) * 16 + (t // 4) % 16
            hi = lo + 64
            if HAS_PERM:
                lo = tl.load(perm_ptr + lo, mask=mt, other=0)
                hi = tl.load(perm_ptr + hi, mask=mt, other=0)
            xl = tl.load(xrow + lo, mask=mt, other=0.0).to(tl.float32)
            xh = tl.load(xrow + hi, mask=mt, other=0.0).to(tl.float32)
            if SCAN:
                fb = tl.zeros((NB,), dtype=tl.int32) + f_all
            else:
                fb = _prescale_bits(tl.max(tl.reshape(tl.maximum(tl.abs(xl), tl.abs(xh)), (NB, 64)), axis=1), UPX)
            up = tl.reshape(tl.broadcast_to((fb << 23).to(tl.float32, bitcast=True)[:, None], (NB, 64)), (XB // 2,))
            bi = c // 64 + tl.arange(0, NB)
            if SUB:  # the sum of each word pair's sixteen x (t = 64 b + 4 r + j: rows r and r + 8) * up * 2^-24
                sx = tl.sum(tl.sum(tl.reshape((xl + xh) * up, (NB, 2, 8, 4)), axis=3), axis=1) * 5.960464477539063e-08
                tl.store(srow + K // 2 + K // 128 + bi[:, None] * 8 + offs_r[None, :], sx.to(tl.int32, bitcast=True),
                         mask=(bi < b1)[:, None])
                up = tl.where((t % 2) == 1, up * 0.0625, up)  # the 0x00F0 nibbles' pairs (j = 1, 3) / 16
            tl.store(srow + t, _h2_pack(xl * up, xh * up, PTX), mask=mt)
            tl.store(srow + K // 2 + bi, (254 - fb) << 23, mask=bi < b1)  # the bits of 1 / up, exactly
        tl.debug_barrier()  # the program's own pairs visible to all its threads
    acc = tl.zeros((KU, 8, BN), dtype=tl.float32)
    for b in range(b0, b1, KU):
        ub = b + offs_u
        mu = ub < b1
        if PREFETCH:  # the next step's words in flight during this step's arithmetic
            ca, cb = wa, wb
            wa = _h2_words(qw_ptr, b + KU, b1, offs_u, offs_r, offs_n, mask_n, N, EVF)
            wb = _h2_words(qw_ptr, b + KU, b1, offs_u, offs_r + 8, offs_n, mask_n, N, EVF)
        else:
            ca = _h2_words(qw_ptr, b, b1, offs_u, offs_r, offs_n, mask_n, N, EVF)
            cb = _h2_words(qw_ptr, b, b1, offs_u, offs_r + 8, offs_n, mask_n, N, EVF)
        if (ABL & 1) != 0:  # bench only: x left out (pairs of ones)
            a0 = tl.zeros((KU, 8), dtype=tl.int32) + 0x3C003C00
            a1, a2, a3, c0, c1, c2, c3 = a0, a0, a0, a0, a0, a0, a0
            dn = tl.zeros((KU,), dtype=tl.float32) + 1.0
            sx = tl.zeros((KU, 8), dtype=tl.float32)
        elif REGX:
            a0, a1, a2, a3, c0, c1, c2, c3, dn, sx = _h2_xpairs(xrow, perm_ptr, ub, mu, offs_r, UPX, HAS_PERM, PTX, SUB)
        else:
            pa = srow + ub[:, None] * 64 + offs_r[None, :] * 4  # [KU, 8]: pairs of rows 0..7; rows 8..15 at + 32
            mp = mu[:, None]
            dn = tl.load(srow + K // 2 + ub, mask=mu, other=0).to(tl.float32, bitcast=True)  # [KU]: 1 / prescale
            if SUB:
                sx = tl.load(srow + K // 2 + K // 128 + ub[:, None] * 8 + offs_r[None, :], mask=mp, other=0).to(tl.float32, bitcast=True)
            a0 = tl.load(pa, mask=mp, other=0)
            a1 = tl.load(pa + 1, mask=mp, other=0)
            a2 = tl.load(pa + 2, mask=mp, other=0)
            a3 = tl.load(pa + 3, mask=mp, other=0)
            c0 = tl.load(pa + 32, mask=mp, other=0)
            c1 = tl.load(pa + 33, mask=mp, other=0)
            c2 = tl.load(pa + 34, mask=mp, other=0)
            c3 = tl.load(pa + 35, mask=mp, other=0)
        m2 = mu[:, None] & mask_n[None, :]
        S: tl.constexpr = (KU, 8, BN)
        if FP4:  # eight block scales per word (slot j of block b: group b * 8 + j), one f16 pair per (j, j + 4)
            if SPRE:
                e0, e1, e2, e3, e4, e5, e6, e7 = n0, n1, n2, n3, n4, n5, n6, n7
                n0, n1, n2, n3, n4, n5, n6, n7 = _h2_e8x(s_ptr, b + KU, b1, offs_u, offs_n, mask_n, N, SPK)
            else:
                e0, e1, e2, e3, e4, e5, e6, e7 = _h2_e8x(s_ptr, b, b1, offs_u, offs_n, mask_n, N, SPK)
            if (ABL & 8) != 0:  # bench only: the block scales not read (1.0 each; the loads left dead)
                e0 = tl.zeros((KU, BN), dtype=tl.int32) + 0x38
                e1, e2, e3, e4, e5, e6, e7 = e0, e0, e0, e0, e0, e0, e0
            if PTX:
                part = tl.inline_asm_elementwise(
                    asm=(_FP4QL_ASM if FP4Q else _FP4L_ASM) if (ABL & 4) != 0 else _FP4Q_ASM if FP4Q else _FP4_ASM, constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                    args=[ca, cb,
                          tl.broadcast_to(a0[:, :, None], S), tl.broadcast_to(a1[:, :, None], S),
                          tl.broadcast_to(a2[:, :, None], S), tl.broadcast_to(a3[:, :, None], S),
                          tl.broadcast_to(c0[:, :, None], S), tl.broadcast_to(c1[:, :, None], S),
                          tl.broadcast_to(c2[:, :, None], S), tl.broadcast_to(c3[:, :, None], S),
                          tl.broadcast_to(_e4m3x2_f16x2(e0, e4)[:, None, :], S), tl.broadcast_to(_e4m3x2_f16x2(e1, e5)[:, None, :], S),
                          tl.broadcast_to(_e4m3x2_f16x2(e2, e6)[:, None, :], S), tl.broadcast_to(_e4m3x2_f16x2(e3, e7)[:, None, :], S)],
                    dtype=tl.float32, is_pure=True, pack=1)
            else:
                f0, f1, f2, f3 = _e4m3_f32(e0)[:, None, :], _e4m3_f32(e1)[:, None, :], _e4m3_f32(e2)[:, None, :], _e4m3_f32(e3)[:, None, :]
                f4, f5, f6, f7 = _e4m3_f32(e4)[:, None, :], _e4m3_f32(e5)[:, None, :], _e4m3_f32(e6)[:, None, :], _e4m3_f32(e7)[:, None, :]
                part = (_fp4_plain(ca, _h2_unpack(a0, True), _h2_unpack(a1, True), _h2_unpack(a2, True), _h2_unpack(a3, True),
                                   _h2_unpack(a0, False), _h2_unpack(a1, False), _h2_unpack(a2, False), _h2_unpack(a3, False),
                                   f0, f1, f2, f3, f4, f5, f6, f7)
                        + _fp4_plain(cb, _h2_unpack(c0, True), _h2_unpack(c1, True), _h2_unpack(c2, True), _h2_unpack(c3, True),
                                     _h2_unpack(c0, False), _h2_unpack(c1, False), _h2_unpack(c2, False), _h2_unpack(c3, False),
                                     f0, f1, f2, f3, f4, f5, f6, f7))
            acc += part * dn[:, None, None]
        else:
            if SPRE:
                s, z = sa, za
                sa, za = _h2_sz(s_ptr, z_ptr, gblk_ptr, b + KU, b1, offs_u, offs_n, mask_n, N, HAS_ZERO, GSH)
            else:
                s, z = _h2_sz(s_ptr, z_ptr, gblk_ptr, b, b1, offs_u, offs_n, mask_n, N, HAS_ZERO, GSH)
            s = s.to(tl.float32)
            if PTX and SUB:
                part = tl.inline_asm_elementwise(
                    asm=_H2S_ASM, constraints="=r,r,r,r,r,r,r,r,r,r,r",
                    args=[ca, cb,
                          tl.broadcast_to(a0[:, :, None], S), tl.broadcast_to(a1[:, :, None], S),
                          tl.broadcast_to(a2[:, :, None], S), tl.broadcast_to(a3[:, :, None], S),
                          tl.broadcast_to(c0[:, :, None], S), tl.broadcast_to(c1[:, :, None], S),
                          tl.broadcast_to(c2[:, :, None], S), tl.broadcast_to(c3[:, :, None], S)],
                    dtype=tl.float32, is_pure=True, pack=1)
            elif SUB:  # the same values in plain Triton: sum q x (zero point 0, the odd pairs' x back * 16) * 2^-24
                part = (_h2_plain(ca, _h2_unpack(a0, True), 16.0 * _h2_unpack(a1, True), _h2_unpack(a2, True), 16.0 * _h2_unpack(a3, True),
                                  _h2_unpack(a0, False), 16.0 * _h2_unpack(a1, False), _h2_unpack(a2, False), 16.0 * _h2_unpack(a3, False), 0.0)
                        + _h2_plain(cb, _h2_unpack(c0, True), 16.0 * _h2_unpack(c1, True), _h2_unpack(c2, True), 16.0 * _h2_unpack(c3, True),
                                    _h2_unpack(c0, False), 16.0 * _h2_unpack(c1, False), _h2_unpack(c2, False), 16.0 * _h2_unpack(c3, False), 0.0)
                        ) * 5.960464477539063e-08
            elif PTX:
                zlo = 0x6400 | z  # fp16 1024 + z
                zhi = 0xD400 | (z << 4)  # fp16 -(64 + z)
                part = tl.inline_asm_elementwise(
                    asm=_H2_ASM, constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r",
                    args=[ca, cb,
                          tl.broadcast_to(a0[:, :, None], S), tl.broadcast_to(a1[:, :, None], S),
                          tl.broadcast_to(a2[:, :, None], S), tl.broadcast_to(a3[:, :, None], S),
                          tl.broadcast_to(c0[:, :, None], S), tl.broadcast_to(c1[:, :, None], S),
                          tl.broadcast_to(c2[:, :, None], S), tl.broadcast_to(c3[:, :, None], S),
                          tl.broadcast_to((zlo | (zlo << 16))[:, None, :], S), tl.broadcast_to((zhi | (zhi << 16))[:, None, :], S)],
                    dtype=tl.float32, is_pure=True, pack=1)
            else:  # the same values in plain Triton (interpreter / no inline PTX): fp32 products
                zf = z.to(tl.float32)[:, None, :]
                part = (_h2_plain(ca, _h2_unpack(a0, True), _h2_unpack(a1, True), _h2_unpack(a2, True), _h2_unpack(a3, True),
                                  _h2_unpack(a0, False), _h2_unpack(a1, False), _h2_unpack(a2, False), _h2_unpack(a3, False), zf)
                        + _h2_plain(cb, _h2_unpack(c0, True), _h2_unpack(c1, True), _h2_unpack(c2, True), _h2_unpack(c3, True),
                                    _h2_unpack(c0, False), _h2_unpack(c1, False), _h2_unpack(c2, False), _h2_unpack(c3, False), zf))
            if SUB:  # sum (q - z) x = sum q x - z sum x, with the 2^-24 of the subnormal decode undone in the scale
                if (ABL & 4) == 0:
                    part = part - z.to(tl.float32)[:, None, :] * sx[:, :, None]
                acc += part * (s * (dn * 16777216.0)[:, None])[:, None, :]
            else:
                acc += part * (s * dn[:, None])[:, None, :]
    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    if FP4:  # the decode's 2^-14 and the global scale
        y = y * (tl.load(gs_ptr) * 16384.0)
    optrs = out_ptr + row * stride_om + offs_n
    if SPLIT_K == 1 or (ABL & 2) != 0:
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    elif CLU:  # the partial in this program's shared memory; program k sums columns k * CW .. of all, in rank order
        CW: tl.constexpr = BN // SPLIT_K
        c = pid_k * CW + tl.arange(0, CW)
        tot = cluster.exchange(y, tl.arange(0, BN), c, SPLIT_K, BN * 4)
        oc = pid_n * BN + c
        tl.store(out_ptr + row * stride_om + oc, tot.to(out_ptr.dtype.element_ty), mask=oc < N)
        cluster.sync()  # every program's buffer read before any leaves
    else:  # fp32 partial sums [SPLIT_K, M, N]
        pptr = part_ptr + row * N + offs_n
        tl.store(pptr + pid_k * stride_ok, y, mask=mask_n)
        if FUSED_REDUCE:  # the last program of this (row, column tile) to finish sums them, then resets the counter
            tl.debug_barrier()  # every thread's partial stored before the count goes up
            tile = row * tl.num_programs(1) + pid_n
            done = tl.atomic_add(cnt_ptr + tile, 1)  # acq_rel, gpu scope
            if done == SPLIT_K - 1:
                tot = tl.zeros((BN,), dtype=tl.float32)
                for i in tl.static_range(SPLIT_K):
                    tot += tl.load(pptr + i * stride_ok, mask=mask_n, other=0.0, cache_modifier=".cg")
                tl.store(optrs, tot.to(out_ptr.dtype.element_ty), mask=mask_n)
                tl.atomic_xchg(cnt_ptr + tile, 0)
        # else: _splitk_reduce sums them (a second kernel)


# ---- int4 through tensor cores, M <= 16 ----------------------------------------------------------
# A code becomes a 16-bit float by one OR with a magic exponent, exactly: bf16 0x4300 | q = 128 + q, fp16
# 0x6400 | q = 1024 + q. Each 16-channel slot is one tl.dot of x [BM, 16] with (MAGIC + q) [16, BN], fp32
# accumulation; zero point and group scale come once per 128-channel block (one group):
#     y += s * (x . (MAGIC + q) - (MAGIC + z) * sum(x)).
# On the GPU one PTX sequence (prmt + lop3) decodes the eight slots of two words at once, about one
# instruction per code; under the interpreter (CI) the same values come from plain Triton ops.


@triton.jit
def _tc_tile(M, N, K, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, CLU: tl.constexpr = False):
    """The program's rows, columns and range of 128-channel blocks (grid: N tiles, K splits, M tiles; CLU: K splits,
    N tiles, M tiles, the splits of a tile one cluster)."""
    pid_k = tl.program_id(0 if CLU else 1)
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1 if CLU else 0) * BN + tl.arange(0, BN)
    nblk = K // 128
    per_split = tl.cdiv(nblk, SPLIT_K)
    b0 = pid_k * per_split
    return pid_k, offs_m, offs_m < M, offs_n, offs_n < N, b0, tl.minimum(b0 + per_split, nblk)


def _dec4z_asm(fp16: bool, i: int, scaled: bool = False, raw: bool = False) -> str:
    """PTX for slot i of two words (word rows 2c, 2c + 1 of a block: a K pair of wgmma's register operand)
    -> one 16-bit float pair q - z: prmt pairs the half-words, lop3 ORs the nibble pair into the magic
    exponent (MAGIC + q, exact), one packed FMA adds -(MAGIC + z) (exact: small integers); scaled (dot4s):
    then times the group scale pair $7, one rounding, as a dequantize to the activations' dtype (Marlin's).
    One output per call: Triton moves the layout conversion of a single-output asm back to the load (the
    decoded tile stays in registers), not of a multi-output one. raw (mma16's BIAS): MAGIC + q as it is (prmt,
    shift, lop3; two inputs, the words and the magic pair), the offset taken off elsewhere."""
    if raw:
        sh = f"shr.b32 t, t, {4 * (i % 4)}; " if i % 4 else ""
        return ("{ .reg .b32 t; " + f"prmt.b32 t, $1, $2, {'0x5410' if i < 4 else '0x7632'}; " + sh +
                "lop3.b32 $0, t, 0x000F000F, $3, 0xEA; }")
    one, ty = ("0x3C003C00", "f16x2") if fp16 else ("0x3F803F80", "bf16x2")
    out = [".reg .b32 t, one, nz;" if scaled else ".reg .b32 t, one;", f"mov.b32 one, {one};"]
    if scaled:
        out.append("mov.b32 nz, 0x80008000;")
    out.append(f"prmt.b32 t, $1, $2, {'0x5410' if i < 4 else '0x7632'};")
    if i % 4:
        out.append(f"shr.b32 t, t, {4 * (i % 4)};")
    out.append("lop3.b32 t, t, 0x000F000F, $3, 0xEA;")
    out += [f"fma.rn.{ty} t, t, one, $5;", f"fma.rn.{ty} $0, t, $7, nz;"] if scaled else [f"fma.rn.{ty} $0, t, one, $5;"]
    return "{\n" + "\n".join(out) + "\n}"


_DEC4Z_F16 = tl.constexpr(tuple(_dec4z_asm(True, i) for i in range(8)))
_DEC4Z_BF16 = tl.constexpr(tuple(_dec4z_asm(False, i) for i in range(8)))


_DEC4L = tl.constexpr(("prmt.b32 $0, $1, $2, 0x5410;", "prmt.b32 $0, $1, $2, 0x7632;"))  # ABL bit 2: the word pair only


@triton.jit
def _dec4z_ptx(words, i: tl.constexpr, magic, zneg, DT: tl.constexpr, ABL: tl.constexpr = 0):
    """[BN, 16] of DT: slot i of each word minus its zero point. ABL bit 2 (bench only): the pair alone, no decode."""
    if ABL & 4:
        if DT == tl.float16:
            return tl.inline_asm_elementwise(asm=_DEC4L[i // 4], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                             dtype=tl.float16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(asm=_DEC4L[i // 4], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                             dtype=tl.bfloat16, is_pure=True, pack=2)
    elif DT == tl.float16:
        return tl.inline_asm_elementwise(asm=_DEC4Z_F16[i], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(asm=_DEC4Z_BF16[i], constraints="=r,r,r,r,r,r,r", args=[words, magic, zneg],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _dec4z_slot(words, i: tl.constexpr, zq, DT: tl.constexpr, INTERP: tl.constexpr):
    """zq: the zero points broadcast against the word tile."""
    v = ((words >> (i * 4)) & 15).to(tl.float32) - zq
    if not INTERP:
        v = v.to(DT)
    return v


@triton.jit
def _h16_pair(v, DT: tl.constexpr):
    """A float tile as DT bits in both halves of an int32 (the packed-pair operand of the PTX decodes)."""
    return (v.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 65537


@triton.jit
def _sdot(acc, v, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, kk, HAS_PERM: tl.constexpr, INTERP: tl.constexpr,
          XL: tl.constexpr = False, ABL: tl.constexpr = 0):
    """acc [BN, BM] += v [BN, KC] . x[:, kk]^T; XL: acc [BM, BN] += x[:, kk] . v [KC, BN]. ABL bit 0 (bench only,
    wrong values): x not read, a constant tile instead."""
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk)
    if ABL & 1:
        xs = tl.full((offs_m.shape[0], kk.shape[0]) if XL else (kk.shape[0], offs_m.shape[0]), 1.0, x_ptr.dtype.element_ty)
    elif XL:
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0)
    else:
        xs = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None], mask=mask_m[None, :], other=0.0)
    if INTERP:
        xs = xs.to(tl.float32)
    if XL:
        acc = tl.dot(xs, v, acc)
    else:
        acc = tl.dot(v, xs, acc)
    return acc


@triton.jit
def _store_t(out_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_ok, pid_k, SPLIT_K: tl.constexpr,
             res_ptr=None, cnt_ptr=None, FUSED: tl.constexpr = False, CLU: tl.constexpr = False, N=0):
    """Store acc [BN, BM] (out^T) into out [M, N], or as fp32 partial sums [SPLIT_K, M, N] (out_ptr) summed by
    _splitk_reduce, or (FUSED) by the last program of the tile to finish, into res [M, N]; it then resets the
    tile's counter (grid: N tiles, K splits, M tiles). CLU: the tile's programs are one cluster and sum through
    their shared memory (cluster.py), program k the rows k * BN / SPLIT_K ..., into out [M, N]."""
    offs = offs_m[None, :] * stride_om + offs_n[:, None]
    omask = mask_m[None, :] & mask_n[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    elif CLU:
        BN: tl.constexpr = acc.shape[0]
        BM: tl.constexpr = acc.shape[1]
        CW: tl.constexpr = BN // SPLIT_K
        lm = tl.arange(0, BM)
        c = pid_k * CW + tl.arange(0, CW)
        tot = cluster.exchange(acc, tl.arange(0, BN)[:, None] * BM + lm[None, :], c[:, None] * BM + lm[None, :],
                               SPLIT_K, BN * BM * 4)
        n = tl.program_id(1) * BN + c
        tl.store(out_ptr + offs_m[None, :] * stride_om + n[:, None], tot.to(out_ptr.dtype.element_ty),
                 mask=mask_m[None, :] & (n < N)[:, None])
        cluster.sync()  # every program's buffer read before any leaves
    else:
        tl.store(out_ptr + offs + pid_k * stride_ok, acc, mask=omask)
        if FUSED:
            tl.debug_barrier()  # every thread's partial stored before the count goes up
            tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            done = tl.atomic_add(cnt_ptr + tile, 1)  # acq_rel, gpu scope
            if done == SPLIT_K - 1:
                tot = tl.zeros_like(acc)
                for i in tl.static_range(SPLIT_K):
                    tot += tl.load(out_ptr + offs + i * stride_ok, mask=omask, other=0.0, cache_modifier=".cg")
                tl.store(res_ptr + offs, tot.to(res_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _dot4t_block(acc, b, s, x_ptr, qw_ptr, z_ptr, gblk_ptr, perm_ptr, offs_m, mask_m, offs_n, mask_n, offs_r, magic,
                 N, stride_xm, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, FP16: tl.constexpr, PTX: tl.constexpr,
                 INTERP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GSH: tl.constexpr, XL: tl.constexpr = False,
                 ABL: tl.constexpr = 0, wdesc=None, n0=0, TMA: tl.constexpr = False):
    """acc [BN, BM] += s * ((q - z) . x^T) over 128-channel block b (s: the block's scales, [BN] fp32); XL (x the
    left operand): acc [BM, BN] += x . (q - z)^T * s, the word tile [16, BN]. ABL (bench only, wrong values): bit 0
    x not read, bit 2 each slot only paired (one prmt, no decode). TMA: the word tile read through wdesc (a tensor
    descriptor of the [K / 8, N] words, block [16, BN]) at columns n0.., by the Tensor Memory Accelerator."""
    MAGIC: tl.constexpr = 1024.0 if FP16 else 128.0
    ZNEG8: tl.constexpr = (0xE408E408 if FP16 else 0xC308C308) - (1 << 32)  # -(MAGIC + 8) in fp16 / bf16, a pair (int32)
    DT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    if XL:
        wofs = (b * 16 + offs_r)[:, None] * N + offs_n[None, :]
        wmask = mask_n[None, :]
        zofs = offs_n[None, :] + 0 * offs_r[:, None]
    else:
        wofs = (b * 16 + offs_r)[None, :] * N + offs_n[:, None]
        wmask = mask_n[:, None]
        zofs = offs_n[:, None] + 0 * offs_r[None, :]
    if TMA:
        words = wdesc.load([b * 16, n0])
        if not XL:
            words = tl.trans(words)
    else:
        words = tl.load(qw_ptr + wofs, mask=wmask, other=0)
    if HAS_ZERO:
        g = _group(gblk_ptr, b, GSH)
    k0 = b * 128
    if PTX:  # -(MAGIC + z) as a 16-bit float pair, loaded as a tile of the words' shape (all arithmetic from loads:
        # Triton then converts the loads, not the decoded tile, to the tensor cores' register layout)
        if HAS_ZERO:
            zt = tl.load(z_ptr + g * N + zofs, mask=wmask, other=0).to(tl.float32)
            zneg = _h16_pair(-(zt + MAGIC), DT)
        else:
            zneg = tl.full(words.shape, ZNEG8, tl.int32)
    else:
        if HAS_ZERO:
            zq = tl.load(z_ptr + g * N + zofs, mask=wmask, other=0).to(tl.float32)
        else:
            zq = tl.full(words.shape, 8.0, tl.float32)
    # all eight slots decoded before the first dot (slot by slot between the dots: 1.70x vs 1.75x at M=16, same H100)
    if PTX:
        v0 = _dec4z_ptx(words, 0, magic, zneg, DT, ABL)
        v1 = _dec4z_ptx(words, 1, magic, zneg, DT, ABL)
        v2 = _dec4z_ptx(words, 2, magic, zneg, DT, ABL)
        v3 = _dec4z_ptx(words, 3, magic, zneg, DT, ABL)
        v4 = _dec4z_ptx(words, 4, magic, zneg, DT, ABL)
        v5 = _dec4z_ptx(words, 5, magic, zneg, DT, ABL)
        v6 = _dec4z_ptx(words, 6, magic, zneg, DT, ABL)
        v7 = _dec4z_ptx(words, 7, magic, zneg, DT, ABL)
    else:
        v0 = _dec4z_slot(words, 0, zq, DT, INTERP)
        v1 = _dec4z_slot(words, 1, zq, DT, INTERP)
        v2 = _dec4z_slot(words, 2, zq, DT, INTERP)
        v3 = _dec4z_slot(words, 3, zq, DT, INTERP)
        v4 = _dec4z_slot(words, 4, zq, DT, INTERP)
        v5 = _dec4z_slot(words, 5, zq, DT, INTERP)
        v6 = _dec4z_slot(words, 6, zq, DT, INTERP)
        v7 = _dec4z_slot(words, 7, zq, DT, INTERP)
    blk = tl.zeros(acc.shape, dtype=tl.float32)
    blk = _sdot(blk, v0, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v1, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 16 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v2, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 32 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v3, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 48 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v4, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 64 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v5, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 80 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v6, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 96 + offs_r, HAS_PERM, INTERP, XL, ABL)
    blk = _sdot(blk, v7, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, k0 + 112 + offs_r, HAS_PERM, INTERP, XL, ABL)
    if XL:
        acc += blk * s[None, :]
    else:
        acc += blk * s[:, None]
    return acc


@triton.jit
def _wo_dot4t_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok,
    HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, FP16: tl.constexpr, PTX: tl.constexpr, INTERP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, KU: tl.constexpr, GSH: tl.constexpr = -1,
    res_ptr=None, cnt_ptr=None, FUSED: tl.constexpr = False, PDL: tl.constexpr = 0, CLU: tl.constexpr = False,
    XL: tl.constexpr = False, ABL: tl.constexpr = 0, TRIG: tl.constexpr = False, wdesc=None, TMA: tl.constexpr = False,
):
    """int4 through tensor cores with the operands swapped: out^T [BN, BM] = W x^T. The decoded weights
    are the left operand (BN >= 64 rows: Hopper's wgmma takes it from registers, no trip through shared
    memory). Word row r of a block is K position r of every slot's [BN, 16] tile, so the [BN, 16] word
    tile, loaded once per block, gives the eight 16-channel slices in place; a thread holds the K pairs
    (2c, 2c + 1) that one PTX call decodes, zero point included (q - z exact in 16-bit floats). The
    group scale multiplies the block's fp32 result. KU blocks per loop step (the split's block count
    is a multiple of KU: the launcher checks). PDL: as gemv16's (the first scales read before the wait).
    XL (kind dot4): x the left operand, out [BM, BN] = x W^T, the decoded [16, BN] slices the right one: at BM = 16
    that is mma.sync (m16n8k16), whose register operands need no wait after each dot as wgmma's do (session 9's
    SASS read); word rows 2c, 2c + 1 are again a thread's K pair of the operand. TRIG: the next kernel (the split-K
    sum) may launch at once (it waits for this one's writes). TMA: the words through wdesc (_dot4t_block)."""
    if PDL or TRIG:
        _gdc_launch_dependents()
    MAGIC16: tl.constexpr = 0x6400 if FP16 else 0x4300
    pid_k, offs_m, mask_m, offs_n, mask_n, b0, b1 = _tc_tile(M, N, K, BM, BN, SPLIT_K, CLU)
    offs_r = tl.arange(0, 16)
    if XL:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        magic = tl.full((16, BN), MAGIC16 * 65537, tl.int32)
    else:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        magic = tl.full((BN, 16), MAGIC16 * 65537, tl.int32)
    # the group scales are read one block ahead (a load whose address comes from another load: on the step's
    # critical path it was the top stall, "long scoreboard", in Nsight Compute)
    s_next = tl.load(s_ptr + _group(gblk_ptr, b0, GSH) * N + offs_n, mask=mask_n, other=0.0)
    if PDL:
        _gdc_wait()
    for bb in range(b0, b1, KU):
        for u in tl.static_range(KU):
            s = s_next.to(tl.float32)
            g_next = _group(gblk_ptr, tl.minimum(bb + u + 1, b1 - 1), GSH)
            s_next = tl.load(s_ptr + g_next * N + offs_n, mask=mask_n, other=0.0)
            acc = _dot4t_block(acc, bb + u, s, x_ptr, qw_ptr, z_ptr, gblk_ptr, perm_ptr, offs_m, mask_m, offs_n, mask_n,
                               offs_r, magic, N, stride_xm, HAS_ZERO, HAS_PERM, FP16, PTX, INTERP, BN, BM, GSH, XL, ABL,
                               wdesc, tl.program_id(1 if CLU else 0) * BN, TMA)
    if XL:
        acc = tl.trans(acc)
    _store_t(out_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_ok, pid_k, SPLIT_K, res_ptr, cnt_ptr, FUSED, CLU, N)


_DEC4S_F16 = tl.constexpr(tuple(_dec4z_asm(True, i, scaled=True) for i in range(8)))
_DEC4S_BF16 = tl.constexpr(tuple(_dec4z_asm(False, i, scaled=True) for i in range(8)))


@triton.jit
def _dec4s_ptx(words, i: tl.constexpr, magic, zneg, spair, DT: tl.constexpr):
    if DT == tl.float16:
        return tl.inline_asm_elementwise(asm=_DEC4S_F16[i], constraints="=r,r,r,r,r,r,r,r,r", args=[words, magic, zneg, spair],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(asm=_DEC4S_BF16[i], constraints="=r,r,r,r,r,r,r,r,r", args=[words, magic, zneg, spair],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _dec4s(words, i: tl.constexpr, magic, zneg, spair, zq, sq, DT: tl.constexpr, PTX: tl.constexpr, INTERP: tl.constexpr):
    if PTX:
        v = _dec4s_ptx(words, i, magic, zneg, spair, DT)
    else:
        v = (((words >> (i * 4)) & 15).to(tl.float32) - zq) * sq
        if not INTERP:
            v = v.to(DT)
    return v


@triton.jit
def _wo_dot4s_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gblk_ptr, perm_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok,
    HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, FP16: tl.constexpr, PTX: tl.constexpr, INTERP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, KB: tl.constexpr,
):
    """dot4t with the group scale applied in the decode ((q - z) * s rounded once to the activations'
    dtype, as a dequantize would): every dot accumulates straight into one fp32 accumulator, so KB
    consecutive 128-channel blocks (their [BN, 16 * KB] word rows are contiguous) make one dot of
    K = 16 * KB per slot: fewer, longer wgmma chains. The split's block count is a multiple of KB."""
    MAGIC16: tl.constexpr = 0x6400 if FP16 else 0x4300
    MAGIC: tl.constexpr = 1024.0 if FP16 else 128.0
    ZNEG8: tl.constexpr = (0xE408E408 if FP16 else 0xC308C308) - (1 << 32)  # -(MAGIC + 8) in fp16 / bf16, a pair (int32)
    DT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    KC: tl.constexpr = 16 * KB
    pid_k, offs_m, mask_m, offs_n, mask_n, b0, b1 = _tc_tile(M, N, K, BM, BN, SPLIT_K)
    offs_c = tl.arange(0, KC)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    magic = tl.full((BN, KC), MAGIC16 * 65537, tl.int32)
    for b in range(b0, b1, KB):
        words = tl.load(qw_ptr + (b * 16 + offs_c)[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
        g = tl.load(gblk_ptr + (b + offs_c // 16) * 8)  # the group of each column's block
        st = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0.0)
        sq = st.to(DT).to(tl.float32)
        if HAS_ZERO:
            zq = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0).to(tl.float32)
            zneg = _h16_pair(-(zq + MAGIC), DT)
        else:  # a constant (arithmetic on a constant tile would keep Triton from moving the layout conversion)
            zq = tl.full((BN, KC), 8.0, tl.float32)
            zneg = tl.full((BN, KC), ZNEG8, tl.int32)
        spair = _h16_pair(st, DT)
        kk = (b + offs_c // 16) * 128 + offs_c % 16
        for i in tl.static_range(8):
            v = _dec4s(words, i, magic, zneg, spair, zq, sq, DT, PTX, INTERP)
            acc = _sdot(acc, v, x_ptr, perm_ptr, offs_m, mask_m, stride_xm, kk + i * 16, HAS_PERM, INTERP)
    _store_t(out_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_ok, pid_k, SPLIT_K)


def _decf_asm(fp16: bool, i: int) -> str:
    """PTX for slot i of two NVFP4 words (a K pair of wgmma's register operand) -> the two e2m1 values, exactly,
    as a 16-bit float pair: prmt pairs the half-words, the three magnitude bits go to the top of the exponent
    field's low end (fp16 bits 9..11: value x 2^-14; bf16 bits 6..8: value x 2^-126, subnormals included)
    and the sign to bit 15, one packed multiply by 2^14 / 2^126 (exact) gives the value."""
    q = i % 4
    mag, hi = (9, "0x0E000E00") if fp16 else (6, "0x01C001C0")
    sh = mag - 4 * q
    out = [".reg .b32 t, a, b, c;", f"prmt.b32 t, $1, $2, {'0x5410' if i < 4 else '0x7632'};",
           f"shl.b32 a, t, {sh};" if sh >= 0 else f"shr.u32 a, t, {-sh};", f"and.b32 a, a, {hi};"]
    out.append(f"shl.b32 b, t, {12 - 4 * q};" if q < 3 else "mov.b32 b, t;")
    out.append("lop3.b32 a, b, 0x80008000, a, 0xEA;")
    out += ["mov.b32 c, 0x74007400;", "mul.rn.f16x2 $0, a, c;"] if fp16 else ["mov.b32 c, 0x7E807E80;", "mul.rn.bf16x2 $0, a, c;"]
    return "{\n" + "\n".join(out) + "\n}"


_DECF_F16 = tl.constexpr(tuple(_decf_asm(True, i) for i in range(8)))
_DECF_BF16 = tl.constexpr(tuple(_decf_asm(False, i) for i in range(8)))


@triton.jit
def _decf_slot(words, i: tl.constexpr, DT: tl.constexpr, PTX: tl.constexpr, INTERP: tl.constexpr):
    """[BN, 16]: the e2m1 values of slot i of each word, in DT (fp32 under the interpreter)."""
    if PTX:
        if DT == tl.float16:
            return tl.inline_asm_elementwise(asm=_DECF_F16[i], constraints="=r,r,r", args=[words],
                                             dtype=tl.float16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(asm=_DECF_BF16[i], constraints="=r,r,r", args=[words],
                                             dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        v = _e2m1_f32((words >> (i * 4)) & 15) * 16384.0
        if not INTERP:
            v = v.to(DT)
        return v


@triton.jit
def _f_slot(acc, words, i: tl.constexpr, e, x_ptr, offs_m, mask_m, stride_xm, kk, DT: tl.constexpr, PTX: tl.constexpr,
            INTERP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """acc [BN, BM] += (slot i's e2m1 values . x^T) * the slot's e4m3 scales e ([1, BN] int32 bits)."""
    v = _decf_slot(words, i, DT, PTX, INTERP)
    blk = _sdot(tl.zeros((BN, BM), dtype=tl.float32), v, x_ptr, x_ptr, offs_m, mask_m, stride_xm, kk, False, INTERP)
    return acc + blk * tl.reshape(_e4m3_f32(e), (BN,))[:, None]


@triton.jit
def _wo_dot4f_kernel(
    x_ptr, qw_ptr, s_ptr, gs_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok,
    FP16: tl.constexpr, PTX: tl.constexpr, INTERP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
    res_ptr=None, cnt_ptr=None, FUSED: tl.constexpr = False, CLU: tl.constexpr = False, TRIG: tl.constexpr = False,
):
    """NVFP4 weights at 2 <= M <= 16 as dot4t does int4 (out^T = W x^T, the decoded weights wgmma's register
    operand): each 16-channel slot of a 128-channel block is one NVFP4 group, so its e2m1 values (exact in
    fp16 / bf16) make one dot and the group's e4m3 scale multiplies that dot's fp32 result; the global scale
    at the end. TRIG: as dot4t's."""
    if TRIG:
        _gdc_launch_dependents()
    DT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    pid_k, offs_m, mask_m, offs_n, mask_n, b0, b1 = _tc_tile(M, N, K, BM, BN, SPLIT_K, CLU)
    offs_r = tl.arange(0, 16)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    # the eight group scales of a block read one block ahead (in the loop they were a dependent round trip
    # before each slot's multiply: 0.91x bf16 at M=16 against dot4t's 1.9x for int4, H100 session 10)
    n0, n1, n2, n3, n4, n5, n6, n7 = _h2_e8(s_ptr, b0, b1, tl.zeros((1,), tl.int32), offs_n, mask_n, N)
    for b in range(b0, b1):
        e0, e1, e2, e3, e4, e5, e6, e7 = n0, n1, n2, n3, n4, n5, n6, n7
        n0, n1, n2, n3, n4, n5, n6, n7 = _h2_e8(s_ptr, b + 1, b1, tl.zeros((1,), tl.int32), offs_n, mask_n, N)
        words = tl.load(qw_ptr + (b * 16 + offs_r)[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
        k0 = b * 128 + offs_r
        acc = _f_slot(acc, words, 0, e0, x_ptr, offs_m, mask_m, stride_xm, k0, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 1, e1, x_ptr, offs_m, mask_m, stride_xm, k0 + 16, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 2, e2, x_ptr, offs_m, mask_m, stride_xm, k0 + 32, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 3, e3, x_ptr, offs_m, mask_m, stride_xm, k0 + 48, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 4, e4, x_ptr, offs_m, mask_m, stride_xm, k0 + 64, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 5, e5, x_ptr, offs_m, mask_m, stride_xm, k0 + 80, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 6, e6, x_ptr, offs_m, mask_m, stride_xm, k0 + 96, DT, PTX, INTERP, BN, BM)
        acc = _f_slot(acc, words, 7, e7, x_ptr, offs_m, mask_m, stride_xm, k0 + 112, DT, PTX, INTERP, BN, BM)
    acc = acc * tl.load(gs_ptr)
    _store_t(out_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_ok, pid_k, SPLIT_K, res_ptr, cnt_ptr, FUSED, CLU, N)


@triton.jit
def _wo_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, gblk_ptr, gs_ptr, out_ptr, N, K,
    BITS: tl.constexpr, WTYPE: tl.constexpr, HAS_ZERO: tl.constexpr, BN: tl.constexpr,
):
    """Dequantize to out [N, K] (in the permuted channel order when act order)."""
    PER: tl.constexpr = 32 // BITS
    BLK: tl.constexpr = 16 * PER
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_n = offs_n < N
    gs = tl.load(gs_ptr)
    words = tl.load(qw_ptr + (b * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    for i in tl.static_range(PER):
        g = tl.load(gblk_ptr + b * PER + i)
        w, s, z = _dequant_slot(words, i, s_ptr, z_ptr, gs, g, offs_n, mask_n, N, BITS, WTYPE, HAS_ZERO, False)
        if WTYPE == 1:
            w = w * gs
        kk = b * BLK + i * 16 + offs_r
        tl.store(out_ptr + offs_n[None, :] * K + kk[:, None], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def _wo_dequant_rows_kernel(
    qw_ptr, s_ptr, z_ptr, gblk_ptr, gs_ptr, out_ptr, N, K,
    BITS: tl.constexpr, WTYPE: tl.constexpr, HAS_ZERO: tl.constexpr, BN: tl.constexpr, HINTS: tl.constexpr = False,
):
    """As _wo_dequant_kernel, but all PER slots decoded at once as a [PER, 16, BN] tile and stored as the
    [BN, 16 * PER] tile of out, so each row's 16 * PER channels go out as one contiguous run (the slot-by-slot
    store writes 32 bytes per row and instruction, strided by K). HINTS: the words read evict-first, the weight
    written evict-last (for the GEMM right after to read from L2)."""
    PER: tl.constexpr = 32 // BITS
    BLK: tl.constexpr = 16 * PER
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    offs_i = tl.arange(0, PER)
    mask_n = offs_n < N
    wptrs = qw_ptr + (b * 16 + offs_r)[:, None] * N + offs_n[None, :]
    if HINTS:
        words = tl.load(wptrs, mask=mask_n[None, :], other=0, eviction_policy="evict_first")
    else:
        words = tl.load(wptrs, mask=mask_n[None, :], other=0)
    q = (words[None, :, :] >> (offs_i * BITS)[:, None, None]) & ((1 << BITS) - 1)  # [PER, 16, BN]
    g = tl.load(gblk_ptr + b * PER + offs_i)  # the group of each slot
    sidx = g[:, None] * N + offs_n[None, :]  # [PER, BN]
    if WTYPE == 0:
        sc = tl.load(s_ptr + sidx, mask=mask_n[None, :], other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + sidx, mask=mask_n[None, :], other=0).to(tl.float32)
        else:
            z = tl.zeros_like(sc) + (1 << (BITS - 1))
        v = (_code_f32(q) - z[:, None, :]) * sc[:, None, :]
    else:
        e = tl.load(s_ptr + sidx, mask=mask_n[None, :], other=0).to(tl.int32)
        if WTYPE == 1:  # e4m3 block scale * global scale
            v = _e2m1_f32(q) * (_e4m3_f32(e) * 16384.0)[:, None, :] * tl.load(gs_ptr)
        else:  # e8m0
            v = _e2m1_f32(q) * (tl.exp2(e.to(tl.float32) - 127.0) * 16384.0)[:, None, :]
    t = tl.reshape(tl.permute(v.to(out_ptr.dtype.element_ty), (2, 0, 1)), (BN, BLK))
    kk = b * BLK + tl.arange(0, BLK)
    if HINTS:
        tl.store(out_ptr + offs_n[:, None] * K + kk[None, :], t, mask=mask_n[:, None], eviction_policy="evict_last")
    else:
        tl.store(out_ptr + offs_n[:, None] * K + kk[None, :], t, mask=mask_n[:, None])


@triton.jit
def _splitk_reduce(part_ptr, out_ptr, total, SK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out = the sum of SK fp32 partials. PDL: launched as a programmatic dependent of the kernel that writes them
    (which triggers it at its start): resident early, it waits here for that kernel's writes; it triggers the next
    kernel at once (a dependent gemv16 then reads its weights early, and waits for this one before anything else)."""
    if PDL:
        _gdc_launch_dependents()
        _gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SK):
        acc += tl.load(part_ptr + i * total + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------

GEMV_CONFIGS = [dict(BN=bn, SPLIT_K=sk, KU=ku, num_warps=w) for bn, sk, ku, w in [
    (32, 2, 4, 4), (64, 1, 4, 4), (64, 2, 4, 4), (64, 4, 2, 4), (64, 4, 4, 4), (128, 2, 2, 4), (128, 4, 2, 4),
    (128, 4, 4, 8), (128, 8, 2, 4), (256, 4, 2, 8), (256, 8, 1, 8),
    (32, 1, 8, 4), (32, 2, 8, 4), (32, 4, 4, 4), (64, 1, 8, 4), (64, 2, 8, 8), (16, 1, 8, 2), (32, 1, 16, 4),
]]
SMALL_CONFIGS = [dict(BM=16, BN=bn, SPLIT_K=sk, num_warps=w) for bn, sk, w in [
    (32, 1, 4), (64, 1, 4), (64, 2, 4), (64, 4, 4), (128, 2, 4), (128, 4, 4), (128, 8, 8),
]]
TILED_CONFIGS = [dict(BM=bm, BN=bn, SPLIT_K=1, num_warps=w, num_stages=st) for bm, bn, w, st in [
    (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2), (128, 64, 4, 3),
]]
# dot4: x the left operand (BM = 16 tokens: mma.sync), BN weight rows per program
DOT4_CONFIGS = [dict(BN=bn, SPLIT_K=sk, KU=ku, num_warps=w, num_stages=st) for bn, sk, ku, w, st in [
    (64, 4, 1, 4, 3), (64, 8, 1, 4, 3), (64, 16, 1, 4, 3), (128, 2, 1, 4, 3), (128, 4, 1, 4, 3), (128, 8, 1, 4, 3),
    (128, 16, 1, 4, 3), (256, 2, 1, 4, 3), (256, 4, 1, 4, 3), (256, 8, 1, 4, 3), (256, 2, 1, 8, 3), (256, 4, 1, 8, 3),
    (128, 4, 1, 8, 3), (128, 4, 1, 4, 4), (128, 8, 1, 4, 4), (128, 4, 2, 4, 3), (64, 8, 1, 2, 3), (32, 8, 1, 2, 3),
]]
# dot4t: BN rows of weights per program (wgmma's M: 64 per warp group), BM tokens (its N)
DOT4T_CONFIGS = [dict(BN=bn, SPLIT_K=sk, num_warps=w, num_stages=st) for bn, sk, w, st in [
    (64, 1, 4, 3), (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (128, 1, 4, 3), (128, 2, 4, 3), (128, 4, 4, 3),
    (128, 8, 4, 3), (128, 16, 4, 3), (256, 2, 8, 3), (256, 4, 8, 3), (128, 4, 8, 3), (64, 16, 4, 3), (128, 4, 4, 4),
    (256, 4, 4, 3), (256, 8, 4, 3), (128, 4, 4, 5), (128, 8, 4, 5), (256, 2, 4, 4), (256, 4, 4, 4), (128, 2, 4, 5),
]] + [dict(BN=bn, SPLIT_K=sk, KU=2, num_warps=4, num_stages=st) for bn, sk, st in [
    (64, 2, 3), (64, 4, 3), (64, 8, 3), (128, 2, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 4), (256, 4, 3),
]] + [dict(BN=32, SPLIT_K=sk, num_warps=2, num_stages=3) for sk in (2, 4, 8, 16)]  # 32 rows: mma.sync (HMMA), no wgmma
# wait after each dot (session 9's SASS read). Session 10, H100: slower for int4 (bench row dot4t-mma 1.44x vs
# dot4t's 1.76x at M=16), the tuner's choice for NVFP4 (dot4f) on three of the four shapes
DOT4S_CONFIGS = [dict(BN=bn, SPLIT_K=sk, KB=kb, num_warps=4, num_stages=st) for bn, sk, kb, st in [
    (64, 1, 1, 3), (64, 2, 1, 3), (64, 4, 1, 3), (64, 8, 1, 3), (64, 16, 1, 3), (128, 4, 1, 3), (128, 8, 1, 3),
    (64, 1, 2, 3), (64, 2, 2, 3), (64, 4, 2, 3), (64, 8, 2, 3), (128, 2, 2, 3), (128, 4, 2, 3), (64, 4, 2, 4),
    (64, 1, 4, 3), (64, 2, 4, 3), (64, 4, 4, 3), (64, 2, 4, 2), (128, 2, 4, 2), (128, 1, 2, 3),
]]
DOT4T_LARGE = [dict(BM=bm, BN=bn, SPLIT_K=1, num_warps=w, num_stages=st) for bm, bn, w, st in [
    (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 8, 3), (32, 128, 4, 4),
    (256, 128, 8, 3),
]]
DEQUANT_MIN_M = 128  # at or above: dequantize + cuBLAS (H100, M = 128: 0.45x bf16 vs 0.31x for the fused tiled kernel)
# the tensor-core int4 path for 2 <= M <= 16 (H100, bench/kernels.py --no-tune --ms 16, CUDA-graph time,
# geometric mean of the four Llama-3-8B shapes, session 8: dot4t 1.69-1.75x bf16, dot4 1.14x, the fused
# dequant "small" kernel 0.92x). QTOOL_DOT4=0 turns it off.
DOT4_DEFAULT = os.environ.get("QTOOL_DOT4", "1") == "1"
# ... as dot4 (x the left operand, mma.sync) with its word tiles read by TMA on Hopper and later (session 18, H100,
# `--no-tune --ms 16 --w4-paths dot4t,dot4t-tma,dot4,dot4-tma`: 2.44 / 2.48 / 2.45 / 2.51x bf16; faster in every
# shape: qkv 9.5 -> 9.3 us, o 7.7 -> 7.5, gate_up 30.4 -> 29.1, down 16.7 -> 16.4). QTOOL_TMA=0: dot4t as before.
TMA_DEFAULT = os.environ.get("QTOOL_TMA", "1") != "0"


def _tma_ok(st: "WeightOnlyState", x: torch.Tensor) -> bool:
    """The word tiles of st may be read by TMA: a CUDA device of compute capability 9 or more, rows of 16-byte
    multiples (N % 4 == 0) from a 16-byte aligned base (the tensor descriptor's rules)."""
    return (TMA_DEFAULT and not tuning.interpreting() and x.device.type == "cuda" and st.n % 4 == 0
            and st.qw.data_ptr() % 16 == 0 and torch.cuda.get_device_capability(x.device)[0] >= 9)


def _launch_gemv(x2, st: WeightOnlyState, cfg: dict) -> torch.Tensor:
    m = x2.shape[0]
    sk = cfg["SPLIT_K"]
    out = torch.empty((m, st.n), dtype=x2.dtype, device=x2.device)
    dst = out if sk == 1 else torch.empty((sk, m, st.n), dtype=torch.float32, device=x2.device)
    grid = (m, triton.cdiv(st.n, cfg["BN"]), sk)
    zeros = st.zeros if st.zeros is not None else st.qw
    perm = st.perm if st.perm is not None else st.gblk
    if st.uniform:
        _wo_gemv_uniform_kernel[grid](
            x2, st.qw, st.scales, zeros, st.gblk, perm, dst, st.n, st.k, x2.stride(0), st.n, m * st.n,
            BITS=st.bits, HAS_ZERO=st.zeros is not None, HAS_PERM=st.perm is not None,
            BN=cfg["BN"], SPLIT_K=sk, KU=cfg.get("KU", 2), num_warps=cfg.get("num_warps", 4),
        )
    else:
        _wo_gemv_kernel[grid](
            x2, st.qw, st.scales, zeros, st.gblk, perm, st.global_scale, dst, st.n, st.k, x2.stride(0), st.n, m * st.n,
            BITS=st.bits, WTYPE=st.wtype, HAS_ZERO=st.zeros is not None, HAS_PERM=st.perm is not None,
            BN=cfg["BN"], SPLIT_K=sk, KU=cfg.get("KU", 2), num_warps=cfg.get("num_warps", 4),
        )
    if sk > 1:
        total = m * st.n
        _reduce(dst, out, total, sk)
    return out


GEMV16_CONFIGS = [dict(BN=bn, SPLIT_K=sk, KU=ku, num_warps=w) for bn, sk, ku, w in [
    (32, 1, 4, 4), (32, 2, 4, 4), (32, 4, 2, 4), (32, 8, 2, 4), (64, 1, 2, 4), (64, 2, 2, 4), (64, 4, 2, 4),
    (64, 8, 1, 4), (64, 2, 4, 4), (64, 4, 4, 8), (128, 1, 2, 4), (128, 2, 2, 4), (128, 4, 2, 8), (128, 8, 1, 4),
    (128, 4, 1, 4), (256, 2, 1, 8), (256, 4, 1, 8), (16, 1, 8, 2), (16, 2, 4, 2), (32, 16, 1, 4),
    (256, 8, 1, 4), (256, 16, 1, 4), (512, 8, 1, 4), (512, 16, 1, 8), (256, 4, 2, 4), (512, 4, 1, 4),
    (64, 8, 4, 4), (128, 8, 4, 4), (32, 8, 4, 4), (64, 16, 2, 4), (256, 16, 2, 4), (512, 8, 2, 4),
]] + [  # session 19's sweep winners, with the switches they need (each ignored where it does not apply)
    dict(BN=32, SPLIT_K=1, KU=16, num_warps=4, REGX=True, SUB=True), dict(BN=32, SPLIT_K=1, KU=32, num_warps=8, REGX=True, SUB=True),
    dict(BN=256, SPLIT_K=16, KU=2, num_warps=4, EVF=True, SUB=True), dict(BN=256, SPLIT_K=8, KU=2, num_warps=4, SUB=True),
    dict(BN=128, SPLIT_K=8, KU=2, num_warps=4, SPK=True), dict(BN=256, SPLIT_K=2, KU=1, num_warps=4, SPK=True, EVF=True),
    dict(BN=256, SPLIT_K=16, KU=1, num_warps=4, SPK=True, EVF=True),
]
# the packed-fp16 GEMV for M = 1 (QTOOL_GEMV16=0 keeps the fp32 one); split-K partials summed by the last
# program of each tile (QTOOL_FUSED_REDUCE=0: by a second kernel)
GEMV16_DEFAULT = os.environ.get("QTOOL_GEMV16", "1") == "1"
FUSED_REDUCE = os.environ.get("QTOOL_FUSED_REDUCE", "1") == "1"
# Written in session 9 without device time, timed in session 10 on an H100 and not faster, so off by default
# (QTOOL_KERNEL_NEXT=1 turns them on): gemv16's scales loaded a step ahead with its words and the group of a
# block as b >> gshift (bench row gemv16-sp: 2.36x = gemv16's 2.36x at M=1), dot4t's split-K partials summed by
# the tile's last program instead of a second kernel (dot4t-fr 1.80x vs 1.91x with the second kernel at M=16).
# What won there is on by default: dot4t's group shift (M=16 1.76x -> 1.91x untuned), NVFP4 at 2 <= M <= 16
# through dot4f (0.57x -> 0.91x).
KERNEL_NEXT = os.environ.get("QTOOL_KERNEL_NEXT", "0") == "1"
# gemv16 (M = 1) as a programmatic dependent launch on Hopper and later (session 11, H100, CUDA-graph geomean of
# the four Llama-3-8B shapes: 2.34-2.38x -> 2.58-2.63x bf16; dot4t at M <= 16 was slower with it: 2.02 -> 1.62).
# QTOOL_PDL=0 turns it off. A weight's first call runs without it (see _pdl_for).
PDL_DEFAULT = os.environ.get("QTOOL_PDL", "1") != "0"
# gemv16 as a dependent launch sums its split-K partials in a second, dependent kernel rather than through the cluster
# (QTOOL_RSUM=0: the cluster, session 16's default)
RSUM_DEFAULT = os.environ.get("QTOOL_RSUM", "1") != "0"
_PDL_OK: dict = {}
# int4 codes decoded as fp16 subnormals with the zero point taken off per block (the kernel's SUB: 16.5 instead of
# 19.3 instructions a word) in the default qkv / o tiles (session 16, H100, as dependent launches: o 5.9 -> 5.3 us,
# qkv 8.1 -> 7.9; gate_up's 512-column tiles were slower with it, 23.7 -> 27.1 at best, down equal).
# QTOOL_SUB=0 turns it off.
SUB_DEFAULT = os.environ.get("QTOOL_SUB", "1") != "0"
# NVFP4's block scales read by gemv16 from a packed copy (_spk: two words per column and block instead of eight
# bytes; session 18, H100: 2.18x -> 2.32x bf16 at M=1, qkv 10.5 -> 10.2 us, o 7.3 -> 7.0, gate_up 37.7 -> 35.2, down
# 18.1 -> 16.0; the byte loads' tile spilled). QTOOL_SPK=0 turns it off.
SPK_DEFAULT = os.environ.get("QTOOL_SPK", "1") != "0"


def gemv16_fits(st: WeightOnlyState, x: torch.Tensor) -> bool:
    """The packed-fp16 GEMV for one row of x: 4-bit int weights whose 128-channel blocks each lie in one group, or
    NVFP4 weights (e4m3 scales per 16 channels). (Forced, its paths take M > 1 too, a program per row: right on an
    H100 in session 18, but slower than the tensor-core kernels: 2.15x / 1.32x / 0.38x bf16 at M = 2 / 4 / 16
    against dot4t's 2.60x / 2.57x / 2.44x.)"""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or st.bits != 4 or x.numel() != x.shape[-1]:
        return False
    if st.wtype == WTYPE_NVFP4:
        return st.scales.shape[0] * 16 == st.k and st.perm is None
    return st.wtype == WTYPE_INT and st.uniform


_REDUCE_LAUNCHES: dict = {}


def _reduce(part: torch.Tensor, out: torch.Tensor, total: int, sk: int, pdl: bool = False) -> None:
    """out = the sum of the [sk, total] fp32 partials (a second kernel, when the split-K sum is not fused); pdl: as a
    programmatic dependent launch of the kernel before it, which must trigger it (TRIG)."""
    # 256 outputs a program: M=16 on an H100, dependent launches, 2.22x -> 2.31x bf16 against 1024 (down 17.7 -> 16.3 us;
    # 512 2.30x, 128 2.27x: session 17)
    launch(_REDUCE_LAUNCHES, (total, sk, out.dtype, pdl), _splitk_reduce, (cdiv(total, 256),), (part, out, total),
           dict(SK=sk, BLOCK=256, num_warps=4, PDL=pdl, **(dict(launch_pdl=True) if pdl else {})))


def _launches(st: WeightOnlyState) -> dict:
    """Per weight: compiled kernels relaunched without Triton's binding (launch.py), by call key."""
    return st.__dict__.setdefault("_launches", {})


def _scratch(st: WeightOnlyState, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-weight work buffer that a kernel writes and reads within one launch (the packed x pairs, split-K
    partials), kept between calls like the tile counters: calls on one stream (or PDL calls, which touch it only after
    the previous kernel has finished) never overlap; concurrent calls of one weight on two streams are not supported."""
    bufs = st.__dict__.setdefault("_scratch", {})
    key = (name, shape, dtype, device)
    b = bufs.get(key)
    if b is None:
        b = bufs[key] = torch.empty(shape, dtype=dtype, device=device)
    return b


def _counters(st: WeightOnlyState, n: int, device: torch.device) -> torch.Tensor:
    """Per-weight tile counters of the fused split-K reduction: zero between calls (the last program resets)."""
    c = getattr(st, "_counters", None)
    if c is None or c.numel() < n or c.device != device:
        c = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        st._counters = c
    return c


def _launch_gemv16(x2, st: WeightOnlyState, cfg: dict, ptx: bool, fused: bool = True, prefetch: bool = True,
                   scan: bool = False, gshift: bool | None = None, spre: bool | None = None, pdl: int = 0,
                   regx: bool = False, evf: bool = False, abl: int = 0, clu: bool = False, fp4q: bool = False,
                   sub: bool = False, spk: bool = False) -> torch.Tensor:
    """gshift (group b >> st.gshift) and spre (scales a step ahead, with prefetch) default to KERNEL_NEXT; pdl: a
    programmatic dependent launch (GPU only); regx, evf, abl: the kernel's REGX, EVF and ABL; clu: the split-K sum
    through a cluster's shared memory (when the split is 2 .. cluster.MAX and divides the tile; the caller checks
    cluster.ok); fp4q: NVFP4 word pairs summed before their scales (_FP4Q_ASM); sub: int4 codes decoded as fp16
    subnormals, the zero point taken off per block (the kernel's SUB)."""
    gshift = KERNEL_NEXT if gshift is None else gshift
    spre = cfg.get("SPRE", KERNEL_NEXT) and prefetch if spre is None else spre
    regx = regx or cfg.get("REGX", False)  # a config may ask for them (REGX: narrow tiles walking the whole K range)
    evf = evf or cfg.get("EVF", False)
    sub = sub or cfg.get("SUB", False)
    m = x2.shape[0]
    sk, bn = cfg["SPLIT_K"], cfg["BN"]
    tiles = cdiv(st.n, bn)
    out = torch.empty((m, st.n), dtype=x2.dtype, device=x2.device)
    part = out if sk == 1 else _scratch(st, "part", (sk, m, st.n), torch.float32, x2.device)
    clu = clu and 1 < sk <= cluster.MAX and bn % sk == 0 and (abl & 3) == 0
    fused = fused and sk > 1 and not clu
    cnt = _counters(st, m * tiles, x2.device) if fused else st.gblk
    sub = sub and st.wtype != WTYPE_NVFP4
    spk = (spk or cfg.get("SPK", False)) and st.wtype == WTYPE_NVFP4
    # the x pairs, 1 / prescale of each block, and (SUB) the sums of each block's eight word pairs' x
    scr = _scratch(st, "pairs", (m, st.k // 2 + st.k // 128 + st.k // 16), torch.int32, x2.device)
    ku, nw, mr = cfg.get("KU", 2), cfg.get("num_warps", 4), cfg.get("MAXNREG", 0)
    args = (x2, st.qw, _spk(st) if spk else st.scales, st.zeros if st.zeros is not None else st.qw, st.gblk,
            st.perm if st.perm is not None else st.gblk, out, part, cnt, scr, st.n, st.k, x2.stride(0), st.n, m * st.n)
    consts = lambda: dict(  # noqa: E731 - built on a key's first launch only
        HAS_ZERO=st.zeros is not None, HAS_PERM=st.perm is not None, PTX=ptx, FUSED_REDUCE=fused,
        BN=bn, SPLIT_K=sk, KU=ku, XB=min(next_pow2(cdiv(st.k // 128, sk) * 128), 4096),
        PREFETCH=prefetch, FP4=st.wtype == WTYPE_NVFP4, gs_ptr=st.global_scale, SCAN=scan,
        GSH=st.gshift if gshift else -1, SPRE=spre, PDL=int(pdl), REGX=regx, EVF=evf, ABL=abl, CLU=clu,
        FP4Q=fp4q and st.wtype == WTYPE_NVFP4, SUB=sub, SPK=spk, num_warps=nw,
        **(dict(launch_pdl=True) if pdl else {}), **(dict(maxnreg=mr) if mr else {}))
    # what decides the compiled kernel besides the weight: the constexprs, and x's dtype, row stride and alignment
    key = ("gemv16", m, x2.dtype, x2.stride(0), x2.data_ptr() % 16, bn, sk, ku, nw, ptx, fused, prefetch, scan, gshift, spre, int(pdl),
           regx, evf, abl, clu, fp4q, sub, spk, mr)
    if clu:  # one cluster of the tile's sk programs along grid axis 0
        launch(_launches(st), key, _wo_gemv16_kernel, (cluster.grid_x(x2.device, sk), tiles, m), args, consts,
               ctas=sk, smem_extra=bn * 4)
    else:
        launch(_launches(st), key, _wo_gemv16_kernel, (m, tiles, sk), args, consts)
    if sk > 1 and not fused and not clu:  # a dependent launch when this one is (it triggers at its start)
        _reduce(part, out, m * st.n, sk, pdl=bool(pdl) and (abl & 2) == 0)
    return out


def _spk(st: WeightOnlyState) -> torch.Tensor:
    """NVFP4's e4m3 block scales [K / 16, N] packed for gemv16 (SPK), kept per weight: int32 [K / 128, 2, N], for
    block b and column n (e0 | e4 << 8 | e1 << 16 | e5 << 24, e2 | e6 << 8 | e3 << 16 | e7 << 24), e_j the scale of
    group 8 b + j: the pair (j, j + 4) that one f16 pair of the decode takes is one half-word."""
    p = st.__dict__.get("_spk")
    if p is None:
        e = st.scales.view(torch.uint8).reshape(st.k // 128, 8, st.n).to(torch.int32)
        a = e[:, 0] | e[:, 4] << 8 | e[:, 1] << 16 | e[:, 5] << 24
        b = e[:, 2] | e[:, 6] << 8 | e[:, 3] << 16 | e[:, 7] << 24
        p = st.__dict__["_spk"] = torch.stack([a, b], 1).contiguous()
    return p


_H2_OK: dict = {}


def _h2_cases(kind: str, device: torch.device):
    """Small weights of each kind the self-check runs: int4 sym / asym, NVFP4."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if kind == "nvfp4":
        codes = torch.randint(0, 16, (96, 512), generator=g, dtype=torch.uint8)
        bs = (torch.rand(96, 32, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn)
        yield prepare(QTensor("e2m1", 4, codes.to(device), bs.to(device), None, 16, global_scale=torch.tensor(3e-3, device=device)))
        return
    for zero in (False, True):
        codes = torch.randint(0, 16, (96, 512), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (96, 4), generator=g, dtype=torch.uint8) if zero else None
        if not zero:
            codes = codes.to(torch.int8) - 8
        sc = (torch.rand(96, 4, generator=g) + 0.5).half()
        yield prepare(QTensor("int", 4, codes.to(device), sc.to(device), None if zeros is None else zeros.to(device), 128))


def _h2_ok(device: torch.device, kind: str = "int4") -> bool:
    """Once per device and kind (int4 | nvfp4): the inline-PTX packed-fp16 GEMV compiles and agrees with its
    plain-Triton twin (fp32 products of the same fp16 x) to 4e-3; else the fp32 GEMV runs."""
    key = (device.type, device.index, kind)
    if key not in _H2_OK:
        _H2_OK[key] = False
        try:
            g = torch.Generator(device="cpu").manual_seed(1)
            for st in _h2_cases(kind, device):
                for dt in (torch.bfloat16, torch.float16):
                    x = (torch.randn(1, 512, generator=g) * 30).to(device=device, dtype=dt)
                    cfg = dict(BN=32, SPLIT_K=2, KU=2)
                    for sub in (False, True) if kind == "int4" else (False,):  # (SUB: the subnormal decode)
                        a, b = _launch_gemv16(x, st, cfg, True, sub=sub).float(), _launch_gemv16(x, st, cfg, False, sub=sub).float()
                        err = float((a - b).norm() / b.norm())
                        if not err < 4e-3:  # fp16 products: about 1e-3 on an H100
                            _H2_OK["why"] = f"{kind}: differs from the plain-Triton twin by {err:.2e} ({dt}, sub {sub})"
                            return False
            _H2_OK[key] = True
        except Exception as e:  # noqa: BLE001 - no inline PTX on this device / Triton: the fp32 GEMV runs
            text = " ".join(str(e).split())
            _H2_OK["why"] = f"{kind}: {type(e).__name__}: {text[-1500:]}"
            return False
    return _H2_OK[key]


def _pdl_ok(device: torch.device) -> bool:
    """Once per device: Hopper or later (griddepcontrol is sm_90 PTX), and gemv16 launched as a dependent launch
    gives the plain launch's output bit for bit; else plain launches."""
    key = (device.type, device.index)
    if key not in _PDL_OK:
        _PDL_OK[key] = False
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            _PDL_OK["why"] = "needs sm_90 or later"
            return False
        try:
            st = next(_h2_cases("int4", device))
            x = (torch.randn(1, 512, generator=torch.Generator(device="cpu").manual_seed(2)) * 3).to(device, torch.bfloat16)
            cfg = dict(BN=32, SPLIT_K=2, KU=2)
            b = _launch_gemv16(x, st, cfg, True)  # plain first: the weights were just written (the rule of _pdl_for)
            a = _launch_gemv16(x, st, cfg, True, pdl=1)
            _PDL_OK[key] = bool(torch.equal(a, b))
            if not _PDL_OK[key]:
                _PDL_OK["why"] = "differs from the plain launch"
        except Exception as e:  # noqa: BLE001 - an older Triton (no launch_pdl) or driver: plain launches
            _PDL_OK["why"] = f"{type(e).__name__}: {' '.join(str(e).split())[-500:]}"
    return _PDL_OK[key]


def _pdl_dev(x: torch.Tensor) -> bool:
    """Programmatic dependent launches on x's device: QTOOL_PDL not 0, and the once-per-device check passed (not
    started inside someone's graph capture: it synchronizes)."""
    if not PDL_DEFAULT or tuning.interpreting() or x.device.type != "cuda":
        return False
    if (x.device.type, x.device.index) not in _PDL_OK:
        if torch.cuda.is_current_stream_capturing():
            return False
        _pdl_ok(x.device)
    return bool(_PDL_OK[(x.device.type, x.device.index)])


def _pdl_for(st: WeightOnlyState, x: torch.Tensor) -> int:
    """1 when this call may be a programmatic dependent launch. Such a kernel reads its weights before it waits
    for the kernel before it, so a weight's first call runs plainly: whatever wrote the weights (repacking, a
    copy) is then ordered before it, and nothing writes them after."""
    if not _pdl_dev(x):
        return 0
    if not getattr(st, "_pdl_ready", False):
        st._pdl_ready = True
        return 0
    return 1


# split-K sums through a thread-block cluster's shared memory (cluster.py) on sm_90+ (QTOOL_CLUSTER=0: off)
_CLU_OK: dict = {}


def _clu_ok(device: torch.device) -> bool:
    """Once per device: cluster launches work (cluster.ok's probe), and gemv16 summing through the cluster gives the
    global-memory sums bit for bit (the same fp32 additions in the same order). dot4t / dot4f cluster only in their
    bench rows (-clu), which check their own outputs; tests/test_kernels_cuda.py checks them bit for bit."""
    key = (device.type, device.index)
    if key not in _CLU_OK:
        _CLU_OK[key] = False
        if not cluster.ok(device):
            _CLU_OK["why"] = cluster.WHY.get(device.index, "off")
            return False
        try:
            st = next(_h2_cases("int4", device))
            g = torch.Generator(device="cpu").manual_seed(3)
            x = (torch.randn(1, 512, generator=g) * 3).to(device, torch.bfloat16)
            for w, sk in ((st, 2), (st, 4), (next(_h2_cases("nvfp4", device)), 4)):
                cfg = dict(BN=32, SPLIT_K=sk, KU=1)
                a, b = _launch_gemv16(x, w, cfg, True, clu=True), _launch_gemv16(x, w, cfg, True)
                if not torch.equal(a, b):
                    _CLU_OK["why"] = f"gemv16 split {sk} differs from the global-memory sum"
                    return False
            _CLU_OK[key] = True
        except Exception as e:  # noqa: BLE001 - a Triton / driver without it: global-memory sums
            _CLU_OK["why"] = f"{type(e).__name__}: {' '.join(str(e).split())[-500:]}"
    return _CLU_OK[key]


_CLU_BAD: set = set()  # (kernel, n, k, config) whose cluster launch failed: global-memory sums from then on


def _clu_run(f, cfg: dict, clu: bool, what: tuple):
    """f(cfg, clu). A cluster launch the driver refuses (a tile's shared memory past what the cluster's SMs hold
    together, a cluster size it does not take) raises before anything runs: that call and every later one of the
    same kernel, shape and config then sum through global memory instead, and _CLU_OK["why"] says why."""
    key = (*what, tuple(sorted(cfg.items())))
    if clu and key not in _CLU_BAD:
        try:
            return f(cfg, True)
        except RuntimeError as e:
            _CLU_BAD.add(key)
            _CLU_OK["why"] = f"{what[0]} {cfg}: {type(e).__name__}: {' '.join(str(e).split())[-300:]}"
    return f(cfg, False)


def _clu_for(x: torch.Tensor) -> bool:
    """Split-K sums through clusters for this call (decided once per device, never inside someone's capture)."""
    if not cluster.ON or tuning.interpreting() or x.device.type != "cuda":
        return False
    if (x.device.type, x.device.index) not in _CLU_OK and torch.cuda.is_current_stream_capturing():
        return False
    return _clu_ok(x.device)


# mma16 (Gluon, mma16.py: the repacked words straight into mma.sync's operand registers) for M <= 16 where it runs;
# QTOOL_MMA16=1 makes it the default there (off: slower than gemv16 / dot4-tma in every shape, sessions 20-21, H100)
MMA16_DEFAULT = os.environ.get("QTOOL_MMA16", "0") == "1"


# gv16s (Gluon, gv16s.py: M = 1 with each program's words staged in shared memory by cp.async) where it runs;
# QTOOL_GV16S=1 makes it the default there (session 22: written and compiled, not yet timed on a GPU)
GV16S_DEFAULT = os.environ.get("QTOOL_GV16S", "0") == "1"


def gv16s_fits(st: WeightOnlyState, x: torch.Tensor) -> bool:
    """int4 symmetric g128 or NVFP4, one row of fp16 / bf16 x on an sm_90+ GPU (cp.async before a dependent launch's
    wait), N a multiple of the default tile, and a Triton with Gluon."""
    if x.device.type != "cuda" or tuning.interpreting() or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    try:
        from . import gv16s
    except ImportError:  # a Triton without Gluon
        return False
    return gv16s.fits(st, x) is None and st.n % gv16s.default_config(st.n, st.k, st.wtype == WTYPE_NVFP4)["BN"] == 0


def mma16_fits(st: WeightOnlyState, x: torch.Tensor) -> bool:
    """int4 with groups of 128 channels or more, no act order, x fp16 / bf16 of at most 16 rows on an sm_80+ GPU,
    N a multiple of the default tile, and a Triton with Gluon."""
    if x.device.type != "cuda" or tuning.interpreting() or torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    try:
        from . import mma16
    except ImportError:  # a Triton without Gluon
        return False
    return mma16.fits(st, x) is None and st.n % mma16.default_config(st.n, st.k, x.shape[0])["BN"] == 0


def dot4_fits(st: WeightOnlyState, x: torch.Tensor) -> bool:
    """The tensor-core int4 path: 4-bit int weights whose 128-channel blocks each lie in one group."""
    return st.bits == 4 and st.wtype == WTYPE_INT and st.uniform and x.dtype in (torch.float16, torch.bfloat16)


def dot4f_fits(st: WeightOnlyState, x: torch.Tensor) -> bool:
    """The tensor-core NVFP4 path (dot4f): e4m3 scales per 16 channels, fp16 / bf16 activations."""
    return st.wtype == WTYPE_NVFP4 and st.scales.shape[0] * 16 == st.k and x.dtype in (torch.float16, torch.bfloat16)


_PTX_OK: dict = {}


def _ptx_ok(device: torch.device, kind: str = "dot4") -> bool:
    """Once per device and kernel (dot4 | dot4t | dot4s): the PTX decode compiles and gives the plain decode's result
    (else the plain one runs)."""
    key = (kind, device.type, device.index)
    if key not in _PTX_OK:
        _PTX_OK[key] = False
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            codes = torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8)
            zeros = torch.randint(0, 16, (64, 2), generator=g, dtype=torch.uint8)
            scales = (torch.rand(64, 2, generator=g) + 0.5).half()
            fs = torch.tensor([0.25, 1.0, 448.0, 0.001953125])[torch.randint(0, 4, (64, 16), generator=g)]
            qts = ((QTensor("int", 4, codes.to(device), scales.to(device), zeros.to(device), 128),
                    QTensor("int", 4, (codes.to(torch.int8) - 8).to(device), scales.to(device), None, 128))
                   if kind != "dot4f" else  # every e2m1 code, scales from the smallest e4m3 subnormal to the largest
                   (QTensor("e2m1", 4, codes.to(device), fs.to(torch.float8_e4m3fn).to(device), None, 16,
                            global_scale=torch.tensor(0.5, device=device)),))
            for qt in qts:
                st = prepare(qt)
                for dt in (torch.bfloat16, torch.float16):
                    x = torch.randn(3, 256, generator=g).to(device=device, dtype=dt)
                    cfg = dict(BN=32 if kind == "dot4" else 64, SPLIT_K=1)
                    a, b = _launch_dot4(x, st, cfg, True, kind), _launch_dot4(x, st, cfg, False, kind)
                    if not torch.equal(a, b):
                        _PTX_OK["why"] = f"{kind} differs from the plain decode by {float((a.float() - b.float()).abs().max())}"
                        return False
            _PTX_OK[key] = True
        except Exception as e:  # noqa: BLE001 - no PTX decode on this device / Triton: the plain decode runs
            text = " ".join(str(e).split())  # Triton puts the source first and the cause last
            _PTX_OK["why"] = f"{kind}: {type(e).__name__}: {text[-400:]}"
            return False
    return _PTX_OK[key]


def _wdesc(st: WeightOnlyState, bn: int):
    """A tensor descriptor of the words st.qw [K / 8, N] for [16, bn] tiles (one 128-channel block of bn rows), kept
    per weight and tile width."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = st.__dict__.setdefault("_wdesc", {})
    if bn not in d:
        d[bn] = TensorDescriptor.from_tensor(st.qw, [16, bn])
    return d[bn]


def _launch_dot4(x2, st: WeightOnlyState, cfg: dict, ptx: bool | None = None, kind: str = "dot4", fused: bool | None = None,
                 gshift: bool | None = None, pdl: int = 0, clu: bool = False, abl: int = 0,
                 rpdl: bool | None = None, tma: bool = False) -> torch.Tensor:
    """int4 through tensor cores: kind dot4 (dot4t's kernel with x the left operand: mma.sync at M <= 16), dot4t
    (the decoded weights the left one, wgmma's register operand) or dot4s (dot4t with the scale in the decode);
    NVFP4: dot4f (as dot4t). Split-K partials are summed by a second kernel, launched as a programmatic dependent
    of the first when rpdl (default: where dependent launches work, `_pdl_dev`); in the kernel when fused (default
    KERNEL_NEXT: not faster on an H100, session 10); or through the tile's cluster when clu (dot4t, dot4f: split 2 ..
    cluster.MAX dividing the tile; the caller checks cluster.ok). dot4 / dot4t take the group of a block as
    b >> st.gshift when gshift (default: on; H100 M=16 1.76x -> 1.91x bf16). abl (dot4 / dot4t, bench only, wrong
    values): the kernel's ABL bits 0 and 2, bit 1 leaves the split-K partials unsummed. tma (dot4 / dot4t): the word
    tiles read by the Tensor Memory Accelerator through a descriptor of st.qw (_wdesc)."""
    m = x2.shape[0]
    sk, bn, bm = cfg["SPLIT_K"], cfg["BN"], cfg.get("BM", 16)
    interp = tuning.interpreting()
    if ptx is None:
        ptx = not interp and _ptx_ok(x2.device, kind)
    clu = clu and kind in ("dot4t", "dot4f") and 1 < sk <= cluster.MAX and bn % sk == 0
    fused = (KERNEL_NEXT and FUSED_REDUCE if fused is None else fused) and kind in ("dot4", "dot4t", "dot4f") and sk > 1 and not clu
    gshift = True if gshift is None else gshift
    out = torch.empty((m, st.n), dtype=x2.dtype, device=x2.device)
    dst = out if sk == 1 or clu else torch.empty((sk, m, st.n), dtype=torch.float32, device=x2.device)
    grid = (cdiv(st.n, bn), sk, cdiv(m, bm))
    cnt = _counters(st, grid[0] * grid[2], x2.device) if fused else None
    ctas = dict(ctas=sk, smem_extra=bn * bm * 4) if clu else {}
    reduce2 = sk > 1 and not fused and not clu and not abl & 2  # the partials summed by a second kernel
    trig = reduce2 and kind != "dot4s" and (_pdl_dev(x2) if rpdl is None else rpdl)
    if clu:  # one cluster of the tile's sk programs along grid axis 0
        grid = (cluster.grid_x(x2.device, sk), cdiv(st.n, bn), cdiv(m, bm))
    kw = dict(FP16=x2.dtype == torch.float16, PTX=ptx, INTERP=interp, BM=bm, BN=bn, SPLIT_K=sk, CLU=clu,
              num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    # the compiled kernel is decided by the weight, the constexprs and x's dtype, row stride and alignment (launch.py)
    key = (kind, m, x2.dtype, x2.stride(0), x2.data_ptr() % 16, bn, sk, bm, ptx, fused, gshift, int(pdl), cfg.get("KB", cfg.get("KU", 1)),
           kw["num_warps"], kw["num_stages"], clu, abl, trig, tma)
    if kind == "dot4f":
        launch(_launches(st), key, _wo_dot4f_kernel, grid, (x2, st.qw, st.scales, st.global_scale, dst, m, st.n, st.k, x2.stride(0), st.n, m * st.n),
               dict(cnt_ptr=cnt, FUSED=fused, TRIG=trig, **kw), live=dict(res_ptr=out), **ctas)
    else:
        has_perm = st.perm is not None
        if has_perm:  # act order: gather x once (M <= 16 rows: one small kernel) instead of per tile
            x2, has_perm = x2.index_select(1, st.perm), False
        nblk, ku = st.k // 128, cfg.get("KB", cfg.get("KU", 1))
        if ku > 1 and nblk % (sk * ku):
            raise ValueError(f"{kind}: {nblk} blocks do not split into {sk} x {ku}")
        args = (x2, st.qw, st.scales, st.zeros if st.zeros is not None else st.qw, st.gblk, st.perm if has_perm else st.gblk,
                dst, m, st.n, st.k, x2.stride(0), st.n, m * st.n)
        kw.update(HAS_ZERO=st.zeros is not None, HAS_PERM=has_perm)
        if kind == "dot4s":
            del kw["CLU"]
            _wo_dot4s_kernel[grid](*args, KB=ku, **kw)
        else:  # dot4t, or dot4: the same kernel with x the left operand (XL)
            launch(_launches(st), key, _wo_dot4t_kernel, grid, args,
                   dict(KU=ku, GSH=st.gshift if gshift else -1, cnt_ptr=cnt, FUSED=fused, PDL=int(pdl), XL=kind == "dot4", ABL=abl, TRIG=trig, **kw,
                        **(dict(launch_pdl=True) if pdl else {}), **(dict(wdesc=_wdesc(st, bn), TMA=True) if tma else {})),
                   live=dict(res_ptr=out), **ctas)
    if reduce2:
        _reduce(dst, out, m * st.n, sk, pdl=trig)
    return out


def _launch_gemm(x2, st: WeightOnlyState, cfg: dict, dot: bool, use_perm: bool = True) -> torch.Tensor:
    m = x2.shape[0]
    has_perm = st.perm is not None and use_perm
    bm = cfg.get("BM", 1)
    sk = cfg["SPLIT_K"]
    if sk == 1:
        out = torch.empty((m, st.n), dtype=x2.dtype, device=x2.device)
    else:
        out = torch.zeros((m, st.n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(st.n, cfg["BN"]), sk)
    dummy = st.qw
    _wo_gemm_kernel[grid](
        x2, st.qw, st.scales, st.zeros if st.zeros is not None else dummy, st.gblk,
        st.perm if has_perm else st.gblk, st.global_scale, out,
        m, st.n, st.k, x2.stride(0), out.stride(0),
        BITS=st.bits, WTYPE=st.wtype, HAS_ZERO=st.zeros is not None, HAS_PERM=has_perm,
        BM=bm, BN=cfg["BN"], SPLIT_K=sk, DOT=dot,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out if sk == 1 else out.to(x2.dtype)


DEQUANT_ROWS = os.environ.get("QTOOL_DEQUANT_ROWS", "1") != "0"  # the row-contiguous store (bench: dequant-v0 without)
DEQUANT_HINTS = os.environ.get("QTOOL_CACHE_HINTS", "1") != "0"  # its cache hints for weights up to 64 MB (bench: dequant-nohint)


def dequantize(st: WeightOnlyState, dtype: torch.dtype, rows: bool | None = None, bn: int = 64,
               num_warps: int = 4, hints: bool = False) -> torch.Tensor:
    """The full weight [N, K] (channels in the permuted order when act order); hints: the row kernel's HINTS."""
    out = torch.empty((st.n, st.k), dtype=dtype, device=st.qw.device)
    grid = (st.k // (16 * (32 // st.bits)), triton.cdiv(st.n, bn))
    kern = _wo_dequant_rows_kernel if (DEQUANT_ROWS if rows is None else rows) else _wo_dequant_kernel
    kern[grid](
        st.qw, st.scales, st.zeros if st.zeros is not None else st.qw, st.gblk, st.global_scale, out,
        st.n, st.k, BITS=st.bits, WTYPE=st.wtype, HAS_ZERO=st.zeros is not None, BN=bn, num_warps=num_warps,
        **(dict(HINTS=True) if hints and kern is _wo_dequant_rows_kernel else {}),
    )
    return out


def _key(st: WeightOnlyState, path: str, m: int):
    return ("wo", path, tuning.m_bucket(m), st.n, st.k, st.bits, st.wtype, st.uniform)


def matmul(x: torch.Tensor, st: WeightOnlyState, path: str | None = None) -> torch.Tensor:
    """y = x @ W^T for x [..., K] in fp16/bf16. `path` forces gemv16 | gemv16-plain | gemv16-sep | gemv16-nopf |
    gemv16-scan | dot4t | dot4t-plain | dot4 | dot4-plain | dot4s | dot4s-plain | gemv | small | tiled | dequant."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if path is None:
        if MMA16_DEFAULT and m <= 16 and mma16_fits(st, x2):
            path = "mma16"
        elif GV16S_DEFAULT and m == 1 and gv16s_fits(st, x2):
            path = "gv16s"
        elif m == 1 and GEMV16_DEFAULT and gemv16_fits(st, x2) and (
                tuning.interpreting() or _h2_ok(x2.device, "nvfp4" if st.wtype == WTYPE_NVFP4 else "int4")):
            path = "gemv16"
        elif 1 < m <= 16 and DOT4_DEFAULT and dot4_fits(st, x2):
            path = "dot4-tma" if _tma_ok(st, x2) else "dot4t"
        elif 1 < m <= 16 and DOT4_DEFAULT and dot4f_fits(st, x2):
            path = "dot4f"
        elif 64 < m <= 128 and st.n >= 16384 and DOT4_DEFAULT and dot4_fits(st, x2):
            path = "dot4t"  # wide N (gate_up) at M = 128, H100: 0.71x bf16 vs 0.41x dequantize + cuBLAS
        else:
            path = "gemv" if m == 1 else "small" if m <= 16 else "tiled" if m < DEQUANT_MIN_M else "dequant"
    if path in ("gemv16", "gemv16-plain", "gemv16-sep", "gemv16-nopf", "gemv16-scan", "gemv16-sp", "gemv16-v0",
                "gemv16-pdl", "gemv16-nopdl", "gemv16-regx", "gemv16-evf", "gemv16-abl1", "gemv16-abl2", "gemv16-abl3", "gemv16-s12",
                "gemv16-noclu", "gemv16-fp4q", "gemv16-abl4", "gemv16-fp4q-abl4", "gemv16-sub", "gemv16-sub-abl4", "gemv16-s15",
                "gemv16-rpdl", "gemv16-s16", "gemv16-abl8", "gemv16-spk", "gemv16-s18"):
        ptx = path != "gemv16-plain" and not tuning.interpreting()
        # -sp: group b >> gshift and the scales a step ahead (KERNEL_NEXT); -v0: neither (session 8's kernel)
        nxt = {"gemv16-sp": True, "gemv16-v0": False}.get(path)
        # the default launches dependently (PDL_DEFAULT); -pdl always, -nopdl never (a trigger after the loop instead
        # of first measured 2.42x against 2.58x, session 11)
        # -regx: x pairs from x in registers, no scratch row; -evf: weights evict-first; -abl1/2/3 (bench only, wrong
        # results): without x / without the split-K sum / without both, launched as the default is (time breakdown)
        # -s12: session 12's defaults (no whole-K REGX tiles, no EVF); -s18: session 18's tiles (before session 19's sweep)
        # -noclu: the default with the split-K sum through global memory (the tile's last program), not the cluster
        # -fp4q: NVFP4 with the two words' pairs summed before their scale (_FP4Q_ASM; slower, session 16)
        like = path in ("gemv16", "gemv16-s12", "gemv16-s15", "gemv16-noclu", "gemv16-fp4q", "gemv16-fp4q-abl4", "gemv16-sub",
                        "gemv16-sub-abl4", "gemv16-rpdl", "gemv16-s16", "gemv16-spk", "gemv16-s18") or path.startswith(("gemv16-regx", "gemv16-evf", "gemv16-abl"))
        pdl = _pdl_for(st, x2) if like else int(path == "gemv16-pdl" and not tuning.interpreting())
        # -abl4 / -fp4q-abl4 (NVFP4, bench only, wrong results): the decode without the sign's own move, as the default
        # -sub (int4): the codes as fp16 subnormals, the zero point per block after (SUB); -sub-abl4: without that term
        # -abl8 (NVFP4, bench only, wrong results): the block scales not read, launched as the default is; -spk (NVFP4):
        # the block scales packed two words per column and block (_spk)
        abl = int(path[-1]) if path.startswith("gemv16-abl") or path.endswith("-abl4") else 0
        fp4q, sub = path.startswith("gemv16-fp4q"), path.startswith("gemv16-sub")
        # the default's split-K sum: a second kernel launched as a dependent (-rpdl forces it: H100, session 17, 2.96x ->
        # 3.12x bf16 against the cluster sum) where this launch is one, else through the cluster (-s16: always so)
        rsum = path == "gemv16-rpdl" or (path in ("gemv16", "gemv16-abl8", "gemv16-spk", "gemv16-s18") and pdl > 0 and RSUM_DEFAULT)
        clu = (path in ("gemv16-regx", "gemv16-evf", "gemv16-abl4", "gemv16-s15", "gemv16-s16") or (path == "gemv16" and not rsum)
               or fp4q or sub) and _clu_for(x2)
        one = lambda cfg, c: _launch_gemv16(x2, st, cfg, ptx, fused=path != "gemv16-sep" and not rsum and FUSED_REDUCE,  # noqa: E731
                                            prefetch=path != "gemv16-nopf", scan=path == "gemv16-scan", gshift=nxt, spre=nxt,
                                            pdl=pdl, regx=path == "gemv16-regx", evf=path == "gemv16-evf", abl=abl, clu=c,
                                            fp4q=fp4q, sub=sub, spk=path == "gemv16-spk")
        run = lambda cfg: _clu_run(one, cfg, clu, (path, st.n, st.k, st.wtype))  # noqa: E731
        y = run(tuning.pick(_key(st, path, m), GEMV16_CONFIGS, run, default=_gemv16_default(st.n, st.k, st.wtype == WTYPE_NVFP4, pdl > 0, _sms(x2.device),
                                                                                     path != "gemv16-s12", path != "gemv16-s15",
                                                                                     path != "gemv16-s18")))
    elif path in ("dot4", "dot4-plain", "dot4t", "dot4t-plain", "dot4t-fr", "dot4t-v0", "dot4t-pdl", "dot4t-mma", "dot4s",
                  "dot4s-plain", "dot4f", "dot4f-plain", "dot4t-clu", "dot4f-clu", "dot4-nopdl", "dot4t-nopdl", "dot4f-nopdl", "dot4t-tma", "dot4-tma") or \
            path.startswith(("dot4-abl", "dot4t-abl")):
        kind, ptx = path.split("-")[0], None if "-plain" not in path else False
        # -ablN (bench only, wrong values, for a time breakdown): bit 0 without x, 1 without the split-K sum, 2 without
        # the decode (each slot's word pair as it is); -nopdl: the split-K sum launched plainly (session 16's default)
        abl = int(path.split("-abl")[1]) if "-abl" in path else 0
        # -fr: split-K partials summed in the kernel (KERNEL_NEXT); -v0: group from the gblk table, reduced by a
        # second kernel (session 8's dot4t)
        # -pdl: -fr as a programmatic dependent launch (one kernel per call)
        # (slower than dot4t in session 11: 1.62-1.68x against 2.02-2.10x; with the trigger after the loop 1.78x)
        fused, gsh = {"dot4t-fr": (True, True), "dot4t-v0": (False, False), "dot4t-pdl": (True, True)}.get(path, (None, None))
        pdl = int(path == "dot4t-pdl" and not tuning.interpreting())
        # -clu: split-K partials summed through the tile's cluster (slower than the default's second kernel on an
        # H100 at every M=16 shape, session 15: cluster.py)
        clu = path in ("dot4t-clu", "dot4f-clu") and _clu_for(x2)
        one = lambda cfg, c: _launch_dot4(x2, st, cfg, ptx, kind, fused=fused, gshift=gsh, pdl=pdl, clu=c, abl=abl,  # noqa: E731
                                             rpdl=False if path.endswith("-nopdl") else None, tma=path.endswith("-tma"))
        run = lambda cfg: _clu_run(one, cfg, clu, (path, st.n, st.k, m))  # noqa: E731
        if kind == "dot4":
            configs, default = (DOT4T_LARGE if m > 16 else DOT4_CONFIGS), _dot4t_default(st.n, st.k, m)  # dot4t's tiles
        elif kind == "dot4f":  # dot4t's configs of one block per step
            configs = [c for c in (DOT4T_LARGE if m > 16 else DOT4T_CONFIGS) if c.get("KU", 1) == 1]
            default = _dot4f_default(st.n, st.k, m)
        else:
            configs = DOT4T_LARGE if m > 16 else DOT4S_CONFIGS if kind == "dot4s" else DOT4T_CONFIGS
            default = (_dot4s_default if kind == "dot4s" else _dot4t_default)(st.n, st.k, m)
            if path == "dot4t-mma" and m <= 16:  # 32 rows, two warps: mma.sync instead of wgmma
                default = dict(default, BN=32, num_warps=2, KU=1)
                configs = [c for c in configs if c["BN"] == 32]
        y = run(tuning.pick(_key(st, path, m), configs, run, default=default))
    elif path == "gv16s":  # Gluon, M = 1: the words staged in shared memory by cp.async (gv16s.py; default: QTOOL_GV16S=1)
        from . import gv16s

        y = gv16s.matmul(x2, st, tuning._cache.get(_key(st, path, m)))
    elif path == "mma16":  # Gluon, the words straight into mma.sync's operand registers (mma16.py; default: QTOOL_MMA16=1)
        from . import mma16

        cfg = tuning._cache.get(_key(st, path, m)) or mma16.default_config(st.n, st.k, m)
        y = mma16.matmul(x2, st, cfg)
    elif path in ("dequant", "dequant-v0", "dequant-hint", "dequant-nohint"):
        # cache hints (the weight written evict-last for cuBLAS to read from L2) when it fits in half an H100's L2 or
        # so: session 13, M=4096, H100: o 205.5 -> 198.6 us, qkv 288.9 -> 286.4; down (117 MB) 701 -> 719: off there
        hints = path == "dequant-hint" or (path == "dequant" and DEQUANT_HINTS and st.n * st.k * 2 <= 64 << 20)
        w = dequantize(st, x2.dtype, rows=False if path == "dequant-v0" else None, hints=hints)
        xp = x2 if st.perm is None else x2.index_select(1, st.perm)
        y = torch.nn.functional.linear(xp, w)
    else:
        configs = {"gemv": GEMV_CONFIGS, "small": SMALL_CONFIGS, "tiled": TILED_CONFIGS}[path]
        dot = path != "gemv"
        use_perm = True
        if st.perm is not None and m > 16:  # gather x once (coalesced tiles) instead of per tile
            x2, use_perm = x2.index_select(1, st.perm), False
        if path == "gemv":  # one row of x per program row
            run = lambda cfg: _launch_gemv(x2, st, cfg)  # noqa: E731
        else:
            run = lambda cfg: _launch_gemm(x2, st, cfg, dot, use_perm)  # noqa: E731
        cfg = tuning.pick(_key(st, path, m), configs, run, default=_default(path, st.n))
        y = run(cfg)
    return y.reshape(*shape[:-1], st.n)


_SMS: dict = {}


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 elsewhere), once per device."""
    if device.type != "cuda":
        return 0
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def _gemv16_default(n: int, k: int, fp4: bool = False, pdl: bool = False, sms: int = 0, s13: bool = True,
                    s16: bool = True, s19: bool = True) -> dict:
    """Untuned packed-fp16 GEMV config: what the tuner chose on an H100 for the Llama-3-8B shapes at M = 1
    (bench/kernels.py, sessions 7 and 8): wide N 512 columns x split-K 8, long K 256 x 16 (two blocks per
    step), qkv and o 256 x 16; 4 warps. As dependent launches (pdl), qkv and o take more blocks per step, so
    that more of a program's K range is in flight before it waits (o's all four blocks); session 11's sweep on
    an H100: qkv 256 x 8 with two blocks per step 8.8 -> 8.1 us, o 128 x 8 with four 7.4 -> 6.6 us.
    Session 13 (H100, `--gemv16-paths gemv16,gemv16-regx`): where 32-column tiles over the whole K range (up to
    4096 channels, one step) fit in one wave of one program per SM (o: 128 programs), they run without the split-K
    sum and with x from registers (REGX): o 6.6 -> 5.9 us (the split-K sum alone cost about 1.6-2.4 us in every
    shape, bench rows gemv16-abl2); the weights of gate_up and down (30-60 MB) read evict-first (EVF): 25.4 -> 23.8
    and 14.6 -> 14.0 us (qkv and o: no gain); s13 False: without these two (bench row gemv16-s12). Session 16: qkv's
    and o's tiles with SUB (SUB_DEFAULT; s16 False: without it, bench row gemv16-s15). Session 19 (H100, two sweeps of
    25-29 configs, `--gemv16-configs`): qkv's 6144 columns as 32-column tiles over the whole K range in two steps of
    4 warps, x from registers, no split-K sum (7.3-7.5 -> 6.9-7.0 us), down with SUB (13.5-13.6 -> 13.2-13.3); NVFP4
    qkv two blocks per step (10.1-10.3 -> 9.4-9.5), gate_up 256 x 2 (35.2 -> 30.7), gate_up's and down's words
    evict-first; s19 False: session 18's tiles (bench row gemv16-s18). The interpreter (CPU tests) keeps small tiles."""
    if tuning.interpreting():
        return dict(BN=32, SPLIT_K=2, KU=2, num_warps=4)
    if not s13:
        return {k_: v for k_, v in _gemv16_default(n, k, fp4, pdl, 0, s16=False).items() if k_ != "EVF"}
    sub = dict(SUB=True) if SUB_DEFAULT and s16 else {}
    if pdl and not fp4 and k <= 4096 and sms // 2 <= cdiv(n, 32) <= sms:  # (fewer programs: unmeasured, kept as before)
        return dict(BN=32, SPLIT_K=1, KU=next_pow2(cdiv(k, 128)), num_warps=8, REGX=True, **sub)
    if pdl and not fp4 and s19 and sub and 256 <= k <= 4096 and sms < cdiv(n, 32) <= 2 * sms:  # qkv: two steps
        return dict(BN=32, SPLIT_K=1, KU=next_pow2(cdiv(k, 128)) // 2, num_warps=4, REGX=True, **sub)
    if pdl and not fp4 and n < 16384 and k < 8192:
        return dict(BN=256, SPLIT_K=8, KU=2, num_warps=4, **sub) if n > 4096 else dict(BN=128, SPLIT_K=8, KU=4, num_warps=4)
    if fp4:  # NVFP4: the CUDA-graph tuner's choices on an H100 (session 10: 1.78x -> 2.05x bf16 tuned), the block
        # scales packed (SPK; session 18, H100, bench rows gemv16 / gemv16-spk: 2.18x -> 2.32x; QTOOL_SPK=0 off)
        spk = dict(SPK=True) if SPK_DEFAULT else {}
        evf = dict(EVF=True) if s19 and spk else {}  # (gate_up 30.5 -> 29.8 us, down 15.9-16.0 -> 15.7-15.8)
        if n >= 16384:
            return dict(BN=256, SPLIT_K=2, KU=1, num_warps=4, **spk, **evf) if s19 and spk else dict(BN=512, SPLIT_K=4, KU=1, num_warps=4, **spk)
        if k < 8192 and n > 4096:
            return dict(BN=128, SPLIT_K=8, KU=2 if s19 and spk else 1, num_warps=4, **spk)
        return dict(BN=256, SPLIT_K=16, KU=1, num_warps=4, **spk, **(evf if k >= 8192 else {}))
    if n >= 16384:
        return dict(BN=512, SPLIT_K=8, KU=1, num_warps=4, EVF=True)
    if k >= 8192:  # session 8's CUDA-graph tuner, two H100s: 256 x 16, two blocks per step
        return dict(BN=256, SPLIT_K=16, KU=2, num_warps=4, EVF=True, **(sub if pdl and s19 else {}))
    return dict(BN=256, SPLIT_K=16, KU=1, num_warps=4)  # qkv and o (session 8: o took 256 x 16 on both)


def _dot4t_large_default(m: int) -> dict:
    """dot4t / dot4s above 16 rows: 128 x 128 tiles, two warp groups (gate_up at M=128, H100: 0.71-0.73x bf16)."""
    return dict(BM=128 if m > 64 else 64, BN=128, SPLIT_K=1, num_warps=8 if m > 64 else 4, num_stages=3)


def _tc_small_default(m: int, cfg: dict) -> dict:
    """cfg at 2 <= M <= 16 on a GPU; small tiles under the interpreter (CPU tests), the large-M tiles above 16."""
    if tuning.interpreting():
        return dict(BN=64, SPLIT_K=4, num_warps=4, num_stages=3)
    return _dot4t_large_default(m) if m > 16 else cfg


def _dot4t_default(n: int, k: int, m: int) -> dict:
    """Untuned dot4t / dot4 config at M <= 16: the fastest tiles of the M = 16 sweep on an H100 with the split-K sum
    as a dependent launch of 256 outputs per program (session 17, `bench/kernels.py --tc-configs`): 128 rows x split-K
    8 on one warp group for qkv, o and down, 256 x 2 for gate_up's 28672 rows."""
    cfg = dict(BN=256, SPLIT_K=2) if n >= 16384 else dict(BN=128, SPLIT_K=8)
    return _tc_small_default(m, dict(cfg, num_warps=4, num_stages=3))


def _dot4f_default(n: int, k: int, m: int) -> dict:
    """Untuned dot4f (NVFP4, M <= 16) config: the tuner's choice on an H100 (session 10): 32 rows x split-K 8 on
    two warps (mma.sync) for qkv, o and down, 64 x 4 for gate_up's 28672 rows."""
    cfg = dict(BN=64, SPLIT_K=4, num_warps=4) if n >= 16384 else dict(BN=32, SPLIT_K=8, num_warps=2)
    return _tc_small_default(m, dict(cfg, num_stages=3))


def _dot4s_default(n: int, k: int, m: int) -> dict:
    """Untuned dot4s config: the graph tuner's most frequent choice on an H100 at M = 1 and 16 (64 rows x split-K 8,
    one block per dot; 64 x 2 with two blocks per dot ran 0.87-1.15x untuned, session 8)."""
    if tuning.interpreting():
        return dict(BN=64, SPLIT_K=2, KB=2, num_warps=4, num_stages=3)
    if m > 16:
        return _dot4t_large_default(m)
    return dict(BN=64, SPLIT_K=8, KB=1, num_warps=4, num_stages=3)


def _default(path: str, n: int) -> dict:
    if path == "gemv":
        return dict(BN=64, SPLIT_K=4, KU=4, num_warps=4)
    if path == "small":
        return dict(BM=16, BN=64, SPLIT_K=2, num_warps=4)
    return dict(BM=64, BN=64, SPLIT_K=1, num_warps=4, num_stages=2)
