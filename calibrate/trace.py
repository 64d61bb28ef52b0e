"""One traced forward of a decoder layer: every submodule's first input and output and the order in
which each started and ended (no architecture table). Used to find smoothing producers
(calibrate/algorithms/smoothing.py) and the outputs a calibration pass may replay (calibrate/reuse.py)."""

from __future__ import annotations

import torch
from torch import nn


def _first_tensor(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a):
            return a
    return None


def out_tensor(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@torch.no_grad()
def trace_layer(layer: nn.Module, x: torch.Tensor, args, kwargs) -> tuple[dict, torch.Tensor]:
    """One layer forward: {module name: (input, output, start index, end index)} and the layer output."""
    rec: dict[str, list] = {}
    counter = [0]
    hooks = []

    def pre(m, a, kw, name):
        counter[0] += 1
        rec[name] = [_first_tensor(a, kw), None, counter[0], None]

    def post(m, a, kw, o, name):
        counter[0] += 1
        if rec[name][1] is None:
            rec[name][1] = out_tensor(o)
            rec[name][3] = counter[0]

    for name, mod in layer.named_modules():
        if name:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, kw, name=name: pre(m, a, kw, name) if name not in rec else None, with_kwargs=True))
            hooks.append(mod.register_forward_hook(lambda m, a, kw, o, name=name: post(m, a, kw, o, name), with_kwargs=True))
    try:
        out = out_tensor(layer(x, *args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
    return rec, out
