"""`qtool inspect`: what a checkpoint is, layer by layer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qtensor.errors import QtoolError

from .base import FORMATS, read_checkpoint, read_config
from .io import TensorDir


def _scheme_label(qt) -> str:
    g = {-1: "per-channel", 0: "per-tensor"}.get(qt.group_size, f"g{qt.group_size}")
    if qt.block:
        g = f"block{qt.block[0]}x{qt.block[1]}"
    w = f"{qt.dtype}{qt.bits if qt.dtype == 'int' else ''} {g}{'' if qt.dtype != 'int' else (' sym' if qt.sym else ' asym')}"
    if qt.act_order:
        w += " act-order"
    if qt.act.kind != "none":
        w += f", act {qt.act.dtype} {qt.act.kind}"
    return w


def summarize(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise QtoolError(f"not a checkpoint directory: {path}")
    config = read_config(path)
    try:
        ckpt = read_checkpoint(path)
    except QtoolError as e:
        if "is not a quantized checkpoint" not in str(e):
            raise
        td = TensorDir(path)
        return {"path": str(path), "format": None, "quantized": False, "model_type": config.get("model_type"),
                "tensors": len(td), "size_bytes": td.nbytes()}
    layers = []
    q_params = q_bits = 0.0
    for name, qt in ckpt.qtensors.items():
        n, k = qt.shape
        bpw = qt.nbytes() * 8 / (n * k)
        layers.append({"name": name, "shape": [n, k], "scheme": _scheme_label(qt), "bits_per_weight": round(bpw, 3)})
        q_params += n * k
        q_bits += qt.nbytes() * 8
    other_params = other_bytes = 0
    for key in ckpt.tensors:
        t = ckpt.tensors[key]
        other_params += t.numel()
        other_bytes += t.numel() * t.element_size()
    fmt = FORMATS[ckpt.format]
    return {
        "path": str(path),
        "format": ckpt.format,
        "quantized": True,
        "model_type": config.get("model_type"),
        "quantization_config": config.get("quantization_config"),
        "schemes": dict(Counter(l["scheme"] for l in layers)),
        "quantized_modules": len(layers),
        "quantized_params": int(q_params),
        "bits_per_weight_quantized": round(q_bits / q_params, 3) if q_params else None,
        "bits_per_weight_overall": round((q_bits + other_bytes * 8) / (q_params + other_params), 3) if q_params + other_params else None,
        "size_bytes": {"quantized": int(q_bits // 8), "unquantized": int(other_bytes), "files": int(sum(f.stat().st_size for f in path.glob("*.safetensors")))},
        "engines": [{"engine": e, "loads": ok, "note": why} for e, ok, why in fmt.engines(ckpt)],
        "layers": layers,
        "source": ckpt.meta.get("source"),
        "eval": ckpt.meta.get("eval"),
    }
