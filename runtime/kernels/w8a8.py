"""W8A8 GEMMs: FP8 through torch._scaled_mm (per-tensor, row-wise), block-FP8 (128x128 weight blocks,
per-token-per-128 activation scales) and INT8 (dynamic per token, or msModelSlim's static asymmetric
activations) through one Triton scaled-GEMM kernel; activations quantized by act_quant's fused kernel."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtensor import QTensor

from . import act_quant, tuning
from .launch import cdiv, launch

_LAUNCHES: dict = {}  # compiled GEMMs relaunched directly, by call key


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, wsum_ptr, off_ptr, out_ptr,
    M, N, K, stride_am, stride_bn, stride_om, sa_stride, sb_stride,
    IS_INT: tl.constexpr, BLOCKWISE: tl.constexpr, SA_ROW: tl.constexpr, SB_COL: tl.constexpr,
    HAS_OFF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = (a @ b^T [- off * wsum]) * sa * sb.  a [M, K], b [N, K] (int8 or e4m3).
    BLOCKWISE: sa [M, K/128] and sb [N/128, K/128] applied per 128-wide K step (BK must be 128)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gm
    pid_n = (pid % group) // gm
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    if IS_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        # K % BK == 0 (the launcher picks BK); rows/columns past M/N only reach masked-out outputs
        a = tl.load(a_ptrs, mask=mask_m[:, None])
        b = tl.load(b_ptrs, mask=mask_n[None, :])
        if BLOCKWISE:
            sa = tl.load(sa_ptr + offs_m * sa_stride + kb, mask=mask_m, other=0.0)
            sb = tl.load(sb_ptr + (offs_n // 128) * sb_stride + kb, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        elif IS_INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    if BLOCKWISE:
        y = acc
    else:
        y = acc.to(tl.float32)
        if HAS_OFF:
            wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
            y = y - tl.load(off_ptr).to(tl.float32) * wsum[None, :]
        if SA_ROW:
            y = y * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            y = y * tl.load(sa_ptr)
        if SB_COL:
            y = y * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            y = y * tl.load(sb_ptr)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


GEMM_CONFIGS = [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s) for bm, bn, bk, w, s in [
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 128, 4, 4),
    (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4),
]]


def _gemm(a, b, sa, sb, out_dtype, is_int, blockwise, wsum=None, off=None, key=None):
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    sa_row = sa.numel() > 1
    sb_col = sb.numel() > 1

    def run(cfg):
        grid = (cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]),)
        args = (a, b, sa, sb, wsum if wsum is not None else sb, off if off is not None else sb, out,
                m, n, k, a.stride(0), b.stride(0), out.stride(0), sa.stride(0) if sa.dim() == 2 else 1,
                sb.stride(0) if sb.dim() == 2 else 1)
        # the compiled kernel: constexprs, dtypes, the ints' value classes, the pointers' alignment (launch.py)
        lkey = (is_int, blockwise, sa_row, sb_col, off is not None, tuple(sorted(cfg.items())), out_dtype,
                tuple((t.dtype, t.data_ptr() % 16) for t in args[:7]), tuple((v == 1, v % 16 == 0) for v in args[7:]))
        launch(_LAUNCHES, lkey, _scaled_gemm_kernel, grid, args,
               lambda: dict(IS_INT=is_int, BLOCKWISE=blockwise, SA_ROW=sa_row, SB_COL=sb_col, HAS_OFF=off is not None,
                            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=8, num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"]))
        return out

    configs = [c for c in GEMM_CONFIGS if k % c["BK"] == 0 and (not blockwise or c["BK"] == 128)]
    bk = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    # untuned: the H100 tuner's choices for the Llama-3-8B shapes (bench/kernels.py, session 7)
    if m <= 16:
        default = dict(BM=16, BN=64, BK=bk, num_warps=4, num_stages=4)
    elif m <= 128:
        default = dict(BM=32, BN=64, BK=bk, num_warps=4, num_stages=4)
    else:
        default = dict(BM=128, BN=128, BK=bk, num_warps=8, num_stages=3)
    cfg = tuning.pick(("gemm", key, tuning.m_bucket(m), n, k), configs, run, default)
    return run(cfg)


@dataclass
class W8A8State:
    kind: str  # fp8 | fp8_block | int8
    w: torch.Tensor  # [N, K] float8_e4m3fn or int8
    sw: torch.Tensor  # fp32: [1] per tensor, [N] per channel, [N/128, K/128] block
    act_static: torch.Tensor | None  # fp32 [1]
    act_offset: torch.Tensor | None  # fp32 [1] (static asymmetric int8)
    wsum: torch.Tensor | None  # int32 [N] (static asymmetric int8)
    n: int
    k: int

    def nbytes(self) -> int:
        return self.w.numel() + self.sw.numel() * 4

    def clone(self) -> "W8A8State":
        return W8A8State(self.kind, self.w.clone(), self.sw.clone(), self.act_static, self.act_offset, self.wsum, self.n, self.k)


def prepare(qt: QTensor) -> W8A8State | None:
    n, k = qt.shape
    act = qt.act
    dev = qt.codes.device
    if qt.dtype == "fp8_e4m3" and act.dtype == "fp8_e4m3":
        sw = qt.scales.float().to(dev)
        if qt.block is not None:
            if tuple(qt.block) != (128, 128) or act.kind != "dynamic" or act.granularity != "group" or k % 128:
                return None
            return W8A8State("fp8_block", qt.codes.contiguous(), sw.contiguous(), None, None, None, n, k)
        if qt.group_size > 0 or k % 16 or n % 16:
            return None
        if act.kind == "static":
            if act.scale is None or act.scale.numel() != 1:
                return None
            return W8A8State("fp8", qt.codes.contiguous(), sw.reshape(-1).contiguous(), act.scale.float().reshape(1).to(dev), None, None, n, k)
        if act.kind == "dynamic" and act.granularity == "token":
            return W8A8State("fp8", qt.codes.contiguous(), sw.reshape(-1).contiguous(), None, None, None, n, k)
        return None
    if qt.dtype == "int" and qt.bits == 8 and qt.sym and act.dtype == "int8" and qt.group_size in (-1, 0) and k % 32 == 0:
        w = qt.codes.to(torch.int8).contiguous()
        sw = qt.scales.float().reshape(-1).to(dev).contiguous()
        if act.kind == "dynamic" and act.granularity == "token":
            return W8A8State("int8", w, sw, None, None, None, n, k)
        if act.kind == "static" and act.scale is not None and act.scale.numel() == 1:
            off = None
            wsum = None
            if act.offset is not None and bool(act.offset.float().ne(0).any()):
                off = act.offset.float().reshape(1).to(dev)
                wsum = w.to(torch.int32).sum(1).to(torch.int32)
            return W8A8State("int8", w, sw, act.scale.float().reshape(1).to(dev), off, wsum, n, k)
    return None


# FP8 _scaled_mm with Hopper's fast accumulation (the tensor cores' own accumulator, promoted less often; what
# vLLM's and TensorRT-LLM's FP8 GEMMs use for inference). QTOOL_FP8_FAST_ACCUM=0: promote every k-block.
FP8_FAST_ACCUM = os.environ.get("QTOOL_FP8_FAST_ACCUM", "1") == "1"


def matmul(x: torch.Tensor, st: W8A8State, path: str | None = None) -> torch.Tensor:
    """path: None (default), 'int_mm' (INT8 through torch._int_mm, M > 16), 'triton' (FP8 through the Triton kernel),
    'precise' (FP8 _scaled_mm without fast accumulation)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if st.kind == "fp8_block":
        xq, sx = act_quant.quantize(x2, "fp8_e4m3", group=128)
        y = _gemm(xq, st.w, sx, st.sw, x2.dtype, False, True, key="fp8_block")
    elif st.kind == "fp8":
        xq, sx = act_quant.quantize(x2, "fp8_e4m3", static_scale=st.act_static)
        if path == "triton":
            y = _gemm(xq, st.w, sx.reshape(-1), st.sw, x2.dtype, False, False, key="fp8")
        else:
            sa, sb = sx, st.sw
            if sa.numel() > 1 or sb.numel() > 1:  # row-wise: both sides as vectors
                sa = sa.reshape(-1, 1).expand(xq.shape[0], 1).contiguous()
                sb = sb.reshape(1, -1).expand(1, st.n).contiguous()
            else:
                sa, sb = sa.reshape(()), sb.reshape(())
            fast = FP8_FAST_ACCUM if path != "precise" else False
            y = torch._scaled_mm(xq, st.w.t(), scale_a=sa, scale_b=sb, out_dtype=x2.dtype, use_fast_accum=fast)
    else:
        xq, sx = act_quant.quantize(x2, "int8", static_scale=st.act_static, offset=st.act_offset)
        if path == "int_mm":
            acc = torch._int_mm(xq, st.w.t())
            if st.act_offset is not None:
                acc = acc - (st.act_offset * st.wsum.float()).round().to(torch.int32)
            y = (acc.float() * sx.reshape(-1, 1) * st.sw.reshape(1, -1)).to(x2.dtype)
        else:
            y = _gemm(xq, st.w, sx.reshape(-1), st.sw, x2.dtype, True, False, wsum=st.wsum, off=st.act_offset, key="int8")
    return y.reshape(*shape[:-1], st.n)
