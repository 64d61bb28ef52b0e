"""Outputs one calibration pass computed that the next pass would compute again, unchanged.

True-sequential calibration runs a layer once per linear group (q/k/v, o, gate/up, down) and once
more for its output; each pass recomputes everything before the group it stops at. A module whose
output the previous pass already computed can be replayed instead when nothing it depends on has
changed since: it ran before that pass's group (so its inputs came from final weights) and holds
no linear of that group or a later one (so its own weights are final). Pass t records the outputs
of the largest such modules that hold a linear (norms and activations cost little to recompute);
pass t + 1 and the output pass replay them. On Gemma-3-270M this roughly halves the forward work of
GPTQ's statistics passes. No architecture table: the order comes from one traced forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .trace import trace_layer


def _clone(o):
    if torch.is_tensor(o):
        return o.clone()
    if isinstance(o, tuple):
        return tuple(_clone(v) for v in o)
    if isinstance(o, list):
        return [_clone(v) for v in o]
    return o


def _nbytes(o) -> int:
    if torch.is_tensor(o):
        return o.numel() * o.element_size()
    if isinstance(o, (tuple, list)):
        return sum(_nbytes(v) for v in o)
    return 0


class PassCache:
    """Per layer: `record(t)` before the pass that collects group t, `replay()` before the output pass."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, groups: list[list[str]], budget: int):
        rec, _ = trace_layer(layer, x, args, kwargs)
        mods = dict(layer.named_modules())
        owner = {n: t for t, g in enumerate(groups) for n in g}
        linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        self.layer, self.budget = layer, budget
        self.safe: list[list[str]] = []
        for t, g in enumerate(groups):
            start = rec[g[0]][2] if g[0] in rec else None
            ok = []
            if start is not None:
                for n, (_, _, _, end) in rec.items():
                    inner = [c for c in linears if c == n or c.startswith(n + ".")]
                    if end is not None and end < start and inner and all(owner.get(c, len(groups)) < t for c in inner):
                        ok.append(n)
            self.safe.append([n for n in ok if not any(n.startswith(p + ".") for p in ok)])
        self.saved: dict[str, dict[int, list]] = {}
        self.batch = 0
        self._hooks: list = []
        self._patched: list = []

    def begin(self, t: int | None) -> None:
        """Start a pass: replay what the previous pass recorded, record group t's safe modules (None: none)."""
        self.end()
        replay, self.saved = self.saved, {}
        for name, per_batch in replay.items():
            mod = self.layer.get_submodule(name)
            had = "forward" in mod.__dict__
            orig = mod.forward

            def forward(*a, _orig=orig, _pb=per_batch, **kw):
                q = _pb.get(self.batch)
                return _clone(q.pop(0)) if q else _orig(*a, **kw)

            mod.forward = forward
            self._patched.append((mod, had, orig))
        if t is None:
            return
        used = [0]
        for name in self.safe[t]:
            self.saved[name] = {}

            def hook(m, a, o, name=name):
                if name not in self.saved:
                    return
                used[0] += _nbytes(o)
                if used[0] > self.budget:  # over the memory budget: this module is recomputed next pass
                    del self.saved[name]
                    return
                self.saved[name].setdefault(self.batch, []).append(_clone(o))

            self._hooks.append(self.layer.get_submodule(name).register_forward_hook(hook))

    def end(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for mod, had, orig in self._patched:
            if had:
                mod.forward = orig
            else:
                del mod.forward
        self._patched = []

    def close(self) -> None:
        self.end()
        self.saved = {}
