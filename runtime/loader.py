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


COMPACT_MIN = 1 << 20  # elements: unquantized embeddings / heads at least this large stay in their 16-bit storage


def _compact(mod: nn.Module, leaf: str, t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Keep a large 16-bit embedding or unquantized linear weight in its stored dtype when computing in a
    wider one: the model is never held as a full-precision copy (Gemma-3-270M's tied 262k x 640 embedding
    is 2/3 of its w4a16 checkpoint). _widen() makes the module compute in `dtype` all the same."""
    return (leaf == "weight" and isinstance(mod, (nn.Embedding, nn.Linear)) and not isinstance(mod, QuantLinear)
            and t.dtype in (torch.bfloat16, torch.float16) and dtype.itemsize > t.itemsize and t.numel() >= COMPACT_MIN)


def _embedding_forward(self, ids):
    out = nn.functional.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
    out = out.to(self._qtool_dtype)  # exact: 16-bit values widened
    scale = getattr(self, "embed_scale", None)  # Gemma's scaled word embedding
    return out * scale.to(out.dtype) if scale is not None else out


def _linear_forward(self, x, rows: int = 16384):
    """x @ W^T with W widened a block of output rows at a time (no full wide copy)."""
    w = self.weight
    out = torch.cat([nn.functional.linear(x, w[i : i + rows].to(x.dtype)) for i in range(0, w.shape[0], rows)], dim=-1)
    return out + self.bias.to(out.dtype) if self.bias is not None else out


def _widen(model: nn.Module, dtype: torch.dtype) -> None:
    import types

    for m in model.modules():
        if isinstance(m, QuantLinear) or not isinstance(m, (nn.Embedding, nn.Linear)) or m.weight.dtype == dtype or m.weight.device.type == "meta":
            continue
        if isinstance(m, nn.Embedding):
            if type(m) is not nn.Embedding and not hasattr(m, "embed_scale"):
                m.weight = nn.Parameter(m.weight.data.to(dtype), requires_grad=False)  # unknown subclass: widen it
                continue
            m._qtool_dtype = dtype
            m.forward = types.MethodType(_embedding_forward, m)
        else:
            m.forward = types.MethodType(_linear_forward, m)


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
        parent, _, leaf = key.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        if t.is_floating_point() and not _compact(mod, leaf, t, dtype):
            t = t.to(dtype)
        if key in params:
            setattr(mod, leaf, nn.Parameter(t, requires_grad=False))
        else:
            mod._buffers[leaf] = t
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QtoolError(f"checkpoint is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    _widen(model, dtype)
    if ckpt.kv_scales:  # FP8 KV cache: keys and values go through fp8 with the checkpoint's scales, as engines cache them
        from calibrate.kvcache import attach

        attach(model, ckpt.kv_scales)
    return model.to(device).eval()


def release_free_heap() -> None:
    """Give the heap freed by loading (tensors read, unpacked and dropped) back to the OS (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Checkpoint]:
    ckpt = read_checkpoint(Path(path))
    model = model_from_checkpoint(ckpt, dtype, device)
    release_free_heap()
    return model, ckpt
