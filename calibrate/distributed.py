"""Data-parallel calibration through torch.distributed (torchrun): samples split across ranks, statistics
all-reduced before each group is quantized, rank 0 writes. NCCL on GPUs, gloo on CPU.

    qtool quantize MODEL ... --gpus K          # launches the processes itself (quantize_cli/launch.py)
    torchrun --nproc-per-node K -m quantize_cli quantize MODEL ... [--device cuda]

Each process owns QTOOL_RANK_GPUS consecutive GPUs (default 1; the --gpus launcher sets more when a
decoder layer must be split over several GPUs): local rank r owns cuda:r*M .. cuda:r*M+M-1.
"""

from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist


def init(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist = _dist()
    if dist.is_initialized():
        return
    if device == "cuda":  # NCCL for the GPU tensors (Hessians), gloo for the small CPU ones (counts, amax)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) * gpus_per_rank())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def gpus_per_rank() -> int:
    try:
        return max(1, int(os.environ.get("QTOOL_RANK_GPUS", "1")))
    except ValueError:
        return 1


def local_gpus() -> list[str]:
    """The CUDA devices this process calibrates on: its QTOOL_RANK_GPUS GPUs under torchrun, every
    visible GPU in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        m = gpus_per_rank()
        base = int(os.environ.get("LOCAL_RANK", "0")) * m
        return [f"cuda:{base + j}" for j in range(m)]
    return [f"cuda:{j}" for j in range(torch.cuda.device_count())]


def active() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def shard(samples: torch.Tensor) -> torch.Tensor:
    """This rank's calibration samples (round-robin)."""
    if not active():
        return samples
    return samples[rank() :: _dist().get_world_size()]


def reduce_stats(stats: dict) -> None:
    """Combine one group's statistics over ranks: Hessian sums and token counts add, amax and max take the
    max, min the min; msModelSlim's per-sample min/max sums and sample counts add (their mean is then
    over every sample); percentile reservoirs merge (bottom-k of the union, calibrate/observers.py).
    A linear no token of this rank reached has no amax here: -1 stands in, so every rank runs the same
    collectives, and it stays absent when no rank saw a token."""
    if not active():
        return
    dist = _dist()
    done = set()
    for st in stats.values():
        acc = st.get("hessian")
        if acc is not None and id(acc) not in done:
            done.add(id(acc))
            acc.all_reduce()
        n = torch.tensor([float(st.get("n", 0))], dtype=torch.float64)
        dist.all_reduce(n)
        st["n"] = int(n.item())
        a = st["amax"].float().reshape(1).clone() if "amax" in st else torch.tensor([-1.0])
        dist.all_reduce(a, op=dist.ReduceOp.MAX)
        if float(a) >= 0:
            st["amax"] = a.reshape(())
        for key, op in (("min", dist.ReduceOp.MIN), ("max", dist.ReduceOp.MAX)):
            if key in st:
                t = st[key].float().reshape(1).clone()
                dist.all_reduce(t, op=op)
                st[key] = t.reshape(())
        if "samples" in st:
            t = torch.tensor([float(st["min_sum"]), float(st["max_sum"]), float(st["samples"])], dtype=torch.float64)
            dist.all_reduce(t)
            st["min_sum"], st["max_sum"], st["samples"] = t[0].clone(), t[1].clone(), int(t[2].item())
        if "reservoir" in st:
            r = st["reservoir"]
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (r.values, r.keys, r.count))
            r.merge(parts)
        for key in ("act_abssum", "act_sqsum"):
            if key in st:
                dist.all_reduce(st[key])


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. "save the hidden states now")."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def min_rank(value: int) -> int:
    """The smallest `value` over the ranks."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    _dist().all_reduce(t, op=_dist().ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    if active():
        _dist().barrier()
