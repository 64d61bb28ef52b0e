"""runtime/kernels/mma16.py on the CPU: the repacked word order against WeightOnlyState.qw (the addresses the kernel
computes, from the format's statement), what it refuses, and the kernel compiled for sm_90 (ptxas ships with
Triton): no shared memory at all, mma.sync in its loop, no spill. Its numbers are checked on the GPU
(tests/test_kernels_cuda.py::test_mma16_matches_reference): Gluon kernels do not run under the interpreter."""

import collections
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon._runtime")

from qtensor import QTensor  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import mma16  # noqa: E402
from tests.helpers import gluon_sm90  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _loop(sass: str) -> collections.Counter:
    """The instructions between the longest backward branch and its target (the hot loop)."""
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)]
    best = None
    for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass):
        a, t = int(a, 16), int(t, 16)
        if t < a and (best is None or a - t > best[1] - best[0]):
            best = (t, a)
    assert best, "no loop"
    return collections.Counter(op for a, op in ins if best[0] <= a <= best[1])


def _state(n=64, k=256, zero=False, group=128):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0 if zero else -8, 16 if zero else 8, (n, k), generator=g).to(torch.uint8 if zero else torch.int8)
    ng = k // group if group else 1
    zeros = torch.randint(0, 16, (n, ng), dtype=torch.uint8, generator=g) if zero else None
    scales = (torch.rand(n, ng, generator=g) * 0.02 + 0.002).half()
    return kernels.prepare(QTensor("int", 4, codes, scales, zeros, group)).state


def test_repack_is_the_kernels_address_order():
    """Word (r, n) of block b (qw row 16 b + r) sits at b * 16 N + (r // 8) * 64 + r % 8 + (n // 8) * 128 + (n % 8) * 8
    (the kernel's offsets: lane (g, c)'s K rows 2c, 2c + 1 and 2c + 8, 2c + 9 as two 8-byte pairs, each warp load 256
    contiguous bytes); unpack inverts it."""
    st = _state(n=48, k=384)
    qm = mma16.repack(st.qw)
    assert qm.shape == (st.qw.numel(),)
    rows, n = st.qw.shape
    for b in range(rows // 16):
        for r in range(16):
            for c in range(n):
                a = b * 16 * n + (r // 8) * 64 + r % 8 + (c // 8) * 128 + (c % 8) * 8
                assert int(qm[a]) == int(st.qw[16 * b + r, c])
    assert torch.equal(mma16.unpack(qm, st.k, st.n), st.qw)
    # lane (g, c) of the subtile: its four words, rows 2c, 2c + 1, 2c + 8, 2c + 9 of column g, are two adjacent pairs
    for g_ in range(8):
        for c in range(4):
            a0 = (2 * c) % 8 + g_ * 8
            assert [int(qm[a0]), int(qm[a0 + 1]), int(qm[a0 + 64]), int(qm[a0 + 65])] == \
                [int(st.qw[r, g_]) for r in (2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9)]


def test_fits_refuses_what_the_kernel_cannot_run():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert mma16.fits(_state(), x) is None
    assert mma16.fits(_state(zero=True), x) is None
    assert mma16.fits(_state(group=256), x) is None  # two blocks a group (gshift 1)
    assert "128" in mma16.fits(_state(group=32), x)
    assert "16 rows" in mma16.fits(_state(), torch.zeros(17, 256, dtype=torch.bfloat16))
    assert "fp16 or bf16" in mma16.fits(_state(), x.float())
    with pytest.raises(ValueError, match="mma16"):
        mma16.matmul(x.float(), _state())
    with pytest.raises(ValueError, match="BIAS needs XS"):
        mma16.matmul(x, _state(), dict(BN=64, SPLIT_K=1, NW=4, BIAS=True))
    with pytest.raises(ValueError, match="160 KiB"):  # x for 80 blocks of 16 rows staged at once
        mma16.matmul(torch.zeros(16, 10240, dtype=torch.bfloat16), _state(k=10240), dict(BN=64, SPLIT_K=1, NW=4, XS=True))
    for k in (4096, 14336, 65536):  # the default tile stages x for at most 32 blocks (128 KiB at 16 rows) at any K
        cfg = mma16.default_config(4096, k)
        assert cfg["XS"] and -(-(k // 128) // cfg["SPLIT_K"]) <= 32 and cfg["SPLIT_K"] >= 8


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="Triton without its CUDA tools")
@pytest.mark.parametrize("zero,bn,nw,xs,wa,bias", [(False, 128, 4, False, False, False), (True, 256, 8, False, False, False),
                                                   (False, 128, 4, True, False, False), (False, 128, 4, False, True, False),
                                                   (True, 128, 4, True, True, False), (True, 128, 4, True, True, True)])
def test_mma16_compiles_without_shared_memory(zero, bn, nw, xs, wa, bias):
    """Without XS no shared memory at all; with XS (x staged once) the loop reads x by ldmatrix and has no barrier;
    WA (weights left, 8 tokens) takes half the mma.sync of the x-left form; BIAS decodes a K pair in two instructions
    (prmt shared by four slots, shift, lop3: no add), so the loop has no packed add at all."""
    sig = dict(x_ptr="*bf16", qm_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr="*fp32", M="i32", N="i32", K="i32",
               stride_xm="i32", stride_om="i32", stride_ok="i32")
    cx = dict(BN=bn, SPLIT_K=8, NW=nw, GSH=0, HAS_ZERO=zero, FP16=False, KB=3, XS=xs, PF=1, EVF=False, TRIG=False, WA=wa, BM=8 if wa else 16, BIAS=bias, KBP=4)
    k, sass, res = gluon_sm90(mma16._mma16_kernel, sig, cx, nw, divisible=[n for n in sig if n != "M"])
    if not xs:
        assert k.metadata.shared == 0
        assert "ld.shared" not in k.asm["ptx"] and "st.shared" not in k.asm["ptx"]
    ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    # 8 slots x BN / NW / 8 subtiles of m16n8k16 per block, per warp; words two 8-byte pairs per subtile
    assert ops["HMMA.16816.F32.BF16"] == 8 * bn // nw // (16 if wa else 8)
    assert ops["LDG.E.64"] >= 2 * 2 * bn // nw // 8
    if bias:
        body = _loop(sass)
        assert not any(o.startswith(("HADD2.BF16", "HFMA2.BF16")) for o in body)
    if xs:
        assert ops["LDSM.16.M88.2" if wa else "LDSM.16.M88.4"] == 8  # one ldmatrix a slot
        assert not any(o.startswith("STS") for o in _loop(sass))  # (the fill's, before the loop)
        assert not any(o.startswith("BAR") for o in _loop(sass))
    else:
        assert not any(o.startswith(("LDS", "STS", "LDSM", "BAR")) for o in ops)
    assert "STACK:0" in res and "LOCAL:0" in res
