"""Config choice for the Triton launchers: a fixed default, or (QTOOL_TUNE=1 / enable()) the fastest
of the candidates, timed once per key with triton.testing.do_bench and cached for the process."""

from __future__ import annotations

import os

_cache: dict = {}
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

    best, best_t = default, float("inf")
    for cfg in configs:
        try:
            t = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not compile or launch on this card
            continue
        if t < best_t:
            best, best_t = cfg, t
    _cache[key] = best
    return best


def chosen() -> dict:
    return dict(_cache)
