"""Algorithm registry: a method is one file with the math, plus one line here.

A Method names the statistics it needs from the pipeline ("hessian", "act_absmean", "act_sqmean") and turns one
weight plus those statistics into a QTensor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from qtensor import QTensor
from qtensor.errors import QtoolError
from qtensor.schemes import WeightSpec

from . import awq, fpscale, smoothquant
from .gptq import gptq_quantize
from .rtn import quantize_weight


@dataclass
class Method:
    name: str
    stats: tuple
    weight_dtypes: tuple  # numeric types it can produce
    fn: Callable  # (weight, spec, stats, **options) -> (QTensor, note)
    options: dict = field(default_factory=dict)
    description: str = ""
    # optional layer-level step run before the per-linear quantization (AWQ scaling, SmoothQuant
    # migration): prepare(ctx: pipeline.LayerContext, **options) -> list of notes
    prepare: Callable | None = None
    # optional: quantize the linears of one shared-input group at once (weights, spec, shared stats,
    # **options) -> [(QTensor, note)] in the same order; GPTQ concatenates their rows
    group_fn: Callable | None = None
    block_scales: bool = True  # can produce 2-D block-scaled weights (fp8-block)
    stats_when: dict = field(default_factory=dict)  # option name -> statistics needed when that option is on
    quantized_acts: bool = False  # only for schemes that quantize activations (SmoothQuant's migration)

    def accepts(self, scheme) -> bool:
        """Whether this method can produce the scheme's weights (and, if it needs them, quantized activations)."""
        return (scheme.weight_dtype in self.weight_dtypes and (self.block_scales or scheme.block is None)
                and (not self.quantized_acts or scheme.act_kind != "none"))

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, stats: dict) -> tuple[QTensor, str]:
        return self.fn(weight, spec, stats, **self.options)


def _rtn(weight, spec, stats, mse_clip=False):
    """With mse_clip the clipping search weights each input channel by the calibration inputs' mean x^2."""
    cw = stats["act_sqsum"] / stats["n"] if mse_clip and stats.get("n") and "act_sqsum" in stats else None
    return quantize_weight(weight, spec, mse_clip=mse_clip, col_weight=cw), ""


def _gptq(weight, spec, stats, damp=0.01, act_order=True, static_groups=True, mse_clip=False, blocksize=128):
    acc = stats.get("hessian")
    if acc is None or acc.n == 0:  # no calibration tokens: fall back to round-to-nearest
        return quantize_weight(weight, spec, mse_clip=mse_clip), "no calibration tokens: round-to-nearest"
    r = gptq_quantize(weight, acc.H, spec, damp=damp, blocksize=blocksize, act_order=act_order, static_groups=static_groups, mse_clip=mse_clip)
    return r.qtensor, r.note


def _gptq_group(weights, spec, stats, damp=0.01, act_order=True, static_groups=True, mse_clip=False, blocksize=128):
    """GPTQ treats rows independently given H: the group's rows go through one column loop."""
    from .gptq import split_rows

    acc = stats["hessian"]
    w = torch.cat([x.float() for x in weights])
    r = gptq_quantize(w, acc.H, spec, damp=damp, blocksize=blocksize, act_order=act_order, static_groups=static_groups, mse_clip=mse_clip)
    return [(qt, r.note) for qt in split_rows(r.qtensor, [x.shape[0] for x in weights])]


def _awq_gptq_prepare(ctx, n_grid=20, search_tokens=4096, duo_scaling=False, **_):
    """AWQ's scale search and folding; GPTQ (with its clipping search) then rounds the scaled weights."""
    return awq.prepare(ctx, n_grid=n_grid, search_tokens=search_tokens, duo_scaling=duo_scaling, clip=False)


# GPTQ after a layer-level prepare step (awq-gptq, smoothquant-gptq): the MSE clip on by default, and the
# prepare step's own options (alpha, n_grid, ...) passed over
def _prepared_gptq(weight, spec, stats, damp=0.01, act_order=True, static_groups=True, mse_clip=True, blocksize=128, **_):
    return _gptq(weight, spec, stats, damp, act_order, static_groups, mse_clip, blocksize)


