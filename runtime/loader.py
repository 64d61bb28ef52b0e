"""Load any checkpoint qtool reads into a runnable model without a full-precision copy.

The skeleton is built from config.json with parameters on the meta device; each quantized linear
is replaced by a QuantLinear; the remaining tensors stream in from the safetensors files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calibrate.models import build_skeleton
from exporters import Checkpoint, read_checkpoint
from qtensor.errors import QtoolError

from .qlinear import QuantLinear


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def model_from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    model = build_skeleton(ckpt.config)
    modules = dict(model.named_modules())
    for name, qt in ckpt.qtensors.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise QtoolError(f"checkpoint quantizes {name}, which is not a linear layer of this architecture")
        if (lin.out_features, lin.in_features) != tuple(qt.shape):
            raise QtoolError(f"tensor {name}: quantized shape {list(qt.shape)} does not match the layer's [{lin.out_features}, {lin.in_features}]")
        bias = None
        if lin.bias is not None:
            bname = f"{name}.bias"
            if bname not in ckpt.tensors:
                raise QtoolError(f"checkpoint is missing tensor {bname}")
            bias = ckpt.tensors[bname].to(dtype)
        _set_module(model, name, QuantLinear(qt, bias))
    skip = {f"{n}.bias" for n in ckpt.qtensors}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key in ckpt.tensors:
        if key in skip:
            continue
        if key not in params and key not in buffers:
            continue  # e.g. rotary caches some exporters keep
        t = ckpt.tensors[key]
        target = params.get(key, buffers.get(key))
        if list(t.shape) != list(target.shape):
            raise QtoolError(f"tensor {key} has shape {list(t.shape)}, the model expects {list(target.shape)}")
        if t.is_floating_point():
            t = t.to(dtype)
        parent, _, leaf = key.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        if key in params:
            setattr(mod, leaf, nn.Parameter(t, requires_grad=False))
        else:
            mod._buffers[leaf] = t
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QtoolError(f"checkpoint is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if ckpt.kv_scales:  # FP8 KV cache: keys and values go through fp8 with the checkpoint's scales, as engines cache them
        from calibrate.kvcache import attach

        attach(model, ckpt.kv_scales)
    return model.to(device).eval()


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Checkpoint]:
    ckpt = read_checkpoint(Path(path))
    return model_from_checkpoint(ckpt, dtype, device), ckpt
