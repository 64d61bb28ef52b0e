"""Config choice for the Triton launchers: a fixed default, or (QTOOL_TUNE=1 / enable()) the fastest
of the candidates, timed once per key with triton.testing.do_bench and cached for the process."""

from __future__ import annotations

import os

_cache: dict = {}
FINALISTS = 3  # candidates timed a second time
_enabled = os.environ.get("QTOOL_TUNE", "0") == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def m_bucket(m: int) -> int:
    b = 1
    while b < m:
        b *= 2
    return b


def pick(key, configs, run, default):
    if key in _cache:
        return _cache[key]
    if not _enabled or interpreting():
        return default
    from triton.testing import do_bench

    def timed(cfg, rep=20):
        try:
            return do_bench(lambda: run(cfg), warmup=5, rep=rep, return_mode="median")
        except Exception:  # a config that does not compile or launch on this card
            return float("inf")

    # an idle GPU runs its first timings at low clocks: warm it on the default first, then time every
    # candidate, then time the best few again back to back and keep the fastest of that second round
    timed(default, rep=100)
    first = sorted(((timed(c), i) for i, c in enumerate(configs)))
    finalists = [configs[i] for t, i in first[:FINALISTS] if t < float("inf")]
    best = min(finalists, key=lambda c: timed(c, rep=50)) if finalists else default
    _cache[key] = best
    return best


def chosen() -> dict:
    return dict(_cache)
