"""AWQ (Lin et al. 2023): activation-aware per-channel scales, searched on the block's real output.

For each linear group and the op producing its input (smoothing.find_pairs: norm -> q/k/v,
v -> o (tied over the query heads sharing a KV head under GQA), norm -> gate/up, up -> down): s = mean|x|^alpha for alpha on a grid of
n_grid values in [0, 1) (alpha = 0 is plain round-to-nearest), the group fake-quantized as
Q(W diag(s)) / s, and the alpha whose block output (the innermost module holding the group: the
attention for q/k/v, the MLP for gate/up, the linear itself for o and down) is closest to the
unquantized one wins. 1/s is folded into the producer (a Gemma norm's 1 + w included) and s into
the group; the layer's unquantized output is unchanged (verified). Groups with no foldable
producer are left unscaled and reported.

Then a clipping search per output channel and group minimises each linear's output error on its
real inputs, dW H dW^T with H = X^T X restricted to the group's columns. The final step is
round-to-nearest with those clip ratios (numerics.int_qparams(clip=...)): prepare leaves them in
_CLIPS keyed by the weight's storage, and quantize takes them from there.
"""

from __future__ import annotations

import torch

from qtensor import QTensor
from qtensor import numerics as nm
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from ..trace import out_tensor
from . import smoothing as sm
from .rtn import quantize_weight

