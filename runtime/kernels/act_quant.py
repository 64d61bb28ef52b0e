"""Fused activation quantizers (one pass over x per row): per-token / per-token-group int8 and fp8,
static per-tensor (with msModelSlim's asymmetric int8 offset), and NVFP4 quantize-dequantize.

Arithmetic matches runtime.qlinear.fake_quant_act: scale = amax / qmax (clamped at 1e-12), codes =
round-half-even(x / scale) for int, the e4m3 conversion's rounding for fp8. On the GPU x is multiplied by
1 / scale instead of divided (as vLLM's quantizers do), which can move a code at an exact rounding tie."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qtensor import numerics as nm

from . import tuning
from .launch import cdiv, launch, next_pow2

_LAUNCHES: dict = {}  # compiled quantizers relaunched directly, by call key


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _e4m3_round(v):
    """Round fp32 (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic: exact on
    the GPU and under the interpreter (whose float8 conversion rounds wrongly)."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, -6) - 3  # quantum exponent: 3 mantissa bits, subnormals below 2^-6
    quantum = ((e + 127) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(a / quantum) * quantum
    return tl.where(v < 0, -r, r)


@triton.jit
def _x_load(ptrs, mask, HINTS: tl.constexpr):
    if HINTS:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quant_store(x, s, inv, q_ptrs, mask, off_ptr, IS_INT: tl.constexpr, HAS_OFF: tl.constexpr, QMAX: tl.constexpr,
                 NATIVE: tl.constexpr, HINTS: tl.constexpr):
    if NATIVE:  # on the GPU x times 1/s, as vLLM's quantizers (a correctly rounded division costs about
        v = x * inv  # twenty instructions per element: the bound for long rows); codes can differ from x / s at exact ties
    else:
        v = tl.div_rn(x, s)
    if IS_INT:
        v = _round_half_even(v)
        if HAS_OFF:
            v = v + tl.load(off_ptr).to(tl.float32)
        q = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX).to(tl.int8)
    else:
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if NATIVE:  # the GPU's conversion (round to nearest even, as _e4m3_round)
            q = v.to(q_ptrs.dtype.element_ty)
        else:
            q = _e4m3_round(v).to(q_ptrs.dtype.element_ty)
    if HINTS:
        tl.store(q_ptrs, q, mask=mask, eviction_policy="evict_last")
    else:
        tl.store(q_ptrs, q, mask=mask)


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, sstat_ptr, off_ptr, K, stride_xm, stride_qm, n_groups,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, IS_INT: tl.constexpr, STATIC: tl.constexpr,
    HAS_OFF: tl.constexpr, QMAX: tl.constexpr, NATIVE: tl.constexpr, HINTS: tl.constexpr = False,
):
    """One (row, group) per program. A group of at most BLOCK channels is read once; a wider one (per token with
    K > BLOCK, 16384 by default: one pass at 16 warps measured faster than 4096-wide chunks read twice) is read
    twice: once for its amax, once to quantize (the second read mostly from L2). HINTS: x read evict-first and the
    codes written evict-last, so that the GEMM after reads them from L2 and their write-back can wait."""
    row = tl.program_id(0)
    grp = tl.program_id(1)
    g0 = grp * GROUP
    if STATIC:
        s = tl.load(sstat_ptr).to(tl.float32)
    if GROUP <= BLOCK:
        offs = g0 + tl.arange(0, BLOCK)
        mask = (tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = _x_load(x_ptr + row * stride_xm + offs, mask, HINTS)
        if not STATIC:
            s = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), QMAX), 1e-12)
            tl.store(s_ptr + row * n_groups + grp, s)
        _quant_store(x, s, tl.div_rn(1.0, s), q_ptr + row * stride_qm + offs, mask, off_ptr, IS_INT, HAS_OFF, QMAX, NATIVE, HINTS)
    else:
        if not STATIC:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for c in tl.static_range(0, GROUP, BLOCK):
                offs = g0 + c + tl.arange(0, BLOCK)
                mask = (c + tl.arange(0, BLOCK) < GROUP) & (offs < K)
                amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)))
            s = tl.maximum(tl.div_rn(tl.max(amax, axis=0), QMAX), 1e-12)
            tl.store(s_ptr + row * n_groups + grp, s)
        inv = tl.div_rn(1.0, s)
        for c in tl.static_range(0, GROUP, BLOCK):
            offs = g0 + c + tl.arange(0, BLOCK)
            mask = (c + tl.arange(0, BLOCK) < GROUP) & (offs < K)
            x = _x_load(x_ptr + row * stride_xm + offs, mask, HINTS)
            _quant_store(x, s, inv, q_ptr + row * stride_qm + offs, mask, off_ptr, IS_INT, HAS_OFF, QMAX, NATIVE, HINTS)


