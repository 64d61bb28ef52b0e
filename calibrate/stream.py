"""Streaming a model from its safetensors: only what is being worked on is ever materialized.

The skeleton comes from config.json with parameters on the meta device; `materialize(prefix)` loads
the parameters under a module prefix from the files, `release(prefix)` puts them back on meta.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from exporters.io import TensorDir
from qtensor.errors import QtoolError

from .models import build_skeleton, load_config


class StreamedModel:
    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.td = TensorDir(self.dir)
        self.model = build_skeleton(self.config, trust_remote_code)
        self.dtype, self.device = dtype, device
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        missing = [n for n in dict(self.model.named_parameters()) if n not in self.td and not self._tied(n)]
        if missing:
            raise QtoolError(f"{self.dir}: checkpoint lacks tensor {missing[0]} that the {self.config.get('model_type')} model needs")
        self.param_names = names
        self._reader, self._pending, self._ahead = None, None, {}  # prefetch(): one layer read ahead
        self.model.to(device) if False else None

    def _tied(self, name: str) -> bool:
        return name.endswith("lm_head.weight") and self.tied

    @property
    def tied(self) -> bool:
        cfg = self.model.config
        return bool(getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False))

    def materialize(self, prefix: str = "", exclude: tuple[str, ...] = (), device=None) -> None:
        """Load every parameter whose name starts with `prefix` (and not with any of `exclude`), onto
        `device` (default: the model's device); real buffers under `prefix` go there too."""
        device = self.device if device is None else device
        self._collect_ahead()
        root = self.model.get_submodule(prefix.rstrip(".")) if prefix else self.model
        base = prefix if prefix.endswith(".") or not prefix else prefix + "."
        for name, p in list(root.named_parameters(recurse=True)):
            full = base + name
            if any(full.startswith(e) for e in exclude) or p.device.type != "meta":
                continue
            if full not in self.td:
                if self._tied(full):
                    continue
                raise QtoolError(f"checkpoint lacks tensor {full}")
            t = self._ahead.pop(full, None) if self._ahead else None
            t = self.td[full] if t is None else t
            if list(t.shape) != list(p.shape):
                raise QtoolError(f"tensor {full} has shape {list(t.shape)}, the model expects {list(p.shape)}")
            parent, _, leaf = name.rpartition(".")
            mod = root.get_submodule(parent) if parent else root
            setattr(mod, leaf, nn.Parameter(t.to(device, self.dtype if t.is_floating_point() else t.dtype), requires_grad=False))
        if device != self.device:
            for name, b in list(root.named_buffers()):
                parent, _, leaf = name.rpartition(".")
                if b.device.type != "meta":
                    (root.get_submodule(parent) if parent else root)._buffers[leaf] = b.to(device)
        if self.tied and not prefix:
            self.model.tie_weights()

    def prefetch(self, prefix: str) -> None:
        """Read the parameters under `prefix` (a decoder layer) from disk in a background thread, so that
        the next materialize of it finds them in memory (one layer ahead: the calibration of the current
        layer overlaps the read of the next)."""
        from concurrent.futures import ThreadPoolExecutor

        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="qtool-prefetch")
        base = prefix.rstrip(".") + "."
        names = [base + n for n, p in self.model.get_submodule(prefix.rstrip(".")).named_parameters() if p.device.type == "meta"]
        pin = str(self.device).startswith("cuda")  # page-locked: the host-to-device copies run at full speed
        self._pending = self._reader.submit(lambda: {n: (self.td[n].pin_memory() if pin else self.td[n]) for n in names if n in self.td})

    def _collect_ahead(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            try:
                self._ahead = fut.result()
            except Exception:  # noqa: BLE001 - the plain read in materialize reports it with its context
                self._ahead = {}

    def release(self, prefix: str) -> None:
        root = self.model.get_submodule(prefix.rstrip("."))
        root.to("meta")

    def materialize_outside(self, layers_prefix: str) -> None:
        """Everything except the decoder layers (embeddings, final norm, rotary, lm_head)."""
        self.materialize("", exclude=(layers_prefix + ".",))
        if self.tied:
            self.model.tie_weights()
