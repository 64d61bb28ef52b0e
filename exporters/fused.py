"""Fused projections: engines load q/k/v (and gate/up) shards as one tensor.

For per-tensor scales an engine keeps a single value for the fused tensor: vLLM and SGLang take the
max of the shards' FP8 input scales and of NVFP4 `weight_scale_2` / `input_scale` without re-scaling
the block scales, so shards whose values differ would be served with the wrong scale. Formats that
hold such per-tensor values call `check_shared` when writing and refuse a checkpoint that breaks it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from qtensor import QTensor

FAMILIES = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
    "gate_proj": "gate_up", "up_proj": "gate_up",
    "w1": "gate_up", "w3": "gate_up",  # Mixtral experts
}


def fused_groups(names: Iterable[str]) -> list[list[str]]:
    """Groups of module names an engine fuses into one tensor (only groups of two or more)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        if leaf in FAMILIES:
            groups[(parent, FAMILIES[leaf])].append(n)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def check_shared(qtensors: dict[str, QTensor], what: str, get: Callable[[QTensor], torch.Tensor | None]) -> str | None:
    """None when every fused group holds bit-identical `get(qt)` values, else the reason naming the shards."""
    for group in fused_groups(qtensors):
        vals = [get(qtensors[n]) for n in group]
        if all(v is None for v in vals):
            continue
        first = vals[0]
        for n, v in zip(group[1:], vals[1:]):
            if first is None or v is None or first.dtype != v.dtype or first.numel() != v.numel() or not torch.equal(first.reshape(-1), v.reshape(-1)):
                return f"fused shards {group[0]} and {n} have different {what} (the engine loads them as one tensor with one {what})"
    return None
