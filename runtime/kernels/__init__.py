"""Triton / torch._scaled_mm kernels behind QuantLinear on CUDA.

`linear(module, x)` returns the layer's output from a kernel, or None when no kernel covers the
weight's layout (QuantLinear then uses its torch reference path). The repacked weight is built once
per module and device (`prepare(qt)`), like Marlin's load-time repack.

weight_only  int4/int8 weights (GPTQ/AWQ groups, sym/asym, act order), NVFP4 and MXFP4 weights
w8a8         FP8 (per-tensor, row-wise) via torch._scaled_mm, block-FP8 and INT8 via Triton
act_quant    fused per-token / per-group activation quantizers, NVFP4 activation fake-quant
cluster      split-K sums through a thread-block cluster's distributed shared memory (Hopper)
launch       direct relaunch of compiled kernels (and cluster launches)

Switches (environment, read at import): QTOOL_TUNE=1 times the candidate configs once per shape (CUDA graph,
cold L2) and keeps the fastest (else the H100 tuner's choices are the defaults); QTOOL_GEMV16=0 keeps the fp32 GEMV at M = 1;
QTOOL_FUSED_REDUCE=0 sums split-K partials in a second kernel; QTOOL_DOT4=0 leaves int4 at 2 <= M <= 16 to
the fused dequant kernel (and wide layers at M <= 128 to dequantize + cuBLAS); QTOOL_FP8_FAST_ACCUM=0 makes FP8 _scaled_mm promote its accumulator every block;
QTOOL_FAST_LAUNCH=0 launches every kernel through Triton's JIT binding (else a key's compiled kernel is relaunched
directly after its first launch: launch.py); QTOOL_PDL=0 launches the M = 1 GEMV plainly (else as a programmatic
dependent launch on sm_90+); QTOOL_CLUSTER=0 turns off cluster split-K sums (on sm_90+ the programs of
a gemv16 tile split 2 .. 8 ways run as one thread-block cluster that sums through its shared memory: cluster.py); QTOOL_KERNEL_NEXT=1 turns on changes that were not faster on an H100 (gemv16's scales a step ahead with the
group from the block index, dot4t's split-K sum in the kernel; bench rows gemv16-sp, dot4t-fr); QTOOL_TMA=0 runs int4 at
2 <= M <= 16 through dot4t with pointer loads (else dot4 with its word tiles read by TMA on sm_90+); QTOOL_SPK=0 has the
NVFP4 GEMV read the e4m3 block scales byte by byte (else from a packed copy, two words per column and block).
Measurements: runtime/kernels/NOTES.md, `python bench/kernels.py`, `python bench/sass.py` (no GPU needed),
`python bench/stalls.py` (one call for Nsight Compute).
"""

from __future__ import annotations

import torch

from qtensor import QTensor

from . import act_quant, w8a8, weight_only


class Prepared:
    """One layer's kernel-ready weight and the call that uses it."""

    def __init__(self, qt: QTensor, state, device: torch.device):
        self.state = state
        self.device = device
        self.act = qt.act
        self.pre_scale = None
        self.weight_only = isinstance(state, weight_only.WeightOnlyState)

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        if self.weight_only:
            if self.act.kind == "dynamic" and self.act.dtype == "e2m1":  # NVFP4 W4A4: activations fake-quantized
                x2 = act_quant.nvfp4_fake_quant(x.reshape(-1, x.shape[-1]).contiguous(), self.act.scale)
                x = x2.reshape(x.shape)
            return weight_only.matmul(x, self.state, path)
        return w8a8.matmul(x, self.state, path)


def _on(qt: QTensor, dev: torch.device) -> QTensor:
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    act = qt.act
    if act.scale is not None or act.offset is not None:
        from dataclasses import replace

        act = replace(act, scale=mv(act.scale), offset=mv(act.offset))
    return qt.replace(codes=mv(qt.codes), scales=mv(qt.scales), zeros=mv(qt.zeros), g_idx=mv(qt.g_idx),
                      global_scale=mv(qt.global_scale), act=act)


def prepare(qt: QTensor) -> Prepared | None:
    """Kernel-ready weight for a QTensor (every tensor moved to the codes' device), or None."""
    qt = _on(qt, qt.codes.device)
    if qt.dtype in ("int", "e2m1"):
        act = qt.act
        if act.kind == "none" or (qt.dtype == "e2m1" and act.kind == "dynamic" and act.dtype == "e2m1"):
            st = weight_only.prepare(qt)
            return None if st is None else Prepared(qt, st, qt.codes.device)
    if qt.dtype in ("int", "fp8_e4m3"):
        st = w8a8.prepare(qt)
        return None if st is None else Prepared(qt, st, qt.codes.device)
    return None


_MISSING = object()


def linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear's CUDA path (pre_scale already applied by the caller). None = no kernel for this layer."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return None
    prep = getattr(module, "_kernel_prep", _MISSING)
    if prep is _MISSING or (prep is not None and prep.device != x.device):
        qt = module.qtensor()
        prep = prepare(qt.replace(codes=qt.codes.to(x.device)))
        module._kernel_prep = prep
    if prep is None:
        return None
    y = prep(x)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y
