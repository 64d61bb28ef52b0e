"""Where a decoder layer is calibrated: one device when it fits, split over several when it does not.

The pipeline works one decoder layer at a time. A layer needs its parameters, the hidden states of
all calibration samples entering and leaving it, and the work of quantizing one linear at a time
(GPTQ's Hessian and solve). When that does not fit the first device's budget, the layer is split
by submodule over the devices the process owns: each *unit* (the smallest module that holds
parameters itself: a linear, a norm, an expert) goes whole to one device, in module order,
filling device 0 first. Each unit then runs on its device with accelerate's AlignDevicesHook
(inputs moved to it, outputs moved back), and its linears are quantized where they are.

`plan_layer` and `choose_ranks` are pure functions of sizes and budgets (unit-tested with fake
budgets); `layer_units` and `hidden_bytes` measure a real (possibly meta-device) layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtensor.errors import QtoolError

GiB = 1 << 30


@dataclass(frozen=True)
class Unit:
    name: str  # module name inside the layer
    params: int  # bytes of its parameters and buffers at the calibration dtype
    work: int  # peak bytes of quantizing its largest linear (Hessian + solve), not additive


def plan_layer(units: list[Unit], budgets: list[int], reserved: list[int] | None = None) -> list[int]:
    """Device index of every unit: in order, fill device 0, then 1, ... A device holds the sum of its
    units' parameters plus the largest work of any of them (linears are quantized one at a time),
    plus `reserved` (device 0 keeps the hidden states). Raises QtoolError when the units do not fit."""
    if not budgets:
        raise QtoolError("no device to place the layer on")
    reserved = list(reserved or []) + [0] * (len(budgets) - len(reserved or []))
    if reserved[0] > budgets[0]:
        raise QtoolError(f"the hidden states of the calibration samples need {_gib(reserved[0])} on the first device, more than its {_gib(budgets[0])} (use fewer --samples or a shorter --seqlen, or more processes)")
    out: list[int] = []
    d, used, work = 0, reserved[0], 0
    for u in units:
        while used + u.params + max(work, u.work) > budgets[d]:
            if d + 1 == len(budgets):
                if u.params + u.work + reserved[d] > budgets[d] and used == reserved[d]:
                    raise QtoolError(f"{u.name or 'the layer'} alone needs {_gib(u.params + u.work + reserved[d])} on one device; the budget is {_gib(budgets[d])}")
                total = sum(x.params for x in units) + max(x.work for x in units) + sum(reserved)
                raise QtoolError(f"the layer needs about {_gib(total)}, more than its {len(budgets)} device(s) hold ({', '.join(_gib(b) for b in budgets)})")
            d += 1
            used, work = reserved[d], 0
        out.append(d)
        used += u.params
        work = max(work, u.work)
    return out


def choose_ranks(gpus: int, units: list[Unit], budget: int, hidden_total: int, fixed: int = 0) -> tuple[int, int]:
    """(processes, GPUs per process) for `gpus` GPUs of `budget` bytes each: the most processes
    (data parallel; each holds 1/processes of the hidden states `hidden_total`) whose layer fits the
    GPUs it owns (model parallel inside a process). `fixed`: bytes on each process's first GPU
    that do not shrink with more processes (activations of one batch)."""
    last = None
    for m in range(1, gpus + 1):
        r = gpus // m
        try:
            plan_layer(units, [budget] * m, [fixed + -(-hidden_total // r)])
            return r, m
        except QtoolError as e:
            last = e
    raise QtoolError(f"a decoder layer does not fit {gpus} GPU(s) of {_gib(budget)}: {last}")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def unit_names(layer: nn.Module) -> list[str]:
    """Submodules that hold parameters or buffers themselves (each is moved whole), in module order.
    Any placement of them is correct (each runs where it lives, its outputs return to its caller's
    device); module order keeps an attention block or an MLP mostly on one device."""
    out: list[str] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        own = any(p is not None for p in mod._parameters.values()) or any(b is not None for b in mod._buffers.values())
        if own:  # "" when the layer itself holds parameters: it cannot be split
            out.append(prefix)
            return
        for n, c in mod.named_children():
            walk(c, f"{prefix}.{n}" if prefix else n)

    walk(layer, "")
    return out


def layer_units(layer: nn.Module, dtype_bytes: int, hessian: bool, hessian_bytes: int = 4) -> list[Unit]:
    """The units of a layer (its parameters may be on the meta device) with their sizes."""
    units = []
    for name in unit_names(layer):
        mod = layer.get_submodule(name) if name else layer
        params = sum(t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size()) for t in (*mod.parameters(), *mod.buffers()))
        work = 0
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                n, k = m.out_features, m.in_features
                # Hessian + its copies in the solve (damped copy, Cholesky inverse) + fp32 weight, error, codes
                w = 4 * k * k * hessian_bytes + n * k * 10 if hessian else n * k * 8
                work = max(work, w)
        units.append(Unit(name, params, work))
    return units


def hidden_bytes(tokens: int, hidden: int, dtype_bytes: int) -> int:
    """Hidden states entering and leaving a layer (both lists live while the next inputs are made)."""
    return 2 * tokens * hidden * dtype_bytes


def batch_bytes(batch: int, seqlen: int, hidden: int, intermediate: int, heads: int) -> int:
    """Activations of one batch's forward through a layer (MLP intermediates, eager attention scores), fp32."""
    return batch * seqlen * (3 * intermediate + 4 * hidden + 2 * heads * seqlen) * 4


# ---- the pipeline side: placing a layer's units on devices and running it there


def dispatch(layer: nn.Module, names: list[str], devices: list[torch.device]) -> list:
    """Hook each unit so it runs on its device; returns what `undispatch` needs."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    hooked = []
    for name, dev in zip(names, devices):
        mod = layer.get_submodule(name) if name else layer
        add_hook_to_module(mod, AlignDevicesHook(execution_device=dev, io_same_device=True))
        hooked.append(mod)
    return hooked


def undispatch(hooked: list) -> None:
    from accelerate.hooks import remove_hook_from_module

    for mod in hooked:
        remove_hook_from_module(mod)


def device_budgets(devices: list[str], max_memory: float | None) -> list[int]:
    """Bytes each device may take for one layer: --max-gpu-memory (GiB), else 90% of what is free now
    on a GPU; no limit on the CPU."""
    out = []
    for d in devices:
        if max_memory is not None:
            out.append(int(max_memory * GiB))
        elif torch.device(d).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(d))
            out.append(int(free * 0.9))
        else:
            out.append(1 << 62)
    return out
