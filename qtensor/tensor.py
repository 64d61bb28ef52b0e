"""The quantized-tensor representation: what algorithms produce, formats encode/decode and kernels consume."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import numerics as nm


@dataclass
class ActQuant:
    """How the layer's input activations are quantized at run time."""

    kind: str = "none"  # none | dynamic | static
    dtype: str = ""  # int8 | fp8_e4m3 | e2m1 | int4
    granularity: str = "token"  # token | tensor | group
    scale: torch.Tensor | None = None  # static scale (per tensor)
    offset: torch.Tensor | None = None  # static zero point (msModelSlim asymmetric int8)
    group_size: int = 0

    @property
    def bits(self) -> int:
        return {"int8": 8, "fp8_e4m3": 8, "e2m1": 4, "int4": 4}.get(self.dtype, 16)


@dataclass
class QTensor:
    """One quantized weight [N, K] (out_features, in_features).

    dtype      numeric type of the codes: "int", "fp8_e4m3", "e2m1" (NVFP4 / MXFP4), "mxfp8"
    bits       code width
    codes      [N, K] unpacked: int8 signed (symmetric int), uint8 (asymmetric int, e2m1 codes),
               float8_e4m3fn (fp8)
    scales     stored in their exact on-disk dtype (fp16, bf16, fp32, e4m3, e8m0 as uint8):
               [N, K/G] grouped, [N, 1] per channel, [1] per tensor, [ceil(N/bn), ceil(K/bk)] block
    zeros      uint8, same shape as scales, asymmetric int only
    group_size >0 group along K, -1 per channel, 0 per tensor
    block      (bn, bk) for 2-D block scales
    g_idx      int32 [K], group of each input channel (act order); None = k // group_size
    global_scale float32 scalar multiplied on top of the scales (NVFP4 level 2); for int weights the
               fp8 second level of W4A8 (ModelOpt W4A8_AWQ weight_scale_2): real = fp8(w_int / gs) * gs
    act        activation quantization
    pre_scale  float32 [K] or None: the layer computes W @ (x * pre_scale) (ModelOpt AWQ
               pre_quant_scale, where smoothing could not be folded into a preceding op)
    """

    dtype: str
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = -1
    block: tuple[int, int] | None = None
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    act: ActQuant = field(default_factory=ActQuant)
    orig_dtype: torch.dtype = torch.bfloat16
    pre_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @property
    def act_order(self) -> bool:
        """True when g_idx is not the plain k // G order (GPTQ desc_act)."""
        return self.g_idx is not None and bool((self.g_idx[1:] < self.g_idx[:-1]).any())

    def replace(self, **kw) -> "QTensor":
        return replace(self, **kw)

    def column_groups(self) -> torch.Tensor:
        k = self.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.group_size <= 0:
            return torch.zeros(k, dtype=torch.long)
        return torch.arange(k) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        if self.dtype == "int":
            w = nm.int_dequantize(self.codes, self.scales, self.zeros, self.group_size, self.g_idx)
            if self.global_scale is not None:  # W4A8 (ModelOpt W4A8_AWQ): int weight re-rounded to fp8
                w = nm.fp8_requantize(w, self.global_scale)
        else:
            if self.dtype == "fp8_e4m3":
                vals = self.codes.float()
            elif self.dtype == "e2m1":
                vals = nm.e2m1_values(self.codes)
            elif self.dtype == "mxfp8":
                vals = self.codes.float()
            else:
                raise ValueError(f"unknown numeric type {self.dtype}")
            s = nm.e8m0_to_float(self.scales) if self.scales.dtype == torch.uint8 else self.scales.float()
            if self.block is not None:
                s = nm.expand_blocks(s, n, k, self.block)
            else:
                s = nm.expand_to_columns(s, k, self.group_size, self.g_idx)
            w = vals * s
            if self.global_scale is not None:
                w = w * self.global_scale.float()
        return w.to(dtype)

    def equal(self, other: "QTensor") -> bool:
        """Bit-identical codes, scales, zeros, layout and activation scheme."""

        def same(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a, b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1 else b)

        return (
            self.dtype == other.dtype
            and self.bits == other.bits
            and same(self.codes, other.codes)
            and same(self.scales, other.scales)
            and same(self.zeros, other.zeros)
            and self.group_size == other.group_size
            and self.block == other.block
            and same(self.global_scale, other.global_scale)
            and torch.equal(self.column_groups(), other.column_groups())
            and self.act.kind == other.act.kind
            and self.act.dtype == other.act.dtype
            and same(self.act.scale, other.act.scale)
            and same(self.act.offset, other.act.offset)
            and same(self.pre_scale, other.pre_scale)
        )

    def nbytes(self) -> int:
        """Bytes on disk for codes + scales + zeros (codes at their bit width)."""
        n, k = self.shape
        b = n * k * self.bits // 8 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            b += self.zeros.numel() * self.bits // 8
        return b
