"""The scheme registry: one entry per scheme name; the CLI's choices come from here."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QtoolError


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_dtype: str  # int | fp8_e4m3 | e2m1 | mxfp8
    weight_bits: int
    group_size: int  # default: >0 group, -1 per channel, 0 per tensor
    sym: bool = True
    block: tuple[int, int] | None = None
    act_kind: str = "none"  # none | dynamic | static
    act_dtype: str = ""
    act_granularity: str = "token"
    description: str = ""

    @property
    def calibrated_acts(self) -> bool:
        """Activation ranges measured on the calibration samples: static scales, and NVFP4's global input scale."""
        return self.act_kind == "static" or self.act_dtype == "e2m1"


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("w4a16", "int", 4, 128, description="int4 weights, grouped, 16-bit activations"),
        Scheme("w8a16", "int", 8, 128, description="int8 weights, grouped, 16-bit activations"),
        Scheme("w8a8-int8", "int", 8, -1, act_kind="dynamic", act_dtype="int8", description="int8 per-channel weights, int8 per-token dynamic activations"),
        Scheme("w8a8-int8-static", "int", 8, -1, act_kind="static", act_dtype="int8", act_granularity="tensor", description="int8 weights, int8 static per-tensor activations"),
        Scheme("w4a4", "int", 4, -1, act_kind="dynamic", act_dtype="int4", description="int4 weights and dynamic int4 activations"),
        Scheme("w4a8", "int", 4, 128, act_kind="dynamic", act_dtype="fp8_e4m3", description="int4 grouped weights, fp8 activations"),
        Scheme("w4a8-int8", "int", 4, -1, act_kind="dynamic", act_dtype="int8", description="int4 per-channel weights, int8 per-token dynamic activations (msModelSlim W4A8_DYNAMIC, MoE experts)"),
        Scheme("fp8", "fp8_e4m3", 8, 0, act_kind="static", act_dtype="fp8_e4m3", act_granularity="tensor", description="fp8 per-tensor weights, static per-tensor fp8 activations"),
        Scheme("fp8-dynamic", "fp8_e4m3", 8, -1, act_kind="dynamic", act_dtype="fp8_e4m3", description="fp8 per-channel weights, dynamic per-token fp8 activations"),
        Scheme("fp8-block", "fp8_e4m3", 8, 128, block=(128, 128), act_kind="dynamic", act_dtype="fp8_e4m3", act_granularity="group", description="fp8 128x128 block weights, dynamic per-token-group activations"),
        Scheme("nvfp4", "e2m1", 4, 16, act_kind="dynamic", act_dtype="e2m1", act_granularity="group", description="NVFP4: e2m1 weights and activations, e4m3 scales per 16, fp32 global scale"),
        Scheme("mxfp4", "e2m1", 4, 32, description="MXFP4: e2m1 weights, e8m0 scales per 32"),
        Scheme("mxfp8", "mxfp8", 8, 32, description="MXFP8: e4m3 weights, e8m0 scales per 32"),
    ]
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise QtoolError(f"unknown scheme '{name}' (choose from: {', '.join(SCHEMES)})")
    return SCHEMES[name]


@dataclass(frozen=True)
class WeightSpec:
    """What one weight quantization produces; the algorithms take this, not CLI flags."""

    dtype: str
    bits: int
    group_size: int
    sym: bool
    block: tuple[int, int] | None
    scale_dtype: "object"  # torch dtype of the stored scales

    @staticmethod
    def of(scheme: Scheme, group_size: int | None = None, sym: bool | None = None) -> "WeightSpec":
        import torch

        gs = scheme.group_size if group_size is None else group_size
        if scheme.weight_dtype == "int":
            if scheme.act_kind != "none":
                scale_dtype = torch.float32  # w8a8, w4a4, w4a8: float32 scales (SGLang/Ascend W8A8, msModelSlim, ModelOpt W4A8)
            else:
                scale_dtype = torch.float16  # weight-only int: fp16 scales (GPTQ, AWQ, AutoRound)
        elif scheme.weight_dtype == "e2m1" and scheme.name == "nvfp4":
            scale_dtype = torch.float8_e4m3fn
        elif scheme.weight_dtype in ("e2m1", "mxfp8"):
            scale_dtype = torch.uint8  # e8m0
        else:
            scale_dtype = torch.float32
        if gs is not None and gs not in (-1, 0) and gs < 1:
            raise QtoolError(f"invalid group size {gs}")
        return WeightSpec(scheme.weight_dtype, scheme.weight_bits, gs, scheme.sym if sym is None else sym, scheme.block, scale_dtype)
