"""Block FP8 (`quant_method: fp8`, DeepSeek-V3 style), loaded natively by vLLM and SGLang.

config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
"ignored_layers": [...] (only when a decoder linear is left unquantized)}. Per layer: `weight` float8_e4m3fn
[N, K] and `weight_scale_inv` float32 [ceil(N/128), ceil(K/128)]; despite its name the scale multiplies:
W = q * weight_scale_inv per 128x128 block. Activations: dynamic fp8 per token per 128 channels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtensor import ActQuant, QTensor
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, check_tensor, passthrough, register, require
from .io import TensorDir

BLOCK = (128, 128)


def unquantized_linears(ckpt: Checkpoint) -> list[str]:
    """Decoder linears (2-D `.weight` under `.layers.`) the checkpoint leaves in full precision."""
    out = []
    for k in ckpt.tensors:
        if k.endswith(".weight") and ".layers." in k and "norm" not in k and k[:-7] not in ckpt.qtensors:
            if ckpt.tensors[k].dim() == 2:
                out.append(k[:-7])
    return sorted(out)


@register
class Fp8BlockFormat(Format):
    name = "fp8"
    description = "block FP8 (quant_method fp8, weight_block_size 128x128): vLLM, SGLang"
    schemes = ("fp8-block",)

    def can_hold(self, name, qt):
        n, k = qt.shape
        if qt.dtype != "fp8_e4m3" or qt.block != BLOCK:
            return f"{qt.dtype} weights with block {qt.block} (fp8 holds float8_e4m3 weights in 128x128 blocks)"
        nb = (-(-n // 128), -(-k // 128))
        if qt.scales.dtype != torch.float32 or tuple(qt.scales.shape) != nb:
            return f"block scales {qt.scales.dtype} {list(qt.scales.shape)}, expected float32 {list(nb)}"
        if qt.act.kind != "dynamic" or qt.act.dtype != "fp8_e4m3" or qt.act.granularity != "group":
            return "activations other than dynamic fp8 per token-group (the engines always quantize them so)"
        if qt.pre_scale is not None:
            return "a pre_scale (no place for it in block fp8)"
        return None

    def encode(self, name, qt):
        return {f"{name}.weight": qt.codes, f"{name}.weight_scale_inv": qt.scales}

    def quant_config(self, ckpt):
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
        skipped = unquantized_linears(ckpt)
        if skipped:
            cfg["ignored_layers"] = skipped
        return cfg

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "fp8"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        qc = config["quantization_config"]
        bs = qc.get("weight_block_size")
        if bs is None:
            raise QtoolError("fp8 quantization_config without weight_block_size: per-tensor fp8 is not read by this qtool")
        if list(bs) != list(BLOCK):
            raise QtoolError(f"fp8 quantization_config: weight_block_size {bs} (only [128, 128] is supported)")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise QtoolError(f"fp8 quantization_config: fmt {qc.get('fmt')!r} (only e4m3 weights are read)")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise QtoolError(f"fp8 quantization_config: activation_scheme {qc.get('activation_scheme')} with block scales")
        td = TensorDir(path)
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        qts, claimed = {}, set()
        for key in sorted(k for k in td if k.endswith(".weight_scale_inv")):
            name = key[: -len(".weight_scale_inv")]
            w = require(td, f"{name}.weight")
            s = td[key]
            check_tensor(f"{name}.weight", w, dtypes=(torch.float8_e4m3fn,))
            if w.dim() != 2:
                raise QtoolError(f"tensor {name}.weight is not 2-D")
            n, k = w.shape
            check_tensor(key, s, shape=[-(-n // 128), -(-k // 128)], dtypes=(torch.float32,))
            act = ActQuant("dynamic", "fp8_e4m3", "group", group_size=128)
            qts[name] = QTensor("fp8_e4m3", 8, w, s, None, 128, block=BLOCK, act=act, orig_dtype=dtype)
            claimed |= {f"{name}.weight", key}
        if not qts:
            raise QtoolError(f"{path}: fp8 config but no .weight_scale_inv tensors")
        return Checkpoint(config, qts, passthrough(td, claimed), path)

    def engines(self, ckpt):
        return [("vllm", True, "fp8 (block-wise, DeepSeek style)"), ("sglang", True, "fp8 (block-wise)"),
                ("transformers", True, "FineGrainedFP8 (needs a GPU)")]