# cache hints in the quantizer: session 13, H100, M=4096: the quantizer 17.8 -> 15.0 us (o), 17.9 -> 14.7 (qkv), FP8
# row-wise with it 1.64 -> 1.68x bf16 (down's 59 MB of codes do not stay in L2: no gain there). QTOOL_CACHE_HINTS=0: off
HINTS = os.environ.get("QTOOL_CACHE_HINTS", "1") != "0"
# ... but only where the codes fit in L2 beside the GEMM's own traffic: session 16, H100, FP8 row-wise at M=4096,
# down (59 MB of codes) 418 us with the hints against 387 without (qkv / o with them 161 / 117 against 163 / 120)
HINT_CODES_MAX = 32 << 20


def hints_for(m: int, k: int) -> bool:
    """The default HINTS for an [m, k] quantization: on (HINTS) where its one-byte codes are at most HINT_CODES_MAX."""
    return HINTS and m * k <= HINT_CODES_MAX


def quantize(x2: torch.Tensor, dtype: str, group: int = 0, static_scale: torch.Tensor | None = None,
             offset: torch.Tensor | None = None, block: int = 16384, hints: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (codes [M, K] int8 / float8_e4m3fn, scales fp32 [M, K/group] or [M, 1]; the static scale
    as given when static). group 0 = one scale per token. hints: the kernel's HINTS (default: hints_for)."""
    m, k = x2.shape
    hints = hints_for(m, k) if hints is None else hints
    is_int = dtype == "int8"
    q = torch.empty((m, k), dtype=torch.int8 if is_int else torch.float8_e4m3fn, device=x2.device)
    gsz = group if group > 0 else k
    ng = cdiv(k, gsz)
    static = static_scale is not None
    s = torch.empty((m, ng), dtype=torch.float32, device=x2.device) if not static else static_scale.float().reshape(1)
    block = min(next_pow2(gsz), block)
    off = offset.reshape(1) if offset is not None else s
    args = (x2, q, s, s, off, k, x2.stride(0), q.stride(0), ng)
    # the compiled kernel: the constexprs, the dtypes, the ints' value classes and the pointers' alignment (launch.py)
    key = (x2.dtype, q.dtype, off.dtype, k, x2.stride(0), ng, gsz, block, static, offset is not None,
           x2.data_ptr() % 16, s.data_ptr() % 16, off.data_ptr() % 16, hints)
    launch(_LAUNCHES, key, _act_quant_kernel, (m, ng), args,
           dict(GROUP=gsz, BLOCK=block, IS_INT=is_int, STATIC=static, HAS_OFF=offset is not None,
                QMAX=127.0 if is_int else nm.FP8_MAX, NATIVE=x2.is_cuda and not tuning.interpreting(), HINTS=hints,
                num_warps=min(16, max(4, block // 512))))
    return q, s


@triton.jit
def _e2m1_round_abs(a):
    a = tl.minimum(a, 6.0)
    return tl.where(a <= 0.25, 0.0, tl.where(a < 0.75, 0.5, tl.where(a <= 1.25, 1.0, tl.where(a < 1.75, 1.5,
           tl.where(a <= 2.5, 2.0, tl.where(a < 3.5, 3.0, tl.where(a <= 5.0, 4.0, 6.0)))))))


@triton.jit
def _nvfp4_fake_kernel(x_ptr, y_ptr, gs_ptr, K, stride_xm, stride_ym, BLOCK: tl.constexpr):
    """NVFP4 activation quantize-dequantize: e4m3 scale per 16 under the global scale, e2m1 values."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr)
    xg = tl.reshape(x, (BLOCK // 16, 16))
    bamax = tl.max(tl.abs(xg), axis=1)
    bs = tl.minimum(tl.div_rn(tl.div_rn(bamax, 6.0), gs), 448.0)
    bs = _e4m3_round(bs)
    sc = bs * gs
    sc = tl.where(sc > 0, sc, 1.0)
    v = tl.div_rn(xg, sc[:, None])
    r = _e2m1_round_abs(tl.abs(v))
    r = tl.where(v < 0, -r, r)
    y = tl.reshape(r * sc[:, None], (BLOCK,))
    tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=offs < K)


def nvfp4_fake_quant(x2: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """As fake_quant_act for NVFP4 activations (global amax from act.scale when static, else from x)."""
    m, k = x2.shape
    amax = scale.float() * nm.E2M1_MAX * nm.FP8_MAX if scale is not None else x2.abs().amax().float()
    gs = (amax / (nm.E2M1_MAX * nm.FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    y = torch.empty_like(x2)
    block = 256
    _nvfp4_fake_kernel[(m, triton.cdiv(k, block))](x2, y, gs, k, x2.stride(0), y.stride(0), BLOCK=block, num_warps=4)
    return y
