"""Moving per-channel scales between a group of linears and the op that produces their input.

Shared by AWQ and SmoothQuant. A group of linears reading one input x (q/k/v; o; gate/up; down)
computes W x = (W diag(s)) (x / s). When the op producing x (a norm's weight, a preceding linear's
output rows) can be made to produce x / s, the group takes W diag(s) and the layer computes the
same function. The producer is found from the module tree and probing forward passes, with no
table of architectures:

- a norm whose output *is* the group input (found with forward hooks); its weight may enter as
  out = n(x) * (c + w) with c = 0 (Llama) or c = 1 (Gemma's 1 + w): c is measured, not assumed;
- otherwise an earlier linear of the layer whose output scaling is proved to reach the group input
  channel for channel (up -> down, v -> o), or, when it has fewer outputs than the group has inputs,
  each of its channels feeding several group channels (v -> o under grouped-query attention: one
  KV head serves several query heads). The map (`Pair.index`, group channel -> producer channel)
  is measured by a probe, and the group's scales are tied over the channels sharing a producer
  channel (`tie`).

Every candidate is probed (random channel factors must arrive unchanged at the group input) and
every fold is verified on the layer's real output and undone if it changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..trace import trace_layer


class _Stop(Exception):
    pass


@dataclass
class Pair:
    group: list[str]  # linears reading the same input
    prev: str | None = None  # module producing that input
    kind: str = ""  # "norm" | "linear"
    offset: float = 0.0  # norm: out = n(x) * (offset + weight)
    block: str = ""  # module whose output scores a candidate scale ("" = the whole layer)
    reason: str = ""  # why the pair cannot be folded
    index: torch.Tensor | None = None  # linear producer with fewer outputs: group input channel -> its output channel


def tie(pair: Pair, v: torch.Tensor, how: str = "gmean") -> torch.Tensor:
    """v (one value per group input channel) made equal over the channels that share a producer
    channel (max, mean or geometric mean over them); v itself when every channel has its own."""
    if pair.index is None:
        return v
    idx = pair.index.to(v.device)
    n = int(idx.max()) + 1
    src = v.float().clamp(min=1e-30).log() if how == "gmean" else v.float()
    red = "amax" if how == "max" else "mean"
    t = torch.zeros(n, dtype=torch.float32, device=v.device).scatter_reduce(0, idx, src, red, include_self=False)
    t = t.exp() if how == "gmean" else t
    return t[idx].to(v.dtype)


def lowest_common_module(names: list[str]) -> str:
    """The innermost module containing every named linear (the linear itself for a group of one)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for xs in zip(*parts):
        if any(x != xs[0] for x in xs):
            break
        common.append(xs[0])
    return ".".join(common)


