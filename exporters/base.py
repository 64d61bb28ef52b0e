"""The format layer's orchestrator: Checkpoint, the Format interface, the registry, write and read.

A format module holds both directions for its on-disk layout: `encode` (QTensor -> named tensors),
`quant_config` (the config.json block) and `decode` (a directory -> QTensors). This module walks the
modules, writes shards into a temporary directory, copies tokenizer files and renames into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtensor import QTensor, __version__
from qtensor.errors import QtoolError

from .io import MAX_SHARD_BYTES, Subset, TensorDir, write_shards

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

    @property
    def weight_dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16"
        return getattr(torch, name, torch.bfloat16)


class Format:
    """One on-disk format. Subclasses set `name` and implement the methods they support."""

    name = ""
    description = ""
    safetensors = True  # False: the format writes its own files (write_files) and checks them in decode

    def write_files(self, ckpt: "Checkpoint", out: Path) -> None:
        """Tensor files of a format that does not use safetensors shards (e.g. one .gguf)."""
        raise NotImplementedError

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


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise QtoolError(f"not a model directory (no config.json): {path}")
    try:
        c = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise QtoolError(f"unreadable config.json in {path}: {e}") from None
    if not isinstance(c, dict):
        raise QtoolError(f"config.json in {path} is not a JSON object")
    return c


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


def read_checkpoint(path: Path) -> Checkpoint:
    """Decode any quantized directory qtool knows into the representation."""
    path = Path(path)
    if not path.exists():
        raise QtoolError(f"path not found: {path}")
    if not path.is_dir():
        raise QtoolError(f"not a checkpoint directory: {path}")
    fmt = detect_format(path)
    if fmt is None:
        raise QtoolError(f"{path} is not a quantized checkpoint (no quantization_config)")
    ckpt = FORMATS[fmt].decode(path, read_config(path))
    ckpt.format = fmt
    ckpt.source_dir = ckpt.source_dir or path
    meta = path / "qtool.json"
    if meta.is_file() and not ckpt.meta:
        try:
            ckpt.meta = json.loads(meta.read_text())
        except ValueError:
            raise QtoolError(f"{meta}: not valid JSON") from None
    return ckpt


def prepare_out(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise QtoolError(f"output {out} exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QtoolError(f"output {out} exists and is not a directory")
    parent = out.resolve().parent
    if not parent.exists():
        raise QtoolError(f"parent directory of {out} does not exist")


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
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
    return h.hexdigest()


def write_checkpoint(ckpt: Checkpoint, fmt_name: str, out: Path, force: bool = False, progress=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    fmt = get_format(fmt_name)
    out = Path(out)
    prepare_out(out, force)
    for name, qt in ckpt.qtensors.items():
        reason = fmt.can_hold(name, qt)
        if reason:
            raise QtoolError(f"format {fmt.name} cannot hold {name}: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        task = progress.add_task(f"writing {fmt.name}", total=len(ckpt.qtensors) + len(ckpt.tensors)) if progress else None
        dtype = ckpt.weight_dtype

        def items():
            for name, qt in ckpt.qtensors.items():
                for k, t in fmt.encode(name, qt).items():
                    yield k, t
                if progress:
                    progress.update(task, advance=1)
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
        (tmp / "qtool.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def passthrough(td: TensorDir, claimed: set[str]) -> Mapping:
    return Subset(td, [k for k in td if k not in claimed])


def module_names_with(td: Mapping, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in td if k.endswith(suffix))


def require(td: Mapping, name: str) -> torch.Tensor:
    if name not in td:
        raise QtoolError(f"checkpoint is missing tensor {name}")
    return td[name]


def check_tensor(name: str, t: torch.Tensor, shape=None, dtypes=None) -> None:
    if shape is not None and list(t.shape) != list(shape):
        raise QtoolError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise QtoolError(f"tensor {name} has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if t.is_floating_point() and t.element_size() > 1 and not torch.isfinite(t).all():
        raise QtoolError(f"tensor {name} holds NaN or Inf")
