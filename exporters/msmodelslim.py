"""msModelSlim (Ascend NPU; SGLang `modelslim`, vllm-ascend), as msModelSlim 26.1's AscendV1 saver writes it.

Files: quant_model_weights-0000i-of-0000N.safetensors + quant_model_weights.safetensors.index.json, and
quant_model_description.json listing EVERY tensor with its type ("W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC",
"W4A8_DYNAMIC", "FLOAT") plus version, model_quant_type, metadata, group_size, optional. config.json
carries no quantization_config. Per linear ([N, K]):

  W8A8 (static)  weight int8; input_scale f32 [1]; input_offset f32 [1] (asymmetric per-tensor int8
                 activations: x_q = round(x / input_scale) + input_offset); deq_scale [N] =
                 fp32(input_scale * weight_scale) (int64 holding the float32 bits unless the model is
                 bf16); quant_bias int32 [N] = round(bias / deq_scale - input_offset * sum_k w).
                 26.1 stores no weight_scale: qtool recovers it from deq_scale (numerics.recover_factor)
                 and, where the QTensor's own float32 scale is not that recovered value (the product
                 lost a bit), also writes weight_scale / weight_offset [N, 1] so decode stays exact.
  W8A8_DYNAMIC   weight int8; weight_scale / weight_offset f32 [N, 1] or [N, K/G]; per-token activations.
  W4A4_DYNAMIC   as W8A8_DYNAMIC with int4 codes held one per int8; per-token int4 activations.
  W4A8_DYNAMIC   weight int8 [N/2, K]: int4 two per byte along N (row 2i low nibble); weight_scale /
                 weight_offset [N, 1]; scale_bias f32 = 8 * sum(dequantized rows) (grouped by K/16 for
                 o_proj/down_proj/w2, as msModelSlim's process_scale for tp 16); int8 activations.
  bias           "<module>.bias" float32, FLOAT.

Weights may be asymmetric (weight_offset): msModelSlim's real weight is scale * (q - offset) with q
signed; qtool's asymmetric uint codes u and zero z map to q = u - 2^(b-1), offset = z - 2^(b-1).
The derived tensors (deq_scale, quant_bias, scale_bias) are checked against the rest on read.

Read also: what msModelSlim's Python API (`Calibrator.save(save_type=["safe_tensor"])`) writes, one
quant_model_weight_<type>.safetensors with quant_model_description_<type>.json (e.g. _w8a8), no
index, no version/group_size keys, and weight_scale/weight_offset kept for W8A8.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from qtensor import ActQuant, QTensor
from qtensor import numerics as nm
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, check_tensor, register, require
from .io import Subset, TensorDir, write_shards

DESC = "quant_model_description.json"
PREFIX = "quant_model_weights"
PART_BYTES = 4 * 1024**3  # msModelSlim's default part_file_size: 4 (GB)
PRIORITY = ["FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC", "W8A8_MXFP8",
            "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE", "W4A4_MXFP4_SVD"]  # W4A8_DYNAMIC hidden
TYPES = ("W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC", "W4A8_DYNAMIC")
DOWN = ("down_proj", "o_proj", "w2")
TP_NUM = 16  # the tensor-parallel split msModelSlim's W4A8 scale_bias assumes
DESC_VARIANT = re.compile(r"quant_model_description_[a-z0-9_]+\.json")  # msModelSlim's Python-API save name


def description_file(path: Path) -> Path | None:
    """quant_model_description.json, else the one quant_model_description_<type>.json; None if neither."""
    path = Path(path)
    if (path / DESC).is_file():
        return path / DESC
    found = sorted(f for f in path.glob("quant_model_description_*.json") if DESC_VARIANT.fullmatch(f.name) and f.is_file()) if path.is_dir() else []
    if len(found) > 1:
        raise QtoolError(f"{path}: several msModelSlim descriptions ({', '.join(f.name for f in found)}); keep one")
    return found[0] if found else None


def type_of(qt: QTensor) -> tuple[str | None, str | None]:
    n, k = qt.shape
    a = qt.act
    if qt.dtype != "int" or qt.bits not in (4, 8):
        return None, f"{qt.dtype}{qt.bits} weights (msModelSlim W8A8/W4A4/W4A8 hold 8/4-bit integers)"
    if qt.pre_scale is not None or qt.act_order or qt.block is not None or qt.global_scale is not None:
        return None, "a pre_scale, act order, block scales or a second-level scale"
    if qt.scales.dtype != torch.float32:
        return None, f"{qt.scales.dtype} scales (msModelSlim stores float32)"
    if qt.group_size == 0 or (qt.group_size > 0 and k % qt.group_size):
        return None, "per-tensor scales or groups that do not divide in_features"
    if a.kind == "static":
        if qt.bits != 8 or a.dtype != "int8" or a.granularity != "tensor" or a.scale is None or a.scale.numel() != 1:
            return None, "static activations other than int8 per-tensor"
        if not qt.sym or qt.group_size != -1:
            return None, "static W8A8 with asymmetric or grouped weights (msModelSlim's W8A8 is per-channel symmetric)"
        if a.offset is not None and (a.offset.numel() != 1 or float(a.offset) != round(float(a.offset)) or not -128 <= float(a.offset) <= 127):
            return None, "an activation offset that is not one int8 value"
        return "W8A8", None
    if a.kind != "dynamic" or a.granularity != "token":
        return None, "activations that are neither static per-tensor nor dynamic per-token int"
    if qt.bits == 8 and a.dtype == "int8":
        return "W8A8_DYNAMIC", None
    if qt.bits == 4 and a.dtype == "int4":
        return "W4A4_DYNAMIC", None
    if qt.bits == 4 and a.dtype == "int8":
        if not qt.sym or qt.group_size != -1 or n % 2:
            return None, "W4A8_DYNAMIC needs symmetric per-channel int4 with even out_features"
        return "W4A8_DYNAMIC", None
    return None, f"{qt.bits}-bit weights with {a.dtype} activations"


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _signed(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes q, float32 offsets) with real = scale * (q - offset)."""
    half = 1 << (qt.bits - 1)
    if qt.sym:
        return qt.codes.to(torch.int8), torch.zeros(qt.scales.shape, dtype=torch.float32)
    return (qt.codes.to(torch.int16) - half).to(torch.int8), qt.zeros.float() - half


