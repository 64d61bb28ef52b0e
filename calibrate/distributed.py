"""Data-parallel calibration through torch.distributed (torchrun): samples split across ranks, statistics
all-reduced before each group is quantized, rank 0 writes. NCCL on GPUs, gloo on CPU.

    torchrun --nproc-per-node K -m quantize_cli quantize MODEL ... [--device cuda]
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
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


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
    """Combine one group's statistics over ranks: Hessian sums and token counts add, amax takes the max."""
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
        if "amax" in st:
            a = st["amax"].float().reshape(1).clone()
            dist.all_reduce(a, op=dist.ReduceOp.MAX)
            st["amax"] = a.reshape(())
        if "act_abssum" in st:
            dist.all_reduce(st["act_abssum"])


def barrier() -> None:
    if active():
        _dist().barrier()
