"""AutoRound (`quant_method: auto-round`): GPTQ v1 or AWQ gemm tensors under AutoRound's config.

`packing_format` `auto_round:auto_gptq` = GPTQ v1 tensors as AutoRound writes them (qweight, qzeros
holding z-1, scales; no g_idx, so no act order); `auto_round:auto_awq` = AWQ gemm tensors. Modules
whose bits/group_size/sym differ from the top-level values are listed in `extra_config` by name;
`{"bits": 16}` marks a linear inside the quantized blocks that was left unquantized. Layers outside
`block_name_to_quantize` (lm_head) are quantized only when `extra_config` lists them in full.

qtool writes `auto_round:auto_gptq` (format `auto-round`) or `auto_round:auto_awq` (format
`auto-round-awq`, what AutoRound 0.16 itself picks for asymmetric int4); it reads both.
"""

from __future__ import annotations

import json

import re
from pathlib import Path

from qtensor import QTensor
from qtensor.errors import QtoolError

from .awq import awq_reason, decode_awq_tensors, encode_awq_tensors, unquantized_linears
from .base import Checkpoint, Format, module_names_with, passthrough, register
from .gptq import BITS, decode_gptq_tensors, encode_gptq_tensors, int_weight_only_reason
from .io import TensorDir

GPTQ_PACKING = "auto_round:auto_gptq"
AWQ_PACKING = "auto_round:auto_awq"
LAYOUT_VERSION = "0.16.1"  # the AutoRound release whose on-disk layout this module follows
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|block))\.\d+\.")


def block_of(name: str) -> str | None:
    m = _BLOCK.match(name)
    return m.group(1) if m else None


def _base(ckpt: Checkpoint) -> tuple[int, int, bool]:
    """The most common (bits, group_size, sym) among the modules inside blocks."""
    counts: dict[tuple, int] = {}
    for name, q in ckpt.qtensors.items():
        if block_of(name) is not None:
            key = (q.bits, q.group_size, q.sym)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        q = next(iter(ckpt.qtensors.values()))
        return q.bits, q.group_size, q.sym
    return max(counts, key=counts.get)


def extra_config_lookup(extra: dict, name: str) -> dict | None:
    """AutoRound's rule: an exact layer name first, then regex keys (re.search)."""
    if not extra:
        return None
    if name in extra:
        return extra[name]
    for key, cfg in extra.items():
        try:
            if re.search(key, name):
                return cfg
        except re.error:
            continue
    return None


INT_DATA_TYPES = ("int", "int_sym", "int_asym")  # AutoRound's integer weight types


def _flag(v, what: str) -> bool:
    """A JSON boolean (a string such as "yes" is refused rather than read as true)."""
    if not isinstance(v, bool):
        raise QtoolError(f"{what} must be true or false, got {json.dumps(v)}")
    return v


