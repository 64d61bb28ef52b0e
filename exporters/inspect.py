"""`qtool inspect`: what a checkpoint is, layer by layer."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from qtensor.errors import QtoolError

from .base import FORMATS, read_checkpoint, read_config, skipped_linears
from .io import TensorDir

KINDS = ("attention", "mlp", "experts", "embeddings", "other")
# shards that vLLM / SGLang fuse into one linear: they must share one scheme (or all stay unquantized)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def module_kind(name: str) -> str:
    """attention | mlp | experts | embeddings | other, from a module or tensor name."""
    n = name.lower()
    if "expert" in n:
        return "experts"
    if "embed" in n or "lm_head" in n or n.endswith("wte") or n.endswith("wpe"):
        return "embeddings"
    if re.search(r"(attn|attention|\.[qkvo]_proj|qkv)", n):
        return "attention"
    if re.search(r"(mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|\.w[123]\b|fc\d)", n):
        return "mlp"
    return "other"


def _marlin_reason(qt) -> str | None:
    """Why vLLM/SGLang's Marlin kernels cannot run a weight-only int layer (they fall back to slower ones)."""
    n, k = qt.shape
    if qt.bits not in (4, 8):
        return f"{qt.bits}-bit weights"
    if qt.group_size not in (-1, 32, 64, 128):
        return f"group size {qt.group_size}"
    if n % 64 or k % 128:
        return f"shape {n}x{k} (Marlin needs out % 64 and in % 128)"
    return None


def _warnings(ckpt, fmt, engines, layers) -> list[str]:
    out = []
    for e, ok, why in engines:
        if not ok:
            out.append(f"{e} will refuse this checkpoint: {why}")
    # weight-only int layers that miss the Marlin kernels (engines load them, more slowly)
    serves = {e for e, ok, _ in engines if ok and e in ("vllm", "sglang")}
    if serves:
        why = Counter()
        for qt in ckpt.qtensors.values():
            if qt.dtype == "int" and qt.act.kind == "none":
                r = _marlin_reason(qt)
                if r:
                    why[r] += 1
        for r, c in why.items():
            out.append(f"{'/'.join(sorted(serves))}: {c} layer(s) cannot use the Marlin kernels ({r}); they run on slower kernels")
    # fused shards must agree: vLLM raises on mixed precision inside qkv_proj / gate_up_proj
    label = {l["name"]: l["scheme"] for l in layers}
    unquant = {k[: -len(".weight")] for k in ckpt.tensors if k.endswith(".weight")}
    for group in FUSED:
        parents = {n.rsplit(".", 1)[0] for n in label if n.rsplit(".", 1)[-1] in group}
        for parent in sorted(parents):
            members = [f"{parent}.{g}" for g in group if f"{parent}.{g}" in label or f"{parent}.{g}" in unquant]
            kinds = {label.get(m, "unquantized") for m in members}
            if len(kinds) > 1:
                out.append(f"vllm/sglang refuse {parent}: fused shards {', '.join(m.rsplit('.', 1)[-1] for m in members)} differ in precision ({'; '.join(sorted(kinds))})")
    return out


def _alternatives(ckpt, current: str) -> list[dict]:
    """Other formats that hold this checkpoint exactly, and the engines that would load them."""
    out = []
    for name, f in FORMATS.items():
        if name == current:
            continue
        try:
            if any(f.can_hold(n, qt) for n, qt in ckpt.qtensors.items()):
                continue
            eng = [e for e, ok, _ in f.engines(ckpt) if ok]
        except NotImplementedError:
            continue
        if eng:
            out.append({"format": name, "engines": eng})
    return out


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
    by_kind = {k: {"quantized": 0, "unquantized": 0} for k in KINDS}
    for name, qt in ckpt.qtensors.items():
        n, k = qt.shape
        bpw = qt.nbytes() * 8 / (n * k)
        kind = module_kind(name)
        layers.append({"name": name, "kind": kind, "shape": [n, k], "scheme": _scheme_label(qt), "bits_per_weight": round(bpw, 3), "bytes": qt.nbytes()})
        by_kind[kind]["quantized"] += qt.nbytes()
        q_params += n * k
        q_bits += qt.nbytes() * 8
    other_params = other_bytes = 0
    for key in ckpt.tensors:
        t = ckpt.tensors[key]
        other_params += t.numel()
        other_bytes += t.numel() * t.element_size()
        by_kind[module_kind(key)]["unquantized"] += t.numel() * t.element_size()
    layers.sort(key=lambda l: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", l["name"])])
    fmt = FORMATS[ckpt.format]
    engines = fmt.engines(ckpt)
    return {
        "path": str(path),
        "format": ckpt.format,
        "quantized": True,
        "model_type": config.get("model_type"),
        "quantization_config": config.get("quantization_config"),
        "schemes": dict(Counter(l["scheme"] for l in layers)),
        "quantized_modules": len(layers),
        "kv_cache": {"dtype": ckpt.kv_cache_dtype, "attention_modules": len(ckpt.kv_scales),
                     "max_k_scale": max(float(k) for k, _ in ckpt.kv_scales.values()),
                     "max_v_scale": max(float(v) for _, v in ckpt.kv_scales.values())} if ckpt.kv_scales else None,
        "quantized_params": int(q_params),
        "bits_per_weight_quantized": round(q_bits / q_params, 3) if q_params else None,
        "bits_per_weight_overall": round((q_bits + other_bytes * 8) / (q_params + other_params), 3) if q_params + other_params else None,
        "size_bytes": {"quantized": int(q_bits // 8), "unquantized": int(other_bytes), "files": int(sum(f.stat().st_size for pat in ("*.safetensors", "*.gguf") for f in path.glob(pat)))},
        "size_by_kind": {k: {**v, "total": v["quantized"] + v["unquantized"]} for k, v in by_kind.items() if v["quantized"] or v["unquantized"]},
        "engines": [{"engine": e, "loads": ok, "note": why} for e, ok, why in engines],
        "warnings": _warnings(ckpt, fmt, engines, layers),
        "convert_to": _alternatives(ckpt, ckpt.format),
        "layers": layers,
        "unquantized_linears": skipped_linears(ckpt),  # decoder linears kept in full precision (routers, --rules skips)
        "source": ckpt.meta.get("source"),
        "eval": ckpt.meta.get("eval"),
    }
