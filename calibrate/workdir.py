"""The quantize work directory beside --out: per-layer results on disk, so a killed run resumes.

    .<out>.qtool-work/
        manifest.json                 fingerprint of the run, finished layers, last saved hidden states
        layer-00003.safetensors       layer 3's QTensors (qtool lossless encoding) + its other tensors
        hidden-00002.safetensors      hidden states after layer 2 (inputs of layer 3), saved every 30 s

Each file is written to a temporary name and renamed; the manifest is updated last, so whatever the
moment of a kill, the manifest names only complete files. Results are read back lazily when the
final checkpoint is written, so quantized layers never accumulate in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exporters.io import TensorFile
from exporters.qtool import decode_module, encode_module, module_meta
from qtensor import QTensor
from qtensor.errors import QtoolError

_PT = "pt::"  # prefix of pass-through tensors inside layer files


def work_path(out: Path) -> Path:
    out = Path(out)
    return out.resolve().parent / f".{out.name}.qtool-work"


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    """Data-parallel runs: every rank keeps its own work directory (its hidden states are those of its
    samples); ranks decide together when to save hidden states and where a resume starts."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        from . import distributed

        self.path = work_path(out)
        self.fingerprint = fingerprint
        man = self.path / "manifest.json"
        error, at = None, -1
        if self.path.exists() and resume:
            old = None
            try:
                old = json.loads(man.read_text())
            except (OSError, ValueError):
                old = None
            if old is None:
                error = f"work directory {self.path} has no readable manifest; remove it to start over"
            elif old.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {})) if fingerprint.get(k) != old.get("fingerprint", {}).get(k))
                error = f"work directory {self.path} is from a different run (differs in: {', '.join(diff)}); remove it or run without --resume"
            else:
                at = int(old.get("hidden_at", -1))
        if distributed.any_rank(error is not None):  # one rank's refusal stops them all
            raise QtoolError(error or "the work directory of another process cannot be resumed (see its error)")
        if self.path.exists() and resume:
            # restart after the last layer whose output hidden states were saved (by every rank); layers
            # after it are recomputed (deterministically: their files are rewritten with the same bytes)
            self.hidden_at = distributed.min_rank(at)
            self.done = self.hidden_at + 1
            self._last_save = time.time()
            return
        distributed.min_rank(-1)  # the collective the resuming ranks make
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.done = 0
        self.hidden_at = -1
        self._last_save = time.time()
        self._write_manifest()

    # hidden states are large (samples x seqlen x hidden per layer): save them at most every
    # QTOOL_CHECKPOINT_SECONDS (default 30 s); a resume recomputes the layers after the last save
    save_interval = float(os.environ.get("QTOOL_CHECKPOINT_SECONDS", "30"))

    def _write_manifest(self) -> None:
        tmp = self.path / f".manifest.{os.getpid()}"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "layers_done": self.done, "hidden_at": self.hidden_at}, indent=2, sort_keys=True))
        os.replace(tmp, self.path / "manifest.json")

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def hidden_file(self, i: int) -> Path:
        return self.path / f"hidden-{i:05d}.safetensors"

    def save_layer(self, i: int, qts: dict[str, QTensor], tensors: dict[str, torch.Tensor], hidden: list[torch.Tensor] | None, notes: list[str],
                   kv: dict | None = None) -> None:
        out = {}
        meta = {}
        for name, qt in qts.items():
            out.update(encode_module(name, qt))
            meta[name] = module_meta(qt)
        for k, v in tensors.items():
            out[_PT + k] = v
        kv_meta = {n: [float(k), float(v)] for n, (k, v) in (kv or {}).items()}  # float32 values: exact as JSON doubles
        _atomic_save(out, self.layer_file(i), {"modules": json.dumps(meta), "notes": json.dumps(notes), "kv": json.dumps(kv_meta)})
        from . import distributed

        old = self.hidden_at
        due = distributed.any_rank(hidden is not None and time.time() - self._last_save >= self.save_interval)
        if due and hidden is not None:
            _atomic_save({f"h{j}": h.detach().cpu() for j, h in enumerate(hidden)}, self.hidden_file(i))
            self.hidden_at = i
            self._last_save = time.time()
        self.done = i + 1
        self._write_manifest()
        distributed.barrier()  # every rank's manifest names the new hidden states before the old go
        if old != self.hidden_at and old >= 0 and self.hidden_file(old).exists():
            self.hidden_file(old).unlink()

    def load_hidden(self, i: int, device: str = "cpu") -> list[torch.Tensor]:
        p = self.hidden_file(i)
        if not p.is_file():
            raise QtoolError(f"work directory {self.path} lacks {p.name}; remove it to start over")
        with safe_open(str(p), "pt") as f:
            return [f.get_tensor(f"h{j}").to(device) for j in range(len(list(f.keys())))]

    def notes(self) -> list[str]:
        out = []
        for i in range(self.done):
            with safe_open(str(self.layer_file(i)), "pt") as f:
                out += json.loads((f.metadata() or {}).get("notes", "[]"))
        return out

    def kv_scales(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """KV-cache scales (k_scale, v_scale) per attention module of the finished layers (--kv-cache)."""
        out = {}
        for i in range(self.done):
            with safe_open(str(self.layer_file(i)), "pt") as f:
                for n, (k, v) in json.loads((f.metadata() or {}).get("kv", "{}")).items():
                    out[n] = (torch.tensor(k, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
        return out

    def results(self, n_layers: int) -> tuple["LazyQTensors", "LazyTensors"]:
        files = [self.layer_file(i) for i in range(n_layers)]
        for f in files:
            if not f.is_file():
                raise QtoolError(f"work directory {self.path} lacks {f.name}")
        return LazyQTensors(files), LazyTensors(files)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class _LayerFiles:
    def __init__(self, files: list[Path]):
        self.files = files
        self._handles = {}

    def handle(self, f: Path) -> TensorFile:
        if f not in self._handles:
            self._handles[f] = TensorFile(f)
        return self._handles[f]


class LazyQTensors(Mapping):
    """module name -> QTensor, decoded from the layer files on access."""

    def __init__(self, files: list[Path]):
        self._lf = _LayerFiles(files)
        self._where: dict[str, tuple[Path, dict]] = {}
        for f in files:
            mods = json.loads(self._lf.handle(f).metadata().get("modules", "{}"))
            for name, m in mods.items():
                self._where[name] = (f, m)

    def __getitem__(self, name: str) -> QTensor:
        f, m = self._where[name]
        h = self._lf.handle(f)

        class _Get(Mapping):
            def __getitem__(self_, k):
                return h.get(k)

            def __contains__(self_, k):
                return k in h.keys()

            def __iter__(self_):
                return iter(h.keys())

            def __len__(self_):
                return len(h.keys())

        return decode_module(_Get(), name, m)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


class LazyTensors(Mapping):
    """Pass-through tensors of the layers (norms, biases, possibly rescaled by AWQ/SmoothQuant)."""

    def __init__(self, files: list[Path]):
        self._lf = _LayerFiles(files)
        self._where = {}
        for f in files:
            for k in self._lf.handle(f).keys():
                if k.startswith(_PT):
                    self._where[k[len(_PT):]] = f

    def __getitem__(self, k):
        return self._lf.handle(self._where[k]).get(_PT + k)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)