@register
class AutoRoundFormat(Format):
    name = "auto-round"
    description = "AutoRound, auto_gptq packing: vLLM, SGLang, transformers (auto-round / gptqmodel)"
    schemes = ("w4a16", "w8a16")
    packing = GPTQ_PACKING

    def can_hold(self, name, qt):
        if self.packing == AWQ_PACKING:
            return awq_reason(qt)
        reason = int_weight_only_reason(qt, allow_act_order=False)
        if reason == "act order":
            return "act order (AutoRound's auto_gptq packing has no g_idx)"
        return reason

    def encode(self, name, qt):
        if self.packing == AWQ_PACKING:
            return encode_awq_tensors(name, qt)
        t = encode_gptq_tensors(name, qt)
        t.pop(f"{name}.g_idx")  # AutoRound's auto_gptq QuantLinear has no g_idx buffer
        return t

    def quant_config(self, ckpt):
        bits, gs, sym = _base(ckpt)
        blocks = sorted({b for b in (block_of(n) for n in ckpt.qtensors) if b is not None})
        extra: dict[str, dict] = {}
        for name, q in sorted(ckpt.qtensors.items()):
            if block_of(name) is None:  # outside the blocks: listed in full (AutoRound does so for lm_head)
                extra[name] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym, "data_type": "int"}
            elif (q.bits, q.group_size, q.sym) != (bits, gs, sym):
                extra[name] = {k: v for k, v, base in (("bits", q.bits, bits), ("group_size", q.group_size, gs), ("sym", q.sym, sym)) if v != base}
        for mod in unquantized_linears(ckpt):
            if block_of(mod) is not None and mod not in ckpt.qtensors:
                extra[mod] = {"bits": 16, "data_type": "float"}
        cfg = {
            "quant_method": "auto-round",
            "packing_format": self.packing,
            "bits": bits,
            "group_size": gs,
            "sym": sym,
            "data_type": "int",
            "block_name_to_quantize": ",".join(blocks) if blocks else None,
            "autoround_version": LAYOUT_VERSION,
        }
        opts = ckpt.meta.get("options") or {}
        cal = ckpt.meta.get("calibration") or {}
        if ckpt.meta.get("method") == "autoround" or ckpt.meta.get("backend") == "autoround":
            for key, val in (("iters", opts.get("iters")), ("nsamples", cal.get("samples")), ("seqlen", cal.get("seqlen"))):
                if val is not None:
                    cfg[key] = val
        if cfg["block_name_to_quantize"] is None:
            cfg.pop("block_name_to_quantize")
        if extra:
            cfg["extra_config"] = extra
        return cfg

    def extra_files(self, ckpt):
        return {"quantization_config.json": self.quant_config(ckpt)}

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return self.packing == GPTQ_PACKING and isinstance(qc, dict) and qc.get("quant_method") in ("auto-round", "intel/auto-round")

    def decode(self, path: Path, config: dict) -> Checkpoint:
        qc = config["quantization_config"]
        try:
            bits, gs = int(qc["bits"]), int(qc.get("group_size", 128))
        except (KeyError, TypeError, ValueError):
            raise QtoolError("auto-round quantization_config lacks a valid 'bits'/'group_size'") from None
        sym = _flag(qc.get("sym", True), "auto-round quantization_config: sym")
        data_type = str(qc.get("data_type", "int"))
        if data_type not in INT_DATA_TYPES:
            raise QtoolError(f"auto-round quantization_config: data_type '{data_type}' is not supported (only {', '.join(INT_DATA_TYPES)})")
        if int(qc.get("act_bits", 16) or 16) <= 8:
            raise QtoolError("auto-round quantization_config: activation quantization (act_bits <= 8) is not supported")
        packing = str(qc.get("packing_format", GPTQ_PACKING))
        if packing not in (GPTQ_PACKING, AWQ_PACKING):
            raise QtoolError(f"auto-round quantization_config: packing_format '{packing}' is not supported ({GPTQ_PACKING} or {AWQ_PACKING})")
        extra = qc.get("extra_config") or {}
        if not isinstance(extra, dict):
            raise QtoolError("auto-round quantization_config: extra_config is not an object")
        td = TensorDir(path)
        qts, claimed = {}, set()
        for name in module_names_with(td, ".qweight"):
            ov = extra_config_lookup(extra, name) or {}
            try:
                b, g = int(ov.get("bits", bits)), int(ov.get("group_size", gs))
            except (TypeError, ValueError):
                raise QtoolError(f"auto-round extra_config entry for {name} is invalid") from None
            s = _flag(ov.get("sym", sym), f"auto-round extra_config entry for {name}: sym")
            if b > 8:
                raise QtoolError(f"tensor {name}.qweight present but extra_config marks {name} unquantized ({b} bits)")
            if packing == AWQ_PACKING:
                if b != 4:
                    raise QtoolError(f"auto-round awq packing: {name} has unsupported bits {b}")
                qts[name] = decode_awq_tensors(td, name, b, g, s)
            else:
                if b not in BITS:
                    raise QtoolError(f"auto-round: {name} has unsupported bits {b}")
                qts[name] = decode_gptq_tensors(td, name, b, g, s)
            claimed |= {f"{name}.{x}" for x in ("qweight", "qzeros", "scales", "g_idx")}
        if not qts:
            raise QtoolError(f"{path}: auto-round config but no .qweight tensors")
        return Checkpoint(config, qts, passthrough(td, claimed), path)

    def engines(self, ckpt):
        qts = list(ckpt.qtensors.values())
        marlin = all(q.bits in (4, 8) and q.sym and q.group_size in (-1, 32, 64, 128) for q in qts)
        kernel = "awq_marlin" if self.packing == AWQ_PACKING else ("gptq_marlin" if marlin else "gptq")
        return [
            ("vllm", True, f"auto-round -> {kernel}"),
            ("sglang", True, f"auto-round -> {kernel}"),
            ("transformers", True, "AutoRoundConfig (auto-round's own QuantLinear on CPU)"),
        ]


@register
class AutoRoundAWQFormat(AutoRoundFormat):
    name = "auto-round-awq"
    description = "AutoRound, auto_awq packing (AutoRound's choice for asymmetric int4)"
    schemes = ("w4a16",)
    packing = AWQ_PACKING

    def detect(self, path, config):
        return False  # auto-round's reader (format auto-round) decodes both packings

