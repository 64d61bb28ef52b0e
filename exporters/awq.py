"""AWQ "gemm" layout (AutoAWQ / GPTQModel / AutoRound's auto_awq; loaded by vLLM, SGLang, transformers).

qweight int32 [K, N/8] packed along N in the nibble order [0,2,4,6,1,3,5,7]; qzeros int32 [K/G, N/8]
same packing, zero points stored as is; scales fp16 [K/G, N]. No g_idx: AWQ has no act order.

Symmetric weights (config `zero_point: false`): GPTQModel's AWQ writer stores the codes offset by 8
and a qzeros tensor whose every nibble is 8 (real = s * (q - 8)), which every AWQ kernel reads
unchanged; a symmetric QTensor is written that way and read back as symmetric when all zeros are 8.
"""

from __future__ import annotations

import json

from pathlib import Path

import torch

from qtensor import QTensor
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .base import Checkpoint, Format, check_tensor, module_names_with, passthrough, register
from .gptq import fp16_exact
from .io import TensorDir

AWQ_BITS = 4


def awq_reason(qt: QTensor) -> str | None:
    """Why the AWQ gemm layout cannot hold `qt` exactly (None: it can)."""
    if qt.dtype != "int":
        return f"{qt.dtype} weights (AWQ holds integer weights)"
    if qt.bits != AWQ_BITS:
        return f"{qt.bits}-bit weights (AWQ gemm holds 4-bit only)"
    if qt.act.kind != "none":
        return "activation quantization (AWQ is weight-only)"
    if qt.pre_scale is not None:
        return "a separate pre-quantization scale (AWQ files fold smoothing into the weights)"
    if qt.block is not None or qt.group_size == 0:
        return "block or per-tensor scales"
    n, k = qt.shape
    if qt.group_size > 0 and k % qt.group_size:
        return f"in_features {k} not a multiple of group size {qt.group_size}"
    if qt.g_idx is not None:
        plain = torch.arange(k) // (qt.group_size if qt.group_size > 0 else k)
        if not torch.equal(qt.g_idx.long(), plain):
            return "act order (a non-trivial g_idx; AWQ has no g_idx)"
    if n % 8:
        return f"out_features {n} not a multiple of 8 (AWQ packs 8 codes per int32 along N)"
    if not fp16_exact(qt.scales):
        return "scales not representable in fp16"
    return None


def encode_awq_tensors(name: str, qt: QTensor) -> dict[str, torch.Tensor]:
    codes = pk.signed_to_offset(qt.codes, qt.bits) if qt.sym else qt.codes
    zeros = torch.full(qt.scales.shape, 1 << (qt.bits - 1), dtype=torch.uint8) if qt.sym else qt.zeros
    return {
        f"{name}.qweight": pk.pack_int32(codes.t(), qt.bits, dim=1, order=pk.AWQ_ORDER),
        f"{name}.qzeros": pk.pack_int32(zeros.t(), qt.bits, dim=1, order=pk.AWQ_ORDER),
        f"{name}.scales": qt.scales.t().to(torch.float16).contiguous(),
    }


