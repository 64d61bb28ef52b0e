"""FP8 KV cache: calibration of k_scale / v_scale and the serving engine's fake quantization.

Both go through one attention function registered in transformers' AttentionInterface, so they see
exactly the tensors an engine caches: keys after q/k norms and rotary embedding, values after v_proj,
shaped [batch, kv_heads, seq, head_dim] (GQA: before any repeat). The function wraps the model's own
implementation (sdpa or eager, masks unchanged) and, per attention module:

- while a `Recorder` is active: records amax |K| and amax |V| (one scalar each per attention module);
- where the module carries scales (`attach`): K, V -> fp8 e4m3 with those per-tensor scales and back,
  q = clamp(x / scale, +-448) -> float8_e4m3fn -> * scale (qtensor.numerics.fp8_requantize), which is
  what vLLM/SGLang/TensorRT-LLM store in an FP8 KV cache and read back for attention. An attention
  module without scales uses 1.0, as vLLM does when a checkpoint lacks them.

scale = amax / 448 (float32), as ModelOpt's export and LLM Compressor compute it.
"""

from __future__ import annotations

import inspect
import threading

import torch
from torch import nn

from qtensor import numerics as nm
from qtensor.errors import QtoolError

KV_DTYPES = ("fp8_e4m3",)
_BASES = ("sdpa", "eager")
_PREFIX = "qtool_kv_"
_state = threading.local()


def _recorder():
    return getattr(_state, "recorder", None)


def _eager_of(module: nn.Module):
    fn = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if fn is None:
        raise QtoolError(f"{type(module).__name__}: no eager_attention_forward in its modeling file (run it with sdpa attention)")
    return fn


def _make(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        rec = _recorder()
        if rec is not None:
            rec.add(module, key, value)
        scales = getattr(module, "_qtool_kv_scales", None)
        if getattr(module, "_qtool_kv_on", False) or scales is not None:
            k_s, v_s = scales if scales is not None else (torch.tensor(1.0), torch.tensor(1.0))
            key = nm.fp8_requantize(key, k_s.to(key.device)).to(key.dtype)
            value = nm.fp8_requantize(value, v_s.to(value.device)).to(value.dtype)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _eager_of(module)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{_PREFIX}{base}"
    return attention


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in _BASES:
        name = _PREFIX + base
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, _make(base))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in [model, *model.modules()]:
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def wrap_attention(model: nn.Module) -> str:
    """Route every attention call of `model` through the qtool wrapper (idempotent); returns the
    implementation it wraps. Only this model's configs change: other models keep theirs."""
    _register()
    cfgs = _configs(model)
    cur = next((c._attn_implementation for c in cfgs if c._attn_implementation), None) or "sdpa"
    base = cur[len(_PREFIX):] if cur.startswith(_PREFIX) else ("eager" if cur == "eager" else "sdpa")
    for c in cfgs:
        c._attn_implementation = _PREFIX + base
    return base


def unwrap_attention(model: nn.Module, base: str) -> None:
    for c in _configs(model):
        if (c._attn_implementation or "").startswith(_PREFIX):
            c._attn_implementation = base


def attach(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fake-quantize the KV cache of `model` with per-attention-module (k_scale, v_scale)."""
    mods = dict(model.named_modules())
    for name, (k, v) in scales.items():
        if name not in mods:
            raise QtoolError(f"KV-cache scales for {name}, which is not a module of this architecture")
        mods[name]._qtool_kv_scales = (k.float().reshape(()), v.float().reshape(()))
    for m in model.modules():  # attention modules without scales in the checkpoint: 1.0, as vLLM
        m._qtool_kv_on = True
    wrap_attention(model)


class Recorder:
    """amax |K| and |V| per attention module over every call while active (`with Recorder() as r`)."""

    def __init__(self):
        self.amax: dict[nn.Module, list[torch.Tensor]] = {}

    def add(self, module, key, value) -> None:
        k = key.detach().abs().amax().float().cpu() if key.numel() else torch.tensor(0.0)
        v = value.detach().abs().amax().float().cpu() if value.numel() else torch.tensor(0.0)
        old = self.amax.get(module)
        self.amax[module] = [k, v] if old is None else [torch.maximum(old[0], k), torch.maximum(old[1], v)]

    def __enter__(self):
        if _recorder() is not None:
            raise RuntimeError("nested KV-cache recorders")
        _state.recorder = self
        return self

    def __exit__(self, *exc):
        _state.recorder = None
        return False

    def named(self, root: nn.Module, prefix: str) -> dict[str, list[torch.Tensor]]:
        """{prefix.module name: [amax_k, amax_v]} for the recorded modules under `root`."""
        out = {}
        for n, m in root.named_modules():
            if m in self.amax:
                out[f"{prefix}.{n}" if n else prefix] = self.amax[m]
        return out


def scales_from_amax(amax_k: torch.Tensor, amax_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scalars amax/448 (1.0 where nothing was seen)."""
    return nm.fp8_scale_from_amax(amax_k.float().reshape(())), nm.fp8_scale_from_amax(amax_v.float().reshape(()))


def check_kv_dtype(dtype: str | None) -> str | None:
    if dtype in (None, "", "none"):
        return None
    if dtype in ("fp8", "fp8_e4m3"):
        return "fp8_e4m3"
    raise QtoolError(f"unknown --kv-cache '{dtype}' (choose from: fp8)")
