"""GPTQ's inner column loop as one Triton kernel per block of 128 columns.

The textbook loop launches about a dozen small kernels per column (tens of thousands per layer on an
8B model: launch-bound on a GPU). Here each program owns a tile of rows, keeps the block's weights in
registers and walks the columns sequentially; the block-to-rest update stays one GEMM in torch.
Same arithmetic as gptq.py's loop (round half to even, the same error propagation), so both paths
give the same codes up to float summation order. Runs on CPU under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _gptq_block(W_ptr, Q_ptr, E_ptr, L_ptr, H_ptr, S_ptr, Z_ptr, G_ptr, N, BS, sw, sh, ss, lo, hi,
                    HAS_Z: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < BS
        m2 = rmask[:, None] & cmask[None, :]
        W = tl.load(W_ptr + rows[:, None] * sw + cols[None, :], mask=m2, other=0.0)
        Q = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        E = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        loss = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(0, BS):
            sel = cols == i
            w = tl.sum(tl.where(sel[None, :], W, 0.0), axis=1)
            g = tl.load(G_ptr + i)
            s = tl.load(S_ptr + rows * ss + g, mask=rmask, other=1.0)
            if HAS_Z:
                z = tl.load(Z_ptr + rows * ss + g, mask=rmask, other=0.0)
            else:
                z = tl.zeros([BLOCK_R], dtype=tl.float32)
            x = w / s
            r = tl.floor(x + 0.5)
            tie = (r - x) == 0.5
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where(tie & odd, r - 1.0, r)  # round half to even, as torch.round
            q = tl.minimum(tl.maximum(r + z, lo), hi)
            dq = (q - z) * s
            d = tl.load(H_ptr + i * sh + i)
            err = (w - dq) / d
            loss += (w - dq) * (w - dq) / (d * d) / 2.0
            h = tl.load(H_ptr + i * sh + cols, mask=cmask & (cols >= i), other=0.0)
            W = W - err[:, None] * h[None, :]
            Q = tl.where(sel[None, :], q[:, None], Q)
            E = tl.where(sel[None, :], err[:, None], E)
        tl.store(Q_ptr + rows[:, None] * sw + cols[None, :], Q, mask=m2)
        tl.store(E_ptr + rows[:, None] * sw + cols[None, :], E, mask=m2)
        tl.store(L_ptr + rows, tl.load(L_ptr + rows, mask=rmask, other=0.0) + loss, mask=rmask)


def available(device: torch.device) -> bool:
    import os

    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def block_quantize(W1: torch.Tensor, Hinv1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   groups: torch.Tensor, lo: int, hi: int, loss: torch.Tensor, block_r: int = 16):
    """One GPTQ block: W1 [N, bs] fp32, Hinv1 [bs, bs], scales/zeros [N, G] fp32, groups [bs] int32.

    Returns (codes [N, bs] float, errors [N, bs]); accumulates per-row loss into `loss`.
    """
    n, bs = W1.shape
    W1 = W1.contiguous()
    Q = torch.empty_like(W1)
    E = torch.empty_like(W1)
    Hc = Hinv1.contiguous()
    S = scales.contiguous()
    Z = zeros.contiguous() if zeros is not None else S
    block_c = max(16, triton.next_power_of_2(bs))
    grid = (triton.cdiv(n, block_r),)
    _gptq_block[grid](W1, Q, E, loss, Hc, S, Z, groups.to(torch.int32).contiguous(), n, bs, W1.stride(0), Hc.stride(0), S.stride(0),
                      float(lo), float(hi), HAS_Z=zeros is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return Q, E
