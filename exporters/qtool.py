"""qtool's own lossless form: every field of the representation, for the export-later workflow.

Tensors `<module>.qt.codes|scales|zeros|g_idx|global_scale|input_scale|input_offset|pre_scale`; the
per-module fields that are not tensors live in config.json quantization_config.modules. The same
per-module encoding serves the quantize work directory (resume). FP8 KV cache: `<attention module>.k_scale`
/ `.v_scale` float32 [] with quantization_config.kv_cache = {"dtype": "fp8_e4m3"}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtensor import ActQuant, QTensor, __version__
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, check_qtensor, passthrough, read_kv_scales, register
from .io import TensorDir

_TENSORS = ("codes", "scales", "zeros", "g_idx", "global_scale", "input_scale", "input_offset", "pre_scale")


def encode_module(name: str, qt: QTensor) -> dict[str, torch.Tensor]:
    t = {"codes": qt.codes, "scales": qt.scales, "zeros": qt.zeros, "g_idx": qt.g_idx, "global_scale": qt.global_scale,
         "input_scale": qt.act.scale, "input_offset": qt.act.offset, "pre_scale": qt.pre_scale}
    return {f"{name}.qt.{k}": (v.reshape(1) if v.dim() == 0 else v).contiguous() for k, v in t.items() if v is not None}


def module_meta(qt: QTensor) -> dict:
    return {"dtype": qt.dtype, "bits": qt.bits, "group_size": qt.group_size, "block": list(qt.block) if qt.block else None,
            "act": {"kind": qt.act.kind, "dtype": qt.act.dtype, "granularity": qt.act.granularity, "group_size": qt.act.group_size},
            "orig_dtype": str(qt.orig_dtype).replace("torch.", "")}


def decode_module(td, name: str, m: dict) -> QTensor:
    """One quantization_config.modules entry plus its tensors -> QTensor, every field type-checked and
    the result checked for consistency (base.check_qtensor), naming the on-disk tensor at fault."""
    if not isinstance(m, dict):
        raise QtoolError(f"qtool config entry for {name} is not an object")
    t = {k: td[f"{name}.qt.{k}"] for k in _TENSORS if f"{name}.qt.{k}" in td}
    for k in ("codes", "scales"):
        if k not in t:
            raise QtoolError(f"checkpoint is missing tensor {name}.qt.{k}")
    qt = _entry(name, m, t)
    check_qtensor(name, qt, label=lambda f: f"{name}.qt.{f}")
    return qt


def module_tensor_names(td, name: str) -> set[str]:
    return {f"{name}.qt.{k}" for k in _TENSORS if f"{name}.qt.{k}" in td}


@register
class QtoolFormat(Format):
    name = "qtool"
    description = "qtool's lossless form (any scheme; convert later with qtool export)"
    packed = False  # codes are kept unpacked, one byte each
    schemes = ("w4a16", "w8a16", "w8a8-int8", "w8a8-int8-static", "w4a4", "w4a8", "w4a8-int8", "fp8", "fp8-dynamic", "fp8-block", "nvfp4", "mxfp4", "mxfp8")

    kv_cache = True

    def can_hold(self, name, qt):
        return None

    def encode_kv(self, ckpt):
        out = {}
        for attn, (k, v) in ckpt.kv_scales.items():
            out[f"{attn}.k_scale"], out[f"{attn}.v_scale"] = k.reshape(()), v.reshape(())
        return out

    def encode(self, name, qt):
        return encode_module(name, qt)

    def quant_config(self, ckpt):
        mods = {name: module_meta(qt) for name, qt in ckpt.qtensors.items()}
        qc = {"quant_method": "qtool", "version": __version__, "scheme": ckpt.meta.get("scheme"), "modules": mods}
        if ckpt.kv_scales:
            qc["kv_cache"] = {"dtype": ckpt.kv_cache_dtype}
        return qc

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "qtool"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        mods = config["quantization_config"].get("modules")
        if not isinstance(mods, dict):
            raise QtoolError("qtool quantization_config has no 'modules' table")
        td = TensorDir(path)
        qts, claimed = {}, set()
        for name, m in mods.items():
            qts[name] = decode_module(td, name, m)
            claimed |= module_tensor_names(td, name)
        kv, kv_dtype = {}, None
        spec = config["quantization_config"].get("kv_cache")
        if spec is not None:
            if not isinstance(spec, dict) or spec.get("dtype") != "fp8_e4m3":
                raise QtoolError(f"qtool quantization_config.kv_cache {spec!r} is not {{\"dtype\": \"fp8_e4m3\"}}"[:200])
            kv, used = read_kv_scales(td, ".k_scale", ".v_scale")
            if not kv:
                raise QtoolError("qtool quantization_config.kv_cache without any .k_scale / .v_scale tensors")
            kv_dtype, claimed = "fp8_e4m3", claimed | used
        return Checkpoint(config, qts, passthrough(td, claimed), path, kv_scales=kv, kv_cache_dtype=kv_dtype)

    def engines(self, ckpt):
        return [("vllm", False, "qtool's own form: convert with qtool export"), ("sglang", False, "qtool's own form: convert with qtool export")]


def _int(name: str, m: dict, key: str, default=None) -> int:
    v = m.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise QtoolError(f"qtool config entry for {name}: {key} {v!r} is not an integer"[:200])
    return v


def _entry(name: str, m: dict, t: dict) -> QTensor:
    """One quantization_config.modules entry plus its tensors -> QTensor (fields type-checked)."""
    a = m.get("act") or {}
    if not isinstance(a, dict):
        raise QtoolError(f"qtool config entry for {name}: act is not an object")
    for key in ("kind", "dtype", "granularity"):
        if key in a and not isinstance(a[key], str):
            raise QtoolError(f"qtool config entry for {name}: act.{key} is not a string")
    if not isinstance(m.get("dtype"), str):
        raise QtoolError(f"qtool config entry for {name}: dtype {m.get('dtype')!r} is not a numeric type name"[:200])
    block = m.get("block")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QtoolError(f"qtool config entry for {name}: block {block!r} is not two positive integers"[:200])
    orig = getattr(torch, m.get("orig_dtype", "bfloat16"), None) if isinstance(m.get("orig_dtype", "bfloat16"), str) else None
    if not isinstance(orig, torch.dtype):
        raise QtoolError(f"qtool config entry for {name}: orig_dtype {m.get('orig_dtype')!r} is not a torch dtype"[:200])
    act = ActQuant(a.get("kind", "none"), a.get("dtype", ""), a.get("granularity", "token"), t.get("input_scale"), t.get("input_offset"), _int(name, a, "group_size", 0))
    gs = t.get("global_scale")
    return QTensor(m["dtype"], _int(name, m, "bits"), t["codes"], t["scales"], t.get("zeros"), _int(name, m, "group_size"),
                   tuple(block) if block else None, t.get("g_idx"), gs.reshape(()) if gs is not None and gs.numel() == 1 else gs, act, orig,
                   t.get("pre_scale"))
