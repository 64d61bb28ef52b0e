"""NVIDIA ModelOpt unified HF checkpoint (export_hf_checkpoint of nvidia-modelopt 0.47).

hf_quant_config.json {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo",
"kv_cache_quant_algo", ["group_size", "has_zero_point", "pre_quant_scale"], "exclude_modules"}} and
the same content flattened into config.json quantization_config (quant_method "modelopt",
compressed-tensors-like config_groups for FP8/NVFP4, "ignore", "producer"). Per layer:

  FP8        weight float8_e4m3fn [N, K]; weight_scale float32 [] = amax/448;
             input_scale float32 [] (static per-tensor activations)
  NVFP4      weight uint8 [N, K/2] (E2M1, even element in the low nibble); weight_scale e4m3
             [N, K/16]; weight_scale_2 float32 []; input_scale float32 [] (activation global scale)
             real weight = e2m1 * weight_scale * weight_scale_2
  W4A16_AWQ  (INT4_AWQ) weight uint8 [N/2, K]: signed int4 two's complement, two per byte packed
             along the OUTPUT dim (row 2i low nibble); weight_scale float32 [N, K/G];
             pre_quant_scale [K] (model dtype) where AWQ smoothing was not folded into a norm
  W4A8_AWQ   as W4A16_AWQ (codes = round(w / weight_scale)) plus weight_scale_2 float32 [] (fp8 second
             level: real = fp8(int4 * weight_scale / weight_scale_2) * weight_scale_2, as ModelOpt's
             SequentialQuantizer and TensorRT-LLM's W4A8 kernel compute it; QTensor.global_scale of an
             int weight) and input_scale float32 [] (static fp8 activations). Verified against
             export_hf_checkpoint with W4A8_AWQ_BETA_CFG.
  W8A8_SQ_PER_CHANNEL  (INT8_SMOOTHQUANT_CFG, "int8_sq") weight int8 [N, K] = round(w / weight_scale)
             clamped to [-128, 127]; weight_scale float32 [N] = per-row amax/127; input_scale float32 []
             = amax/127 of the smoothed input (STATIC per-tensor int8: ModelOpt's SmoothQuant collects
             per-channel amax only to compute the smoothing, then sets axis=None and one amax; there
             is no dynamic per-token mode in its export); pre_quant_scale [K] (model dtype) on every
             layer ModelOpt wrote it (0.47 keeps the smoothing separate for int8_sq, q/k/v and gate/up
             share one). Layers without pre_quant_scale (qtool's smoothquant folds it into the norm)
             are written without it. config.json gets no config_groups (ModelOpt's
             convert_hf_quant_config_format has none for it). Verified against export_hf_checkpoint.
             (ModelOpt's fake quant clamps activations to [-127, 127], qtool's runtime and TensorRT-LLM
             to [-128, 127]: only inputs beyond the calibrated amax can differ.)
  KV cache   <attn>.k_proj.k_scale / <attn>.v_proj.v_scale float32 [] = amax/448 (kv_cache_quant_algo FP8;
             Checkpoint.kv_scales; vLLM/SGLang remap them to <attn>.attn.k_scale)

Mixed algorithms are written as ModelOpt does: quant_algo MIXED_PRECISION with quantized_layers.
Engine rule enforced on write: fused q/k/v and gate/up shards share `input_scale`, `weight_scale_2`
and `pre_quant_scale` (vLLM/SGLang/TensorRT-LLM keep one value per fused tensor, and a fused GEMM
reads one input; ModelOpt's export unifies them the same way); FP8 per-tensor weight scales may
differ (the engines re-quantize the shards to their max, as they do for ModelOpt's own exports).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

from qtensor import ActQuant, QTensor
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, check_tensor, passthrough, read_kv_scales, register, require
from .fused import check_shared
from .io import TensorDir

PRODUCER = {"name": "modelopt", "version": "0.47.0"}  # the export layout mirrored (qtool.json records qtool)
F32 = (torch.float32,)


def _scalar(t: torch.Tensor | None) -> bool:
    return t is not None and t.numel() == 1 and t.dtype == torch.float32


def algo_of(qt: QTensor) -> tuple[str | None, str | None]:
    """(ModelOpt quant_algo, None) or (None, reason the layer cannot be held)."""
    n, k = qt.shape
    a = qt.act
    if qt.g_idx is not None and qt.act_order:
        return None, "act order (ModelOpt has no g_idx)"
    if qt.dtype == "fp8_e4m3":
        if qt.group_size != 0 or qt.block is not None or not _scalar(qt.scales):
            return None, "FP8 weights without one float32 per-tensor scale (ModelOpt FP8 is per-tensor)"
        if a.kind != "static" or a.dtype != "fp8_e4m3" or not _scalar(a.scale) or a.offset is not None:
            return None, "FP8 without static per-tensor fp8 input scale (ModelOpt FP8 needs input_scale)"
        if qt.pre_scale is not None:
            return None, "pre_scale on an FP8 layer"
        return "FP8", None
    if qt.dtype == "e2m1":
        if qt.scales.dtype != torch.float8_e4m3fn or qt.group_size != 16 or not _scalar(qt.global_scale):
            return None, "e2m1 weights that are not NVFP4 (e4m3 scales per 16 and a float32 global scale)"
        if a.dtype != "e2m1" or a.kind == "none" or not _scalar(a.scale):
            return None, "NVFP4 activations without a calibrated global input scale (ModelOpt NVFP4 needs input_scale)"
        if k % 16 or qt.scales.shape != (n, k // 16):
            return None, f"NVFP4 scale shape {list(qt.scales.shape)} for weight {n}x{k}"
        if qt.pre_scale is not None:
            return None, "pre_scale on an NVFP4 layer (NVFP4_AWQ is not written)"
        return "NVFP4", None
    if qt.dtype == "int" and qt.bits == 8:
        return _int8_algo(qt)
    if qt.dtype == "int":
        if qt.bits != 4 or not qt.sym:
            return None, f"{qt.bits}-bit {'symmetric' if qt.sym else 'asymmetric'} int weights (ModelOpt INT4_AWQ is 4-bit symmetric)"
        if qt.group_size <= 0 or k % qt.group_size or qt.scales.shape != (n, k // qt.group_size):
            return None, "int4 without groups along K (ModelOpt INT4_AWQ is grouped)"
        if qt.scales.dtype != torch.float32:
            return None, f"{qt.scales.dtype} scales (ModelOpt INT4_AWQ stores float32)"
        if n % 2:
            return None, f"odd out_features {n} (int4 packs two rows per byte)"
        if qt.pre_scale is not None and qt.pre_scale.shape != (k,):
            return None, f"pre_scale of shape {list(qt.pre_scale.shape)}"
        if a.kind == "none":
            if qt.global_scale is not None:
                return None, "an fp8 second-level weight scale without fp8 activations"
            return "W4A16_AWQ", None
        if a.kind != "static" or a.dtype != "fp8_e4m3" or not _scalar(a.scale) or a.offset is not None or not _scalar(qt.global_scale):
            return None, "int4 with activations other than W4A8_AWQ's (static per-tensor fp8 input_scale and an fp8 weight_scale_2)"
        return "W4A8_AWQ", None
    return None, f"{qt.dtype} weights"


def _int8_algo(qt: QTensor) -> tuple[str | None, str | None]:
    """W8A8_SQ_PER_CHANNEL (ModelOpt INT8 SmoothQuant) or the reason an int8 layer is not it."""
    n, k = qt.shape
    a = qt.act
    if not qt.sym:
        return None, "asymmetric int8 weights (ModelOpt W8A8_SQ_PER_CHANNEL is symmetric)"
    if qt.group_size != -1 or qt.scales.shape != (n, 1):
        return None, "int8 weights not scaled per output channel (ModelOpt W8A8_SQ_PER_CHANNEL has one weight_scale per row)"
    if qt.scales.dtype != torch.float32:
        return None, f"{qt.scales.dtype} scales (ModelOpt W8A8_SQ_PER_CHANNEL stores float32)"
    if qt.global_scale is not None:
        return None, "a second-level weight scale on int8 weights"
    if qt.pre_scale is not None and qt.pre_scale.shape != (k,):
        return None, f"pre_scale of shape {list(qt.pre_scale.shape)}"
    if a.kind == "none":
        return None, "int8 weight-only (ModelOpt W8A16 is not written by qtool)"
    if a.kind != "static" or a.dtype != "int8" or a.granularity != "tensor" or not _scalar(a.scale) or a.offset is not None:
        how = "dynamic per-token" if a.kind == "dynamic" else f"{a.kind} {a.dtype} {a.granularity}"
        return None, (f"int8 weights with {how} activations (ModelOpt W8A8_SQ_PER_CHANNEL needs static per-tensor "
                      "int8 activations with one float32 input_scale; ModelOpt has no per-token int8 export)")
    return "W8A8_SQ_PER_CHANNEL", None


def layer_config(algo: str, qt: QTensor) -> dict:
    """Per-layer entry as ModelOpt's process_layer_quant_config writes it."""
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        return {"quant_algo": algo, "group_size": qt.group_size, "has_zero_point": False, "pre_quant_scale": True}
    if algo == "NVFP4":
        return {"quant_algo": algo, "group_size": qt.group_size}
    return {"quant_algo": algo}


