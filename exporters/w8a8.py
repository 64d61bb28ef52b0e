"""SGLang's native W8A8 layouts: `quant_method: w8a8_int8` and `w8a8_fp8`.

Per layer: `weight` int8 (w8a8_int8) or float8_e4m3fn (w8a8_fp8) [N, K], `weight_scale` float32 [N, 1]
(per output channel, symmetric); activations are quantized per token at run time (dynamic). The
config block is just {"quant_method": ...}: SGLang's W8A8Int8Config / W8A8Fp8Config read nothing
else and quantize every linear of the decoder, so a checkpoint that leaves one in full precision is
refused. vLLM has no such quant_method (use compressed-tensors there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtensor import ActQuant, QTensor
from qtensor.errors import QtoolError

from .base import ROUTER_RE, Checkpoint, Format, check_tensor, passthrough, register, require
from .fp8_block import unquantized_linears
from .io import TensorDir


class _W8A8(Format):
    method = ""
    dtype = ""  # QTensor numeric type
    torch_dtype = torch.int8

    def can_hold(self, name, qt):
        n, k = qt.shape
        want = "int8" if self.dtype == "int" else "fp8_e4m3"
        if qt.dtype != self.dtype or qt.bits != 8 or (self.dtype == "int" and not qt.sym):
            return f"{qt.dtype}{qt.bits}{'' if qt.sym else ' asym'} weights ({self.name} holds symmetric {want} weights)"
        if qt.group_size != -1 or qt.block is not None or tuple(qt.scales.shape) != (n, 1):
            return "scales that are not per output channel"
        if qt.scales.dtype != torch.float32:
            return f"{qt.scales.dtype} scales ({self.name} stores float32)"
        if qt.act.kind != "dynamic" or qt.act.dtype != want or qt.act.granularity != "token":
            return f"activations other than dynamic per-token {want}"
        if qt.pre_scale is not None or qt.act_order or qt.global_scale is not None:
            return "a pre_scale, act order or second-level scale"
        return None

    def encode(self, name, qt):
        return {f"{name}.weight": qt.codes, f"{name}.weight_scale": qt.scales}

    def quant_config(self, ckpt):
        # MoE routers are built without a quant config in SGLang (ReplicatedLinear(quant_config=None))
        skipped = [n for n in unquantized_linears(ckpt) if not ROUTER_RE.search(n)]
        if skipped:
            raise QtoolError(f"format {self.name} cannot hold this checkpoint: {skipped[0]} is unquantized (SGLang quantizes every decoder linear)")
        return {"quant_method": self.method}

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == self.method

    def decode(self, path: Path, config: dict) -> Checkpoint:
        td = TensorDir(path)
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        qts, claimed = {}, set()
        act_dtype = "int8" if self.dtype == "int" else "fp8_e4m3"
        for key in sorted(k for k in td if k.endswith(".weight_scale")):
            name = key[: -len(".weight_scale")]
            w = require(td, f"{name}.weight")
            check_tensor(f"{name}.weight", w, dtypes=(self.torch_dtype,))
            if w.dim() != 2:
                raise QtoolError(f"tensor {name}.weight is not 2-D")
            s = td[key]
            check_tensor(key, s, shape=[w.shape[0], 1], dtypes=(torch.float32,))
            qts[name] = QTensor(self.dtype, 8, w, s, None, -1, act=ActQuant("dynamic", act_dtype, "token"), orig_dtype=dtype)
            claimed |= {f"{name}.weight", key}
        if not qts:
            raise QtoolError(f"{path}: {self.method} config but no .weight_scale tensors")
        stray = [k for k in td if k.endswith(("input_scale", "weight_offset"))]
        if stray:
            raise QtoolError(f"tensor {stray[0]}: {self.method} has dynamic activations and symmetric weights")
        return Checkpoint(config, qts, passthrough(td, claimed), path)

    def engines(self, ckpt):
        return [("sglang", True, self.method), ("vllm", False, f"vLLM has no '{self.method}' quant_method (write compressed-tensors for vLLM)")]


@register
class W8A8Int8Format(_W8A8):
    name = "w8a8-int8"
    description = "SGLang w8a8_int8: int8 per-channel weights, dynamic per-token int8 activations"
    schemes = ("w8a8-int8",)
    method, dtype, torch_dtype = "w8a8_int8", "int", torch.int8


@register
class W8A8Fp8Format(_W8A8):
    name = "w8a8-fp8"
    description = "SGLang w8a8_fp8: fp8 per-channel weights, dynamic per-token fp8 activations"
    schemes = ("fp8-dynamic",)
    method, dtype, torch_dtype = "w8a8_fp8", "fp8_e4m3", torch.float8_e4m3fn
