"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

Per linear group and the op producing its input (smoothing.find_pairs): s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha) over the calibration tokens and the group's weight columns; 1/s is folded
into the producer (a norm, or a preceding linear such as up -> down, whose per-channel int8 scales
absorb the row scaling exactly) and s into the group's columns. The layer's unquantized output is
unchanged (verified); the activations' per-channel ranges become flatter, which per-token and
per-tensor int8 activation quantization need. With alpha "search" each group takes the alpha of a small grid whose W8A8 output error on a sample of its calibration inputs
is smallest. Weights are then quantized per channel by round-to-nearest; the pipeline fills static
activation scales from the smoothed amax.
"""

from __future__ import annotations

import torch

from qtensor import numerics as nm
from qtensor.errors import QtoolError

from . import smoothing as sm
from .rtn import quantize_weight

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)  # the alpha search's grid


@torch.no_grad()
def channel_amax(ctx, firsts: list[str], keep: int = 0) -> dict[str, torch.Tensor | None] | tuple[dict, dict]:
    """max |x| per input channel of each named linear over every calibration batch (one layer pass);
    with keep > 0 also the first `keep` input rows of each (the alpha search's tokens)."""
    got: dict[str, torch.Tensor | None] = {n: None for n in firsts}
    rows: dict[str, list] = {n: [] for n in firsts}

    def hook(m, a, n):
        x2 = a[0].detach().reshape(-1, a[0].shape[-1])
        x = x2.abs().amax(0).float()
        got[n] = x if got[n] is None else torch.maximum(got[n], x)
        have = sum(r.shape[0] for r in rows[n])
        if have < keep:
            rows[n].append(x2[: keep - have].float().clone())

    hooks = [ctx.module(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in firsts]
    try:
        ctx.run()
    finally:
        for h in hooks:
            h.remove()
    if keep:
        return got, {n: torch.cat(v) if v else None for n, v in rows.items()}
    return got


def _act_fake_quant(x: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
    """int8 quantize-dequantize: one static scale from amax, or per token (dynamic) when amax is None."""
    s = nm.int_scale_from_amax(amax if amax is not None else x.abs().amax(-1, keepdim=True), 8)
    return torch.clamp(torch.round(x / s), -128, 127) * s


@torch.no_grad()
def search_alpha(x: torch.Tensor, x_amax: torch.Tensor, weights: list[torch.Tensor], specs: list, static: bool, pair: sm.Pair,
                 grid: tuple = ALPHAS) -> tuple[float, list[float]]:
    """The migration strength whose W8A8 output error on the sample rows x is smallest: for each alpha the
    group's weights are scaled by s and rounded (their own specs), the inputs divided by s and rounded
    (static: one scale from the smoothed amax of every calibration token; dynamic: per token)."""
    ws = [(w.float(), sp) for w, sp in zip(weights, specs) if sp is not None]
    ref = torch.cat([x @ w.t() for w, _ in ws], 1)
    errs = []
    for alpha in grid:
        s = smooth_scales(x_amax, [w for w, _ in ws], alpha, pair)
        xq = _act_fake_quant(x / s, (x_amax.float() / s).max() if static else None)
        y = torch.cat([xq @ quantize_weight(w * s, sp).dequantize().t() for w, sp in ws], 1)
        errs.append(float((y - ref).square().sum()))
    return grid[min(range(len(grid)), key=errs.__getitem__)], errs


def smooth_scales(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float, pair: sm.Pair | None = None) -> torch.Tensor:
    """Per input channel s = max|X|^alpha / max|W|^(1 - alpha); with a pair whose producer feeds several
    group channels per output (GQA v -> o) both maxima are taken over the channels sharing one."""
    w_amax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    if pair is not None:
        x_amax, w_amax = sm.tie(pair, x_amax.float(), "max"), sm.tie(pair, w_amax, "max")
    s = x_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def prepare(ctx, alpha: float | str | None = None, fold_linear: bool = True, search_tokens: int = 2048, pre_scale: bool = False,
            **_) -> list[str]:
    """alpha: migration strength, or "search": per linear group, the alpha of ALPHAS whose W8A8 output error
    on search_tokens calibration rows is smallest. Default: 1.0 for static per-tensor activations (one scale
    for every token needs flat channels), 0.5 for per-token ones. Measured on Gemma-3-270M w8a8-int8-static:
    alpha 0.5 +17.1% perplexity, 1.0 +2.8% (KL 0.033), search +3.5% (KL 0.031): the search lowers each
    group's own error and the KL, not the perplexity, so it is not the default.
    pre_scale=True: where no preceding op absorbs the smoothing exactly (GQA v -> o: one v channel feeds
    several o channels, which then share one scale; or no producer found) smooth the group per channel
    through its own pre_quant_scale instead (sm.apply_pre_scale, ModelOpt's layout), when the output
    format holds one (ctx.pre_scale_ok: qtool, modelopt). Off by default: on Gemma-3-270M w8a8-int8-static
    it measured 11.742 (KL 0.0339) against 11.732 (KL 0.0332) for the tied fold, and a layer with a
    pre_quant_scale no longer exports to compressed-tensors."""
    if not isinstance(pre_scale, bool):
        raise QtoolError(f"smoothquant pre_scale must be true or false, got {pre_scale!r}")
    pre_scale = pre_scale and bool(getattr(ctx, "pre_scale_ok", False))
    if ctx.scheme.act_kind == "none" or ctx.spec.dtype != "int":
        raise QtoolError(f"smoothquant is for schemes with int weights and quantized activations (w8a8-int8, w8a8-int8-static), not {ctx.scheme.name}")
    if alpha is None:
        alpha = 1.0 if ctx.scheme.act_kind == "static" else 0.5
    search = alpha == "search"
    if not search and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise QtoolError(f"smoothquant alpha must be a number in [0, 1] or 'search', got {alpha!r}")
    if not search and not 0.0 <= alpha <= 1.0:
        raise QtoolError(f"smoothquant alpha must lie in [0, 1], got {alpha}")
    notes, done = [], []
    pairs = sm.find_pairs(ctx)
    amax, rows = channel_amax(ctx, [p.group[0] for p in pairs], keep=search_tokens if search else 1)
    check = ctx.run([ctx.inputs[0][:1]])[0]
    for p in pairs:
        label = "/".join(p.group)
        own = pre_scale and (p.prev is None or p.index is not None)  # no exact fold: the group's own input scale
        if p.prev is None and not own:
            notes.append(f"smoothquant: {label}: not smoothed ({p.reason})")
            continue
        if p.kind == "linear" and not fold_linear and not own:
            continue
        a = amax[p.group[0]]
        if a is None:
            notes.append(f"smoothquant: {label}: not smoothed (no calibration tokens)")
            continue
        weights = [ctx.module(n).weight.data for n in p.group]
        a_p = alpha
        if search:
            specs = [ctx.spec_of(n) if hasattr(ctx, "spec_of") else ctx.spec for n in p.group]
            a_p, _ = search_alpha(rows[p.group[0]], a, weights, specs, ctx.scheme.act_kind == "static", p)
        if own:
            s = smooth_scales(a, weights, a_p)
            msg = sm.apply_pre_scale(ctx, p, s, check)
        else:
            s = smooth_scales(a, weights, a_p, p)
            msg, _ = sm.apply(ctx, p, s, check)
        if msg:
            notes.append("smoothquant: " + msg)
        else:
            done.append(f"{label}<-{'pre_quant_scale' if own else p.prev}" + (f" alpha {a_p:.2f}" if search else ""))
    notes.append(f"smoothquant alpha {alpha}: " + "; ".join(done))
    return notes


def quantize(weight, spec, stats, **_):
    return quantize_weight(weight, spec), ""