def group_config(cfg: dict) -> dict:
    """compressed-tensors style config group (ModelOpt's convert_hf_quant_config_format)."""
    algo, gs = cfg["quant_algo"], cfg.get("group_size")
    if algo == "FP8":
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"}, "weights": {"dynamic": False, "num_bits": 8, "type": "float"}}
    if algo == "W4A8_AWQ":  # as ModelOpt's _quant_algo_to_group_config has it (weights "float", sic)
        g = gs or 128
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float", "group_size": g},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": g}}
    if algo == "NVFP4":
        g = gs or 16
        return {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": g},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": g}}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "int"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "int", "strategy": "channel"}}
    return {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": gs or 128}}


def _kv_scales(ckpt: Checkpoint) -> bool:
    return bool(ckpt.kv_scales)


def _read_kv(td, algo) -> tuple[dict, str | None]:
    suffixes = (".k_proj.k_scale", ".v_proj.v_scale")
    if algo is None:
        stray = next((k for k in td if k.endswith(suffixes)), None)
        if stray is not None:
            raise QtoolError(f"tensor {stray} is a KV-cache scale, but kv_cache_quant_algo is null")
        return {}, None
    if algo != "FP8":
        raise QtoolError(f"ModelOpt kv_cache_quant_algo {algo!r} is not supported by this qtool (FP8)")
    kv, _ = read_kv_scales(td, *suffixes)
    if not kv:
        raise QtoolError("kv_cache_quant_algo FP8 without any .k_proj.k_scale / .v_proj.v_scale tensors")
    return kv, "fp8_e4m3"


def _excluded(ckpt: Checkpoint) -> list[str]:
    """Modules with a 2-D weight left unquantized (embeddings, lm_head, skipped linears)."""
    out = {"lm_head"}
    for k in ckpt.tensors:
        if k.endswith(".weight") and k[:-7] not in ckpt.qtensors:
            t = ckpt.tensors[k]
            if t.dim() == 2:
                out.add(k[:-7])
    return sorted(m for m in out if m not in ckpt.qtensors)


def hf_quant_config(ckpt: Checkpoint) -> dict:
    per = {}
    for name, qt in ckpt.qtensors.items():
        algo, reason = algo_of(qt)
        if reason:
            raise QtoolError(f"format modelopt cannot hold {name}: {reason}")
        per[name] = layer_config(algo, qt)
    kinds = {json.dumps(c, sort_keys=True) for c in per.values()}
    q: dict = {"quant_algo": None, "kv_cache_quant_algo": "FP8" if _kv_scales(ckpt) else None}
    if len(kinds) == 1:
        q.update(next(iter(per.values())))
        q["exclude_modules"] = _excluded(ckpt)
    else:
        q["quant_algo"] = "MIXED_PRECISION"
        q["quantized_layers"] = dict(sorted(per.items()))
    return {"producer": dict(PRODUCER), "quantization": q}


def config_block(hf: dict) -> dict:
    """config.json quantization_config, as ModelOpt 0.47 derives it from hf_quant_config."""
    q = hf["quantization"]
    algo = q.get("quant_algo")
    out: dict = {}
    if algo in ("FP8", "NVFP4"):
        out["config_groups"] = {"group_0": {**group_config(q), "targets": ["Linear"]}}
    elif algo == "MIXED_PRECISION":
        groups: dict[str, list[str]] = {}
        for name, cfg in q["quantized_layers"].items():
            groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(name)
        out["config_groups"] = {f"group_{i}": {**group_config(json.loads(key)), "targets": sorted(names)} for i, (key, names) in enumerate(groups.items())}
        out["quantized_layers"] = q["quantized_layers"]
    ex = q.get("exclude_modules")
    out["ignore"] = ex if ex is not None else []
    if algo:
        out["quant_algo"] = algo
    if q.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf["producer"]
    out["quant_method"] = "modelopt"
    return out


def _check_groups(qc, q: dict) -> None:
    """config.json's config_groups (what engines read first) must say what the quant_algo implies."""
    if not isinstance(qc, dict) or "config_groups" not in qc or q.get("quant_algo") not in ("FP8", "NVFP4"):
        return
    groups = qc["config_groups"]
    want = group_config(q)
    if not isinstance(groups, dict) or not groups:
        raise QtoolError("config.json quantization_config.config_groups is not a non-empty object")
    for gname, g in groups.items():
        for part, spec in want.items():
            got = g.get(part) if isinstance(g, dict) else None
            if not isinstance(got, dict):
                raise QtoolError(f"config.json quantization_config.config_groups.{gname}.{part} is missing")
            for key in ("num_bits", "type", "group_size"):
                if key in spec and got.get(key) != spec[key]:
                    raise QtoolError(f"config.json quantization_config.config_groups.{gname}.{part}.{key} is {got.get(key)!r}, "
                                     f"{q['quant_algo']} means {spec[key]!r}")


def read_hf_quant_config(path: Path, config: dict) -> dict:
    """The `quantization` table: hf_quant_config.json, else config.json's flattened block."""
    f = Path(path) / "hf_quant_config.json"
    if f.is_file():
        try:
            hf = json.loads(f.read_text())
            q = hf["quantization"]
        except (ValueError, KeyError, TypeError):
            raise QtoolError(f"{f}: not a valid ModelOpt hf_quant_config.json") from None
        if not isinstance(q, dict):
            raise QtoolError(f"{f}: 'quantization' is not an object")
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "quant_algo" in qc and qc["quant_algo"] != q.get("quant_algo"):
            raise QtoolError(f"{f} says quant_algo {q.get('quant_algo')!r} but config.json quantization_config says {qc['quant_algo']!r}")
        _check_groups(qc, q)
        return q
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict) or "quant_algo" not in qc:
        raise QtoolError(f"{path}: modelopt checkpoint without hf_quant_config.json or quant_algo in config.json")
    _check_groups(qc, {"quant_algo": qc["quant_algo"]})
    kv = qc.get("kv_cache_scheme")  # ModelOpt writes FP8 as {"num_bits": 8, "type": "float", ...}, others as the algo name
    kv_algo = None if kv is None else ("FP8" if isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8 else str(kv))
    return {"quant_algo": qc["quant_algo"], "kv_cache_quant_algo": kv_algo, "exclude_modules": qc.get("ignore", []), "quantized_layers": qc.get("quantized_layers"),
            "group_size": next((g.get("weights", {}).get("group_size") for g in (qc.get("config_groups") or {}).values()), None)}


