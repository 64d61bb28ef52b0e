"""Quantized linear modules with the serving engines' arithmetic (reference torch kernels).

The weight is kept packed (int codes in int32 words, fp8 as bytes, e2m1 two per byte) and is
unpacked and dequantized per call, so no full-precision copy of the model is ever resident.
Activations are quantized as the scheme says (dynamic per token, static per tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from qtensor import ActQuant, QTensor
from qtensor import numerics as nm
from qtensor import packing as pk


def fake_quant_act(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Quantize-dequantize activations the way the engine's W8A8/FP8/FP4 kernels see them."""
    if act.kind == "none":
        return x
    xf = x.float()
    if act.dtype in ("int8", "int4"):
        qmax = 127.0 if act.dtype == "int8" else 7.0
        if act.kind == "static":
            s, off = act.scale.float(), (act.offset.float() if act.offset is not None else 0.0)
            q = torch.clamp(torch.round(xf / s) + off, -qmax - 1, qmax)
            return ((q - off) * s).to(x.dtype)
        s = (xf.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
        return (torch.clamp(torch.round(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    if act.dtype == "fp8_e4m3":
        if act.kind == "static":
            s = act.scale.float()
        elif act.granularity == "group":  # block-FP8: per token per 128 channels
            k = xf.shape[-1]
            g = xf.reshape(*xf.shape[:-1], k // 128, 128)
            s = (g.abs().amax(-1, keepdim=True) / nm.FP8_MAX).clamp(min=1e-12)
            return (nm.fp8_quantize(g, s).float() * s).reshape(x.shape).to(x.dtype)
        else:
            s = (xf.abs().amax(-1, keepdim=True) / nm.FP8_MAX).clamp(min=1e-12)
        return (nm.fp8_quantize(xf, s).float() * s).to(x.dtype)
    if act.dtype == "e2m1":  # NVFP4 activations: per-16 e4m3 scales under a global scale
        k = xf.shape[-1]
        flat = xf.reshape(-1, k)
        gs_amax = act.scale.float() * nm.E2M1_MAX * nm.FP8_MAX if act.scale is not None else None
        bs, gs = nm.nvfp4_qparams(flat, 16, gs_amax)
        s = bs.float() * gs  # = nvfp4_quantize's codes looked up and rescaled, without materializing codes
        deq = nm.e2m1_fake(flat.reshape(-1, k // 16, 16) / torch.where(s > 0, s, torch.ones_like(s))[..., None]) * s[..., None]
        return deq.reshape(x.shape).to(x.dtype)
    raise ValueError(f"unsupported activation type {act.dtype}")


class QuantLinear(nn.Module):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = qt.shape
        self.in_features, self.out_features = k, n
        self.meta = qt.replace(codes=torch.empty(0))  # every field but the codes
        self.bits = qt.bits
        self.packed = False
        codes = qt.codes
        if qt.dtype == "int" and k % 32 == 0:
            u = pk.signed_to_offset(codes, qt.bits) if qt.sym else codes
            codes = pk.pack_int32(u, qt.bits, dim=1)
            self.packed = True
        elif qt.dtype == "e2m1":
            codes = pk.pack_nibbles_uint8(codes, dim=1)
            self.packed = True
        self.register_buffer("codes", codes)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def qtensor(self) -> QTensor:
        c = self.codes
        if self.packed and self.meta.dtype == "int":
            c = pk.unpack_int32(c, self.bits, dim=1)
            c = pk.offset_to_signed(c, self.bits) if self.meta.sym else c
        elif self.packed:
            c = pk.unpack_nibbles_uint8(c, dim=1)
        return self.meta.replace(codes=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.meta.pre_scale is not None:
            x = x * self.meta.pre_scale.to(x.device, x.dtype)
        if x.is_cuda:  # Triton / _scaled_mm kernels when one covers this layout
            from runtime import kernels

            y = kernels.linear(self, x)
            if y is not None:
                return y
        x = fake_quant_act(x, self.meta.act)
        w = self.qtensor().dequantize(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        m = self.meta
        return f"{self.in_features}->{self.out_features}, {m.dtype}{m.bits}, group={m.group_size}, act={m.act.kind}"
