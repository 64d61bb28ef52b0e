"""Launching a compiled Triton kernel again without Triton's per-call binding.

Eager decode runs one small kernel per linear, and Triton's launch path (bind the arguments, specialize each on
alignment and value, hash the key, look the compiled kernel up) costs more CPU than the kernel's GPU time at
M = 1. `launch` keeps, per key, the CompiledKernel that the first launch through the JIT returned, with the values
of every parameter after the per-call ones, and launches it directly afterwards. The key is the caller's: it must
hold everything that decides the compiled kernel, i.e. every constexpr and launch option, and for the per-call
arguments what Triton specializes on (an int's value class: 1, multiple of 16; a pointer's 16-byte alignment).
The JIT path is always taken under the interpreter, while a launch hook is set (profilers), or with
QTOOL_FAST_LAUNCH=0.
"""

from __future__ import annotations

import inspect
import os

ON = os.environ.get("QTOOL_FAST_LAUNCH", "1") != "0"
_stream = None


def cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain Python (Triton's is a JIT function: microseconds per call from the host)."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """triton.next_power_of_2 in plain Python."""
    return 1 << max(v - 1, 0).bit_length()


def _knobs():
    from triton import knobs

    return knobs.runtime


def _idle(hook) -> bool:
    """No launch hook set (None in older Triton, an empty HookChain in newer ones)."""
    return hook is None or getattr(hook, "calls", None) == []


def launch(cache: dict, key, fn, grid: tuple, args: tuple, consts, live: dict | None = None, ctas: int = 1,
           smem_extra: int = 0):
    """fn[grid](*args, **consts, **live); args are the leading parameters (they change per call), consts (a dict, or
    a function returning it, called on a key's first launch only) name every other parameter the call sets
    (constexprs, pointers fixed for the key) and the launch options (num_warps, launch_pdl, ...); live names later
    parameters that change per call (an output, a scratch). ctas > 1: launched as clusters of that many programs
    along grid axis 0 with smem_extra more bytes of dynamic shared memory (cluster.py), always directly (the JIT
    only compiles it; launch hooks do not see it)."""
    global _stream
    dev = args[0].device.index  # a compiled kernel is loaded per device, as Triton's own cache is kept
    hit = cache.get((dev, key)) if ON or ctas > 1 else None
    if hit is None and ctas > 1:
        hit = _compile(cache, dev, key, fn, grid, args, consts, live or {}, ctas, smem_extra)
    if hit is not None:
        rt = _knobs()
        if ctas > 1 or (_idle(rt.launch_enter_hook) and _idle(rt.launch_exit_hook)):
            kernel, tail, slots, meta = hit
            if slots:
                tail = list(tail)
                for i, name in slots:
                    tail[i] = live[name]
            if _stream is None:
                from triton.runtime import driver

                _stream = driver.active.get_current_stream
            stream = _stream(dev)
            kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                       kernel.function, meta, None, None, None, *args, *tail)
            return
    live = live or {}
    if callable(consts):
        consts = consts()
    kernel = fn[grid](*args, **consts, **live)
    if ON and key is not None and kernel is not None and hasattr(kernel, "packed_metadata"):
        _keep(cache, dev, key, fn, kernel, args, consts, live, kernel.packed_metadata)


def _keep(cache, dev, key, fn, kernel, args, consts, live, meta):
    params = list(inspect.signature(fn.fn).parameters.values())[len(args):]
    tail = tuple(None if p.name in live else consts[p.name] if p.name in consts else p.default for p in params)
    slots = tuple((i, p.name) for i, p in enumerate(params) if p.name in live)
    if all(v is not inspect.Parameter.empty for v in tail):
        cache[(dev, key)] = (kernel, tail, slots, meta)
        return cache[(dev, key)]
    return None


def _set_attr(kernel, attr: int, value: int, what: str) -> None:
    """cuFuncSetAttribute through the driver API (torch and Triton do not expose it)."""
    import ctypes

    rc = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(ctypes.c_void_p(kernel.function), attr, ctypes.c_int(value))
    if rc != 0:
        raise ValueError(f"{what} refused (CUresult {rc})")


def _compile(cache, dev, key, fn, grid, args, consts, live, ctas, smem_extra):
    """Compile without launching (a cluster launch cannot go through the JIT) and keep the kernel with its packed
    metadata: (num_warps, num_ctas, shared) with the cluster size and the extra shared memory (older Triton packs
    cluster dims after them: the first one set too)."""
    if callable(consts):
        consts = consts()
    kernel = fn.warmup(*args, grid=grid, **consts, **live)
    getattr(kernel, "_init_handles", lambda: None)()  # loaded: kernel.function set
    meta = list(kernel.packed_metadata)
    meta[1] = ctas
    meta[2] = meta[2] + smem_extra
    if len(meta) >= 6:
        meta[3] = ctas
    if meta[2] > 48 * 1024:  # past 48 KiB a kernel must opt in (Triton does so at load only for its own size)
        _set_attr(kernel, 8, meta[2], f"{meta[2]} bytes of dynamic shared memory")  # MAX_DYNAMIC_SHARED_SIZE_BYTES
    if ctas > 8:  # NON_PORTABLE_CLUSTER_SIZE_ALLOWED (Hopper runs 16)
        _set_attr(kernel, 14, 1, f"a cluster of {ctas}")
    hit = _keep(cache, dev, key, fn, kernel, args, consts, live, tuple(meta))
    if hit is None:
        raise ValueError("a cluster launch needs every parameter set")
    return hit
