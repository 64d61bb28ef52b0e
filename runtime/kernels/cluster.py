"""Split-K sums through a thread-block cluster's distributed shared memory (Hopper, sm_90+).

A split-K kernel's programs that share a column tile each hold a partial sum; summing them through global memory
costs the tile's last program two dependent round trips (its partial stored and a counter bumped, then every
partial loaded back: 1.6-2.4 us per call at M = 1, session 13's ablation) or a second kernel. Here the programs of
one tile are launched as one cluster (cluster dims (SPLIT_K, 1, 1), the split index as grid axis 0): each stores its
fp32 partial in its own shared memory, the cluster meets at a barrier, each program sums a 1 / SPLIT_K slice of the
tile from every program's shared memory (`ld.shared::cluster`, in rank order 0 .. SPLIT_K - 1: the order of the
last-program sum, so the result is bit for bit the same), and a second barrier keeps every program resident until
the others have read it.

The buffer lies past Triton's own dynamic shared memory: the kernel is launched with `shared + extra` bytes and
finds it at `global_smem + %dynamic_smem_size - extra`, so nothing Triton allocates can overlap it. Triton compiles
the kernel as usual (num_ctas 1); `launch.launch(..., ctas=n, smem_extra=...)` launches it directly with the
packed metadata's num_ctas set to the cluster size, which Triton's C launcher turns into the cluster attribute.
`ok(device)` runs a probe kernel once per device (cluster size, rank, a value read from the neighbour's shared
memory) and finds how the launcher counts grid axis 0 (`grid_x`). On by default for gemv16 (M = 1) with splits of
2 .. 8 (QTOOL_CLUSTER=0 turns it off); never under the interpreter, before sm_90, or where the probe fails (`WHY`
says why).

Timed on an H100 (session 15, NOTES.md): clusters of up to 8 programs sum as fast as the global-memory sum or
faster (gemv16, same config: o 128 x 4 x 4 7.3 against 8.2 us, 256 x 8 x 2 7.1 against 7.7; gate_up 512 x 8 23.7
against 24.2; NVFP4 qkv 128 x 8 11.1 against 11.9); clusters of 16 (non-portable: a GPC holds few of them at once)
are much slower (down 256 x 16 x 2 20.8 against 14.2 us, NVFP4 o 13.0 against 8.2), hence MAX = 8. dot4t / dot4f
(M <= 16, 8-16 KiB of partials per program beside their wgmma tiles) were slower at every shape (qkv 13.0 against
12.0 us, o 11.6 against 10.0, down 22.6 against 19.1): their cluster sums are the bench rows dot4t-clu / dot4f-clu,
not the default."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tuning
from .launch import launch

ON = os.environ.get("QTOOL_CLUSTER", "1") == "1"  # gemv16's split-K sums (timed: the module's docstring)
MAX = 8  # cluster size: 8 is portable; 16 runs on Hopper (launch.py sets the attribute) but measured much slower
_OK: dict = {}
_MUL: dict = {}
WHY: dict = {}


@triton.jit
def smem_end():
    """The CTA shared-window address just past this program's dynamic shared memory."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 s; mov.u32 s, %dynamic_smem_size; mov.u32 $0, global_smem; add.u32 $0, $0, s; }",
        "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def put(addr, v):
    """Store fp32 v at shared address addr (elementwise; threads holding the same element store the same value)."""
    tl.inline_asm_elementwise("st.shared.b32 [$1], $2; mov.u32 $0, 0;", "=r,r,r", [addr, v], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def get(addr, rank):
    """The fp32 at shared address addr of the cluster's program `rank` (an int32 tensor shaped like addr)."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 a; mapa.shared::cluster.u32 a, $1, $2; ld.shared::cluster.b32 $0, [a]; }",
        "=r,r,r", [addr, rank], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def sync():
    """Cluster barrier: this program's shared stores visible to the cluster (release / acquire)."""
    tl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned; // $0",
                              "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def exchange(v, loc, mine, NPROG: tl.constexpr, NBYTES: tl.constexpr):
    """The cluster's sum of fp32 partials: this program's partial v goes to element offsets loc of its buffer (the
    last NBYTES of its dynamic shared memory), a barrier, then the elements at offsets `mine` (this program's share)
    summed over the NPROG programs in rank order. The caller stores the sum, then calls sync() before it leaves."""
    buf = smem_end() - NBYTES
    put(buf + loc * 4, v)
    sync()
    tot = tl.zeros(mine.shape, dtype=tl.float32)
    for i in tl.static_range(NPROG):
        tot += get(buf + mine * 4, tl.full(mine.shape, i, tl.int32))
    return tot


@triton.jit
def _probe_kernel(out_ptr):
    i = tl.arange(0, 4)
    rank = tl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank; // $1", "=r,r", [i], dtype=tl.int32, is_pure=True, pack=1)
    size = tl.inline_asm_elementwise("mov.u32 $0, %cluster_nctarank; // $1", "=r,r", [i], dtype=tl.int32, is_pure=True, pack=1)
    nx = tl.inline_asm_elementwise("mov.u32 $0, %nctaid.x; // $1", "=r,r", [i], dtype=tl.int32, is_pure=True, pack=1)
    slot = smem_end() - 16 + i * 4
    put(slot, (rank * 10 + i).to(tl.float32))
    sync()
    got = get(slot, (rank + 1) % size)  # the neighbour's values
    sync()
    pid = tl.program_id(0)
    # a sum across warps: Triton then allocates shared memory of its own (global_smem, which smem_end names, exists
    # only in kernels that use some; every kernel that sums through a cluster does)
    zero = tl.sum(tl.arange(0, 512) * 0, axis=0)
    v = tl.where(i == 0, rank, tl.where(i == 1, size, tl.where(i == 2, nx, zero)))
    tl.store(out_ptr + pid * 8 + i, v.to(tl.float32))
    tl.store(out_ptr + pid * 8 + 4 + i, got)


def grid_x(device: torch.device, ctas: int) -> int:
    """Grid axis 0 to pass for one cluster of `ctas` programs along it (1 where the launcher multiplies by the
    cluster size, as Triton 3.8's does; else ctas: the probe finds which)."""
    return 1 if _MUL.get(device.index, True) else ctas


def ok(device: torch.device) -> bool:
    """Cluster launches with distributed shared memory work on this device (once per device)."""
    if not ON or device.type != "cuda" or tuning.interpreting():
        return False
    if device.index in _OK:
        return _OK[device.index]
    _OK[device.index] = False
    if torch.cuda.get_device_capability(device)[0] < 9:
        WHY[device.index] = "needs sm_90 or later"
        return False
    if torch.cuda.is_current_stream_capturing():
        del _OK[device.index]  # decide outside someone's capture (the probe synchronizes)
        return False
    for mul in (True, False):  # grid axis 0 counted in clusters (Triton's launcher multiplies it) or in programs
        try:
            out = torch.full((4 * 8,), -1.0, device=device)
            launch({}, ("probe", mul), _probe_kernel, (1 if mul else 2, 1, 1), (out,), dict(num_warps=4),
                   ctas=2, smem_extra=16)
            torch.cuda.synchronize(device)
            o = out.view(4, 8).cpu()
            want = torch.tensor([[0, 2, 2, 0, 10, 11, 12, 13], [1, 2, 2, 0, 0, 1, 2, 3]] + [[-1] * 8] * 2, dtype=torch.float32)
            if torch.equal(o, want):
                _MUL[device.index] = mul
                _OK[device.index] = True
                return True
            WHY[device.index] = f"probe read {o.tolist()}"
        except Exception as e:  # noqa: BLE001 - no cluster launch in this Triton / driver: the global-memory sum runs
            WHY[device.index] = f"{type(e).__name__}: {' '.join(str(e).split())[-400:]}"
    return False
