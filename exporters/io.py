"""Reading and writing safetensors directories, with the checks a hostile file needs."""

from __future__ import annotations

import json
import os
import threading
import stat
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtensor.errors import QtoolError

MAX_SHARD_BYTES = 5 * 1024**3
_MAX_HEADER = 100 * 1024 * 1024
_MAX_INDEX = 64 * 1024 * 1024
# bytes per element of the safetensors dtypes (sub-byte types: bits per element / 8)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
               "C64": 8, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def regular_file(path: Path, what: str = "") -> None:
    """A path that is a plain file (not a FIFO, device or directory: those block or fail on read)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise QtoolError(f"{what or path.name}: cannot read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise QtoolError(f"{what or path.name}: not a regular file")


def read_header(path: Path) -> dict:
    """The header of a safetensors file, with its length and every tensor extent checked against the
    file size before anything is allocated: offsets are pairs of integers inside the data area, do not
    overlap, and hold exactly shape x dtype bytes."""
    regular_file(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QtoolError(f"{path.name}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise QtoolError(f"{path.name}: safetensors header length {n} exceeds the file or the {_MAX_HEADER}-byte limit")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise QtoolError(f"{path.name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise QtoolError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise QtoolError(f"{path.name}: __metadata__ is not a map of strings")
            continue
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise QtoolError(f"{path.name}: tensor {name} has no data offsets")
        off = info["data_offsets"]
        if not (isinstance(off, list) and len(off) == 2 and all(_is_int(x) for x in off)):
            raise QtoolError(f"{path.name}: tensor {name} has invalid data offsets {off!r}"[:300])
        a, b = off
        if not (0 <= a <= b):
            raise QtoolError(f"{path.name}: tensor {name} has invalid data offsets {off!r}")
        if b > data:
            raise QtoolError(f"{path.name}: tensor {name} lies outside the file (ends at {b}, data holds {data} bytes)")
        dtype, shape = info.get("dtype"), info.get("shape")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise QtoolError(f"{path.name}: tensor {name} has unknown dtype {dtype!r}"[:300])
        if not (isinstance(shape, list) and all(_is_int(x) and x >= 0 for x in shape)):
            raise QtoolError(f"{path.name}: tensor {name} has invalid shape {shape!r}"[:300])
        numel = 1
        for x in shape:
            numel *= x
        if numel * DTYPE_BYTES[dtype] != b - a:
            raise QtoolError(f"{path.name}: tensor {name} claims shape {shape} {dtype} ({numel * DTYPE_BYTES[dtype]:.0f} bytes) but spans {b - a} bytes")
        spans.append((a, b, name))
    spans.sort()
    for (a1, b1, n1), (a2, b2, n2) in zip(spans, spans[1:]):
        if a2 < b1:
            raise QtoolError(f"{path.name}: tensors {n1} and {n2} overlap")
    return header


def _check_header(path: Path) -> None:
    read_header(path)


def _inside(root: Path, f: Path, what: str) -> Path:
    """`f` resolved (links followed), refused unless it lies inside `root`."""
    try:
        r = f.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise QtoolError(f"{what}: cannot resolve ({getattr(e, 'strerror', None) or e})") from None
    if root not in r.parents:
        raise QtoolError(f"{what} leaves the model directory")
    return r


def read_index(path: Path, root: Path) -> tuple[dict, list[Path]]:
    """weight_map and shard files of a *.safetensors.index.json, every shard inside the directory."""
    regular_file(path)
    if path.stat().st_size > _MAX_INDEX:
        raise QtoolError(f"{path.name}: index larger than {_MAX_INDEX} bytes")
    try:
        wm = json.loads(path.read_bytes().decode("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise QtoolError(f"{path.name}: not a valid safetensors index (JSON object with a weight_map)") from None
    if not isinstance(wm, dict):
        raise QtoolError(f"{path.name}: weight_map is not an object")
    for k, v in wm.items():
        if not isinstance(v, str):
            raise QtoolError(f"{path.name}: shard path of {k} is not a string")
    files = {}
    for fname in sorted(set(wm.values())):
        if not fname or "\0" in fname:
            raise QtoolError(f"{path.name}: invalid shard path {fname!r}")
        f = _inside(root, path.parent / fname, f"{path.name}: shard path {fname!r}")
        try:
            ok = f.is_file()
        except OSError as e:
            raise QtoolError(f"{path.name}: shard {fname!r}: {e.strerror}") from None
        if not ok:
            raise QtoolError(f"{path.name}: shard {fname!r} is missing")
        files[fname] = f
    return wm, [files[k] for k in sorted(files)]


_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                 "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
                 "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64}
_ST_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


_OPEN_LOCK = threading.Lock()


class TensorFile:
    """One safetensors file read with plain reads into fresh memory (no mmap): pages of tensors already
    used do not stay resident, so streaming a model larger than memory keeps a flat RSS."""

    def __init__(self, path: Path, header: dict | None = None):
        self.path = Path(path)
        self.header = read_header(self.path) if header is None else header
        with self.path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        self.start = 8 + n
        self._f = None

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def metadata(self) -> dict:
        return self.header.get("__metadata__", {})

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise QtoolError(f"{self.path.name}: tensor {name} has dtype {info['dtype']}, which qtool does not read")
        a, b = info["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        with _OPEN_LOCK:
            if self._f is None:
                self._f = self.path.open("rb")
        # positional reads (no shared file offset): threads may read tensors of one file at once
        view, fd, pos, done = memoryview(buf.numpy()), self._f.fileno(), self.start + a, 0
        while done < b - a:
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise QtoolError(f"{self.path.name}: tensor {name} is truncated")
            done += got
        return buf.view(dtype).reshape(info["shape"])


class TensorDir(Mapping):
    """Lazy name -> tensor view of the *.safetensors files of a directory (index honoured).

    Every file must be a regular file inside the directory (links are followed and checked), every
    header is checked before a tensor is touched, and a tensor name may live in one file only.
    """

    def __init__(self, path: Path, pattern: str | None = None):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        root = self.path.resolve()
        index = sorted(self.path.glob("*.safetensors.index.json"))
        files: list[Path]
        wm = None
        if index:
            wm, files = read_index(index[0], root)
        else:
            files = [_inside(root, f, f.name) for f in sorted(self.path.glob(pattern or "*.safetensors"))]
        if not files:
            pick = [f.name for f in self.path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")] if self.path.is_dir() else []
            if pick:
                raise QtoolError(f"{self.path} holds only pickle weights ({pick[0]}); qtool reads safetensors only")
            raise QtoolError(f"no .safetensors files in {self.path}")
        self._handles = {}
        for f in files:
            header = read_header(f)
            try:  # the reference parser validates too (then closes: no mapping stays open)
                with safe_open(str(f), framework="pt") as h:
                    keys = list(h.keys())
            except Exception as e:  # noqa: BLE001
                raise QtoolError(f"{f.name}: cannot open safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._handles[f] = TensorFile(f, header)
            for k in keys:
                if k in self._where:
                    raise QtoolError(f"tensor {k} appears in more than one file ({self._where[k].name}, {f.name})")
                self._where[k] = f
                self._info[k] = header[k]
        if wm is not None:
            for k, fname in wm.items():
                if self._where.get(k) != _inside(root, self.path / fname, fname):
                    raise QtoolError(f"{index[0].name}: index puts tensor {k} in {fname}, which does not hold it")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        try:
            return self._handles[self._where[name]].get(name)
        except QtoolError:
            raise
        except Exception as e:  # noqa: BLE001
            raise QtoolError(f"cannot read tensor {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> list[int]:
        return list(self._info[name]["shape"])

    def dtype_of(self, name: str) -> str:
        """The safetensors dtype name (F16, I32, ...) of a tensor, from the header."""
        return self._info[name]["dtype"]

    def nbytes_of(self, name: str) -> int:
        """Bytes of one tensor on disk, from the header (nothing is read)."""
        a, b = self._info[name]["data_offsets"]
        return b - a

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

    def nbytes_of(self, k) -> int:
        return tensor_nbytes(self.base, k)

    def dtype_of(self, k) -> str | None:
        return getattr(self.base, "dtype_of", lambda k: None)(k)


def tensor_nbytes(tensors: Mapping, k: str) -> int:
    """Bytes of tensors[k] without loading it where the mapping knows (TensorDir, Subset)."""
    if hasattr(tensors, "nbytes_of"):
        return tensors.nbytes_of(k)
    t = tensors[k]
    return t.numel() * t.element_size()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def pickle_files(path: Path) -> list[Path]:
    """The pickle weight files of a directory that holds no safetensors (index honoured)."""
    path = Path(path)
    if not path.is_dir() or list(path.glob("*.safetensors")):
        return []
    root = path.resolve()
    index = sorted(path.glob("*.bin.index.json"))
    if index:
        return read_index(index[0], root)[1]
    return [_inside(root, f, f.name) for f in sorted(path.iterdir()) if f.suffix in PICKLE_SUFFIXES]


def pickle_to_safetensors(src: Path, dst: Path, copy_files: Iterable[str] = ()) -> list[str]:
    """--allow-pickle: read pickle weights with torch.load(weights_only=True) (tensors and plain
    containers only: no code runs) and write them as safetensors into `dst` with config.json and
    `copy_files`; returns the shard names."""
    import shutil

    tensors: dict[str, torch.Tensor] = {}
    for f in pickle_files(src):
        regular_file(f)
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                sd = torch.load(f, map_location="cpu", weights_only=True)  # the pre-1.6 (not zip) layout
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
            text = str(e).strip()
            skip = ("Weights only load failed", "Check the documentation", "Please file an issue")  # torch's advice, not the cause
            why = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith(skip)]
            msg = why[0] if why else type(e).__name__
            raise QtoolError(f"{f.name}: refused by torch.load(weights_only=True): {msg[:200]}") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise QtoolError(f"{f.name}: not a state dict of named tensors")
        for k, v in sd.items():
            if k in tensors:
                raise QtoolError(f"tensor {k} appears in more than one file")
            tensors[k] = v
    if not tensors:
        raise QtoolError(f"no pickle weights in {src}")
    seen: set[int] = set()

    def items():
        for k in sorted(tensors):
            t = tensors[k]
            ptr = t.untyped_storage().data_ptr()
            yield k, (t.clone() if ptr in seen else t)  # tied weights share storage; safetensors wants them apart
            seen.add(ptr)

    names = write_shards(Path(dst), items())
    for fname in ("config.json", *copy_files):
        if (Path(src) / fname).is_file():
            shutil.copyfile(Path(src) / fname, Path(dst) / fname)
    return names


def _append_file(src, dst, size: int) -> None:
    """Copy `size` bytes of the open file src to the end of dst: in the kernel (copy_file_range, no
    round trip through user memory) where the OS offers it, else in 16 MiB chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < size:
                n = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
                if n <= 0:
                    break
                done += n
        except OSError:  # e.g. across file systems on old kernels: the chunked copy takes over from `done`
            pass
    if done < size:
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 1 << 24)


