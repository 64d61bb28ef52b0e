"""Scale math and rounding for every numeric type, in exactly one place.

int:   real = scale * (code - zero); symmetric codes are signed in [-2^(b-1), 2^(b-1)-1] with no zero.
fp8:   real = float(e4m3 code) * scale.
e2m1:  real = E2M1[code] * block_scale(e4m3) * global_scale (NVFP4), or * 2^(e8m0 - 127) (MXFP4).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_E2M1_POS = E2M1_VALUES[:8]


def int_range(bits: int, sym: bool) -> tuple[int, int]:
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def groups_of(k: int, group_size: int) -> int:
    return 1 if group_size <= 0 else (k + group_size - 1) // group_size


def expand_to_columns(s: torch.Tensor, k: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group tensor [N, n_groups] (or [N, 1], [1]) -> per-element [N, K] (broadcastable)."""
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(1, 1)
    if s.shape[-1] == 1:
        return s
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
    return s[:, g_idx.long()]


def expand_blocks(s: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    return s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if group_size <= 0:
        return w.reshape(n, 1, k)
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
    return w.reshape(n, k // group_size, group_size)


def int_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    clip: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [N, G] in `scale_dtype` and zero points (uint8, asym only) from a weight [N, K].

    Symmetric uses GPTQ's convention scale = 2*absmax / (2^b - 1); asymmetric min/max with an
    integer zero point. `clip` shrinks the range (a scalar or [N, G] tensor, for clipping searches).
    """
    g = _group_view(w.float(), group_size)
    if sym:
        return int_qparams_from_range(bits, sym, scale_dtype, amax=g.abs().amax(-1) * clip)
    return int_qparams_from_range(bits, sym, scale_dtype, mn=g.amin(-1).clamp(max=0) * clip, mx=g.amax(-1).clamp(min=0) * clip)


def int_qparams_from_range(bits: int, sym: bool, scale_dtype: torch.dtype, amax=None, mn=None, mx=None):
    """int_qparams from group ranges already taken: amax (symmetric) or mn <= 0 <= mx (asymmetric)."""
    lo, hi = int_range(bits, sym)
    scale = 2 * amax / (hi - lo) if sym else (mx - mn) / (hi - lo)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # underflow in fp16
    if sym:
        return scale, None
    zero = torch.round(-mn / scale.float()).clamp(lo, hi).to(torch.uint8)
    return scale, zero


def int_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes for w [N, K] given per-group scales: int8 signed (sym) or uint8 (asym)."""
    k = w.shape[1]
    s = expand_to_columns(scale.float(), k, group_size, g_idx)
    sym = zero is None
    lo, hi = int_range(bits, sym)
    q = torch.round(w.float() / s)
    if not sym:
        q = q + expand_to_columns(zero.float(), k, group_size, g_idx)
    q = q.clamp(lo, hi)
    return q.to(torch.int8 if sym else torch.uint8)


def int_dequantize(codes, scale, zero, group_size, g_idx=None) -> torch.Tensor:
    n, k = codes.shape
    if g_idx is None and group_size > 0 and k % group_size == 0 and scale.shape == (n, k // group_size):
        # contiguous groups: broadcast over a [N, groups, G] view instead of gathering [N, K] scales
        q = codes.to(torch.float32, copy=True).reshape(n, k // group_size, group_size)
        if zero is not None:
            q = q.sub_(zero.float().unsqueeze(-1))
        return q.mul_(scale.float().unsqueeze(-1)).reshape(n, k)
    q = codes.float()
    if zero is not None:
        q = q - expand_to_columns(zero.float(), k, group_size, g_idx)
    return q * expand_to_columns(scale.float(), k, group_size, g_idx)


# ---- FP8 (E4M3) ----------------------------------------------------------------------------------


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_requantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(w / scale) * scale: a weight already on another grid rounded onto e4m3 (W4A8's second level)."""
    s = scale.float()
    return fp8_quantize(w, s).float() * s


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    s = amax.float() / FP8_MAX
    return torch.where(s > 0, s, torch.ones_like(s))


def block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, k = w.shape
    bn, bk = block
    pn, pk = (-n) % bn, (-k) % bk
    wp = torch.nn.functional.pad(w.float().abs(), (0, pk, 0, pn))
    return wp.reshape((n + pn) // bn, bn, (k + pk) // bk, bk).amax(dim=(1, 3))


# ---- E2M1 (FP4) with E4M3 block scales (NVFP4) or E8M0 scales (MX) -------------------------------


def e2m1_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| rounded to the nearest E2M1 magnitude {0, .5, 1, 1.5, 2, 3, 4, 6} (saturating), ties to the even
    code: on each binade the grid is uniform (steps .5, 1, 2), so torch.round (half to even) on the
    scaled value lands on the even code at every midpoint, 1.75 -> 2 and 3.5 -> 4 included."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    return torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))


def e2m1_fake(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto the signed E2M1 grid (= e2m1_values(e2m1_round(x)), without the codes)."""
    return torch.copysign(e2m1_magnitude(x), x.float())


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even code), returning 4-bit codes (uint8)."""
    v = e2m1_magnitude(x)
    idx = torch.where(v < 2, v * 2, torch.where(v < 4, v + 2, v * 0.5 + 4)).to(torch.uint8)
    return idx + ((x < 0) & (idx > 0)).to(torch.uint8) * 8


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


# ---- scales from calibrated amax, as NVIDIA ModelOpt / TensorRT-LLM compute them -------------------


def int_scale_from_amax(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric int scale with absmax mapped to 2^(b-1)-1 (ModelOpt INT4 AWQ: amax/7, INT8: amax/127)."""
    s = amax.float() / ((1 << (bits - 1)) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def int_act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8, sym: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static per-tensor int activation (scale [1], offset [1] or None) from a calibrated range [lo, hi].

    sym:  scale = max(|lo|, |hi|) / (2^(b-1) - 1), no offset (qtool's absmax convention).
    asym: msModelSlim's linear_quantization_params (signed codes): the range is widened to hold 0,
          scale = max((hi - lo) / (2^b - 1), float32 eps), offset = round(-lo / scale) - 2^(b-1),
          in float32; the layer computes x_q = clamp(round(x / scale) + offset, -2^(b-1), 2^(b-1) - 1).
          An offset of exactly 0 is returned as None (as the msmodelslim reader gives it back).
    """
    lo, hi = lo.float().reshape(1), hi.float().reshape(1)
    if sym:
        a = torch.maximum(-lo, hi)
        return (a / ((1 << (bits - 1)) - 1)).clamp(min=1e-12), None
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.maximum((hi - lo) / ((1 << bits) - 1), torch.tensor(torch.finfo(torch.float32).eps))
    offset = (-1 * lo / scale).round() - (1 << (bits - 1))
    return scale, (None if float(offset) == 0 else offset)


def nvfp4_scales_from_amax(w: torch.Tensor, amax: torch.Tensor, block: int = 16):
    """ModelOpt's NVFP4 weight scales from the calibrated per-tensor amax: global = amax/(6*448) (float32
    scalar), block = block_amax/(6*global) with 0 -> 1, clamped to [2^-9, 448], cast to e4m3."""
    n, k = w.shape
    gs = amax.float().reshape(()) / (E2M1_MAX * FP8_MAX)
    bamax = w.float().abs().reshape(n, k // block, block).amax(-1)
    bs = bamax / (E2M1_MAX * gs)
    bs = torch.where(bs == 0, torch.ones_like(bs), bs)
    return bs.clamp(min=2.0**-9, max=FP8_MAX).to(torch.float8_e4m3fn), gs


def e8m0_scales_ceil(w: torch.Tensor, block: int, elem_max: float) -> torch.Tensor:
    """MX shared exponents as ModelOpt computes them: 2^ceil(log2(block_amax / elem_max)) (uint8, bias 127),
    so no element exceeds elem_max (448 for MXFP8, 6 for MXFP4); all-zero blocks get 2^-127."""
    n, k = w.shape
    d = w.float().abs().reshape(n, k // block, block).amax(-1) / elem_max
    e = torch.ceil(torch.where(d > 0, torch.log2(d), torch.full_like(d, -127.0)))
    return (e.clamp(-127, 127) + 127).to(torch.uint8)


def e2m1_round_half_down(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes with ties toward zero (ModelOpt's MXFP4 cast: a value on a midpoint takes the smaller
    magnitude); no clamp, the caller's scale keeps |x| <= 6."""
    mids = ((_E2M1_POS[1:] + _E2M1_POS[:-1]) / 2).to(x.device)
    idx = (x.abs().unsqueeze(-1) > mids).sum(-1)
    return (idx + (x < 0).to(idx.dtype) * 8 * (idx > 0)).to(torch.uint8)


def nvfp4_qparams(w: torch.Tensor, block: int = 16, amax: torch.Tensor | None = None, snap: bool = False):
    """(block scales e4m3 [N, K/block], global scale float32 scalar) with real = e2m1*bs*gs. snap: the
    global scale moved to the nearest float32 whose reciprocal round-trips (compressed-tensors stores
    1/gs), before the block scales are derived from it."""
    n, k = w.shape
    amax = w.float().abs().amax() if amax is None else amax.float()
    gs = (amax / (E2M1_MAX * FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny).reshape(())
    if snap:
        gs = f32_reciprocal_snap(gs)
    bamax = w.float().abs().reshape(n, k // block, block).amax(-1)
    bs = (bamax / E2M1_MAX / gs).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    return bs, gs


def nvfp4_quantize(w: torch.Tensor, bs: torch.Tensor, gs: torch.Tensor, block: int = 16) -> torch.Tensor:
    n, k = w.shape
    s = bs.float() * gs.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return e2m1_round(w.float().reshape(n, k // block, block) / s[..., None]).reshape(n, k)


def e8m0_scales(w: torch.Tensor, block: int, elem_emax: int) -> torch.Tensor:
    """MX shared exponents (uint8, bias 127): 2^(floor(log2(amax)) - elem_emax)."""
    n, k = w.shape
    amax = w.float().abs().reshape(n, k // block, block).amax(-1)
    e = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - elem_emax
    return (e.clamp(-127, 127) + 127).to(torch.uint8)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    return torch.exp2(e.float() - 127)


def f32_reciprocal(x: torch.Tensor) -> torch.Tensor | None:
    """1/x in float32 when that maps back to x exactly (compressed-tensors stores NVFP4 global scales
    as 1/scale); None when x is not the float32 reciprocal of any float32 (~16% of values)."""
    x = x.float()
    y = 1.0 / x
    return y if bool(torch.isfinite(y).all()) and torch.equal(1.0 / y, x) else None


def f32_reciprocal_snap(x: torch.Tensor) -> torch.Tensor:
    """The float32 nearest x that f32_reciprocal accepts (1/(1/x)): pick global scales this way when
    the checkpoint is meant for compressed-tensors."""
    return 1.0 / (1.0 / x.float())


# ---- products stored instead of factors (msModelSlim deq_scale = input_scale * weight_scale) -----


def recover_factor(prod: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """The float32 s with fp32(a * s) == prod bit for bit, for every element (nearest to prod / a
    first, then its two neighbours), or None when some element has no such s."""
    prod, a = prod.float(), a.float()
    c = prod / a
    out = torch.full_like(c, float("nan"))
    for cand in (c, torch.nextafter(c, torch.zeros_like(c)), torch.nextafter(c, torch.full_like(c, float("inf")))):
        hit = torch.isnan(out) & ((a * cand) == prod)
        out = torch.where(hit, cand, out)
    return None if bool(torch.isnan(out).any()) else out
