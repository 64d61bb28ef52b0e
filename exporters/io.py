"""Reading and writing safetensors directories, with the checks a hostile file needs."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtensor.errors import QtoolError

MAX_SHARD_BYTES = 5 * 1024**3
_MAX_HEADER = 100 * 1024 * 1024


def _check_header(path: Path) -> None:
    """Header length and tensor extents are checked before any allocation."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QtoolError(f"{path.name}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise QtoolError(f"{path.name}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise QtoolError(f"{path.name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise QtoolError(f"{path.name}: corrupt safetensors header")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise QtoolError(f"{path.name}: tensor {name} has no data offsets")
        a, b = info["data_offsets"]
        if not (0 <= a <= b <= data):
            raise QtoolError(f"{path.name}: tensor {name} lies outside the file")


class TensorDir(Mapping):
    """Lazy name -> tensor view of the *.safetensors files of a directory (index honoured)."""

    def __init__(self, path: Path, pattern: str | None = None):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        root = self.path.resolve()
        index = sorted(self.path.glob("*.safetensors.index.json"))
        files: list[Path]
        if index:
            try:
                wm = json.loads(index[0].read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise QtoolError(f"{index[0].name}: not a valid safetensors index") from None
            if not isinstance(wm, dict):
                raise QtoolError(f"{index[0].name}: weight_map is not an object")
            files = []
            for fname in sorted(set(wm.values())):
                f = (self.path / str(fname)).resolve()
                if root not in f.parents:
                    raise QtoolError(f"{index[0].name}: shard path {fname} leaves the model directory")
                if not f.is_file():
                    raise QtoolError(f"{index[0].name}: shard {fname} is missing")
                files.append(f)
        else:
            files = sorted(self.path.glob(pattern or "*.safetensors"))
        if not files:
            raise QtoolError(f"no .safetensors files in {self.path}")
        self._handles = {}
        for f in files:
            _check_header(f)
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise QtoolError(f"{f.name}: cannot open safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise QtoolError(f"cannot read tensor {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self._where[name]].get_slice(name).get_shape())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self._handles)


class Subset(Mapping):
    """A lazy mapping restricted to some names (and optionally renamed)."""

    def __init__(self, base: Mapping, names: Iterable[str]):
        self.base, self.names = base, list(names)

    def __getitem__(self, k):
        if k not in self.names:
            raise KeyError(k)
        return self.base[k]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def write_shards(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write tensors into model.safetensors, or model-0000i-of-0000N shards + index above max_bytes."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[Path] = []
    total = 0

    def flush():
        nonlocal size
        p = out / f".part-{len(written):05d}.safetensors"
        save_file(parts[-1], str(p), metadata={"format": "pt"})
        written.append(p)
        parts[-1] = {}
        size = 0

    for name, t in tensors:
        nb = t.numel() * t.element_size()
        if parts[-1] and size + nb > max_bytes:
            flush()
        parts[-1][name] = t.contiguous()
        size += nb
        total += nb
    if parts[-1] or not written:
        flush()
    if len(written) == 1:
        os.replace(written[0], out / "model.safetensors")
        return ["model.safetensors"]
    names = []
    weight_map = {}
    for i, p in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        with safe_open(str(p), framework="pt") as h:
            for k in h.keys():
                weight_map[k] = fname
        os.replace(p, out / fname)
        names.append(fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
