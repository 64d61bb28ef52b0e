"""qtool's own lossless form: every field of the representation, for the export-later workflow.

Tensors `<module>.qt.codes|scales|zeros|g_idx|global_scale|input_scale|input_offset`; the per-module
fields that are not tensors live in config.json quantization_config.modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtensor import ActQuant, QTensor, __version__
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, passthrough, register
from .io import TensorDir

_TENSORS = ("codes", "scales", "zeros", "g_idx", "global_scale", "input_scale", "input_offset", "pre_scale")


@register
class QtoolFormat(Format):
    name = "qtool"
    description = "qtool's lossless form (any scheme; convert later with qtool export)"
    schemes = ("w4a16", "w8a16", "w8a8-int8", "w8a8-int8-static", "w4a4", "w4a8", "fp8", "fp8-dynamic", "fp8-block", "nvfp4", "mxfp4", "mxfp8")

    def can_hold(self, name, qt):
        return None

    def encode(self, name, qt):
        t = {"codes": qt.codes, "scales": qt.scales, "zeros": qt.zeros, "g_idx": qt.g_idx, "global_scale": qt.global_scale,
             "input_scale": qt.act.scale, "input_offset": qt.act.offset, "pre_scale": qt.pre_scale}
        return {f"{name}.qt.{k}": v.reshape(1) if v.dim() == 0 else v for k, v in t.items() if v is not None}

    def quant_config(self, ckpt):
        mods = {}
        for name, qt in ckpt.qtensors.items():
            mods[name] = {"dtype": qt.dtype, "bits": qt.bits, "group_size": qt.group_size, "block": list(qt.block) if qt.block else None,
                          "act": {"kind": qt.act.kind, "dtype": qt.act.dtype, "granularity": qt.act.granularity, "group_size": qt.act.group_size},
                          "orig_dtype": str(qt.orig_dtype).replace("torch.", "")}
        return {"quant_method": "qtool", "version": __version__, "scheme": ckpt.meta.get("scheme"), "modules": mods}

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
            t = {}
            for k in _TENSORS:
                key = f"{name}.qt.{k}"
                if key in td:
                    t[k] = td[key]
                    claimed.add(key)
            for k in ("codes", "scales"):
                if k not in t:
                    raise QtoolError(f"checkpoint is missing tensor {name}.qt.{k}")
            try:
                a = m.get("act") or {}
                act = ActQuant(a.get("kind", "none"), a.get("dtype", ""), a.get("granularity", "token"), t.get("input_scale"), t.get("input_offset"), int(a.get("group_size", 0)))
                gs = t.get("global_scale")
                qts[name] = QTensor(m["dtype"], int(m["bits"]), t["codes"], t["scales"], t.get("zeros"), int(m["group_size"]),
                                    tuple(m["block"]) if m.get("block") else None, t.get("g_idx"),
                                    gs.reshape(()) if gs is not None else None, act, getattr(torch, m.get("orig_dtype", "bfloat16")),
                                    t.get("pre_scale"))
            except (KeyError, TypeError, ValueError) as e:
                raise QtoolError(f"qtool config entry for {name} is invalid: {e}") from None
            if list(qts[name].codes.shape) != list(qts[name].codes.shape[:2]) or qts[name].codes.dim() != 2:
                raise QtoolError(f"tensor {name}.qt.codes is not 2-D")
        return Checkpoint(config, qts, passthrough(td, claimed), path)
