"""Static activation observers: how a linear's input range is measured for static per-tensor scales.

    --act-observer minmax          min and max over every calibration token (default; symmetric, this
                                   is the absmax the pipeline always used)
    --act-observer mean-minmax     msModelSlim's min-max (act_method=1): each sample's min and max,
                                   averaged over the samples
    --act-observer percentile:P    the P-th and (100-P)-th percentiles of the input values (of |x| when
                                   symmetric), pooled over all calibration tokens
    --act-asym                     asymmetric int8 (input_scale + input_offset, msModelSlim's W8A8);
                                   scale and offset come from qtensor.numerics.int_act_qparams

Percentile estimator: a uniform random sample of at most RESERVOIR values per linear (bottom-k
sampling: every value gets a uniform random key, the RESERVOIR smallest keys are kept), then
torch.quantile (linear interpolation) on the sample. While a linear has seen at most RESERVOIR values
the sample is all of them and the result equals torch.quantile on the full data exactly; beyond, the
estimate is the quantile of a uniform sample of n = RESERVOIR values: its rank is within
4 * sqrt(q (1 - q) / n) of q with probability > 0.9999 (for q = 0.9999, n = 2^18: +-7.8e-5).
Memory: 8 bytes a kept value (value + key), 2 MiB per linear of the group being calibrated. Samples
of data-parallel ranks merge exactly (bottom-k of the union); keys are seeded per rank, so the run
is deterministic for a given process count.

"Sample" for mean-minmax: one row of the leading (batch) dimension of a 3-D input [B, S, K]; a 2-D
input (MoE experts receive their routed tokens flattened) counts as one sample per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtensor.errors import QtoolError

RESERVOIR = 1 << 18
KINDS = ("minmax", "mean-minmax", "percentile")


@dataclass(frozen=True)
class ActObserver:
    kind: str = "minmax"
    percentile: float = 100.0
    asym: bool = False

    @property
    def default(self) -> bool:
        """The pipeline's historical behaviour: symmetric absmax over every token."""
        return self.kind == "minmax" and not self.asym

    def label(self) -> str:
        k = f"percentile:{self.percentile:g}" if self.kind == "percentile" else self.kind
        return f"{k}{' asym' if self.asym else ''}"

    def describe(self) -> dict:
        return {"observer": self.kind, **({"percentile": self.percentile} if self.kind == "percentile" else {}), "asym": self.asym}


def parse(observer: str | None, asym: bool = False) -> ActObserver:
    """'minmax' | 'mean-minmax' | 'percentile:P' (0 < P < 100; P >= 50) -> ActObserver; bad input is one QtoolError line."""
    text = (observer or "minmax").strip()
    kind, _, arg = text.partition(":")
    if kind not in KINDS:
        raise QtoolError(f"--act-observer {text!r}: choose minmax, mean-minmax or percentile:P (e.g. percentile:99.99)")
    if kind != "percentile":
        if arg:
            raise QtoolError(f"--act-observer {text!r}: {kind} takes no argument")
        return ActObserver(kind, 100.0, bool(asym))
    try:
        p = float(arg)
    except ValueError:
        raise QtoolError(f"--act-observer {text!r}: percentile needs a number, e.g. percentile:99.99") from None
    if not (math.isfinite(p) and 50.0 <= p < 100.0):
        raise QtoolError(f"--act-observer {text!r}: the percentile must lie in [50, 100) (minmax is the 100th)")
    return ActObserver("percentile", p, bool(asym))


class Reservoir:
    """A uniform random sample (without replacement) of at most `cap` values seen so far (bottom-k)."""

    def __init__(self, cap: int = RESERVOIR, seed: int = 0):
        self.cap = cap
        self.gen = torch.Generator().manual_seed(0x5EED_0000 + seed)  # apart from torch's default seeds: keys must not track the data
        self.values = torch.empty(0)
        self.keys = torch.empty(0)
        self.count = 0  # values seen

    def _keep(self, values: torch.Tensor, keys: torch.Tensor) -> None:
        if values.numel() > self.cap:
            idx = keys.topk(self.cap, largest=False).indices
            values, keys = values[idx], keys[idx]
        self.values, self.keys = values, keys

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float().cpu()
        self.count += x.numel()
        keys = torch.rand(x.numel(), generator=self.gen)
        if self.values.numel() >= self.cap:  # full: only values whose key beats the largest kept key can enter
            m = keys < self.keys.max()
            x, keys = x[m], keys[m]
        self._keep(torch.cat([self.values, x]), torch.cat([self.keys, keys]))

    def merge(self, parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Replace this sample by the bottom-k of the union of several samples (data-parallel ranks)."""
        self.count = sum(c for _, _, c in parts)
        self._keep(torch.cat([v for v, _, _ in parts]), torch.cat([k for _, k, _ in parts]))

    def quantile(self, q: float) -> torch.Tensor:
        return torch.quantile(self.values, q)


def init_stats(st: dict, obs: ActObserver, seed: int = 0) -> None:
    """The statistics one linear's observer fills; present on every rank, so reductions line up."""
    st["min"], st["max"] = torch.tensor(math.inf), torch.tensor(-math.inf)
    if obs.kind == "mean-minmax":
        st["min_sum"], st["max_sum"], st["samples"] = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), 0
    if obs.kind == "percentile":
        st["reservoir"] = Reservoir(RESERVOIR, seed)


def observe(st: dict, x: torch.Tensor, obs: ActObserver) -> None:
    """Add one call's input [..., K] of a linear to its statistics."""
    if x.numel() == 0:
        return
    x = x.detach()
    st["min"] = torch.minimum(st["min"], x.amin().float().cpu())
    st["max"] = torch.maximum(st["max"], x.amax().float().cpu())
    if obs.kind == "mean-minmax":
        rows = x.reshape(x.shape[0], -1) if x.dim() >= 3 else x.reshape(1, -1)
        st["min_sum"] = st["min_sum"] + rows.amin(1).double().sum().cpu()
        st["max_sum"] = st["max_sum"] + rows.amax(1).double().sum().cpu()
        st["samples"] += rows.shape[0]
    elif obs.kind == "percentile":
        st["reservoir"].add(x)


def act_range(st: dict, obs: ActObserver) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi) float32 scalars of the observed input; symmetric observers give (-amax, amax). None: no token reached it."""
    if "min" not in st or not math.isfinite(float(st["min"])):
        return None
    if obs.kind == "minmax":
        lo, hi = st["min"].float(), st["max"].float()
    elif obs.kind == "mean-minmax":
        lo, hi = (st["min_sum"] / st["samples"]).float(), (st["max_sum"] / st["samples"]).float()
    else:
        r, q = st["reservoir"], obs.percentile / 100.0
        if obs.asym:
            lo, hi = r.quantile(1.0 - q), r.quantile(q)
        else:
            a = torch.quantile(r.values.abs(), q)
            lo, hi = -a, a
    if not obs.asym:
        a = torch.maximum(-lo, hi)
        lo, hi = -a, a
    return lo.reshape(()), hi.reshape(())