# clip ratios found by prepare, taken by quantize: weight storage pointer -> (that weight, ratios [N, G]).
# Holding the weight keeps its storage (and so the key) from being reused.
_CLIPS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.no_grad()
def _layer_pass(ctx, firsts: list[str], hessian_groups: int | None, blocks: set[str], search_batches: int):
    """One pass of the layer over every calibration batch, collecting per group input (keyed by the
    group's first linear) mean |x| per channel and, when hessian_groups is given, X^T X restricted to
    blocks of that many columns (<= 0: the whole matrix); and, on the first search_batches batches,
    each block's call (module, args, kwargs) with its unquantized output."""
    st = {n: {"abssum": 0.0, "n": 0, "H": None} for n in firsts}
    calls: dict[str, list] = {b: [] for b in blocks}
    searching = [False]
    hooks = []

    def stat(a, name):
        x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
        s = st[name]
        s["abssum"] = s["abssum"] + x.abs().sum(0)
        s["n"] += x.shape[0]
        if hessian_groups is not None:
            k = x.shape[1]
            g = k if hessian_groups <= 0 else hessian_groups
            xg = x.reshape(-1, k // g, g)
            h = torch.einsum("tgi,tgj->gij", xg, xg)
            s["H"] = h if s["H"] is None else s["H"] + h

    def pre(m, a, kw, b):
        if searching[0]:
            calls[b].append([m, a, kw, None])

    def post(m, a, kw, o, b):
        if searching[0] and calls[b] and calls[b][-1][3] is None:
            calls[b][-1][3] = out_tensor(o).detach()

    for n in firsts:
        hooks.append(ctx.module(n).register_forward_pre_hook(lambda m, a, n=n: stat(a, n)))
    for b in blocks:
        if b:
            hooks.append(ctx.module(b).register_forward_pre_hook(lambda m, a, kw, b=b: pre(m, a, kw, b), with_kwargs=True))
            hooks.append(ctx.module(b).register_forward_hook(lambda m, a, kw, o, b=b: post(m, a, kw, o, b), with_kwargs=True))
    try:
        with torch.no_grad():
            for i, h in enumerate(ctx.inputs):
                searching[0] = i < search_batches
                out = ctx.run([h])[0]
                if searching[0] and "" in calls:
                    calls[""].append([ctx.layer, (h, *ctx.args), ctx.kwargs, out])
    finally:
        for hk in hooks:
            hk.remove()
    for s in st.values():
        s["mean"] = s["abssum"] / s["n"] if s["n"] else None
    return st, {b: [tuple(c) for c in v] for b, v in calls.items()}


def _normalise(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(ctx, pair: sm.Pair, x_mean: torch.Tensor, calls: list[tuple], spec: WeightSpec, n_grid: int = 20,
                  duo_scaling: bool = False) -> tuple[torch.Tensor, float, float, float]:
    """(best s, its alpha, its block error, the error at alpha = 0, i.e. plain round-to-nearest)."""
    lins = [ctx.module(n) for n in pair.group]
    specs = [ctx.spec_of(n) if hasattr(ctx, "spec_of") else spec for n in pair.group]  # mixed precision: None = kept in full precision
    orig = [lin.weight.data.clone() for lin in lins]
    w_mean = None
    if duo_scaling:
        w = torch.cat([o.float() for o in orig])
        gs = w.shape[1] if spec.group_size <= 0 else spec.group_size
        wg = w.abs().reshape(w.shape[0], -1, gs)
        w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).reshape_as(w).mean(0)
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    base = float("inf")
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_mean.pow(alpha)
            if w_mean is not None:
                s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
            s = _normalise(sm.tie(pair, s))
            for lin, w, sp in zip(lins, orig, specs):
                if sp is not None:
                    lin.weight.data.copy_((quantize_weight(w.float() * s, sp).dequantize() / s).to(w.dtype))
            err, cnt = 0.0, 0
            for mod, a, kw, ref in calls:
                out = out_tensor(mod(*a, **kw))
                err += float((out.float() - ref.float()).pow(2).sum())
                cnt += ref.numel()
            err /= max(cnt, 1)
            if i == 0:
                base = err
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for lin, w in zip(lins, orig):
            lin.weight.data.copy_(w)
    return best[1], best[2], best[0], base


@torch.no_grad()
def clip_search(w: torch.Tensor, H: torch.Tensor, spec: WeightSpec, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (output channel, group) clip ratio in (1 - max_shrink, 1] minimising dW H dW^T, H [G, g, g]."""
    w = w.float()
    n, k = w.shape
    gs = k if spec.group_size <= 0 else spec.group_size
    best_err = torch.full((n, k // gs), float("inf"))
    best = torch.ones(n, k // gs)
    for i in range(grid):
        r = 1.0 - max_shrink * i / grid
        scale, zero = nm.int_qparams(w, spec.bits, spec.group_size, spec.sym, spec.scale_dtype, r)
        dq = nm.int_dequantize(nm.int_quantize(w, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size)
        d = (dq - w).reshape(n, k // gs, gs)
        err = torch.einsum("ngi,ngi->ng", torch.einsum("ngi,gij->ngj", d, H), d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def prepare(ctx, n_grid: int = 20, search_tokens: int = 4096, duo_scaling: bool = False, clip: bool = True, clip_grid: int = 20,
            max_shrink: float = 0.5, **_) -> list[str]:
    """The layer-level AWQ step: scale search and folding for every pair, then the clipping search.

    One pass of the layer collects everything: mean |x| and the Hessian blocks per group input, and
    the blocks' inputs on the first whole batches holding search_tokens tokens for the scale search. The
    folds leave every block's unquantized inputs and outputs unchanged except the folded group's own
    input, which is multiplied by a known factor a: its Hessian becomes diag(a) H diag(a)."""
    spec = ctx.spec
    if spec.dtype != "int":
        raise QtoolError(f"awq quantizes integer weights, not {spec.dtype}")
    notes = []
    pairs = sm.find_pairs(ctx)
    per_batch = max(1, ctx.inputs[0].numel() // ctx.inputs[0].shape[-1])
    stats, calls = _layer_pass(ctx, [g[0] for g in ctx.groups], spec.group_size if clip else None,
                               {p.block for p in pairs if p.prev is not None}, max(1, -(-search_tokens // per_batch)))
    check = ctx.run([ctx.inputs[0][:1]])[0]
    picked = []
    for p in pairs:
        label = "/".join(p.group)
        x_mean = stats[p.group[0]]["mean"]
        if p.prev is None:
            notes.append(f"awq: {label}: not scaled ({p.reason})")
            continue
        if x_mean is None:
            notes.append(f"awq: {label}: not scaled (no calibration tokens)")
            continue
        s, alpha, err, base = search_scales(ctx, p, x_mean.float(), calls[p.block], spec, n_grid, duo_scaling)
        if alpha == 0.0:
            picked.append(f"{label} alpha 0")
            continue
        msg, a = sm.apply(ctx, p, s, check)
        if msg:
            notes.append("awq: " + msg)
            continue
        picked.append(f"{label}<-{p.prev} alpha {alpha:.2f} err {err / base if base > 0 else 0:.2f}x")
        H = stats[p.group[0]]["H"]
        if H is not None:
            ag = a.reshape(H.shape[0], -1)
            stats[p.group[0]]["H"] = H * ag[:, :, None] * ag[:, None, :]
    del calls
    notes.append("awq scales: " + "; ".join(picked))
    if clip:
        shrunk, total = 0, 0
        for g in ctx.groups:
            H = stats[g[0]]["H"]
            if H is None:
                continue
            for n in g:
                lin, sp = ctx.module(n), ctx.spec_of(n) if hasattr(ctx, "spec_of") else spec
                if sp is None or sp.group_size != spec.group_size:  # full precision, or H blocks of another width
                    continue
                c = clip_search(lin.weight.data, H, sp, clip_grid, max_shrink)
                shrunk += int((c < 1).sum())
                total += c.numel()
                _CLIPS[lin.weight.data_ptr()] = (lin.weight.data, c)
        notes.append(f"awq clipping: {shrunk} of {total} weight groups clipped")
    return notes


def quantize(weight, spec, stats, **_):
    """The final step: round-to-nearest of the scaled weight with the clip ratios prepare found."""
    hit = _CLIPS.pop(weight.data_ptr(), None)
    if hit is None or hit[0].shape != weight.shape:
        return quantize_weight(weight, spec), ""
    w = weight.float()
    scale, zero = nm.int_qparams(w, spec.bits, spec.group_size, spec.sym, spec.scale_dtype, hit[1])
    return QTensor("int", spec.bits, nm.int_quantize(w, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size), ""