def _prepared_gptq_group(weights, spec, stats, damp=0.01, act_order=True, static_groups=True, mse_clip=True, blocksize=128, **_):
    return _gptq_group(weights, spec, stats, damp, act_order, static_groups, mse_clip, blocksize)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("rtn", (), ("int", "fp8_e4m3", "e2m1", "mxfp8"), _rtn, description="round-to-nearest, absmax/minmax scales",
               stats_when={"mse_clip": ("act_sqmean",)}),
        Method("gptq", ("hessian",), ("int", "fp8_e4m3"), _gptq, description="GPTQ with act order and static groups (int; FP8 per tensor or channel)",
               group_fn=_gptq_group, block_scales=False),
        Method("awq", (), ("int",), awq.quantize, {"n_grid": 20, "search_tokens": 4096, "duo_scaling": False, "clip": True},
               "AWQ: activation-aware scales searched on the block output, folded into the preceding op; clipping search", awq.prepare),
        Method("awq-gptq", ("hessian",), ("int",), _prepared_gptq, {"mse_clip": True},
               "AWQ scales folded into the preceding op, then GPTQ on the scaled weights (LLM Compressor's AWQ + GPTQ recipe)",
               _awq_gptq_prepare, _prepared_gptq_group),
        Method("smoothquant", (), ("int",), smoothquant.quantize, {"alpha": None, "fold_linear": True},
               "SmoothQuant: activation outliers migrated into the weights (w8a8-int8, w8a8-int8-static)", smoothquant.prepare,
               quantized_acts=True),
        Method("smoothquant-gptq", ("hessian",), ("int",), _prepared_gptq, {"alpha": None, "fold_linear": True, "mse_clip": True},
               "SmoothQuant's migration, then GPTQ on the smoothed weights with Hessians of the smoothed inputs", smoothquant.prepare, _prepared_gptq_group,
               quantized_acts=True),
        Method("fp8", (), ("fp8_e4m3",), _rtn, description="FP8 E4M3 weights with absmax scales (per tensor, channel or 128x128 block)"),
        Method("nvfp4", (), ("e2m1",), fpscale.quantize_nvfp4, {"scale_search": True}, "NVFP4 with a per-block E4M3 scale search",
               group_fn=fpscale.quantize_nvfp4_group),
        Method("mx", (), ("e2m1", "mxfp8"), fpscale.quantize_mx, {"scale_search": True}, "MXFP4/MXFP8 with a per-block E8M0 exponent search"),
    ]
}


TEXT_VALUES = {"act_order": ("group",)}  # option values besides the default's type


def knobs(m: Method) -> dict:
    """The options a method takes (keyword parameters of its quantize, group and prepare functions) and
    their defaults."""
    out: dict = {}
    for f, skip in ((m.fn, 3), (m.group_fn, 3), (m.prepare, 1)):
        if f is not None:
            for p in list(inspect.signature(f).parameters.values())[skip:]:
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    out.setdefault(p.name, m.options.get(p.name, p.default))
    return out


def _value(v):
    """A --option value given as text: true/false, an int, a float, or the text itself."""
    if not isinstance(v, str):
        return v
    low = v.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(low)
        except ValueError:
            pass
    return v.strip()


def get_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise QtoolError(f"unknown method '{name}' (choose from: {', '.join(METHODS)})")
    m = METHODS[name]
    known = knobs(m)
    for k in options:
        if k not in known:
            raise QtoolError(f"--option {k}: not an option of method {name} (it takes: {', '.join(known) or 'none'}; "
                             "a library's options need --backend)")
    options = {k: _value(v) for k, v in options.items()}
    for k, v in options.items():  # a value of the default's type (an int where a float is expected too)
        d = known[k]
        if v in TEXT_VALUES.get(k, ()):
            continue
        ok = (type(v) is bool) if isinstance(d, bool) else (isinstance(v, int) and not isinstance(v, bool)) if isinstance(d, int) else \
            (isinstance(v, (int, float)) and not isinstance(v, bool)) if isinstance(d, float) else True
        if not ok:
            raise QtoolError(f"--option {k}={v}: expected {type(d).__name__}")
    options = {**m.options, **options}
    stats = m.stats + tuple(st for k, extra in m.stats_when.items() if options.get(k) for st in extra if st not in m.stats)
    return Method(m.name, stats, m.weight_dtypes, m.fn, options, m.description, m.prepare, m.group_fn, m.block_scales, m.stats_when,
                  m.quantized_acts)
