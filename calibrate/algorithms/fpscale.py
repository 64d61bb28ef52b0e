"""Scale search for the block-scaled float formats: NVFP4 (E4M3 block scales) and MX (E8M0 exponents).

Round-to-nearest takes each block's scale from its absmax. Because the scale itself is rounded
(E4M3 has 3 mantissa bits; E8M0 is a power of two), the absmax scale can clip the block's largest
value or waste range. The search tries a few candidate scales per block and keeps, block by block,
the one with the smallest squared rounding error; the absmax scale is one of the candidates, so
the result is never worse than round-to-nearest. All scale math goes through qtensor.numerics.
"""

from __future__ import annotations

import torch

from qtensor import QTensor
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from .rtn import quantize_weight

NVFP4_RATIOS = tuple(round(0.75 + 0.025 * i, 3) for i in range(21))  # 0.75 .. 1.25 of the block absmax


def _block_err(w: torch.Tensor, qt: QTensor, block: int) -> torch.Tensor:
    n, k = w.shape
    return (qt.dequantize() - w).reshape(n, k // block, block).pow(2).sum(-1)


def nvfp4_search(w: torch.Tensor, block: int = 16, ratios=NVFP4_RATIOS, amax: torch.Tensor | None = None) -> QTensor:
    """NVFP4 with each block's E4M3 scale chosen among absmax x ratio (global scale from `amax`: the
    tensor's, or that of the fused group the tensor belongs to)."""
    w = w.float()
    amax = w.abs().amax() if amax is None else amax.float()
    bs, gs = nm.nvfp4_qparams(w, block, amax=amax, snap=True)
    best = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, block), bs, None, block, global_scale=gs)
    best_err = _block_err(w, best, block)
    for r in ratios:
        if r == 1.0:
            continue
        cbs, _ = nm.nvfp4_qparams(w * r, block, amax=amax, snap=True)  # the block scales of absmax * r, same global scale
        cand = QTensor("e2m1", 4, nm.nvfp4_quantize(w, cbs, gs, block), cbs, None, block, global_scale=gs)
        err = _block_err(w, cand, block)
        better = err < best_err
        if better.any():
            best_err = torch.where(better, err, best_err)
            bs = torch.where(better, cbs.float(), bs.float()).to(torch.float8_e4m3fn)
            best = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, block), bs, None, block, global_scale=gs)
    return best


def _mx(w: torch.Tensor, e: torch.Tensor, spec: WeightSpec) -> QTensor:
    s = nm.expand_to_columns(nm.e8m0_to_float(e), w.shape[1], spec.group_size)
    codes = nm.e2m1_round(w / s) if spec.dtype == "e2m1" else nm.fp8_quantize(w, s)
    return QTensor(spec.dtype, spec.bits, codes, e, None, spec.group_size)


def mx_search(w: torch.Tensor, spec: WeightSpec, steps=(-1, 1)) -> QTensor:
    """MXFP4/MXFP8 with each block's shared exponent chosen among the OCP one and its neighbours."""
    w = w.float()
    emax = 2 if spec.dtype == "e2m1" else 8
    e0 = nm.e8m0_scales(w, spec.group_size, emax)
    e = e0
    best_err = _block_err(w, _mx(w, e0, spec), spec.group_size)
    for d in steps:
        ce = (e0.to(torch.int16) + d).clamp(0, 254).to(torch.uint8)
        err = _block_err(w, _mx(w, ce, spec), spec.group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        e = torch.where(better, ce, e)
    return _mx(w, e, spec)


def quantize_nvfp4(weight, spec, stats, scale_search: bool = True, **_):
    if spec.dtype != "e2m1" or spec.scale_dtype != torch.float8_e4m3fn:
        raise QtoolError("method nvfp4 makes the nvfp4 scheme (use method mx for mxfp4/mxfp8)")
    if not scale_search:
        return quantize_weight(weight, spec), ""
    return nvfp4_search(weight, spec.group_size), ""


def quantize_nvfp4_group(weights, spec, stats, scale_search: bool = True, **_):
    """The linears of one shared-input group (q/k/v, gate/up), which engines fuse into one tensor with one
    global scale: the global scale comes from the group's largest |w| (as ModelOpt's export and LLM
    Compressor set it), block scales per linear."""
    if spec.dtype != "e2m1" or spec.scale_dtype != torch.float8_e4m3fn:
        raise QtoolError("method nvfp4 makes the nvfp4 scheme (use method mx for mxfp4/mxfp8)")
    amax = torch.stack([w.float().abs().amax() for w in weights]).amax()
    out = []
    for w in weights:
        if scale_search:
            out.append((nvfp4_search(w, spec.group_size, amax=amax), ""))
        else:
            bs, gs = nm.nvfp4_qparams(w.float(), spec.group_size, amax=amax, snap=True)
            out.append((QTensor("e2m1", 4, nm.nvfp4_quantize(w.float(), bs, gs, spec.group_size), bs, None, spec.group_size, global_scale=gs), ""))
    return out


def quantize_mx(weight, spec, stats, scale_search: bool = True, **_):
    if spec.dtype not in ("e2m1", "mxfp8") or spec.scale_dtype != torch.uint8:
        raise QtoolError("method mx makes the mxfp4 and mxfp8 schemes (use method nvfp4 for nvfp4)")
    if not scale_search:
        return quantize_weight(weight, spec), ""
    return mx_search(weight, spec), ""
