"""compressed-tensors (`quant_method: compressed-tensors`; LLM Compressor's output, vLLM/SGLang/transformers).

Formats written, with compressed-tensors 0.20's own tensor and field names:
- pack-quantized (int weight-only, 4/8 bit): weight_packed int32 [N, K*b/32] (codes + 2^(b-1), lowest
  bits first, along K), weight_scale [N, K/G] or [N, 1], weight_shape int64 [2], and when asymmetric
  weight_zero_point int32 [N*b/32, K/G] (zero points packed along N the same way).
- int-quantized (W8A8): weight int8 [N, K], weight_scale [N, 1]; static activations add input_scale [1].
- float-quantized (FP8): weight float8_e4m3fn, weight_scale [1] tensor | [N, 1] channel |
  [N, K/G] group | [ceil(N/bn), ceil(K/bk)] block; static activations add input_scale [1].
- nvfp4-pack-quantized: weight_packed uint8 [N, K/2] (even element low nibble), weight_scale e4m3
  [N, K/16], weight_global_scale float32 [1] = 1 / qtool's global scale (the reciprocal of
  ModelOpt's weight_scale_2); input_global_scale likewise.
Scales keep their exact dtype. `ignore` lists the linears left unquantized (lm_head, routers);
FP8 KV cache (Checkpoint.kv_scales): `kv_cache_scheme` {num_bits 8, type float, strategy tensor, dynamic
false} and `<attention module>.k_scale` / `.v_scale` [1] per layer (LLM Compressor's names; vLLM remaps
them to `self_attn.attn.k_scale`). Written float32; LLM Compressor's model-dtype scales are read too.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from qtensor import ActQuant, QTensor
from qtensor import numerics as nm
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .awq import unquantized_linears
from .base import Checkpoint, Format, check_tensor, passthrough, read_kv_scales, register, require
from .io import TensorDir

VERSION = "0.20.0"  # the compressed-tensors release whose layout this module follows
PACK_BITS = (4, 8)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- QTensor <-> config_groups scheme ----------------------------------------------------------


def _weights_args(qt: QTensor) -> dict:
    if qt.dtype == "int":
        a = {"num_bits": qt.bits, "type": "int", "symmetric": qt.sym}
    elif qt.dtype == "fp8_e4m3":
        a = {"num_bits": 8, "type": "float", "symmetric": True}
    else:  # e2m1 NVFP4
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group", "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
    if qt.block is not None:
        a.update(group_size=None, strategy="block", block_structure=list(qt.block))
    elif qt.group_size == 0:
        a.update(group_size=None, strategy="tensor")
    elif qt.group_size == -1:
        a.update(group_size=None, strategy="channel")
    else:
        a.update(group_size=qt.group_size, strategy="group")
    a["dynamic"] = False
    return a


def _input_args(qt: QTensor) -> dict | None:
    act = qt.act
    if act.kind == "none":
        return None
    if act.dtype == "e2m1":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group", "dynamic": "local",
                "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
    typ = "int" if act.dtype == "int8" else "float"
    if act.kind == "static":
        return {"num_bits": 8, "type": typ, "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}
    if act.granularity == "group":
        return {"num_bits": 8, "type": typ, "symmetric": True, "group_size": 128, "strategy": "group", "dynamic": True}
    return {"num_bits": 8, "type": typ, "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}


def compression_format(qt: QTensor) -> str:
    if qt.dtype == "e2m1":
        return "nvfp4-pack-quantized"
    if qt.dtype == "fp8_e4m3":
        return "float-quantized"
    return "pack-quantized" if qt.act.kind == "none" else "int-quantized"


def ct_reason(qt: QTensor) -> str | None:
    """Why compressed-tensors (as qtool writes it) cannot hold `qt` exactly."""
    n, k = qt.shape
    if qt.pre_scale is not None:
        return "a separate pre-quantization scale (compressed-tensors has no such tensor)"
    if qt.g_idx is not None:
        plain = torch.arange(k) // (qt.group_size if qt.group_size > 0 else k)
        if not torch.equal(qt.g_idx.long(), plain):
            return "act order (qtool writes no weight_g_idx)"
    if qt.dtype == "int":
        if qt.block is not None or qt.group_size == 0:
            return "block or per-tensor int scales"
        if qt.group_size > 0 and k % qt.group_size:
            return f"in_features {k} not a multiple of group size {qt.group_size}"
        if qt.scales.dtype not in _SCALE_DTYPES:
            return f"{qt.scales.dtype} scales"
        if qt.act.kind == "none":
            if qt.bits not in PACK_BITS:
                return f"{qt.bits}-bit weights (pack-quantized W4A16/W8A16 only)"
            if (k * qt.bits) % 32 or (not qt.sym and (n * qt.bits) % 32):
                return f"shape {n}x{k} does not pack into int32 words at {qt.bits} bits"
            return None
        if qt.bits != 8 or qt.act.dtype != "int8":
            return f"int{qt.bits} weights with {qt.act.dtype} activations (int-quantized W8A8 only)"
        if not qt.sym:
            return "asymmetric W8A8 weights"
        if qt.act.offset is not None:
            return "asymmetric static activations (an input offset)"
        if qt.act.kind == "static" and (qt.act.scale is None or qt.act.scale.numel() != 1):
            return "static activations without a per-tensor input scale"
        if qt.act.kind == "dynamic" and qt.act.granularity != "token":
            return f"dynamic {qt.act.granularity} int8 activations"
        return None
    if qt.dtype == "fp8_e4m3":
        if qt.scales.dtype not in _SCALE_DTYPES:
            return f"{qt.scales.dtype} scales"
        if qt.global_scale is not None:
            return "a second-level global scale on FP8"
        if qt.group_size > 0 and qt.block is None and k % qt.group_size:
            return f"in_features {k} not a multiple of group size {qt.group_size}"
        if qt.act.kind != "none" and qt.act.dtype != "fp8_e4m3":
            return f"FP8 weights with {qt.act.dtype} activations"
        if qt.act.kind == "static" and (qt.act.scale is None or qt.act.scale.numel() != 1):
            return "static activations without a per-tensor input scale"
        if qt.act.offset is not None:
            return "asymmetric static activations (an input offset)"
        return None
    if qt.dtype == "e2m1":
        if qt.scales.dtype != torch.float8_e4m3fn or qt.group_size != 16 or qt.global_scale is None:
            return "e2m1 weights that are not NVFP4 (e4m3 scales per 16 with a global scale); MX formats are not written"
        if k % 16:
            return f"in_features {k} not a multiple of 16"
        if nm.f32_reciprocal(qt.global_scale) is None:
            return ("global scale is not the float32 reciprocal of any float32 (compressed-tensors stores 1/scale); "
                    "a quantizer can pick it with numerics.f32_reciprocal_snap")
        if qt.act.kind == "static" or (qt.act.kind != "none" and qt.act.dtype != "e2m1"):
            return f"NVFP4 weights with {qt.act.kind} {qt.act.dtype} activations"
        if qt.act.kind == "dynamic":
            if qt.act.scale is None:
                return "NVFP4 activations without a calibrated input global scale (compressed-tensors needs input_global_scale)"
            if nm.f32_reciprocal(qt.act.scale) is None:
                return "input global scale is not the float32 reciprocal of any float32 (compressed-tensors stores 1/scale)"
        return None
    return f"{qt.dtype} weights (MX formats are not written to compressed-tensors)"


def encode_ct_tensors(name: str, qt: QTensor) -> dict[str, torch.Tensor]:
    n, k = qt.shape
    fmt = compression_format(qt)
    out: dict[str, torch.Tensor] = {}
    if fmt == "pack-quantized":
        codes = pk.signed_to_offset(qt.codes, qt.bits) if qt.sym else qt.codes  # CT: signed code + 2^(b-1)
        out[f"{name}.weight_packed"] = pk.pack_int32(codes, qt.bits, dim=1)
        out[f"{name}.weight_scale"] = qt.scales.contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not qt.sym:  # CT's signed zero point + 2^(b-1) == qtool's unsigned zero point
            out[f"{name}.weight_zero_point"] = pk.pack_int32(qt.zeros, qt.bits, dim=0)
    elif fmt == "int-quantized":
        out[f"{name}.weight"] = qt.codes.to(torch.int8).contiguous()
        out[f"{name}.weight_scale"] = qt.scales.contiguous()
    elif fmt == "float-quantized":
        out[f"{name}.weight"] = qt.codes.contiguous()
        out[f"{name}.weight_scale"] = qt.scales.contiguous()
    else:  # nvfp4
        out[f"{name}.weight_packed"] = pk.pack_nibbles_uint8(qt.codes, dim=1)
        out[f"{name}.weight_scale"] = qt.scales.contiguous()
        out[f"{name}.weight_global_scale"] = nm.f32_reciprocal(qt.global_scale).reshape(1)
        if qt.act.kind == "dynamic":
            out[f"{name}.input_global_scale"] = nm.f32_reciprocal(qt.act.scale).reshape(1)
    if qt.act.kind == "static":
        out[f"{name}.input_scale"] = qt.act.scale.reshape(1).contiguous()
    return out


def _scheme_key(qt: QTensor) -> str:
    import json

    return json.dumps([compression_format(qt), _weights_args(qt), _input_args(qt)], sort_keys=True)


# ---- reading -----------------------------------------------------------------------------------


def _read_kv(td, scheme) -> tuple[dict, str | None]:
    if scheme is None:
        stray = next((k for k in td if k.endswith((".k_scale", ".v_scale"))), None)
        if stray is not None:
            raise QtoolError(f"tensor {stray} is a KV-cache scale, but quantization_config has no kv_cache_scheme")
        return {}, None
    if not isinstance(scheme, dict):
        raise QtoolError("compressed-tensors kv_cache_scheme is not an object")
    want = {"type": "float", "num_bits": 8}
    for key, val in want.items():
        if scheme.get(key) != val:
            raise QtoolError(f"compressed-tensors kv_cache_scheme {key} {scheme.get(key)!r}: only FP8 (float, 8 bits) KV caches are read")
    if scheme.get("dynamic") not in (False, None) or (scheme.get("strategy") or "tensor") != "tensor" or scheme.get("symmetric", True) is not True:
        raise QtoolError("compressed-tensors kv_cache_scheme: only static symmetric per-tensor FP8 scales are read")
    kv, _ = read_kv_scales(td, ".k_scale", ".v_scale")
    if not kv:
        raise QtoolError("compressed-tensors kv_cache_scheme without any .k_scale / .v_scale tensors")
    return kv, "fp8_e4m3"


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in ("Linear", "LinearBase")


def _scheme_for(name: str, groups: dict, ignore: list) -> dict | None:
    if any(_matches(name, t) and t not in ("Linear", "LinearBase") for t in ignore):
        return None
    exact = [g for g in groups.values() if any(t == name or (t.startswith("re:") and _matches(name, t)) for t in g.get("targets") or [])]
    if exact:
        return exact[0]
    cls = [g for g in groups.values() if any(t in ("Linear", "LinearBase") for t in g.get("targets") or [])]
    return cls[0] if cls else None


def _act_from_args(a: dict | None, td, name: str) -> ActQuant:
    if not a:
        return ActQuant()
    typ, bits, dyn = a.get("type", "int"), int(a.get("num_bits", 8)), a.get("dynamic", False)
    strategy = a.get("strategy") or "tensor"
    if typ == "float" and bits == 4:
        if f"{name}.input_global_scale" in td:
            g = td[f"{name}.input_global_scale"]
            check_tensor(f"{name}.input_global_scale", g, dtypes=(torch.float32,))
            if g.numel() != 1:
                raise QtoolError(f"tensor {name}.input_global_scale has shape {list(g.shape)}, expected [1]")
            gs = (1.0 / g.float()).reshape(())
        else:
            gs = None
        return ActQuant("dynamic", "e2m1", "group", scale=gs, group_size=int(a.get("group_size") or 16))
    dtype = "int8" if typ == "int" else "fp8_e4m3"
    if bits != 8:
        raise QtoolError(f"{name}: {bits}-bit {typ} input activations are not supported")
    if dyn is False:
        s = require(td, f"{name}.input_scale")
        check_tensor(f"{name}.input_scale", s, dtypes=_SCALE_DTYPES)
        if s.numel() != 1:
            raise QtoolError(f"tensor {name}.input_scale has shape {list(s.shape)}, expected [1] (per-tensor static)")
        if not bool(a.get("symmetric", True)):
            raise QtoolError(f"{name}: asymmetric input activations are not supported")
        return ActQuant("static", dtype, "tensor", scale=s.reshape(1))
    if strategy == "group":
        return ActQuant("dynamic", dtype, "group", group_size=int(a.get("group_size") or 128))
    return ActQuant("dynamic", dtype, "token")


def decode_ct_module(td, name: str, group: dict, fmt: str) -> tuple[QTensor, set[str]]:
    w = group.get("weights") or {}
    typ, bits = w.get("type", "int"), int(w.get("num_bits", 8))
    strategy = w.get("strategy") or "tensor"
    sym = bool(w.get("symmetric", True))
    gsize = w.get("group_size")
    claimed = {f"{name}.{x}" for x in ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                        "weight_global_scale", "input_scale", "input_global_scale", "input_zero_point")}
    act = _act_from_args(group.get("input_activations"), td, name)
    scale = require(td, f"{name}.weight_scale")
    if fmt == "nvfp4-pack-quantized":
        packed = require(td, f"{name}.weight_packed")
        check_tensor(f"{name}.weight_packed", packed, dtypes=(torch.uint8,))
        if packed.dim() != 2:
            raise QtoolError(f"tensor {name}.weight_packed is not 2-D")
        n, k = packed.shape[0], packed.shape[1] * 2
        check_tensor(f"{name}.weight_scale", scale, shape=[n, k // 16], dtypes=(torch.float8_e4m3fn,))
        g = require(td, f"{name}.weight_global_scale")
        check_tensor(f"{name}.weight_global_scale", g, dtypes=(torch.float32,))
        if g.numel() != 1:
            raise QtoolError(f"tensor {name}.weight_global_scale has shape {list(g.shape)}, expected [1]")
        codes = pk.unpack_nibbles_uint8(packed, dim=1)
        return QTensor("e2m1", 4, codes, scale, None, 16, global_scale=(1.0 / g.float()).reshape(()), act=act), claimed
    if fmt == "pack-quantized":
        if typ != "int" or bits not in (2, 3, 4, 8):
            raise QtoolError(f"{name}: pack-quantized {typ}{bits} weights are not supported")
        packed = require(td, f"{name}.weight_packed")
        check_tensor(f"{name}.weight_packed", packed, dtypes=(torch.int32,))
        if packed.dim() != 2:
            raise QtoolError(f"tensor {name}.weight_packed is not 2-D")
        n, k = packed.shape[0], packed.shape[1] * 32 // bits
        if f"{name}.weight_shape" in td:
            shp = td[f"{name}.weight_shape"]
            if [int(v) for v in shp.reshape(-1).tolist()] != [n, k]:
                raise QtoolError(f"tensor {name}.weight_shape says {shp.tolist()}, weight_packed holds [{n}, {k}] (padded shapes are not supported)")
        codes = pk.unpack_int32(packed, bits, dim=1)
    else:
        wt = require(td, f"{name}.weight")
        if wt.dim() != 2:
            raise QtoolError(f"tensor {name}.weight is not 2-D")
        n, k = wt.shape
        if fmt == "int-quantized":
            check_tensor(f"{name}.weight", wt, dtypes=(torch.int8,))
            if typ != "int" or bits != 8:
                raise QtoolError(f"{name}: int-quantized {typ}{bits} weights are not supported")
            codes = wt
        elif fmt in ("float-quantized", "naive-quantized"):
            check_tensor(f"{name}.weight", wt, dtypes=(torch.float8_e4m3fn,))
            codes = wt
        else:
            raise QtoolError(f"compressed-tensors format '{fmt}' is not supported")
    block = None
    if strategy == "tensor":
        gs, shape = 0, [1]
    elif strategy == "channel":
        gs, shape = -1, [n, 1]
    elif strategy == "group":
        gs = int(gsize or 0)
        if gs <= 0 or k % gs:
            raise QtoolError(f"{name}: group_size {gsize} does not divide in_features {k}")
        shape = [n, k // gs]
    elif strategy == "block":
        bs = w.get("block_structure") or []
        if len(bs) != 2:
            raise QtoolError(f"{name}: block strategy without a 2-element block_structure")
        block = (int(bs[0]), int(bs[1]))
        gs, shape = block[1], [math.ceil(n / block[0]), math.ceil(k / block[1])]
    else:
        raise QtoolError(f"{name}: weight strategy '{strategy}' is not supported")
    check_tensor(f"{name}.weight_scale", scale, shape=shape if strategy != "tensor" else None, dtypes=_SCALE_DTYPES)
    if strategy == "tensor" and scale.numel() != 1:
        raise QtoolError(f"tensor {name}.weight_scale has shape {list(scale.shape)}, expected [1]")
    if strategy == "tensor":
        scale = scale.reshape(1)
    if typ == "float":
        return QTensor("fp8_e4m3", 8, codes, scale, None, gs, block=block, act=act), claimed
    zeros = None
    if fmt == "pack-quantized":
        if sym:
            codes = pk.offset_to_signed(codes, bits)
        else:
            zp = require(td, f"{name}.weight_zero_point")
            check_tensor(f"{name}.weight_zero_point", zp, shape=[n * bits // 32, shape[1]], dtypes=(torch.int32,))
            zeros = pk.unpack_int32(zp, bits, dim=0)
    elif not sym:
        raise QtoolError(f"{name}: asymmetric int-quantized weights are not supported")
    return QTensor("int", bits, codes, scale, zeros, gs, act=act), claimed


@register
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    description = "compressed-tensors (LLM Compressor): vLLM, SGLang, transformers"
    schemes = ("w4a16", "w8a16", "w8a8-int8", "w8a8-int8-static", "fp8", "fp8-dynamic", "fp8-block", "nvfp4")

    kv_cache = True

    def can_hold(self, name, qt):
        return ct_reason(qt)

    def encode_kv(self, ckpt):
        out = {}
        for attn, (k, v) in ckpt.kv_scales.items():
            out[f"{attn}.k_scale"], out[f"{attn}.v_scale"] = k.reshape(1), v.reshape(1)
        return out

    def encode(self, name, qt):
        return encode_ct_tensors(name, qt)

    def quant_config(self, ckpt):
        groups: dict[str, list[str]] = {}
        first: dict[str, QTensor] = {}
        for name, qt in ckpt.qtensors.items():
            key = _scheme_key(qt)
            groups.setdefault(key, []).append(name)
            first.setdefault(key, qt)
        ordered = sorted(groups, key=lambda k: -len(groups[k]))
        formats = {compression_format(first[k]) for k in ordered}
        config_groups = {}
        for i, key in enumerate(ordered):
            qt = first[key]
            config_groups[f"group_{i}"] = {
                "targets": ["Linear"] if len(ordered) == 1 else sorted(groups[key]),
                "weights": _weights_args(qt),
                "input_activations": _input_args(qt),
                "output_activations": None,
                "format": compression_format(qt) if len(formats) > 1 else None,
            }
        kv = None
        if ckpt.kv_scales:
            kv = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}
        return {
            "quant_method": "compressed-tensors",
            "version": VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": unquantized_linears(ckpt),
            "kv_cache_scheme": kv,
            "global_compression_ratio": None,
            "moe_sparsity_config": None,
            "sparsity_config": {},
            "transform_config": {},
        }

    def detect(self, path, config):
        qc = config.get("quantization_config") or config.get("compression_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        qc = config.get("quantization_config") or config.get("compression_config")
        if qc.get("quantization_status", "compressed") != "compressed":
            raise QtoolError(f"compressed-tensors quantization_status '{qc.get('quantization_status')}' (only compressed checkpoints are read)")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise QtoolError("compressed-tensors quantization_config has no config_groups")
        if qc.get("sparsity_config") and qc["sparsity_config"].get("format") not in (None, "dense"):
            raise QtoolError("compressed-tensors sparsity is not supported")
        top_fmt = qc.get("format") or "dense"
        ignore = qc.get("ignore") or []
        td = TensorDir(path)
        names = sorted({k.rsplit(".", 1)[0] for k in td if k.endswith((".weight_packed", ".weight_scale"))})
        qts, claimed = {}, set()
        for name in names:
            group = _scheme_for(name, groups, ignore)
            if group is None or not group.get("weights"):
                continue
            fmt = group.get("format") or top_fmt
            if fmt == "mixed-precision":
                raise QtoolError(f"{name}: mixed-precision config without a per-group format")
            qts[name], c = decode_ct_module(td, name, group, fmt)
            claimed |= c
        if not qts:
            raise QtoolError(f"{path}: compressed-tensors config but no quantized weights")
        kv, kv_dtype = _read_kv(td, qc.get("kv_cache_scheme"))
        claimed |= {k for k in td if k.endswith((".k_scale", ".v_scale"))}
        return Checkpoint(config, qts, passthrough(td, claimed), path, kv_scales=kv, kv_cache_dtype=kv_dtype)

    def engines(self, ckpt):
        qts = list(ckpt.qtensors.values())
        out = []
        notes = []
        if any(q.dtype == "int" and q.act.kind == "none" and q.scales.dtype != ckpt.weight_dtype for q in qts):
            notes.append(f"engines cast the {qts[0].scales.dtype} weight_scale to the model dtype {ckpt.weight_dtype} on load")
        if ckpt.kv_scales:
            notes.append("FP8 KV-cache scales load with --kv-cache-dtype fp8")
        why = "; ".join(notes) or "compressed-tensors"
        out.append(("vllm", True, why))
        out.append(("sglang", True, why))
        out.append(("transformers", True, "CompressedTensorsConfig (decompresses to dense weights)"))
        return out