def scale_bias(name: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """msModelSlim's W4A8 scale_bias (process_scale): 8 * row sums of the dequantized weight."""
    deq = (codes.to(torch.float32).T * scale.reshape(-1)).T
    if _leaf(name) in DOWN:
        n, k = deq.shape
        return 8 * deq.reshape(-1, k // TP_NUM).sum(dim=1, keepdim=True).reshape(n, -1)
    return 8 * deq.sum(dim=1, keepdim=True)


def quant_bias(w: torch.Tensor, deq: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """round(bias / deq_scale - input_offset * sum_k w), in msModelSlim's float32 order."""
    fp_bias = bias.float() if bias is not None else torch.zeros(w.shape[0])
    correction = w.to(torch.float32).sum(dim=1) * offset.to(torch.float32)
    return torch.round(fp_bias / deq - correction).to(torch.int32)


def deq_to_file(deq: torch.Tensor, bf16: bool) -> torch.Tensor:
    if bf16:
        return deq
    return deq.contiguous().view(torch.int32).to(torch.int64)


def deq_from_file(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    check_tensor(name, t, shape=[n], dtypes=(torch.int64, torch.float32))
    if t.dtype == torch.float32:
        return t
    if int(t.min()) < -(2**31) or int(t.max()) >= 2**31:
        raise QtoolError(f"tensor {name} holds values that are not float32 bit patterns")
    return t.to(torch.int32).view(torch.float32)


@register
class MsModelSlimFormat(Format):
    name = "msmodelslim"
    description = "msModelSlim for Ascend NPUs (W8A8, W8A8_DYNAMIC, W4A4_DYNAMIC, W4A8_DYNAMIC): vllm-ascend, SGLang on NPU"
    schemes = ("w8a8-int8", "w8a8-int8-static", "w4a4", "w4a8-int8")
    safetensors = False

    def can_hold(self, name, qt):
        t, reason = type_of(qt)
        if reason:
            return reason
        if t == "W4A8_DYNAMIC" and _leaf(name) in DOWN and qt.shape[1] % TP_NUM:
            return f"in_features {qt.shape[1]} not a multiple of {TP_NUM} (W4A8 scale_bias)"
        return None

    def encode(self, name, qt):  # written whole by write_files (quant_bias needs the layer's bias)
        raise NotImplementedError

    def quant_config(self, ckpt):
        return None  # msModelSlim removes quantization_config from config.json

    def _layer(self, name: str, qt: QTensor, bias: torch.Tensor | None, bf16: bool) -> tuple[str, dict[str, torch.Tensor]]:
        t = type_of(qt)[0]
        q, off = _signed(qt)
        if t == "W8A8":
            a = qt.act.scale.reshape(1).float()
            o = qt.act.offset.reshape(1).float() if qt.act.offset is not None else torch.zeros(1)
            deq = (a * qt.scales).squeeze(1)
            out = {"weight": q, "quant_bias": quant_bias(q, deq, o, bias), "input_scale": a, "input_offset": o, "deq_scale": deq_to_file(deq, bf16)}
            rec = nm.recover_factor(deq, a)
            if rec is None or not torch.equal(rec.reshape(-1), qt.scales.reshape(-1)):
                out["weight_scale"], out["weight_offset"] = qt.scales, off
            return t, out
        if t == "W4A8_DYNAMIC":
            packed = pk.pack_nibbles_uint8(pk.signed_to_twos(q, 4), dim=0).view(torch.int8)
            return t, {"weight": packed, "weight_scale": qt.scales, "weight_offset": off, "scale_bias": scale_bias(name, q, qt.scales)}
        return t, {"weight": q, "weight_scale": qt.scales, "weight_offset": off}

    def _plan(self, ckpt: Checkpoint):
        bf16 = ckpt.weight_dtype == torch.bfloat16
        items: list[tuple[str, torch.Tensor]] = []
        desc: dict = {}
        used: set[str] = set()
        groups = set()
        for name, qt in ckpt.qtensors.items():
            reason = self.can_hold(name, qt)  # checked here too: a lazily decoded source is checked on access
            if reason:
                raise QtoolError(f"format msmodelslim cannot hold {name}: {reason}")
            bias = ckpt.tensors[f"{name}.bias"] if f"{name}.bias" in ckpt.tensors else None
            t, tensors = self._layer(name, qt, bias, bf16)
            used.add(t)
            if qt.group_size > 0:
                groups.add(qt.group_size)
            for suffix, v in tensors.items():
                items.append((f"{name}.{suffix}", v))
                desc[f"{name}.{suffix}"] = t
            if bias is not None:
                items.append((f"{name}.bias", bias.float()))
                desc[f"{name}.bias"] = "FLOAT"
        dtype = ckpt.weight_dtype
        for key in ckpt.tensors:
            if key.endswith(".bias") and key[:-5] in ckpt.qtensors:
                continue
            v = ckpt.tensors[key]
            if v.is_floating_point() and v.element_size() > 1 and v.dtype != dtype and v.dim() > 0:
                v = v.to(dtype)
            items.append((key, v))
            desc[key] = "FLOAT"
        if len(groups) > 1:
            raise QtoolError(f"format msmodelslim cannot hold this checkpoint: several group sizes {sorted(groups)} (one group_size per model)")
        present = set(desc.values())  # FLOAT tensors count too; W4A8_DYNAMIC never names the model (msModelSlim)
        ranked = [t for t in PRIORITY if t in present]
        desc.update({"version": "1.0.0", "model_quant_type": ranked[-1] if ranked else "FLOAT", "metadata": {},
                     "group_size": next(iter(groups), 0), "optional": {}})
        return items, desc

    def write_files(self, ckpt: Checkpoint, out: Path) -> None:
        items, desc = self._plan(ckpt)
        # base's shard writer, renamed the way msModelSlim names parts (always -0000i-of-0000N + index)
        names = write_shards(out, iter(items), PART_BYTES)
        n = len(names)
        rename = {old: f"{PREFIX}-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(names)}
        for old, new in rename.items():
            os.replace(out / old, out / new)
        index = out / "model.safetensors.index.json"
        if index.exists():
            weight_map = {k: rename[v] for k, v in json.loads(index.read_text())["weight_map"].items()}
            index.unlink()
        else:
            weight_map = {k: rename[names[0]] for k, _ in items}
        total = sum(v.numel() * v.element_size() for _, v in items)
        (out / f"{PREFIX}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (out / DESC).write_text(json.dumps(desc, indent=2) + "\n")

    def detect(self, path, config):
        return description_file(path) is not None

    def decode(self, path: Path, config: dict) -> Checkpoint:
        f = description_file(path) or Path(path) / DESC
        try:
            desc = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            raise QtoolError(f"{f}: not valid JSON") from None
        if not isinstance(desc, dict):
            raise QtoolError(f"{f}: not a JSON object")
        td = TensorDir(path)
        for k in td:
            if k not in desc:
                raise QtoolError(f"tensor {k} is not listed in {f.name}")
        gsz = desc.get("group_size", 0)
        if not isinstance(gsz, int) or gsz < 0:
            raise QtoolError(f"{f.name}: group_size {gsz!r} is not a non-negative integer")
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        qts, claimed = {}, set()
        for key, t in desc.items():
            if not key.endswith(".weight") or not isinstance(t, str) or t == "FLOAT":
                continue
            name = key[:-7]
            if t not in TYPES:
                raise QtoolError(f"tensor {key}: msModelSlim type {t} is not supported by this qtool ({', '.join(TYPES)})")
            qts[name], used = self._decode_layer(td, name, t, gsz, dtype)
            for u in used:
                if desc.get(u) != t:
                    raise QtoolError(f"tensor {u} is described as {desc.get(u)!r}, its layer as {t}")
            claimed |= used
        if not qts:
            raise QtoolError(f"{path}: {f.name} lists no quantized layer")
        return Checkpoint(config, qts, Subset(td, [k for k in td if k not in claimed]), path)

    def _decode_layer(self, td, name: str, t: str, gsz: int, dtype) -> tuple[QTensor, set[str]]:
        w = require(td, f"{name}.weight")
        used = {f"{name}.weight"}
        check_tensor(f"{name}.weight", w, dtypes=(torch.int8,))
        if w.dim() != 2:
            raise QtoolError(f"tensor {name}.weight is not 2-D")

        def get(suffix, shape, dtypes):
            key = f"{name}.{suffix}"
            v = require(td, key)
            check_tensor(key, v, shape=shape, dtypes=dtypes)
            used.add(key)
            return v

        bias = td[f"{name}.bias"] if f"{name}.bias" in td else None
        if t == "W8A8":
            n, k = w.shape
            a = get("input_scale", [1], (torch.float32,))
            o = get("input_offset", [1], (torch.float32,))
            if not bool(a > 0):
                raise QtoolError(f"tensor {name}.input_scale is not positive")
            if float(o) != round(float(o)) or not -128 <= float(o) <= 127:
                raise QtoolError(f"tensor {name}.input_offset is not an int8 value")
            deq = deq_from_file(f"{name}.deq_scale", get("deq_scale", [n], (torch.int64, torch.float32)), n)
            qb = get("quant_bias", [n], (torch.int32,))
            if f"{name}.weight_scale" in td:
                s = get("weight_scale", [n, 1], (torch.float32,))
                if f"{name}.weight_offset" in td and bool(get("weight_offset", [n, 1], (torch.float32,)).any()):
                    raise QtoolError(f"tensor {name}.weight_offset: static W8A8 weights are symmetric")
                if not torch.equal((a * s).squeeze(1), deq):
                    raise QtoolError(f"tensor {name}.deq_scale is not input_scale * weight_scale")
            else:
                rec = nm.recover_factor(deq, a)
                if rec is None:
                    raise QtoolError(f"tensor {name}.deq_scale is not input_scale times any float32 weight scale")
                s = rec.reshape(n, 1)
            if not torch.equal(quant_bias(w, deq, o, bias), qb):
                raise QtoolError(f"tensor {name}.quant_bias does not match bias, deq_scale and input_offset")
            act = ActQuant("static", "int8", "tensor", scale=a.clone(), offset=None if float(o) == 0 else o.clone())
            return QTensor("int", 8, w, s, None, -1, act=act, orig_dtype=dtype), used
        bits = 8 if t == "W8A8_DYNAMIC" else 4
        if t == "W4A8_DYNAMIC":
            codes = pk.twos_to_signed(pk.unpack_nibbles_uint8(w.view(torch.uint8), dim=0), 4)
        else:
            codes = w
        n, k = codes.shape
        s = require(td, f"{name}.weight_scale")
        if s.dim() != 2 or s.shape[0] != n or k % s.shape[1]:
            raise QtoolError(f"tensor {name}.weight_scale has shape {list(s.shape)} for a weight of {n}x{k}")
        g = -1 if s.shape[1] == 1 else k // s.shape[1]
        if g > 0 and gsz and g != gsz:
            raise QtoolError(f"tensor {name}.weight_scale implies group size {g}, the description says {gsz}")
        s = get("weight_scale", [n, s.shape[1]], (torch.float32,))
        off = get("weight_offset", [n, s.shape[1]], (torch.float32,))
        half = 1 << (bits - 1)
        if int(codes.min()) < -half or int(codes.max()) >= half:
            raise QtoolError(f"tensor {name}.weight holds codes outside int{bits}")
        zeros = None
        if bool(off.any()):
            if not torch.equal(off, off.round()) or float(off.min()) < -half or float(off.max()) >= half:
                raise QtoolError(f"tensor {name}.weight_offset is not an int{bits} zero point")
            codes = (codes.to(torch.int16) + half).to(torch.uint8)
            zeros = (off + half).to(torch.uint8)
        act_dtype = "int4" if t == "W4A4_DYNAMIC" else "int8"
        if t == "W4A8_DYNAMIC":
            if zeros is not None or g != -1:
                raise QtoolError(f"tensor {name}.weight_offset/weight_scale: W4A8_DYNAMIC is symmetric per channel")
            sb = get("scale_bias", None, (torch.float32,))
            ref = scale_bias(name, codes, s)
            if sb.shape != ref.shape or not torch.allclose(sb, ref, rtol=1e-5, atol=1e-7):
                raise QtoolError(f"tensor {name}.scale_bias does not match the weight and weight_scale")
        qt = QTensor("int", bits, codes.contiguous(), s, zeros, g, act=ActQuant("dynamic", act_dtype, "token"), orig_dtype=dtype)
        return qt, used

    def engines(self, ckpt):
        return [("vllm-ascend", True, "Ascend NPU only"), ("sglang", True, "modelslim on Ascend NPU only"),
                ("vllm", False, "GPU engines do not read msModelSlim checkpoints"), ("transformers", False, "no msModelSlim loader")]
