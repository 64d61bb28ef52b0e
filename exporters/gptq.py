"""GPTQ v1 layout (GPTQModel / AutoGPTQ; loaded by vLLM, SGLang, transformers+optimum).

qweight int32 [K*bits/32, N] packed along K; qzeros int32 [K/G, N*bits/32] packed along N holding
z-1 (v1; v2 stores z); scales fp16 [K/G, N]; g_idx int32 [K].
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qtensor import QTensor, __version__
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .base import ROUTER_RE, Checkpoint, Format, check_tensor, module_names_with, passthrough, register, skipped_linears
from .io import TensorDir

BITS = (2, 3, 4, 8)


def fp16_exact(s: torch.Tensor) -> bool:
    if s.dtype == torch.float16:
        return True
    if not s.dtype.is_floating_point:
        return False
    h = s.to(torch.float16)
    return bool(torch.isfinite(h).all()) and torch.equal(h.to(s.dtype), s)


def int_weight_only_reason(qt: QTensor, bits=BITS, allow_act_order=True) -> str | None:
    """Shared check for the GPTQ-style layouts (GPTQ, AutoRound auto_gptq)."""
    if qt.dtype != "int":
        return f"{qt.dtype} weights (GPTQ holds integer weights)"
    if qt.bits not in bits:
        return f"{qt.bits}-bit weights"
    if qt.act.kind != "none":
        return "activation quantization (GPTQ is weight-only)"
    if qt.pre_scale is not None:
        return "a pre_quant_scale (smoothing not folded into a preceding layer; GPTQ has no place for it)"
    if qt.block is not None or qt.group_size == 0:
        return "block or per-tensor scales"
    n, k = qt.shape
    if qt.group_size > 0 and k % qt.group_size:
        return f"in_features {k} not a multiple of group size {qt.group_size}"
    if (n * qt.bits) % 32 or (k * qt.bits) % 32 or (qt.bits == 3 and (n % 32 or k % 32)):
        return f"shape {n}x{k} does not pack into int32 words at {qt.bits} bits"
    if not fp16_exact(qt.scales):
        return "scales not representable in fp16"
    if qt.zeros is not None and int(qt.zeros.min()) == 0:
        return "an asymmetric zero point of 0 cannot be stored in GPTQ v1 (z-1 underflows)"
    if qt.act_order and not allow_act_order:
        return "act order"
    return None


def encode_gptq_tensors(name: str, qt: QTensor) -> dict[str, torch.Tensor]:
    n, k = qt.shape
    codes = pk.signed_to_offset(qt.codes, qt.bits) if qt.sym else qt.codes
    zeros = torch.full_like(qt.scales, 1 << (qt.bits - 1), dtype=torch.uint8) if qt.sym else qt.zeros
    return {
        f"{name}.qweight": pk.pack_int32(codes.t(), qt.bits, dim=0),
        f"{name}.qzeros": pk.pack_int32((zeros.to(torch.int16) - 1).t().to(torch.uint8), qt.bits, dim=1),
        f"{name}.scales": qt.scales.t().to(torch.float16).contiguous(),
        f"{name}.g_idx": qt.column_groups().to(torch.int32),
    }


def gptq_params(bits, group_size, sym, where: str = "gptq quantization_config") -> tuple[int, int, bool]:
    """Validated (bits, group_size, sym) of a GPTQ config block (or a `dynamic` override)."""
    for key, v in (("bits", bits), ("group_size", group_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise QtoolError(f"{where}: {key} {v!r} is not an integer"[:200])
    if bits not in BITS:
        raise QtoolError(f"{where}: unsupported bits {bits} (GPTQ stores {', '.join(map(str, BITS))})")
    if group_size != -1 and group_size < 1:
        raise QtoolError(f"{where}: group_size {group_size} is invalid (-1 or a positive group length)")
    if not isinstance(sym, bool):
        raise QtoolError(f"{where}: sym {sym!r} is not true or false"[:200])
    return bits, group_size, sym


def decode_gptq_tensors(td, name: str, bits: int, group_size: int, sym: bool, v2: bool = False) -> QTensor:
    qweight = td[f"{name}.qweight"]
    for suffix in ("qzeros", "scales"):
        if f"{name}.{suffix}" not in td:
            raise QtoolError(f"checkpoint is missing tensor {name}.{suffix}")
    qzeros, scales = td[f"{name}.qzeros"], td[f"{name}.scales"]
    check_tensor(f"{name}.qweight", qweight, dtypes=(torch.int32,))
    if qweight.dim() != 2 or 0 in qweight.shape:
        raise QtoolError(f"tensor {name}.qweight is not a 2-D [in*bits/32, out] tensor")
    if bits == 3 and qweight.shape[0] % 3:
        raise QtoolError(f"tensor {name}.qweight: {qweight.shape[0]} rows do not hold whole 3-bit words")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if (n * bits) % 32 or (bits == 3 and n % 32):
        raise QtoolError(f"tensor {name}.qweight: {n} output columns do not pack into int32 qzeros at {bits} bits")
    if group_size > 0 and k % group_size:
        raise QtoolError(f"tensor {name}.qweight: in_features {k} is not a multiple of group_size {group_size}")
    ng = 1 if group_size <= 0 else k // group_size
    check_tensor(f"{name}.scales", scales, shape=[ng, n], dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_tensor(f"{name}.qzeros", qzeros, shape=[ng, n * bits // 32], dtypes=(torch.int32,))
    codes = pk.unpack_int32(qweight, bits, dim=0).t().contiguous()
    z = pk.unpack_int32(qzeros, bits, dim=1).t().to(torch.int16)
    z = z + (0 if v2 else 1)  # v1 stores z-1
    g_idx = td[f"{name}.g_idx"] if f"{name}.g_idx" in td else None
    if g_idx is not None:
        check_tensor(f"{name}.g_idx", g_idx, shape=[k], dtypes=(torch.int32, torch.int64, torch.int16))
        g_idx = g_idx.to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
            raise QtoolError(f"tensor {name}.g_idx points outside the {ng} groups")
        plain = (torch.arange(k) // (group_size if group_size > 0 else k)).to(torch.int32)
        if torch.equal(g_idx, plain):
            g_idx = None
    mid = 1 << (bits - 1)
    if sym and bool((z == mid).all()):
        return QTensor("int", bits, pk.offset_to_signed(codes, bits), scales.t().contiguous(), None, group_size, g_idx=g_idx)
    if sym:
        raise QtoolError(f"tensor {name}.qzeros: the config says sym, but the zero points are not all {mid}")
    if int(z.min()) < 0 or int(z.max()) >= (1 << bits):
        raise QtoolError(f"tensor {name}.qzeros holds zero points outside {bits}-bit range")
    return QTensor("int", bits, codes, scales.t().contiguous(), z.to(torch.uint8), group_size, g_idx=g_idx)


def dynamic_override(dynamic: dict | None, module: str) -> dict | None:
    """GPTQModel `dynamic`: {regex: overrides}; '-:regex' excludes; '+:' or bare regex overrides."""
    if not dynamic:
        return {}
    if not isinstance(dynamic, dict):
        raise QtoolError("gptq quantization_config: dynamic is not an object of {regex: overrides}")
    for pattern, override in dynamic.items():
        neg = pattern.startswith("-:")
        pat = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        try:
            hit = re.match(pat, module)
        except re.error as e:
            raise QtoolError(f"gptq quantization_config: dynamic pattern {pattern!r} is not a valid regex ({e})"[:300]) from None
        if hit:
            if not neg and override is not None and not isinstance(override, dict):
                raise QtoolError(f"gptq quantization_config: dynamic override for {pattern!r} is not an object"[:300])
            return None if neg else dict(override or {})
    return {}


@register
class GPTQFormat(Format):
    name = "gptq"
    description = "GPTQ v1 (GPTQModel/AutoGPTQ): vLLM, SGLang, transformers"
    schemes = ("w4a16", "w8a16")

    def can_hold(self, name, qt):
        return int_weight_only_reason(qt)

    def encode(self, name, qt):
        return encode_gptq_tensors(name, qt)

    def quant_config(self, ckpt):
        from collections import Counter

        # one pass over the modules (they may be decoded lazily from disk)
        keys = {name: (qt.bits, qt.group_size, qt.sym, qt.act_order) for name, qt in ckpt.qtensors.items()}
        base = Counter(k[:3] for k in keys.values()).most_common(1)[0][0]
        # decoder linears left in full precision: '-:' (GPTQModel, vLLM and SGLang then build a plain Linear)
        dynamic = {f"-:^{re.escape(name)}$": {} for name in skipped_linears(ckpt) if not ROUTER_RE.search(name)}
        dynamic.update({f"+:^{re.escape(name)}$": {"bits": k[0], "group_size": k[1], "sym": k[2]} for name, k in keys.items() if k[:3] != base})
        cfg = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "format": "gptq",
            "method": "gptq",
            "bits": base[0],
            "group_size": base[1],
            "sym": base[2],
            "desc_act": any(k[3] for k in keys.values()),
            "lm_head": False,
            "true_sequential": True,
            "pack_dtype": "int32",
            "damp_percent": ckpt.meta.get("options", {}).get("damp", 0.01),
            "meta": {"quantizer": [f"qtool:{__version__}"]},
        }
        if dynamic:
            cfg["dynamic"] = dynamic
        self._last_config = (ckpt, cfg)
        return cfg

    def extra_files(self, ckpt):
        cached = getattr(self, "_last_config", None)  # write_checkpoint asked for it just before
        return {"quantize_config.json": cached[1] if cached and cached[0] is ckpt else self.quant_config(ckpt)}

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "gptq"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        qc = config["quantization_config"]
        if "bits" not in qc:
            raise QtoolError("gptq quantization_config lacks 'bits'")
        bits, gs, sym = gptq_params(qc["bits"], qc.get("group_size", -1), qc.get("sym", True))
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QtoolError(f"gptq quantization_config: checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)"[:200])
        v2 = fmt == "gptq_v2"
        td = TensorDir(path)
        qts, claimed = {}, set()
        for name in module_names_with(td, ".qweight"):
            ov = dynamic_override(qc.get("dynamic"), name)
            ov = ov or {}
            b, g, s = gptq_params(ov.get("bits", bits), ov.get("group_size", gs), ov.get("sym", sym), f"gptq dynamic override for {name}")
            qts[name] = decode_gptq_tensors(td, name, b, g, s, v2)
            claimed |= {f"{name}.{x}" for x in ("qweight", "qzeros", "scales", "g_idx")}
        if not qts:
            raise QtoolError(f"{path}: gptq config but no .qweight tensors")
        return Checkpoint(config, qts, passthrough(td, claimed), path)

    def engines(self, ckpt):
        qts = list(ckpt.qtensors.values())
        out = []
        marlin = all(q.bits in (4, 8) and q.sym and q.group_size in (-1, 32, 64, 128) for q in qts)
        act_order_groups = any(q.act_order and q.group_size > 0 for q in qts)
        if act_order_groups:
            out.append(("vllm", False, "desc_act with groups is rejected by vLLM 0.33"))
        else:
            out.append(("vllm", True, "gptq_marlin" if marlin else "gptq (non-Marlin kernel)"))
        out.append(("sglang", True, "gptq_marlin" if marlin else "gptq"))
        mixed = len({(q.bits, q.group_size, q.sym) for q in qts}) > 1 or any(not ROUTER_RE.search(n) for n in skipped_linears(ckpt))
        if mixed:  # optimum's GPTQQuantizer builds every block linear with the top-level bits
            out.append(("transformers", False, "optimum's GPTQ loader ignores `dynamic` (per-module bits, skipped linears): load it with GPTQModel.load"))
        else:
            out.append(("transformers", True, "through optimum + gptqmodel"))
        return out
