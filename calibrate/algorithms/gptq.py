"""GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error compensation.

Statistics in: H = 2/n * sum x x^T over the layer's calibration inputs. Out: a QTensor.
Follows IST-DASLab's gptq.py: lazy block updates, damping, act order (optionally with static
groups, so no g_idx is needed), Cholesky failure answered by raising the damping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtensor import QTensor
from qtensor import numerics as nm
from qtensor.schemes import WeightSpec

from .rtn import mse_clip_search, quantize_weight


_HALF_MM: list = []


def _half_mm_ok() -> bool:
    """torch.mm(..., out_dtype=torch.float32) on half inputs (PyTorch >= 2.8 on CUDA), checked once."""
    if not _HALF_MM:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
            _HALF_MM.append(torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _HALF_MM.append(False)
    return _HALF_MM[0]


class HessianAccumulator:
    """H = 2/n * sum x x^T. On CPU each sequence's x^T x is computed in float32 and the sum kept in
    float64, so the result does not depend on how the sequences were batched or split across
    processes (float32 H read out); on GPU in float32, from bf16/fp16 inputs through half-precision
    tensor cores with fp32 output (else TF32)."""

    def __init__(self, k: int, device="cpu"):
        dev = torch.device(device)
        self.S = torch.zeros(k, k, dtype=torch.float64 if dev.type == "cpu" else torch.float32, device=dev)
        self.n = 0
        self.upper = dev.type == "cpu"  # S holds the upper triangle (the CPU sums only the upper panels)

    def add(self, x: torch.Tensor) -> None:
        rows = x.shape[-2] if x.dim() > 2 else x.shape[0]  # one sequence at a time (batch-size independent)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        self.n += x.shape[0]
        x = x.to(self.S.device)  # a layer split over devices: inputs may come from another one
        if not x.is_cuda:  # fp32 products (twice as fast as fp64) per sequence, summed in fp64
            k = x.shape[1]
            bs = max(256, -(-k // 8))  # upper panels only (about 0.56-0.75 of the products); H mirrors them
            for c in x.split(max(rows, 1)):
                c = c.float()
                for i0 in range(0, k, bs):
                    self.S[i0 : i0 + bs, i0:] += c[:, i0 : i0 + bs].t() @ c[:, i0:]
            return
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _half_mm_ok():
            # half-precision tensor cores with fp32 output: the products of bf16/fp16 values are exact
            # and summed in fp32, as with TF32 on the fp32 copy (whose 10-bit mantissa holds them
            # exactly), at twice TF32's rate and without the fp32 copy of x
            self.S += torch.mm(x.t(), x, out_dtype=torch.float32)
            return
        x = x.to(self.S.dtype)
        if x.is_cuda:  # TF32 tensor cores for the big x^T x (fp32 accumulation); restored after
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                self.S.addmm_(x.t(), x)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            self.S.addmm_(x.t(), x)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.S.device)
        dist.all_reduce(self.S)
        dist.all_reduce(n)
        self.n = int(n.item())

    @property
    def H(self) -> torch.Tensor:
        S = self.S.triu() + self.S.triu(1).t() if self.upper else self.S
        return (S * (2.0 / max(self.n, 1))).float()


SUB = 16  # columns per sub-block of the column loop: rank-1 updates inside it, one product for the rest of the block


@dataclass
class GPTQResult:
    qtensor: QTensor
    loss: float  # sum of squared, Hessian-weighted rounding errors
    damp: float  # damping actually used
    note: str = ""


def _column_params(w: torch.Tensor, spec: WeightSpec, mse_clip: bool, col_weight: torch.Tensor | None = None):
    """One group's scale/zero per row; the clip search weights each column's error by the Hessian's diagonal."""
    clip = mse_clip_search(w, spec.__class__(spec.dtype, spec.bits, -1, spec.sym, None, spec.scale_dtype), col_weight=col_weight) if mse_clip else 1.0
    return nm.int_qparams(w, spec.bits, -1, spec.sym, spec.scale_dtype, clip)


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool | str = False,  # True: columns by descending Hessian diagonal; "group": group-aware order
    static_groups: bool = True,
    mse_clip: bool = False,
    use_triton: bool | None = None,
) -> GPTQResult:
    fp8 = spec.dtype == "fp8_e4m3"
    if not (spec.dtype == "int" or (fp8 and spec.block is None and spec.group_size <= 0)):
        raise ValueError("GPTQ quantizes integer weights and FP8 weights with per-tensor or per-channel scales")
    W = weight.detach().clone().float()
    n, k = W.shape
    H = H.detach().clone().float().to(W.device)
    dev = W.device
    if not torch.isfinite(H).all():
        raise FloatingPointError("non-finite values in the Hessian")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    G = k if spec.group_size <= 0 else spec.group_size
    n_groups = nm.groups_of(k, spec.group_size)
    scales = torch.empty(n, n_groups, dtype=spec.scale_dtype, device=dev)
    zeros = None if spec.sym else torch.empty(n, n_groups, dtype=torch.uint8, device=dev)

    def set_group(g: int, cols: torch.Tensor, hdiag: torch.Tensor) -> None:
        s, z = _column_params(cols, spec, mse_clip, hdiag)
        scales[:, g] = s[:, 0]
        if zeros is not None:
            zeros[:, g] = z[:, 0]

    if fp8:  # FP8: the scales of round-to-nearest (absmax / 448 per tensor or channel); GPTQ picks the codes
        scales = quantize_weight(W, spec).scales
        row_scale = scales.float().reshape(-1).expand(n).reshape(n, 1)
    elif spec.group_size <= 0 or static_groups:
        hd = torch.diag(H)
        for g in range(n_groups):
            set_group(g, W[:, g * G : (g + 1) * G], hd[g * G : (g + 1) * G])

    if act_order == "group" and spec.group_size > 0 and k % G == 0:
        # group-aware order (GPTQModel's GAR): whole groups by their largest Hessian diagonal, columns
        # within each group by theirs; every group stays contiguous, so its parameters stay static
        diag = torch.diag(H).reshape(-1, G)
        local = torch.argsort(diag, dim=1, descending=True, stable=True)
        order = torch.argsort(diag.max(dim=1).values, descending=True, stable=True)
        perm = (order[:, None] * G + local[order]).reshape(-1)
    elif act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]
    # group of each permuted column: static/per-channel groups follow the original index
    orig_group = perm // G if (spec.group_size <= 0 or static_groups) else None

    used = damp
    note = ""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(k, dtype=H.dtype, device=dev)
    for attempt in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(used * mean_diag)
        # the upper Cholesky factor of H^-1 without forming H^-1: with J the order reversal and
        # J H J = L L^T, H^-1 = (J L^-T J)(J L^-1 J) and J L^-1 J is upper triangular
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if info == 0:
            Hinv = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(Hinv).all()):
                break
        used *= 10 if attempt else 5
        note = f"Hessian not positive definite; damping raised to {used:g}"
    else:
        raise FloatingPointError("Hessian stays singular after raising damping to %g" % used)
    if note:
        note += f" (mean Hessian diagonal {float(mean_diag):.3g})"

    Q = torch.zeros(n, k, dtype=torch.float32 if fp8 else torch.int16, device=dev)
    lo, hi = nm.int_range(spec.bits, spec.sym)
    loss = torch.zeros(n, device=dev)
    from . import gptq_triton

    if use_triton is None:
        use_triton = dev.type == "cuda" and not fp8 and gptq_triton.available(dev)
    if use_triton and orig_group is not None:
        S = scales.float()
        Z = None if zeros is None else zeros.float()
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            q, err = gptq_triton.block_quantize(W[:, i1:i2], Hinv[i1:i2, i1:i2], S, Z, orig_group[i1:i2], lo, hi, loss)
            Q[:, i1:i2] = q.to(torch.int16)
            W[:, i2:] -= err @ Hinv[i1:i2, i2:]
        k_done = k
    else:
        k_done = 0
    for i1 in range(k_done, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if fp8:
            S1, Z1 = row_scale.expand(n, i2 - i1), None
        elif orig_group is not None:  # group parameters known up front: gather them once per block
            S1 = scales.float()[:, orig_group[i1:i2]]
            Z1 = None if zeros is None else zeros.float()[:, orig_group[i1:i2]]
        for i in range(i2 - i1):
            col = i1 + i
            if i % SUB == 0 and i:  # the finished sub-block's errors reach the rest of the block in one product
                W1[:, i:] -= Err1[:, i - SUB : i] @ Hinv1[i - SUB : i, i:]
            if orig_group is None and not fp8:
                gid = col // G if act_order != "group" else int(perm[col]) // G  # group-aware: groups stay whole
                if col % G == 0:  # on-the-fly group parameters (from the updated weights)
                    cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :G]
                    set_group(gid, cols, torch.diag(H)[col : col + G])
                s = scales[:, gid].float()
                z = 0.0 if zeros is None else zeros[:, gid].float()
            else:
                s = S1[:, i]
                z = 0.0 if Z1 is None else Z1[:, i]
            w = W1[:, i]
            if fp8:
                q = nm.fp8_quantize(w, s).float()
                deq = q * s
            else:
                q = torch.clamp(torch.round(w / s) + z, lo, hi)
                deq = (q - z) * s
            Q1[:, i] = q
            err = (w - deq) / Hinv1[i, i]
            j = min((i // SUB + 1) * SUB, i2 - i1)  # rank-1 updates only inside the sub-block
            W1[:, i:j].addr_(err, Hinv1[i, i:j], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(Q.dtype)
        loss += (Err1**2).sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes = Q[:, invperm]
    if fp8:
        qt = QTensor("fp8_e4m3", 8, codes.to(torch.float8_e4m3fn), scales, None, spec.group_size)
        return GPTQResult(qt, float(loss.sum()), used, note)
    codes = codes.to(torch.int8) if spec.sym else codes.to(torch.uint8)
    g_idx = None
    if act_order is True and not static_groups and spec.group_size > 0:
        g_idx = (torch.arange(k, device=dev) // G)[invperm].to(torch.int32)
    qt = QTensor("int", spec.bits, codes, scales, zeros, spec.group_size, g_idx=g_idx)
    return GPTQResult(qt, float(loss.sum()), used, note)


def split_rows(qt: QTensor, sizes: list[int]) -> list[QTensor]:
    """Split a QTensor of concatenated output rows back into its parts (per-row scales/zeros)."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        per_row = qt.scales.dim() > 1 or qt.scales.numel() > 1  # a per-tensor scale is shared by the parts
        out.append(qt.replace(codes=qt.codes[sl].contiguous(), scales=qt.scales[sl].contiguous() if per_row else qt.scales.clone(),
                              zeros=None if qt.zeros is None else qt.zeros[sl].contiguous()))
        start += n
    return out
