"""runtime/kernels/gv16s.py on the CPU: what it refuses, its shared-memory sizing, and the kernel compiled for sm_90
(ptxas ships with Triton): few registers (the point: two programs an SM), the words by cp.async before the
dependent-launch wait, no spill. Its numbers are checked on the GPU (tests/test_kernels_cuda.py::
test_gv16s_matches_reference): Gluon kernels do not run under the interpreter."""

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon._runtime")

from qtensor import QTensor  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import gv16s  # noqa: E402
from tests.helpers import gluon_sm90  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _state(n=64, k=256, zero=False, group=128, act_order=False):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0 if zero else -8, 16 if zero else 8, (n, k), generator=g).to(torch.uint8 if zero else torch.int8)
    ng = k // group if group else 1
    zeros = torch.randint(0, 16, (n, ng), dtype=torch.uint8, generator=g) if zero else None
    scales = (torch.rand(n, ng, generator=g) * 0.02 + 0.002).half()
    g_idx = torch.randperm(k, generator=g) // group if act_order else None
    return kernels.prepare(QTensor("int", 4, codes, scales, zeros, group, g_idx=g_idx)).state


def test_fits_and_sizing():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert gv16s.fits(_state(), x) is None
    assert "symmetric" in gv16s.fits(_state(zero=True), x)
    assert "128" in gv16s.fits(_state(group=256), x)
    assert "one row" in gv16s.fits(_state(), torch.zeros(2, 256, dtype=torch.bfloat16))
    assert "fp16 or bf16" in gv16s.fits(_state(), x.float())
    with pytest.raises(ValueError, match="gv16s"):
        gv16s.matmul(x.float(), _state())
    # Llama-3-8B's K: 4096 whole (32 blocks: 64 KiB of words + 12 KiB), 14336 in four splits of 28 blocks
    assert gv16s.smem_bytes(4096, 32, 1) == 32 * 16 * 32 * 4 + 32 * 32 * 2 + 32 * 64 * 4 + 2 * 32 * 8 * 4
    assert gv16s.default_config(4096, 4096) == dict(BN=32, NW=8, SPLIT_K=1, CH=4)
    assert gv16s.default_config(4096, 14336)["SPLIT_K"] == 4
    assert gv16s.smem_bytes(14336, 32, 4) <= gv16s.SMEM_MAX
    assert gv16s.smem_bytes(4096, 32, 1, fp4=True) - gv16s.smem_bytes(4096, 32, 1) == 32 * 32 * 6  # two words, not a half
    assert gv16s.default_config(4096, 14336, fp4=True)["SPLIT_K"] == 4
    assert gv16s.default_config(4096, 11008)["SPLIT_K"] == 43  # 86 blocks: 1 and 2 splits too big, 43 the next divisor


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="Triton without its CUDA tools")
@pytest.mark.parametrize("nbs,bn,nw,ch,sk,fp4", [(32, 32, 8, 4, 1, False), (28, 32, 8, 4, 4, False), (32, 64, 4, 8, 1, False),
                                                (32, 32, 8, 4, 1, True), (28, 32, 8, 4, 4, True)])
def test_gv16s_compiles_lean(nbs, bn, nw, ch, sk, fp4):
    """Compiled for sm_90: at most 64 registers a thread, no stack; the words by cp.async (LDGSTS), all issued before
    griddepcontrol.wait (ACQBULK in the SASS); one SUB decode a word pair (eight HFMA2 per PTX call); NVFP4: its block
    scales converted from e4m3 pairs in the loop (F2FP ... E4M3)."""
    sig = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*i32" if fp4 else "*fp16", out_ptr="*bf16" if sk == 1 else "*fp32",
               N="i32", stride_ok="i32", **(dict(gs_ptr="*fp32") if fp4 else {}))
    cx = dict(NBS=nbs, NBP=triton.next_power_of_2(nbs), BN=bn, NW=nw, CH=ch, SPLIT_K=sk, PDL=True, EVF=False, FP4=fp4,
              **({} if fp4 else dict(gs_ptr=None)))
    k, sass, res = gluon_sm90(gv16s._gvs_kernel, sig, cx, nw)
    assert k.metadata.shared <= gv16s.smem_bytes(nbs * 128 * sk, bn, sk, fp4) + 4096  # (+ the reduction's scratch)
    assert int(re.search(r"REG:(\d+)", res).group(1)) <= 64
    assert int(re.search(r"STACK:(\d+)", res).group(1)) == 0
    ops = re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    wait = ops.index("ACQBULK")
    copies = [i for i, o in enumerate(ops) if o.startswith("LDGSTS")]
    words_per_thread = nbs * 16 * bn // (nw * 32 * 4)  # 16-byte copies
    assert len(copies) >= words_per_thread and max(copies) < wait
    assert sum(o.startswith("HFMA2") for o in ops) >= 8 * nbs * 2 * bn // (nw * 32) // 2
    assert any("E4M3" in o for o in ops) is fp4
