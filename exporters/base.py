"""The format layer's orchestrator: Checkpoint, the Format interface, the registry, write and read.

A format module holds both directions for its on-disk layout: `encode` (QTensor -> named tensors),
`quant_config` (the config.json block) and `decode` (a directory -> QTensors). This module walks the
modules, writes shards into a temporary directory, copies tokenizer files and renames into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtensor import QTensor, __version__
from qtensor import numerics as nm
from qtensor.errors import QtoolError

from .io import MAX_SHARD_BYTES, Subset, TensorDir, regular_file, tensor_nbytes, write_shards

COPY_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


@dataclass
class Checkpoint:
    """A quantized model in the shared representation."""

    config: dict  # config.json without its quantization block
    qtensors: dict[str, QTensor]  # module name -> quantized weight
    tensors: Mapping  # every other tensor by checkpoint name (lazy mappings allowed)
    source_dir: Path | None = None  # tokenizer and generation config come from here
    meta: dict = field(default_factory=dict)  # qtool.json content
    format: str = ""  # the format it was decoded from
    # FP8 KV cache: attention module name (e.g. "model.layers.0.self_attn") -> (k_scale, v_scale), float32
    # 0-dim tensors, real = fp8 * scale; kv_cache_dtype "fp8_e4m3" when present, None without a KV scheme
    kv_scales: dict = field(default_factory=dict)
    kv_cache_dtype: str | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16"
        return getattr(torch, name, torch.bfloat16)


class Format:
    """One on-disk format. Subclasses set `name` and implement the methods they support."""

    name = ""
    description = ""
    packed = True  # integer codes stored at their bit width (False: one byte per code, e.g. qtool)
    safetensors = True  # False: the format writes its own files (write_files) and checks them in decode
    kv_cache = False  # True: the format carries FP8 KV-cache scales (Checkpoint.kv_scales)

    def check_kv_cache(self, dtype: str) -> None:
        if not self.kv_cache:
            writers = ", ".join(f.name for f in FORMATS.values() if f.kv_cache)
            raise QtoolError(f"format {self.name} has no {dtype} KV-cache scales (--kv-cache); formats that carry them: {writers}")

    def write_files(self, ckpt: "Checkpoint", out: Path) -> None:
        """Tensor files of a format that does not use safetensors shards (e.g. one .gguf)."""
        raise NotImplementedError

    def encode_kv(self, ckpt: "Checkpoint") -> dict[str, torch.Tensor]:
        """The KV-cache scale tensors (formats with kv_cache = True)."""
        return {}

    def can_hold(self, name: str, qt: QTensor) -> str | None:
        """None if the format can store `qt` exactly, else the reason it cannot."""
        raise NotImplementedError

    def encode(self, name: str, qt: QTensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quant_config(self, ckpt: Checkpoint) -> dict | None:
        raise NotImplementedError

    def extra_files(self, ckpt: Checkpoint) -> dict[str, dict]:
        return {}

    def detect(self, path: Path, config: dict) -> bool:
        return False

    def decode(self, path: Path, config: dict) -> Checkpoint:
        raise NotImplementedError

    def engines(self, ckpt: Checkpoint) -> list[tuple[str, bool, str]]:
        """(engine, loads, reason) for the serving engines."""
        return []


FORMATS: dict[str, Format] = {}


def register(cls):
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> Format:
    from . import ALL  # noqa: F401 - make sure every format module registered

    if name not in FORMATS:
        raise QtoolError(f"unknown format '{name}' (choose from: {', '.join(FORMATS)})")
    return FORMATS[name]


MAX_CONFIG_BYTES = 16 * 1024 * 1024

# module names that stay in full precision in every checkpoint qtool writes (calibrate/rules.py's default
# skips; the engines build these without a quantization method)
ROUTER_RE = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")  # MoE routers (`mlp.gate`, not `gate_proj`)
VISION_RE = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|vision_embed_tokens|multi_modal_projector|"
                       r"mm_projector|multimodal_projector|audio_tower|audio_model)(\.|$)")


def skipped_linears(ckpt: "Checkpoint") -> list[str]:
    """Decoder-layer linears (2-D float `.weight` under a numbered block, norms and embeddings aside) that
    the checkpoint leaves in full precision: MoE routers and what --rules skipped."""
    out = []
    for k in ckpt.tensors:
        if not k.endswith(".weight") or "norm" in k or "embed" in k or not re.search(r"\.(layers|h|blocks|block)\.\d+\.", k):
            continue
        mod = k[: -len(".weight")]
        if mod in ckpt.qtensors or VISION_RE.search(mod):
            continue
        t = ckpt.tensors[k]
        if t.dim() == 2 and t.is_floating_point():
            out.append(mod)
    return sorted(out)


def _no_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: Path, what: str, max_bytes: int = MAX_CONFIG_BYTES):
    """A small JSON file from an untrusted directory: a regular file, bounded size, strict UTF-8 JSON
    without NaN/Infinity, bounded nesting."""
    regular_file(path, what)
    if path.stat().st_size > max_bytes:
        raise QtoolError(f"{what} is larger than {max_bytes} bytes")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise QtoolError(f"unreadable {what}: {msg}") from None


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists() and not cfg.is_symlink():
        raise QtoolError(f"not a model directory (no config.json): {path}")
    c = read_json(cfg, f"config.json in {path}")
    if not isinstance(c, dict):
        raise QtoolError(f"config.json in {path} is not a JSON object")
    return c


# config.json integers that size the model: name -> (smallest, largest) accepted value
CONFIG_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), (1, 4096)),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), (1, 1 << 18)),
    **dict.fromkeys(("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim", "n_inner"), (0, 1 << 20)),
    "vocab_size": (1, 1 << 24),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads", "head_dim"), (1, 1 << 14)),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok"), (0, 1 << 16)),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), (1, 1 << 26)),
}
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
_PACK = 16  # the most codes one stored element holds (2-bit in int32): a dimension can hide that much


def _sub_configs(config: dict, where: str = "", depth: int = 0):
    yield where, config
    if depth < 3:
        for k, v in config.items():
            if isinstance(v, dict) and k.endswith("_config") and k not in ("quantization_config", "compression_config"):
                yield from _sub_configs(v, f"{where}{k}.", depth + 1)


def check_config(config: dict, shapes: Mapping[str, list[int]], dtypes: Mapping[str, str] | None = None) -> None:
    """Bound the config.json values that size a model, against fixed limits and against the tensors
    present (`shapes`: name -> shape from the safetensors headers), before any model is built."""
    mt = config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise QtoolError("config.json has no model_type" if mt is None else f"config.json: model_type {mt!r} is not a name"[:200])
    max_dim = max((d for s in shapes.values() for d in s), default=1)
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.", k)] if m}
    experts = {int(m.group(1)) for k in shapes for m in [re.search(r"\.experts\.(\d+)\.", k)] if m}
    for where, c in _sub_configs(config):
        for key, (lo, hi) in CONFIG_BOUNDS.items():
            if key not in c or c[key] is None:
                continue
            v = c[key]
            name = f"{where}{key}"
            if not isinstance(v, int) or isinstance(v, bool):
                raise QtoolError(f"config.json: {name} = {v!r} is not an integer"[:200])
            if not lo <= v <= hi:
                raise QtoolError(f"config.json: {name} = {v} is outside [{lo}, {hi}]")
            if key in _LAYERS:
                if layers and v > len(layers):
                    raise QtoolError(f"config.json: {name} = {v}, but the tensors hold {len(layers)} layers")
            elif key in _EXPERTS:
                if v > max(len(experts), max_dim):
                    raise QtoolError(f"config.json: {name} = {v}, more than the tensors can hold")
            elif key not in ("max_position_embeddings", "n_positions", "num_experts_per_tok", "n_shared_experts") and v > _PACK * max_dim:
                raise QtoolError(f"config.json: {name} = {v}, larger than any tensor dimension ({max_dim}) allows")
    embeds = [k for k in shapes if k.endswith("embed_tokens.weight") and len(shapes[k]) == 2 and (dtypes is None or dtypes.get(k) in ("F16", "BF16", "F32"))]
    if len(embeds) == 1:
        rows, cols = shapes[embeds[0]]
        for where, c in _sub_configs(config):
            if isinstance(c.get("hidden_size"), int) and isinstance(c.get("vocab_size"), int):
                if c["hidden_size"] != cols:
                    raise QtoolError(f"config.json: {where}hidden_size = {c['hidden_size']}, but {embeds[0]} has {cols} columns")
                if c["vocab_size"] > rows:
                    raise QtoolError(f"config.json: {where}vocab_size = {c['vocab_size']}, but {embeds[0]} has {rows} rows")
                break


def check_model_files(path: Path) -> tuple[dict, TensorDir]:
    """config.json and the safetensors files of a directory, checked before anything is built from them."""
    path = Path(path)
    config = read_config(path)
    td = TensorDir(path)
    check_config(config, {k: td.shape(k) for k in td}, {k: td.dtype_of(k) for k in td})
    return config, td


def detect_format(path: Path) -> str | None:
    """The format of a checkpoint directory, in the engines' order of precedence; None = unquantized."""
    from . import ALL  # noqa: F401

    path = Path(path)
    config = read_config(path)
    for name in ("msmodelslim",):
        if name in FORMATS and FORMATS[name].detect(path, config):
            return name
    for f in FORMATS.values():
        if f.name != "msmodelslim" and f.detect(path, config):
            return f.name
    qc = config.get("quantization_config") or config.get("compression_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise QtoolError(f"{path}: quantization method '{method}' is not supported by this qtool")
    return None


_CODE_DTYPES = ("I8", "U8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I32", "U32", "F4")  # a weight in these is quantized


def read_checkpoint(path: Path) -> Checkpoint:
    """Decode any quantized directory qtool knows into the representation."""
    path = Path(path)
    if not path.exists():
        raise QtoolError(f"path not found: {path}")
    if path.is_file() and path.suffix == ".gguf":  # a bare GGUF (llama.cpp's): its Q8_0/Q4_0 linears
        from .gguf import read_gguf_file

        return read_gguf_file(path)
    if not path.is_dir():
        raise QtoolError(f"not a checkpoint directory: {path}")
    own = [f for f in FORMATS.values() if not f.safetensors and f.detect(path, read_config(path))]
    if not own:  # formats with their own files (gguf) check them in decode
        check_model_files(path)
    fmt = detect_format(path)
    if fmt is None:
        raise QtoolError(f"{path} is not a quantized checkpoint (no quantization_config)")
    ckpt = FORMATS[fmt].decode(path, read_config(path))
    ckpt.format = fmt
    ckpt.source_dir = ckpt.source_dir or path
    if ckpt.kv_scales or ckpt.kv_cache_dtype:
        check_kv_scales(ckpt)
    if not ckpt.qtensors:
        raise QtoolError(f"{path}: {fmt} checkpoint with no quantized modules")
    if isinstance(ckpt.qtensors, dict):  # decoded already: check them all (a lazy mapping's decode checks each)
        for name, qt in ckpt.qtensors.items():
            check_qtensor(name, qt)
    dtype_of = getattr(ckpt.tensors, "dtype_of", None)
    for k in ckpt.tensors if dtype_of else ():
        if k.endswith(".weight") and dtype_of(k) in _CODE_DTYPES:
            raise QtoolError(f"tensor {k} holds {dtype_of(k)} codes that no quantized module claims (its scales are missing or not described)")
    meta = path / "qtool.json"
    if (meta.exists() or meta.is_symlink()) and not ckpt.meta:
        ckpt.meta = read_json(meta, f"{meta.name} in {path}")
        if not isinstance(ckpt.meta, dict):
            raise QtoolError(f"{meta}: not a JSON object")
    return ckpt


def prepare_out(out: Path, force: bool) -> None:
    out = Path(out)
    if len(out.name.encode("utf-8", "surrogateescape")) > 200:  # leaves room for the temporary name
        raise QtoolError(f"output name is too long ({len(out.name)} characters): {out.name[:40]}...")
    try:
        exists = out.exists() or out.is_symlink()
        if exists and not force:
            raise QtoolError(f"output {out} exists (pass --force to replace it)")
        if exists and not out.is_dir():
            raise QtoolError(f"output {out} exists and is not a directory")
        parent = out.resolve().parent
        if not parent.exists():
            raise QtoolError(f"parent directory of {out} does not exist")
        if not parent.is_dir():
            raise QtoolError(f"parent {parent} of {out} is not a directory")
    except OSError as e:
        raise QtoolError(f"cannot use output {out}: {e.strerror or e}") from None


def estimate_size(quantized: Iterable[tuple[int, int, int, int]], other_bytes: int, fmt: Format | None = None, source_dir: Path | None = None) -> int:
    """Bytes a checkpoint will take on disk, before it is written.

    quantized: (out_features, in_features, bits, group_size) per quantized linear; the codes take
    params x bits/8 (one byte per code where the format does not pack), plus a scale and zero point
    (4 bytes) per group and an int32 g_idx per input channel; other_bytes: every unquantized
    tensor; the tokenizer files copied from source_dir; 64 KiB for config and qtool.json.
    """
    total = int(other_bytes) + (64 << 10)
    if source_dir is not None:
        total += sum((Path(source_dir) / f).stat().st_size for f in COPY_FILES if (Path(source_dir) / f).is_file())
    for n, k, bits, gs in quantized:
        code_bits = bits if fmt is None or fmt.packed else 8
        groups = 1 if gs == 0 else n * (1 if gs < 0 else -(-k // gs))
        total += n * k * code_bits // 8 + 4 * groups + (4 * k if gs > 0 else 0)
    return total


def checkpoint_size(ckpt: Checkpoint, fmt: Format) -> int:
    """estimate_size of writing a decoded checkpoint in `fmt`. Modules decoded lazily are not decoded
    twice for this: the source files' size stands in (doubled when `fmt` keeps codes unpacked)."""
    if isinstance(ckpt.qtensors, dict):
        quantized = [(*qt.shape, qt.bits, qt.group_size) for qt in ckpt.qtensors.values()]
        return estimate_size(quantized, sum(tensor_nbytes(ckpt.tensors, k) for k in ckpt.tensors), fmt, ckpt.source_dir)
    src = sum(f.stat().st_size for f in Path(ckpt.source_dir).glob("*.safetensors")) if ckpt.source_dir else 0
    return src * (1 if fmt.packed else 2) + (1 << 20)


def check_free_space(out: Path, need: int) -> None:
    """Refuse before any work when the file system of `out` cannot hold `need` bytes."""
    parent = Path(out).resolve().parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise QtoolError(f"not enough free space for {out}: the output needs about {need / 1e9:.2f} GB, {parent} has {free / 1e9:.2f} GB free")


def place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory into place (replacing an old output only at the end)."""
    out = Path(out)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def file_sha256(paths) -> str:
    """sha256 over the files' bytes in name order (hashlib releases the GIL: run it in a thread)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 24), b""):
                h.update(b)
    return h.hexdigest()


# modules encoded ahead of the writer in threads (decode, checks and packing release the GIL)
WRITE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def prefetch(fn, keys: list, ahead: int):
    """(key, fn(key)) for each key in order, computed up to `ahead` keys in advance in threads
    (ahead 1: in this thread, one at a time). An error surfaces at its key."""
    if ahead <= 1:
        for k in keys:
            yield k, fn(k)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ahead, thread_name_prefix="qtool-encode") as pool:
        q = deque((k, pool.submit(fn, k)) for k in keys[:ahead])
        nxt = ahead
        try:
            while q:
                k, fut = q.popleft()
                res = fut.result()
                if nxt < len(keys):
                    q.append((keys[nxt], pool.submit(fn, keys[nxt])))
                    nxt += 1
                yield k, res
        finally:
            for _, f in q:
                f.cancel()


def write_checkpoint(ckpt: Checkpoint, fmt_name: str, out: Path, force: bool = False, progress=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    fmt = get_format(fmt_name)
    out = Path(out)
    prepare_out(out, force)

    def check(name, qt):
        reason = fmt.can_hold(name, qt)
        if reason:
            raise QtoolError(f"format {fmt.name} cannot hold {name}: {reason}")

    if ckpt.kv_scales or ckpt.kv_cache_dtype:
        fmt.check_kv_cache(ckpt.kv_cache_dtype or "fp8_e4m3")
        check_kv_scales(ckpt)
    lazy = not isinstance(ckpt.qtensors, dict)  # decoded from disk on access: check while encoding (one pass)
    if not lazy:
        for name, qt in ckpt.qtensors.items():
            check(name, qt)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        task = progress.add_task(f"writing {fmt.name}", total=len(ckpt.qtensors) + len(ckpt.tensors)) if progress else None
        dtype = ckpt.weight_dtype

        def encoded(name):
            qt = ckpt.qtensors[name]
            if lazy:
                check(name, qt)
            return fmt.encode(name, qt)

        def items():
            for name, enc in prefetch(encoded, list(ckpt.qtensors), WRITE_THREADS):
                yield from enc.items()
                if progress:
                    progress.update(task, advance=1)
            yield from (fmt.encode_kv(ckpt) if ckpt.kv_scales else {}).items()
            for k in ckpt.tensors:
                t = ckpt.tensors[k]
                if t.is_floating_point() and t.element_size() > 1 and t.dtype != dtype and t.dim() > 0:  # scalars are scales (kv, input): kept
                    t = t.to(dtype)
                yield k, t
                if progress:
                    progress.update(task, advance=1)

        if fmt.safetensors:
            write_shards(tmp, items(), max_shard_bytes)
        else:
            fmt.write_files(ckpt, tmp)
        config = dict(ckpt.config)
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
        qc = fmt.quant_config(ckpt)
        if qc is not None:
            config["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, content in fmt.extra_files(ckpt).items():
            (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
        if ckpt.source_dir is not None:
            for fname in COPY_FILES:
                src = Path(ckpt.source_dir) / fname
                if src.is_file() and not (tmp / fname).exists():
                    shutil.copyfile(src, tmp / fname)
        meta = dict(ckpt.meta)
        meta.update({"qtool_version": __version__, "format": fmt.name})
        meta.pop("eval", None)  # metrics belong to the checkpoint they were measured on
        meta.pop("kv_cache", None)
        if ckpt.kv_scales:
            meta["kv_cache"] = {"dtype": ckpt.kv_cache_dtype, "modules": len(ckpt.kv_scales)}
        (tmp / "qtool.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_kv_scales(ckpt: Checkpoint) -> None:
    if ckpt.kv_cache_dtype != "fp8_e4m3":
        raise QtoolError(f"KV-cache dtype {ckpt.kv_cache_dtype!r} is not supported (fp8_e4m3)")
    if not ckpt.kv_scales:
        raise QtoolError("an fp8 KV-cache scheme without any k_scale / v_scale")
    for name, pair in ckpt.kv_scales.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise QtoolError(f"KV-cache scales of {name} are not a (k_scale, v_scale) pair")
        for which, t in zip(("k_scale", "v_scale"), pair):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 0:
                raise QtoolError(f"{name} {which} is not a float32 scalar")


def read_kv_scales(td: Mapping, k_suffix: str, v_suffix: str) -> tuple[dict, set[str]]:
    """KV-cache scales stored as `<attention module><k_suffix>` / `<...><v_suffix>` (one value each, a float
    type, finite and positive) -> ({module: (k_scale, v_scale) float32 0-dim}, tensor names used)."""
    out, used = {}, set()
    for key in sorted(td):
        if not key.endswith(k_suffix):
            continue
        attn = key[: -len(k_suffix)]
        vkey = attn + v_suffix
        pair = []
        for name in (key, vkey):
            t = require(td, name)
            if not t.is_floating_point() or t.element_size() < 2 or t.numel() != 1:
                raise QtoolError(f"tensor {name} must be one float16/bfloat16/float32 value (a KV-cache scale)")
            v = t.float().reshape(())
            if not bool(torch.isfinite(v)) or not bool(v > 0):
                raise QtoolError(f"tensor {name} is not a positive finite KV-cache scale")
            pair.append(v)
            used.add(name)
        out[attn] = (pair[0], pair[1])
    for key in td:
        if key.endswith(v_suffix) and key not in used:
            raise QtoolError(f"tensor {key} has no matching {key[: -len(v_suffix)] + k_suffix}")
    return out, used


def passthrough(td: TensorDir, claimed: set[str]) -> Mapping:
    return Subset(td, [k for k in td if k not in claimed])


def module_names_with(td: Mapping, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in td if k.endswith(suffix))


def require(td: Mapping, name: str) -> torch.Tensor:
    if name not in td:
        raise QtoolError(f"checkpoint is missing tensor {name}")
    return td[name]


INT_CODE_DTYPES = {True: torch.int8, False: torch.uint8}
ACT_DTYPES = ("int8", "fp8_e4m3", "e2m1", "int4")


def check_qtensor(name: str, qt: QTensor, label=None) -> None:
    """A decoded QTensor is consistent with its own description (qtensor/tensor.py), so nothing
    downstream (export, dequantize, QuantLinear) meets a shape, dtype or range it cannot handle.
    `label(field)` names the on-disk tensor of a field in messages."""
    lab = label or (lambda f: f"{name} ({f})")
    bits_of = {"fp8_e4m3": (8,), "e2m1": (4,), "mxfp8": (8,), "int": (2, 3, 4, 8)}  # int: what qtensor.packing packs
    if qt.dtype not in bits_of:
        raise QtoolError(f"{name}: unknown numeric type {qt.dtype!r}")
    if not isinstance(qt.bits, int) or qt.bits not in bits_of[qt.dtype]:
        raise QtoolError(f"{name}: {qt.bits!r}-bit {qt.dtype} weights are not possible")
    c = qt.codes
    if not isinstance(c, torch.Tensor) or c.dim() != 2 or 0 in c.shape:
        raise QtoolError(f"tensor {lab('codes')} is not a 2-D [out, in] tensor")
    n, k = c.shape
    if qt.dtype == "int":
        want = INT_CODE_DTYPES[qt.zeros is None]
        if c.dtype != want:
            raise QtoolError(f"tensor {lab('codes')} has dtype {c.dtype}, expected {want} for {'symmetric' if qt.zeros is None else 'asymmetric'} int codes")
        lo, hi = nm.int_range(qt.bits, qt.zeros is None)
        if int(c.min()) < lo or int(c.max()) > hi:
            raise QtoolError(f"tensor {lab('codes')} holds values outside the {qt.bits}-bit range [{lo}, {hi}]")
    elif qt.dtype == "e2m1":
        if c.dtype != torch.uint8 or int(c.max()) > 15:
            raise QtoolError(f"tensor {lab('codes')} must hold e2m1 codes 0..15 as uint8")
    elif c.dtype != torch.float8_e4m3fn:
        raise QtoolError(f"tensor {lab('codes')} has dtype {c.dtype}, expected torch.float8_e4m3fn")
    s = qt.scales
    if not isinstance(s, torch.Tensor) or not (s.is_floating_point() or s.dtype == torch.uint8):
        raise QtoolError(f"tensor {lab('scales')} has dtype {getattr(s, 'dtype', None)}, expected a float type (or e8m0 bytes)")
    if s.dtype == torch.uint8 and qt.dtype not in ("e2m1", "mxfp8"):
        raise QtoolError(f"tensor {lab('scales')}: e8m0 (uint8) scales only go with MX types")
    if s.is_floating_point() and not torch.isfinite(s.float()).all():
        raise QtoolError(f"tensor {lab('scales')} holds NaN or Inf")
    gs = qt.group_size
    if not isinstance(gs, int) or gs < -1:
        raise QtoolError(f"{name}: invalid group size {gs!r}")
    if qt.block is not None:
        if not (isinstance(qt.block, tuple) and len(qt.block) == 2 and all(isinstance(b, int) and b > 0 for b in qt.block)):
            raise QtoolError(f"{name}: invalid block {qt.block!r}")
        want_s = [-(-n // qt.block[0]), -(-k // qt.block[1])]
    elif gs == 0:
        want_s = None
        if s.numel() != 1:
            raise QtoolError(f"tensor {lab('scales')} has shape {list(s.shape)}, expected one per-tensor scale")
    elif gs == -1:
        want_s = [n, 1]
    else:
        if k % gs and qt.dtype == "int":
            raise QtoolError(f"{name}: in_features {k} is not a multiple of group size {gs}")
        want_s = [n, -(-k // gs)]
    if want_s is not None and list(s.shape) != want_s:
        raise QtoolError(f"tensor {lab('scales')} has shape {list(s.shape)}, expected {want_s}")
    if qt.zeros is not None:
        z = qt.zeros
        if qt.dtype != "int" or z.dtype != torch.uint8 or z.shape != s.shape:
            raise QtoolError(f"tensor {lab('zeros')} must be uint8 shaped like the scales {list(s.shape)}")
        if int(z.max()) > (1 << qt.bits) - 1:
            raise QtoolError(f"tensor {lab('zeros')} holds zero points outside the {qt.bits}-bit range")
    if qt.g_idx is not None:
        g = qt.g_idx
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool or list(g.shape) != [k]:
            raise QtoolError(f"tensor {lab('g_idx')} must be an integer tensor of {k} group indices")
        if gs <= 0 or qt.block is not None:
            raise QtoolError(f"tensor {lab('g_idx')} given without a group size")
        if int(g.min()) < 0 or int(g.max()) >= s.shape[-1]:
            raise QtoolError(f"tensor {lab('g_idx')} points outside the {s.shape[-1]} groups")
    for f, t, size in (("global_scale", qt.global_scale, 1), ("pre_scale", qt.pre_scale, k)):
        if t is None:
            continue
        if not t.is_floating_point() or t.numel() != size or not torch.isfinite(t.float()).all():
            raise QtoolError(f"tensor {lab(f)} must hold {size} finite float value{'s' if size > 1 else ''}")
    a = qt.act
    if a.kind not in ("none", "dynamic", "static"):
        raise QtoolError(f"{name}: unknown activation quantization kind {a.kind!r}")
    if a.kind != "none" and a.dtype not in ACT_DTYPES:
        raise QtoolError(f"{name}: unknown activation type {a.dtype!r}")
    if a.kind == "static" and a.dtype != "e2m1" and a.scale is None:
        raise QtoolError(f"{name}: static activation quantization without an input scale")
    for f, t in (("input_scale", a.scale), ("input_offset", a.offset)):
        if t is None:
            continue
        if f == "input_scale" and not t.is_floating_point():
            raise QtoolError(f"tensor {lab(f)} is not a float tensor")
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise QtoolError(f"tensor {lab(f)} holds NaN or Inf")


def check_tensor(name: str, t: torch.Tensor, shape=None, dtypes=None) -> None:
    if shape is not None and list(t.shape) != list(shape):
        raise QtoolError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise QtoolError(f"tensor {name} has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if t.is_floating_point() and t.element_size() > 1 and not torch.isfinite(t).all():
        raise QtoolError(f"tensor {name} holds NaN or Inf")