def decode_awq_tensors(td, name: str, bits: int, group_size: int, sym: bool) -> QTensor:
    for suffix in ("qweight", "qzeros", "scales"):
        if f"{name}.{suffix}" not in td:
            raise QtoolError(f"checkpoint is missing tensor {name}.{suffix}")
    qweight, qzeros, scales = td[f"{name}.qweight"], td[f"{name}.qzeros"], td[f"{name}.scales"]
    check_tensor(f"{name}.qweight", qweight, dtypes=(torch.int32,))
    if qweight.dim() != 2:
        raise QtoolError(f"tensor {name}.qweight is not 2-D")
    k, n = qweight.shape[0], qweight.shape[1] * 32 // bits
    if group_size > 0 and k % group_size:
        raise QtoolError(f"tensor {name}.qweight: in_features {k} is not a multiple of group size {group_size}")
    ng = 1 if group_size <= 0 else k // group_size
    check_tensor(f"{name}.scales", scales, shape=[ng, n], dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_tensor(f"{name}.qzeros", qzeros, shape=[ng, n * bits // 32], dtypes=(torch.int32,))
    codes = pk.unpack_int32(qweight, bits, dim=1, order=pk.AWQ_ORDER).t().contiguous()
    z = pk.unpack_int32(qzeros, bits, dim=1, order=pk.AWQ_ORDER).t().contiguous()
    if sym and bool((z == (1 << (bits - 1))).all()):
        return QTensor("int", bits, pk.offset_to_signed(codes, bits), scales.t().contiguous(), None, group_size)
    return QTensor("int", bits, codes, scales.t().contiguous(), z, group_size)


def unquantized_linears(ckpt: Checkpoint) -> list[str]:
    """Modules the loader must leave as plain Linear: lm_head (even when tied) and other 2-D weights
    that were not quantized (MoE routers, ...), embeddings and norms aside."""
    out = set() if "lm_head" in ckpt.qtensors else {"lm_head"}
    for key in ckpt.tensors:
        if not key.endswith(".weight") or "embed" in key or "norm" in key:
            continue
        mod = key[: -len(".weight")]
        if mod in ckpt.qtensors:
            continue
        t = ckpt.tensors[key]
        if t.dim() == 2 and t.is_floating_point():
            out.add(mod)
    return sorted(out)


def uniform_int_params(ckpt: Checkpoint, fmt: str) -> tuple[int, int, bool]:
    """(bits, group_size, sym) shared by every quantized module; formats without per-module overrides."""
    seen = {(q.bits, q.group_size, q.sym) for q in ckpt.qtensors.values()}
    if len(seen) != 1:
        desc = ", ".join(f"{b}-bit g{g} {'sym' if s else 'asym'}" for b, g, s in sorted(seen))
        raise QtoolError(f"format {fmt} has one bits/group_size/zero_point for the whole model, the modules mix: {desc}")
    return seen.pop()


@register
class AWQFormat(Format):
    name = "awq"
    description = "AWQ gemm (AutoAWQ/GPTQModel): vLLM, SGLang, transformers"
    schemes = ("w4a16",)

    def can_hold(self, name, qt):
        return awq_reason(qt)

    def encode(self, name, qt):
        return encode_awq_tensors(name, qt)

    def quant_config(self, ckpt):
        bits, gs, sym = uniform_int_params(ckpt, self.name)
        return {
            "quant_method": "awq",
            "bits": bits,
            "group_size": gs,
            "zero_point": not sym,
            "version": "gemm",
            "modules_to_not_convert": unquantized_linears(ckpt),
        }

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "awq"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        qc = config["quantization_config"]
        try:
            bits = int(qc.get("bits", qc.get("w_bit", 4)))
            gs = int(qc.get("group_size", qc.get("q_group_size", 128)))
        except (TypeError, ValueError):
            raise QtoolError("awq quantization_config has invalid 'bits'/'group_size'") from None
        zp = qc.get("zero_point", True)
        if not isinstance(zp, bool):
            raise QtoolError(f"awq quantization_config: zero_point must be true or false, got {json.dumps(zp)}")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise QtoolError(f"awq quantization_config: version '{version}' is not supported (only gemm)")
        if bits != AWQ_BITS:
            raise QtoolError(f"awq quantization_config: unsupported bits {bits} (only 4)")
        td = TensorDir(path)
        qts, claimed = {}, set()
        for name in module_names_with(td, ".qweight"):
            qts[name] = decode_awq_tensors(td, name, bits, gs, not zp)
            claimed |= {f"{name}.{x}" for x in ("qweight", "qzeros", "scales")}
        if not qts:
            raise QtoolError(f"{path}: awq config but no .qweight tensors")
        return Checkpoint(config, qts, passthrough(td, claimed), path)

    def engines(self, ckpt):
        qts = list(ckpt.qtensors.values())
        asym = all(not q.sym for q in qts)
        groups_ok = all(q.group_size in (32, 64, 128) for q in qts)
        out = []
        if not groups_ok:
            out.append(("vllm", False, "AWQ kernels need group size 32/64/128"))
            out.append(("sglang", False, "AWQ kernels need group size 32/64/128"))
        else:
            out.append(("vllm", True, "awq_marlin" if asym else "awq (Marlin-AWQ needs zero_point true)"))
            out.append(("sglang", True, "awq_marlin" if asym else "awq"))
        out.append(("transformers", True, "through gptqmodel's AWQ kernels"))
        return out