class _ShardWriter:
    """A safetensors file written as tensors arrive: data goes to a side file, the header and the data
    are joined at close, so no shard is ever held in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.f = self.data_path.open("wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.entries:
            raise QtoolError(f"tensor {name} written twice")
        t = t.detach().cpu().contiguous()
        if t.dtype not in _ST_NAMES:
            raise QtoolError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        nb = t.numel() * t.element_size()
        self.f.write(memoryview(raw) if nb else b"")
        self.entries[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size, self.size + nb]}
        self.size += nb

    def close(self) -> None:
        self.f.close()
        header = {"__metadata__": {"format": "pt"}, **self.entries}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        with self.path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(hb)))
            out.write(hb)
            out.flush()
            _append_file(data, out, self.size)
        self.data_path.unlink()


def write_shards(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write tensors into model.safetensors, or model-0000i-of-0000N shards + index above max_bytes,
    streaming (memory holds one tensor at a time)."""
    written: list[_ShardWriter] = []
    cur = None
    total = 0
    for name, t in tensors:
        nb = t.numel() * t.element_size()
        if cur is None or (cur.entries and cur.size + nb > max_bytes):
            if cur is not None:
                cur.close()
            cur = _ShardWriter(out / f".part-{len(written):05d}.safetensors")
            written.append(cur)
        cur.add(name, t)
        total += nb
    if cur is None:
        cur = _ShardWriter(out / ".part-00000.safetensors")
        written.append(cur)
    cur.close()
    if len(written) == 1:
        os.replace(written[0].path, out / "model.safetensors")
        return ["model.safetensors"]
    names = []
    weight_map = {}
    for i, w in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        weight_map.update(dict.fromkeys(w.entries, fname))
        os.replace(w.path, out / fname)
        names.append(fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