@torch.no_grad()
def group_input(layer: nn.Module, first: str, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """The input the linear `first` receives when the layer runs on x (the layer stops there)."""
    got = []

    def hook(m, a):
        got.append(a[0].detach().clone())
        raise _Stop

    h = layer.get_submodule(first).register_forward_pre_hook(hook)
    try:
        layer(x, *args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


def _params(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.data.clone() for k, v in mod.named_parameters(recurse=False)}


def _restore(mod: nn.Module, saved: dict) -> None:
    for k, v in mod.named_parameters(recurse=False):
        v.data.copy_(saved[k])


def _is_norm(mod: nn.Module, k: int) -> bool:
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == k
            and not any(True for _ in mod.children()))


@torch.no_grad()
def _norm_offset(mod: nn.Module, inp: torch.Tensor) -> float | None:
    """c in out = n(x) * (c + weight) (+ bias), measured with weight 0 and 1; None if out is not of that form."""
    saved = _params(mod)
    try:
        if getattr(mod, "bias", None) is not None:
            mod.bias.data.zero_()
        mod.weight.data.zero_()
        y0 = mod(inp).float()
        mod.weight.data.fill_(1.0)
        y1 = mod(inp).float()
        mod.weight.data.fill_(2.0)
        y2 = mod(inp).float()
    finally:
        _restore(mod, saved)
    d = y1 - y0
    if not torch.allclose(y2 - y1, d, rtol=1e-4, atol=1e-5 * float(d.abs().max().clamp(min=1e-30))):
        return None  # not affine in the weight
    mask = d.abs() > 1e-3 * d.abs().max()
    if not mask.any():
        return None
    c = float((y0[mask] / d[mask]).median())
    if not torch.allclose(y0, c * d, rtol=1e-3, atol=1e-4 * float(d.abs().max())):
        return None
    return round(c, 6)


@torch.no_grad()
def fold(layer: nn.Module, pair: Pair, factor: torch.Tensor) -> torch.Tensor:
    """Make pair.prev's output x * factor (per channel); returns the factor really applied.

    A norm's new weight is rounded to bfloat16 precision (exactly representable in bf16, fp16 and
    fp32 checkpoints), and the factor it then applies is returned, so that the group's columns
    compensate it exactly. Channels where that would lose the sign or vanish keep their weight.
    """
    mod = layer.get_submodule(pair.prev)
    factor = factor.float()
    if pair.kind == "linear":
        if pair.index is not None:  # one factor per producer channel (the group's are tied over its repeats)
            idx = pair.index.to(factor.device)
            factor = torch.ones(mod.out_features, dtype=torch.float32, device=factor.device).scatter(0, idx, factor)
        mod.weight.data.mul_(factor.to(mod.weight.dtype)[:, None])
        if mod.bias is not None:
            mod.bias.data.mul_(factor.to(mod.bias.dtype))
        return factor if pair.index is None else factor[idx]
    c = pair.offset
    w = mod.weight.data.float()
    base = w + c
    new = (base * factor - c).to(torch.bfloat16).float()
    applied = (new + c) / torch.where(base == 0, torch.ones_like(base), base)
    keep = (base.abs() < 1e-12) | (applied <= 0) | ~torch.isfinite(applied)
    new = torch.where(keep, w, new)
    applied = torch.where(keep, torch.ones_like(applied), applied)
    mod.weight.data.copy_(new.to(mod.weight.dtype))
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.mul_(applied.to(mod.bias.dtype))
    return applied


@torch.no_grad()
def scale_columns(layer: nn.Module, names: list[str], s: torch.Tensor) -> None:
    for n in names:
        lin = layer.get_submodule(n)
        lin.weight.data.mul_(s.to(lin.weight.dtype)[None, :])


def _output_change(ctx, before: torch.Tensor) -> float:
    """Relative change of the layer output on its first sample since `before` (a fold must keep it)."""
    after = ctx.run([ctx.inputs[0][:1]])[0]
    return float((after.float() - before.float()).norm() / before.float().norm().clamp(min=1e-30))


PRE_SCALE_ATTR = "qtool_pre_scale"  # set on a linear whose input is multiplied by it before quantization


@torch.no_grad()
def apply_pre_scale(ctx, pair: Pair, s: torch.Tensor, check: torch.Tensor | None = None, tol: float = 1e-3) -> str:
    """Smoothing that no preceding op can absorb exactly (GQA v -> o, or no producer found), kept as the
    group's own input scale: every linear of the group computes W' (x * p) with p = 1/s rounded to
    bfloat16 (ModelOpt's pre_quant_scale; formats store it in the model dtype) and W' = W / p column-wise.
    The float layer gets the same: its columns are scaled and a forward pre-hook multiplies the input by
    p, so the statistics passes see the smoothed input. The pipeline puts p into each QTensor's pre_scale.
    Returns "" or why it was skipped (output changed: undone)."""
    layer = ctx.layer
    before = ctx.run([ctx.inputs[0][:1]])[0] if check is None else check
    p = (1.0 / s.float()).to(torch.bfloat16).float()
    saved = {n: _params(layer.get_submodule(n)) for n in pair.group}
    hooks = []
    for n in pair.group:
        lin = layer.get_submodule(n)
        lin.weight.data.copy_((lin.weight.data.float() / p[None, :].to(lin.weight.device)).to(lin.weight.dtype))
        hooks.append(lin.register_forward_pre_hook(lambda m, inp, p=p: (inp[0] * p.to(inp[0].device, inp[0].dtype), *inp[1:])))
    err = _output_change(ctx, before)
    if not err <= tol:
        for h in hooks:
            h.remove()
        for n, prm in saved.items():
            _restore(layer.get_submodule(n), prm)
        return f"{'/'.join(pair.group)}: a pre_quant_scale changed the layer output (rel. error {err:.2g}); skipped"
    for n in pair.group:
        setattr(layer.get_submodule(n), PRE_SCALE_ATTR, p.cpu())
    return ""


@torch.no_grad()
def find_pairs(ctx) -> list[Pair]:
    """One Pair per linear group of the layer, with its foldable producer when one is found."""
    layer = ctx.layer
    x = ctx.inputs[0][:1]
    rec, _ = trace_layer(layer, x, ctx.args, ctx.kwargs)
    mods = dict(layer.named_modules())
    linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    pairs = []
    for group in ctx.groups:
        first = group[0]
        pair = Pair(list(group), block=lowest_common_module(group))
        if first not in rec or rec[first][0] is None:
            pair.reason = "no calibration tokens reach this group"
            pairs.append(pair)
            continue
        gin, start = rec[first][0], rec[first][2]
        k = gin.shape[-1]
        cands = []
        for name, (inp, out, s0, e0) in rec.items():  # norms whose output is the group input
            if out is None or not torch.is_tensor(out) or e0 is None or e0 > start or not _is_norm(mods[name], k):
                continue
            if out.shape == gin.shape and (out.data_ptr() == gin.data_ptr() or torch.equal(out, gin)):
                cands.append(("norm", name))
        earlier = sorted((rec[n][3], n) for n in linears if n in rec and rec[n][3] is not None and rec[n][3] < start and n not in group
                         and 0 < mods[n].out_features <= k and k % mods[n].out_features == 0)
        cands += [("linear", n) for _, n in reversed(earlier)]
        for kind, name in cands:
            offset = 0.0
            if kind == "norm":
                c = _norm_offset(mods[name], rec[name][0])
                if c is None:
                    continue
                offset = c
            cand = Pair(list(group), name, kind, offset, pair.block)
            if kind == "linear" and mods[name].out_features != k:
                cand.index = _probe_index(layer, cand, x, ctx.args, ctx.kwargs, gin)
                if cand.index is not None:
                    pair = cand
                    break
                continue
            if _probe(layer, cand, x, ctx.args, ctx.kwargs, gin):
                pair = cand
                break
        else:
            pair.reason = "no preceding norm or linear scales this group's input channel for channel"
        pairs.append(pair)
    return pairs


@torch.no_grad()
def _probe(layer, pair: Pair, x, args, kwargs, gin) -> bool:
    mod = layer.get_submodule(pair.prev)
    saved = _params(mod)
    g = torch.Generator().manual_seed(1234)
    r = 0.5 + 1.5 * torch.rand(gin.shape[-1], generator=g)
    try:
        applied = fold(layer, pair, r)
        got = group_input(layer, pair.group[0], x, args, kwargs)
    finally:
        _restore(mod, saved)
    want = gin.float() * applied
    if got.shape != want.shape:  # e.g. the probe changed an MoE router's choice
        return False
    return bool((got.float() - want).norm() <= 1e-4 * want.norm().clamp(min=1e-30))


@torch.no_grad()
def _probe_index(layer, pair: Pair, x, args, kwargs, gin) -> torch.Tensor | None:
    """Scale the producer's output channel c by 1 + c / n and read which factor each group input
    channel received: the map group channel -> producer channel, or None when the group input is
    not the producer's channels repeated (each scaled exactly by one factor)."""
    mod = layer.get_submodule(pair.prev)
    n = mod.out_features
    r = 1.0 + torch.arange(n, dtype=torch.float32) / n
    saved = _params(mod)
    try:
        mod.weight.data.mul_(r.to(mod.weight.dtype)[:, None])
        if mod.bias is not None:
            mod.bias.data.mul_(r.to(mod.bias.dtype))
        got = group_input(layer, pair.group[0], x, args, kwargs)
    finally:
        _restore(mod, saved)
    if got.shape != gin.shape:
        return None
    g, o = gin.float().reshape(-1, gin.shape[-1]), got.float().reshape(-1, gin.shape[-1])
    den = (g * g).sum(0)
    if not bool((den > 0).all()):
        return None
    ratio = (o * g).sum(0) / den
    idx = ((ratio - 1.0) * n).round().long().clamp(0, n - 1)  # the nearest of the evenly spaced factors
    if (o - g * r[idx]).norm() > 1e-4 * (g * r[idx]).norm().clamp(min=1e-30):
        return None
    return idx


@torch.no_grad()
def apply(ctx, pair: Pair, s: torch.Tensor, check: torch.Tensor | None = None, tol: float = 1e-3) -> tuple[str, torch.Tensor | None]:
    """Divide the group input by s (folded into pair.prev), multiply the group's columns by it, and
    check the layer output on one sample is unchanged; undo and explain when it is not.

    Returns (message, a): a is the factor the group input was really multiplied by (about 1/s;
    exact after the norm weight's rounding), None when the fold was undone."""
    layer = ctx.layer
    x = ctx.inputs[0][:1]
    before = ctx.run([x])[0] if check is None else check
    prev = layer.get_submodule(pair.prev)
    s = tie(pair, s)
    saved = {n: _params(layer.get_submodule(n)) for n in pair.group}
    saved_prev = _params(prev)
    applied = fold(layer, pair, 1.0 / s.float())
    scale_columns(layer, pair.group, 1.0 / applied)
    err = _output_change(ctx, before)
    if not err <= tol:
        _restore(prev, saved_prev)
        for n, p in saved.items():
            _restore(layer.get_submodule(n), p)
        return f"{'/'.join(pair.group)}: folding into {pair.prev} changed the layer output (rel. error {err:.2g}); skipped", None
    return "", applied