def decode_layer(td, name: str, algo: str, cfg: dict, orig_dtype: torch.dtype) -> tuple[QTensor, set[str]]:
    w = require(td, f"{name}.weight")
    ws = require(td, f"{name}.weight_scale")
    used = {f"{name}.weight", f"{name}.weight_scale"}
    if w.dim() != 2:
        raise QtoolError(f"tensor {name}.weight is not 2-D")

    def scalar(suffix, needed=True):
        key = f"{name}.{suffix}"
        if key not in td:
            if needed:
                raise QtoolError(f"checkpoint is missing tensor {key}")
            return None
        t = td[key]
        check_tensor(key, t, dtypes=F32)
        if t.numel() != 1:
            raise QtoolError(f"tensor {key} has shape {list(t.shape)}, expected a scalar")
        if not bool(t.float() > 0):
            raise QtoolError(f"tensor {key} is not positive")
        used.add(key)
        return t

    def pre_quant(k):
        key = f"{name}.pre_quant_scale"
        if key not in td:
            return None
        pre = td[key]
        check_tensor(key, pre, shape=[k], dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if not bool((pre > 0).all()):
            raise QtoolError(f"tensor {key} holds a value that is not positive")
        used.add(key)
        return pre

    if algo == "FP8":
        check_tensor(f"{name}.weight", w, dtypes=(torch.float8_e4m3fn,))
        check_tensor(f"{name}.weight_scale", ws, dtypes=F32)
        if ws.numel() != 1:
            raise QtoolError(f"tensor {name}.weight_scale has shape {list(ws.shape)}, expected a scalar (FP8 per-tensor)")
        inp = scalar("input_scale")
        act = ActQuant("static", "fp8_e4m3", "tensor", scale=inp.reshape(1))
        return QTensor("fp8_e4m3", 8, w, ws.reshape(1), None, 0, act=act, orig_dtype=orig_dtype), used
    if algo == "NVFP4":
        gs = int(cfg.get("group_size") or 16)
        check_tensor(f"{name}.weight", w, dtypes=(torch.uint8,))
        n, k = w.shape[0], w.shape[1] * 2
        if gs != 16 or k % gs:
            raise QtoolError(f"{name}: NVFP4 group size {gs} with in_features {k}")
        check_tensor(f"{name}.weight_scale", ws, shape=[n, k // gs], dtypes=(torch.float8_e4m3fn,))
        ws2 = scalar("weight_scale_2")
        inp = scalar("input_scale")
        codes = pk.unpack_nibbles_uint8(w, dim=1)
        act = ActQuant("dynamic", "e2m1", "group", scale=inp.reshape(1), group_size=16)
        return QTensor("e2m1", 4, codes, ws, None, gs, global_scale=ws2.reshape(()), act=act, orig_dtype=orig_dtype), used
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        gs = int(cfg.get("group_size") or 128)
        check_tensor(f"{name}.weight", w, dtypes=(torch.uint8,))
        n, k = w.shape[0] * 2, w.shape[1]
        if gs <= 0 or k % gs:
            raise QtoolError(f"{name}: INT4_AWQ group size {gs} does not divide in_features {k}")
        check_tensor(f"{name}.weight_scale", ws, shape=[n, k // gs], dtypes=F32)
        codes = pk.twos_to_signed(pk.unpack_nibbles_uint8(w, dim=0), 4)
        pre = pre_quant(k)
        if algo == "W4A8_AWQ":
            act = ActQuant("static", "fp8_e4m3", "tensor", scale=scalar("input_scale").reshape(1))
            return QTensor("int", 4, codes, ws, None, gs, global_scale=scalar("weight_scale_2").reshape(()), act=act,
                           orig_dtype=orig_dtype, pre_scale=pre), used
        return QTensor("int", 4, codes, ws, None, gs, orig_dtype=orig_dtype, pre_scale=pre), used
    if algo == "W8A8_SQ_PER_CHANNEL":
        check_tensor(f"{name}.weight", w, dtypes=(torch.int8,))
        n, k = w.shape
        check_tensor(f"{name}.weight_scale", ws, shape=[n], dtypes=F32)
        if not bool((ws > 0).all()):
            raise QtoolError(f"tensor {name}.weight_scale holds a scale that is not positive")
        inp = scalar("input_scale")
        act = ActQuant("static", "int8", "tensor", scale=inp.reshape(1))
        return QTensor("int", 8, w, ws.reshape(n, 1), None, -1, act=act, orig_dtype=orig_dtype, pre_scale=pre_quant(k)), used
    raise QtoolError(f"{name}: ModelOpt quant_algo '{algo}' is not supported by this qtool (FP8, NVFP4, W4A16_AWQ, W4A8_AWQ, W8A8_SQ_PER_CHANNEL)")


@register
class ModelOptFormat(Format):
    name = "modelopt"
    description = "NVIDIA ModelOpt HF export (FP8, NVFP4, INT4_AWQ, W4A8_AWQ, INT8 SmoothQuant): TensorRT-LLM, vLLM, SGLang"
    schemes = ("fp8", "nvfp4", "w4a16", "w4a8", "w8a8-int8", "w8a8-int8-static")
    kv_cache = True

    def can_hold(self, name, qt):
        return algo_of(qt)[1]

    def encode_kv(self, ckpt):
        out = {}
        for attn, (k, v) in ckpt.kv_scales.items():
            out[f"{attn}.k_proj.k_scale"], out[f"{attn}.v_proj.v_scale"] = k.reshape(()), v.reshape(())
        return out

    def encode(self, name, qt):
        algo, reason = algo_of(qt)
        if reason:
            raise QtoolError(f"format modelopt cannot hold {name}: {reason}")
        if algo == "FP8":
            return {f"{name}.weight": qt.codes, f"{name}.weight_scale": qt.scales.reshape(()), f"{name}.input_scale": qt.act.scale.reshape(())}
        if algo == "NVFP4":
            return {f"{name}.weight": pk.pack_nibbles_uint8(qt.codes, dim=1), f"{name}.weight_scale": qt.scales,
                    f"{name}.weight_scale_2": qt.global_scale.reshape(()), f"{name}.input_scale": qt.act.scale.reshape(())}
        if algo == "W8A8_SQ_PER_CHANNEL":
            out = {f"{name}.weight": qt.codes, f"{name}.weight_scale": qt.scales.reshape(-1), f"{name}.input_scale": qt.act.scale.reshape(())}
            if qt.pre_scale is not None:
                out[f"{name}.pre_quant_scale"] = qt.pre_scale
            return out
        out = {f"{name}.weight": pk.pack_nibbles_uint8(pk.signed_to_twos(qt.codes, 4), dim=0), f"{name}.weight_scale": qt.scales}
        if qt.pre_scale is not None:
            out[f"{name}.pre_quant_scale"] = qt.pre_scale
        if algo == "W4A8_AWQ":
            out[f"{name}.weight_scale_2"] = qt.global_scale.reshape(())
            out[f"{name}.input_scale"] = qt.act.scale.reshape(())
        return out

    def check(self, ckpt: Checkpoint) -> None:
        """Fused-shard rule (see exporters/fused.py), checked on the whole checkpoint."""
        reason = check_shared(ckpt.qtensors, "input_scale", lambda q: q.act.scale) or \
            check_shared(ckpt.qtensors, "weight_scale_2", lambda q: q.global_scale) or \
            check_shared(ckpt.qtensors, "pre_quant_scale", lambda q: q.pre_scale)
        if reason:
            raise QtoolError(f"format modelopt cannot hold this checkpoint: {reason}")

    def quant_config(self, ckpt):
        self.check(ckpt)
        return config_block(hf_quant_config(ckpt))

    def extra_files(self, ckpt):
        return {"hf_quant_config.json": hf_quant_config(ckpt)}

    def detect(self, path, config):
        qc = config.get("quantization_config")
        if isinstance(qc, dict):
            return qc.get("quant_method") == "modelopt"
        f = Path(path) / "hf_quant_config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text()).get("producer", {}).get("name") == "modelopt"
            except (ValueError, AttributeError):
                raise QtoolError(f"{f}: not valid JSON") from None
        return False

    def decode(self, path: Path, config: dict) -> Checkpoint:
        q = read_hf_quant_config(path, config)
        algo = q.get("quant_algo")
        layers = q.get("quantized_layers") if algo == "MIXED_PRECISION" else None
        if algo == "MIXED_PRECISION" and not isinstance(layers, dict):
            raise QtoolError(f"{path}: MIXED_PRECISION ModelOpt config without quantized_layers")
        exclude = q.get("exclude_modules") or []
        td = TensorDir(path)
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        qts, claimed = {}, set()
        names = sorted(k[: -len(".weight_scale")] for k in td if k.endswith(".weight_scale"))
        for name in names:
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                raise QtoolError(f"tensor {name}.weight_scale belongs to a module the config excludes from quantization")
            cfg = layers.get(name) if layers is not None else q
            if cfg is None:
                raise QtoolError(f"tensor {name}.weight_scale: module missing from quantized_layers")
            qts[name], used = decode_layer(td, name, cfg.get("quant_algo"), cfg, dtype)
            claimed |= used
        if layers is not None:
            for name in layers:
                if name not in qts and f"{name}.weight" in td:
                    raise QtoolError(f"checkpoint is missing tensor {name}.weight_scale")
        if not qts:
            raise QtoolError(f"{path}: modelopt config but no .weight_scale tensors")
        kv, kv_dtype = _read_kv(td, q.get("kv_cache_quant_algo"))
        claimed |= {k for k in td if k.endswith((".k_proj.k_scale", ".v_proj.v_scale"))}
        return Checkpoint(config, qts, passthrough(td, claimed), path, kv_scales=kv, kv_cache_dtype=kv_dtype)

    def engines(self, ckpt):
        algos = {algo_of(q)[0] for q in ckpt.qtensors.values()}
        out = []
        if algos <= {"FP8", "NVFP4"}:
            fp4 = "NVFP4" in algos
            out.append(("vllm", True, "modelopt / modelopt_fp4" + (" (FP4 GEMM needs Blackwell)" if fp4 else "")))
            out.append(("sglang", True, "modelopt / modelopt_fp4" + (" (FP4 GEMM needs Blackwell)" if fp4 else "")))
        elif "W8A8_SQ_PER_CHANNEL" in algos:
            # vLLM's modelopt.py QUANT_ALGOS is FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4,
            # MXFP8, MIXED_PRECISION and raises on anything else; SGLang's modelopt only maps quant_algos
            # containing "FP8" or "FP4" (ModelOptFp8Config raises otherwise)
            out.append(("vllm", False, "ModelOpt W8A8_SQ_PER_CHANNEL is not in vLLM's modelopt QUANT_ALGOS (it raises on load)"))
            out.append(("sglang", False, "ModelOpt W8A8_SQ_PER_CHANNEL: SGLang's modelopt loader takes FP8/FP4 quant_algos only"))
        else:
            reason = "ModelOpt W4A16_AWQ / W4A8_AWQ: not in the checked vLLM/SGLang modelopt loaders (FP8/NVFP4 only)"
            out.append(("vllm", False, reason))
            out.append(("sglang", False, reason))
        if ckpt.kv_scales:
            out = [(e, ok, f"{why}; FP8 KV-cache scales (kv_cache_quant_algo FP8)") for e, ok, why in out]
        if "W8A8_SQ_PER_CHANNEL" in algos:
            nopre = sum(q.pre_scale is None for q in ckpt.qtensors.values() if algo_of(q)[0] == "W8A8_SQ_PER_CHANNEL")
            note = (f"; {nopre} int8 layers have no pre_quant_scale (smoothing folded into the norm), "
                    "which ModelOpt's own int8_sq export never produces: untested there") if nopre else ""
            out.append(("tensorrt-llm", True, "reads hf_quant_config.json; W8A8_SQ_PER_CHANNEL = int8 per-channel weights, "
                        "static per-tensor int8 activations (untested here)" + note))
        else:
            out.append(("tensorrt-llm", True, "reads hf_quant_config.json"))
        out.append(("transformers", False, "transformers 5.24 cannot load ModelOpt exports (FP8 drops scales, int4/fp4 shapes fail)"))
        return out
