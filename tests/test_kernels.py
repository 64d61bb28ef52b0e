"""runtime.kernels against the torch reference (QTensor.dequantize + matmul, fake_quant_act), on CPU
under the Triton interpreter (TRITON_INTERPRET=1 is set before triton is imported). Tiny shapes."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from qtensor import ActQuant, QTensor  # noqa: E402
from qtensor import numerics as nm  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import act_quant, w8a8, weight_only  # noqa: E402
from runtime.qlinear import QuantLinear, fake_quant_act  # noqa: E402

DT = torch.float16


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all()
    return float((y - ref).norm() / ref.norm())


def int_qt(n, k, bits, group, sym, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale, zero = nm.int_qparams(w, bits, group, sym, torch.float16)
    g_idx = None
    if act_order:
        # GPTQ desc_act: channel k belongs to group perm[k] // G for a random permutation
        perm = torch.randperm(k, generator=g)
        g_idx = (perm // group).to(torch.int32)
    codes = nm.int_quantize(w, scale, zero, bits, group, g_idx)
    return QTensor("int", bits, codes, scale, zero, group, g_idx=g_idx)


def x_of(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DT)


def ref_linear(x, qt):
    xq = fake_quant_act(x.float(), qt.act)
    return xq @ qt.dequantize(torch.float32).t()


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 128, True, False), (4, 32, False, False), (4, 64, True, True), (8, -1, True, False), (8, 64, False, True),
])
@pytest.mark.parametrize("path,m", [("gemv", 1), ("small", 5), ("tiled", 33), ("dequant", 7)])
def test_weight_only_int(bits, group, sym, act_order, path, m):
    n, k = 48, 256
    qt = int_qt(n, k, bits, group, sym, act_order)
    prep = kernels.prepare(qt)
    assert prep is not None and prep.weight_only
    assert (prep.state.perm is not None) == act_order
    x = x_of(m, k)
    y = prep(x, path)
    assert y.shape == (m, n) and y.dtype == DT
    # the weight is exact in fp16; only fp16 rounding of products/outputs differs
    assert rel_err(y, x.float() @ qt.dequantize(torch.float32).t()) < 2e-3


def test_weight_only_split_k_and_dequant_exact():
    qt = int_qt(40, 512, 4, 128, False)
    st = weight_only.prepare(qt)
    # every repacked code comes back: the dequantize kernel is bit-exact against QTensor.dequantize
    w = weight_only.dequantize(st, torch.float32)
    assert torch.equal(w, qt.dequantize(torch.float32))
    x = x_of(3, 512)
    y1 = weight_only._launch_gemm(x, st, dict(BM=16, BN=32, SPLIT_K=1), True)
    y4 = weight_only._launch_gemm(x, st, dict(BM=16, BN=32, SPLIT_K=4), True)
    ref = x.float() @ w.t()
    assert rel_err(y1, ref) < 2e-3 and rel_err(y4, ref) < 2e-3


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 128, True, False), (4, 32, False, False), (4, 64, True, True),
                                                     (8, -1, True, False), (8, 64, False, True)])
def test_dequantize_kernels_bit_exact(bits, group, sym, act_order):
    """Both dequantize kernels (slot by slot, and the [BN, 128] row tile stored at once) give QTensor.dequantize
    bit for bit, in the kernels' permuted channel order under act order, at two tile sizes."""
    qt = int_qt(40, 512, bits, group, sym, act_order)
    st = weight_only.prepare(qt)
    ref = qt.dequantize(torch.float32)
    if st.perm is not None:
        ref = ref[:, st.perm.long()]
    for rows, bn in ((False, 64), (True, 64), (True, 32)):
        assert torch.equal(weight_only.dequantize(st, torch.float32, rows=rows, bn=bn), ref), (rows, bn)
    assert torch.equal(weight_only.dequantize(st, torch.float32, rows=True, hints=True), ref)  # cache hints: same values
    # in bf16 the two kernels agree (the interpreter's fp32 -> bf16 cast truncates, the GPU's rounds to nearest)
    assert torch.equal(weight_only.dequantize(st, torch.bfloat16, rows=True), weight_only.dequantize(st, torch.bfloat16, rows=False))


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [1, 6, 20])
def test_fp4_weights(scheme, m):
    n, k = 32, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    if scheme == "nvfp4":
        bs, gs = nm.nvfp4_qparams(w, 16)
        qt = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, 16), bs, None, 16, global_scale=gs,
                     act=ActQuant("dynamic", "e2m1", "group", group_size=16))
    else:
        e = nm.e8m0_scales(w, 32, 2)
        codes = nm.e2m1_round(w / nm.expand_to_columns(nm.e8m0_to_float(e), k, 32))
        qt = QTensor("e2m1", 4, codes, e, None, 32)
    prep = kernels.prepare(qt)
    st = prep.state
    for rows in (False, True):
        assert torch.equal(weight_only.dequantize(st, torch.float32, rows=rows), qt.dequantize(torch.float32))
    x = x_of(m, k)
    y = prep(x)
    assert rel_err(y, ref_linear(x, qt)) < 3e-3


def test_nvfp4_activation_fake_quant_matches_reference():
    x = x_of(5, 128) * 3
    act = ActQuant("dynamic", "e2m1", "group", group_size=16)
    y = act_quant.nvfp4_fake_quant(x, None)
    assert torch.equal(y, fake_quant_act(x, act))


@pytest.mark.parametrize("dtype,static,group,k", [("int8", False, 0, 256), ("int8", True, 0, 256), ("fp8_e4m3", False, 0, 256),
                                                  ("fp8_e4m3", False, 128, 256), ("fp8_e4m3", True, 0, 256),
                                                  ("int8", False, 0, 4096 + 272), ("fp8_e4m3", False, 0, 8192 + 16)])
def test_act_quant_codes_exact(dtype, static, group, k):
    """Per token, per group and static scales; rows wider than the kernel's block (here 4096) are read in chunks."""
    x = x_of(6, k) * 4
    x[0, 3] = 0.5 * 127 / 127  # a value on a rounding tie for some scales
    sc = torch.tensor([0.03]) if static else None
    off = torch.tensor([3.0]) if static and dtype == "int8" else None
    q, s = act_quant.quantize(x, dtype, group, sc, off, block=4096)
    q1, s1 = act_quant.quantize(x, dtype, group, sc, off)  # one pass (the default block is 16384 wide)
    assert torch.equal(q1.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s1, s)
    for blk in (4096, 16384):  # with the cache hints (x evict-first, codes evict-last): the same codes
        q2, s2 = act_quant.quantize(x, dtype, group, sc, off, block=blk, hints=True)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    xf = x.float()
    if static:
        ref_s = sc
    elif group:
        ref_s = (xf.reshape(6, -1, group).abs().amax(-1) / (127.0 if dtype == "int8" else nm.FP8_MAX)).clamp(min=1e-12)
    else:
        ref_s = (xf.abs().amax(-1, keepdim=True) / (127.0 if dtype == "int8" else nm.FP8_MAX)).clamp(min=1e-12)
    assert torch.equal(s.reshape(ref_s.shape) if not static else s, ref_s.reshape(-1) if static else ref_s)
    se = ref_s.repeat_interleave(group, 1) if group else ref_s
    if dtype == "int8":
        ref_q = torch.clamp(torch.round(xf / se) + (off if off is not None else 0), -128, 127).to(torch.int8)
        assert torch.equal(q, ref_q)
    else:
        ref_q = nm.fp8_quantize(xf, se)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def fp8_qt(n, k, kind):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    if kind == "block":
        scale = nm.fp8_scale_from_amax(nm.block_amax(w, (128, 128)))
        codes = nm.fp8_quantize(w, nm.expand_blocks(scale, n, k, (128, 128)))
        return QTensor("fp8_e4m3", 8, codes, scale, None, 128, block=(128, 128),
                       act=ActQuant("dynamic", "fp8_e4m3", "group", group_size=128))
    if kind == "tensor":
        scale = nm.fp8_scale_from_amax(w.abs().amax()).reshape(1)
        return QTensor("fp8_e4m3", 8, nm.fp8_quantize(w, scale), scale, None, 0,
                       act=ActQuant("static", "fp8_e4m3", "tensor", scale=torch.tensor([0.01])))
    scale = nm.fp8_scale_from_amax(w.abs().amax(1, keepdim=True))
    return QTensor("fp8_e4m3", 8, nm.fp8_quantize(w, scale), scale, None, -1, act=ActQuant("dynamic", "fp8_e4m3", "token"))


@pytest.mark.parametrize("kind", ["tensor", "token", "block"])
@pytest.mark.parametrize("m", [1, 17])
def test_fp8_w8a8(kind, m):
    n, k = 160, 256
    qt = fp8_qt(n, k, kind)
    prep = kernels.prepare(qt)
    assert prep is not None and prep.state.kind == ("fp8_block" if kind == "block" else "fp8")
    x = x_of(m, k)
    y = prep(x)
    assert y.shape == (m, n)
    assert rel_err(y, ref_linear(x, qt)) < 2e-3


def test_quantizer_cache_hints_only_where_the_codes_fit_in_l2(monkeypatch):
    """The activation quantizer's cache hints (codes kept in L2 for the GEMM) by default only up to 32 MiB of codes:
    Llama-3-8B at M=4096 qkv / o / gate_up (16 MiB) with them, down (56 MiB) without; QTOOL_CACHE_HINTS=0: never."""
    assert act_quant.hints_for(4096, 4096) and not act_quant.hints_for(4096, 14336)
    monkeypatch.setattr(act_quant, "HINTS", False)
    assert not act_quant.hints_for(16, 4096)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 20])
def test_int8_w8a8(static, m):
    n, k = 48, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    scale, _ = nm.int_qparams(w, 8, -1, True, torch.float32)
    codes = nm.int_quantize(w, scale, None, 8, -1)
    act = ActQuant("static", "int8", "tensor", scale=torch.tensor([0.025]), offset=torch.tensor([-4.0])) if static \
        else ActQuant("dynamic", "int8", "token")
    qt = QTensor("int", 8, codes, scale, None, -1, act=act)
    prep = kernels.prepare(qt)
    assert prep is not None and prep.state.kind == "int8"
    x = x_of(m, k) + (0.1 if static else 0.0)
    y = prep(x)
    assert rel_err(y, ref_linear(x, qt)) < 2e-3
    if m > 16:  # the torch._int_mm route gives the same integers
        assert rel_err(w8a8.matmul(x, prep.state, "int_mm"), ref_linear(x, qt)) < 2e-3


def test_quantlinear_dispatch_matches_torch_path():
    qt = int_qt(32, 128, 4, 32, True)
    mod = QuantLinear(qt, bias=torch.randn(32).to(DT))
    x = x_of(2, 128)
    ref = mod(x)  # CPU: the torch reference path
    y = kernels.linear(mod, x)  # what forward() returns on CUDA
    assert y is not None and rel_err(y, ref) < 2e-3
    # layouts without a kernel fall back (3-bit)
    assert kernels.linear(QuantLinear(int_qt(32, 128, 3, 32, True)), x) is None


@pytest.mark.parametrize("bits,group,uniform", [(4, 128, True), (4, -1, True), (8, 64, True), (4, 32, False), (4, 64, False)])
def test_gemv_uniform_block_path(bits, group, uniform):
    """Weights whose packed blocks each lie in one group take the per-block-scale GEMV (magic-number
    decode); the others the per-slot one; both equal the reference, asym and act order included."""
    n, k = 40, 512
    for sym, act_order in ((True, False), (False, True)):
        qt = int_qt(n, k, bits, group, sym, act_order and group > 0)
        st = kernels.prepare(qt).state
        assert st.uniform == uniform
        x = x_of(1, k)
        y = weight_only.matmul(x, st, path="gemv")
        assert rel_err(y, ref_linear(x, qt)) < 1e-2


@pytest.mark.parametrize("group,sym,act_order", [(128, True, False), (128, False, True), (-1, False, False), (256, True, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv16_packed_fp16_path(group, sym, act_order, dtype):
    """The M = 1 default for int4 weights with one group per 128-channel block: x scaled by a power of two
    from the program's largest |x| (so that fp16 products stay finite) and rounded to fp16, codes minus
    zero point times x summed per word, the group scale once per word. Under the interpreter the
    plain-Triton twin of the inline-PTX decode runs (the PTX one is checked against it on the GPU).
    Split-K partials are summed by the last program of each tile (counters reset for the next call) or
    by a second kernel; both equal one pass. Activations far outside fp16's range stay exact."""
    n, k = 40, 1024
    qt = int_qt(n, k, 4, group, sym, act_order)
    st = kernels.prepare(qt).state
    assert weight_only.gemv16_fits(st, x_of(1, k).to(dtype))
    ref_w = qt.dequantize(torch.float32)
    big = 600.0 if dtype == torch.float16 else 1e6  # 8 * 15 * big passes fp16's range; 1e-6 * x is below its normal range
    for scale in (1.0, big, 1e-6):
        x = (x_of(1, k).float() * scale).to(dtype)
        ref = x.float() @ ref_w.t()
        y = weight_only.matmul(x, st)  # the default M = 1 path
        assert y.dtype == dtype and rel_err(y, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
        for sk, fused in ((1, True), (2, True), (8, True), (4, False)) if scale == 1.0 else ():
            for _ in range(2):  # the second call finds the counters reset
                y2 = weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False, fused, prefetch=sk != 2)
                assert rel_err(y2, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
            # the group from the table instead of b >> gshift, scales loaded in their own step: the same sums
            for gshift, spre in ((True, True), (False, True), (True, False)):
                y4 = weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False, fused, gshift=gshift, spre=spre)
                assert torch.equal(y4, weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False, fused))
        # x pairs computed in registers (regx, no scratch row) and weights read evict-first: the same sums bit for bit,
        # with a K range that ends in half a step (1024 channels = 8 blocks, split-K 3: 3 blocks, two per step)
        for cfg in (dict(BN=16, SPLIT_K=3, KU=2), dict(BN=32, SPLIT_K=1, KU=8)):
            base = weight_only._launch_gemv16(x, st, cfg, False)
            for kw in (dict(regx=True), dict(evf=True)) if scale == 1.0 else (dict(regx=True),):
                assert torch.equal(weight_only._launch_gemv16(x, st, cfg, False, **kw), base), (cfg, kw, scale)
    # blocks of very different magnitude: each 128-channel block has its own prescale (or, SCAN, one for the
    # program's range, found by a first pass over x)
    xw = x_of(1, k).float()
    xw[:, :128] *= 1e3 if dtype == torch.float16 else 1e5
    xw = xw.to(dtype)
    ref = xw.float() @ ref_w.t()
    for scan in (False, True):
        y3 = weight_only._launch_gemv16(xw, st, dict(BN=16, SPLIT_K=2, KU=2), False, scan=scan)
        assert rel_err(y3, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
    assert torch.equal(weight_only._launch_gemv16(xw, st, dict(BN=16, SPLIT_K=2, KU=2), False, regx=True),
                       weight_only._launch_gemv16(xw, st, dict(BN=16, SPLIT_K=2, KU=2), False))
    if st.perm is None:
        assert int(st._counters.abs().sum()) == 0
    # fp32 activations take the same path (fp32 out)
    x32 = x_of(1, k).float()
    y32 = weight_only.matmul(x32, st)
    assert y32.dtype == torch.float32 and rel_err(y32, x32 @ ref_w.t()) < 2e-3
    # no inline PTX under the interpreter: the self-check says so
    assert weight_only._h2_ok(torch.device("cpu")) is False
    # 32-channel groups and 8-bit weights take the fp32 GEMV
    assert not weight_only.gemv16_fits(kernels.prepare(int_qt(n, k, 4, 32, True)).state, x_of(1, k))
    assert not weight_only.gemv16_fits(kernels.prepare(int_qt(n, k, 8, 128, True)).state, x_of(1, k))
    # one row by default (M = 1): more rows go to the tensor-core kernels; forced, gemv16 runs a program per row
    assert not weight_only.gemv16_fits(st, x_of(2, k).to(dtype))
    x3 = x_of(3, k).to(dtype)
    assert rel_err(weight_only.matmul(x3, st, path="gemv16"), x3.float() @ ref_w.t()) < (2e-3 if dtype == torch.float16 else 1e-2)
    # the kernel itself keeps each row of x in its own scratch row (pairs, 1 / prescale per block, SUB's x sums): two
    # rows at once leave the same scratch as each row alone (a row stride of K / 2 once let row 1 overwrite row 0's
    # prescales on the GPU, where the rows' programs run at once; the interpreter runs them one after another)
    x2, row = x_of(2, k).to(dtype), k // 2 + k // 128 + k // 16
    for sub in (False, True):
        cfg = dict(BN=16, SPLIT_K=2, KU=2)
        both = weight_only._scratch(st, "pairs", (2, row), torch.int32, x2.device)
        both.zero_()  # (the buffer the launch takes; what a call does not write stays zero)
        weight_only._launch_gemv16(x2, st, cfg, False, sub=sub)
        for r in range(2):
            one = weight_only._scratch(st, "pairs", (1, row), torch.int32, x2.device)
            one.zero_()
            weight_only._launch_gemv16(x2[r:r + 1], st, cfg, False, sub=sub)
            assert torch.equal(both[r], one[0]) and bool(one[0, : k // 2].any()), (sub, r)


@pytest.mark.parametrize("group,sym,act_order,dtype", [(128, True, False, torch.bfloat16), (128, False, True, torch.float16),
                                                     (256, True, True, torch.bfloat16)])
def test_gemv16_subnormal_decode(group, sym, act_order, dtype):
    """SUB: int4 codes as fp16 subnormals (q * 2^-24, one and a pair), sum q x per word pair, then z times the sum of
    the pair's sixteen x taken off per block in fp32 (the sums packed with the x pairs, or from x in registers).
    Under the interpreter the plain twin runs (its word sums q x with the odd pairs' x packed / 16): against the
    fp32 reference as the default kernel is, through the scratch row and REGX, split-K 3 and 8, one prescale per
    block or per program, and with blocks of very different magnitude."""
    n, k = 40, 1024
    qt = int_qt(n, k, 4, group, sym, act_order)
    st = kernels.prepare(qt).state
    ref_w = qt.dequantize(torch.float32)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    big = 600.0 if dtype == torch.float16 else 1e6
    xw = x_of(1, k).float()
    xw[:, :128] *= 1e3 if dtype == torch.float16 else 1e5
    for i, x in enumerate([(x_of(1, k).float() * sc).to(dtype) for sc in (1.0, big, 1e-6)] + [xw.to(dtype)]):
        ref = x.float() @ ref_w.t()
        for cfg in (dict(BN=16, SPLIT_K=3, KU=2), dict(BN=32, SPLIT_K=8, KU=1)):
            ys = [weight_only._launch_gemv16(x, st, cfg, False, sub=True, **kw) for kw in ({}, dict(regx=True), dict(scan=True))]
            for y in ys:
                assert rel_err(y, ref) < tol, (cfg, rel_err(y, ref))
            if i == 0:  # the zero-point term is what makes it right: without it (ABL bit 2) the sums are far off
                assert rel_err(weight_only._launch_gemv16(x, st, cfg, False, sub=True, abl=4), ref) > 0.1
    # through matmul's bench path name
    x = x_of(1, k).to(dtype)
    assert rel_err(weight_only.matmul(x, st, path="gemv16-sub"), x.float() @ ref_w.t()) < tol


def test_gemv16_tuner_configs_with_switches():
    """The tuner's gemv16 configs that carry switches (session 19's winners: REGX, SUB, EVF, SPK) run and match the
    fp32 reference, int4 (asym, act order: SUB's zero-point term and x gathered by the permutation) and NVFP4; a switch
    that does not apply to the weight type is ignored."""
    n, k = 40, 1024
    qt = int_qt(n, k, 4, 128, False, True)
    st = kernels.prepare(qt).state
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    bs, gs = nm.nvfp4_qparams(w, 16)
    fq = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, 16), bs, None, 16, global_scale=gs)
    fst = kernels.prepare(fq).state
    x = x_of(1, k).to(torch.bfloat16)
    swit = [c for c in weight_only.GEMV16_CONFIGS if set(c) - {"BN", "SPLIT_K", "KU", "num_warps"}]
    assert len(swit) >= 7
    # the bench's sweep keys: scales a step ahead (SPRE), a register cap (a launch option; ignored by the interpreter)
    swit += [dict(BN=32, SPLIT_K=2, KU=4, num_warps=4, SPRE=True, SUB=True), dict(BN=32, SPLIT_K=1, KU=8, num_warps=4, MAXNREG=128)]
    for cfg in swit:
        for t, q in ((st, qt), (fst, fq)):
            y = weight_only._launch_gemv16(x, t, cfg, False)
            assert rel_err(y, x.float() @ q.dequantize(torch.float32).t()) < 1e-2, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv16_nvfp4(dtype):
    """NVFP4 weights through the packed-fp16 GEMV: e2m1 codes placed in fp16 bit fields (value * 2^-14),
    the e4m3 block scales of each pair of groups as one fp16 pair, x prescaled under 2^14, the global
    scale at the end; equal to x @ dequantized W for ordinary, huge and tiny activations, with and without
    split-K. (Plain-Triton twin under the interpreter; the PTX one is checked against it on the GPU.)"""
    n, k = 40, 1024
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    bs, gs = nm.nvfp4_qparams(w, 16)
    qt = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, 16), bs, None, 16, global_scale=gs)
    st = kernels.prepare(qt).state
    assert weight_only.gemv16_fits(st, x_of(1, k).to(dtype))
    ref_w = qt.dequantize(torch.float32)
    big = 600.0 if dtype == torch.float16 else 1e6
    for scale in (1.0, big, 1e-6):
        x = (x_of(1, k).float() * scale).to(dtype)
        ref = x.float() @ ref_w.t()
        y = weight_only.matmul(x, st)
        assert y.dtype == dtype and rel_err(y, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
        for sk in (1, 4) if scale == 1.0 else ():
            y2 = weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False)
            assert rel_err(y2, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
            for spre in (True, False):  # the scales loaded a step ahead or in their own step: the same sums
                assert torch.equal(weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False, spre=spre), y2)
                # the block scales packed two words per column and block (SPK): the same sums
                assert torch.equal(weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=sk, KU=2), False, spre=spre, spk=True), y2)
        # x pairs from registers (no scratch row): the same sums, at every magnitude
        assert torch.equal(weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=4, KU=2), False, regx=True),
                           weight_only._launch_gemv16(x, st, dict(BN=16, SPLIT_K=4, KU=2), False))
    # MXFP4 (e8m0 scales, groups of 32) stays on the fp32 GEMV
    e = nm.e8m0_scales(w, 32, 2)
    mx = QTensor("e2m1", 4, nm.e2m1_round(w / nm.expand_to_columns(nm.e8m0_to_float(e), k, 32)), e, None, 32)
    assert not weight_only.gemv16_fits(kernels.prepare(mx).state, x_of(1, k))


@pytest.mark.parametrize("group,sym,act_order", [(128, True, False), (128, False, True), (-1, True, False), (256, False, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["dot4", "dot4t", "dot4s"])
def test_dot4_tensor_core_path(group, sym, act_order, dtype, path):
    """int4 through tl.dot for M <= 16: codes decoded by the magic OR (128 + q in bf16, 1024 + q in fp16),
    zero point and scale once per 128-channel block (dot4t, the default for 2 <= M <= 16: swapped operands, the zero
    point taken off in the decode; dot4s: the scale too); M = 17
    spans two row tiles. (Under the interpreter the plain-Triton decode runs; the PTX decode is checked at
    full size on the GPU by bench/kernels.py.)"""
    n, k = 40, 512
    qt = int_qt(n, k, 4, group, sym, act_order)
    st = kernels.prepare(qt).state
    assert weight_only.dot4_fits(st, x_of(1, k).to(dtype))
    ref_w = qt.dequantize(torch.float32)
    for m in (1, 5, 17):
        x = x_of(m, k).to(dtype)
        y = weight_only.matmul(x, st, path=path)
        assert y.dtype == dtype and rel_err(y, x.float() @ ref_w.t()) < (2e-3 if dtype == torch.float16 else 1e-2)
    for sk in (1, 2, 4):  # split-K partial sums equal one pass
        kw = dict(kind=path)
        y1 = weight_only._launch_dot4(x_of(3, k).to(dtype), st, dict(BN=32, SPLIT_K=1), **kw)
        y2 = weight_only._launch_dot4(x_of(3, k).to(dtype), st, dict(BN=32, SPLIT_K=sk), **kw)
        assert rel_err(y2, y1) < 1e-2
        if path in ("dot4", "dot4t"):  # partials summed by the last program (twice: the counters reset) or by a
            # second kernel; the group of a block from the shift or from the table: the same sums
            for fused, gshift in ((True, True), (True, True), (False, True), (True, False), (False, False)):
                y3 = weight_only._launch_dot4(x_of(3, k).to(dtype), st, dict(BN=32, SPLIT_K=sk), kind=path, fused=fused, gshift=gshift)
                assert torch.equal(y3, y2)
            if sk > 1:
                assert int(st._counters.abs().sum()) == 0
    if path in ("dot4", "dot4t"):  # the word tiles through a tensor descriptor (TMA on the GPU; 40 rows: the last
        # tile's rows past N read as zeros): the same sums as the pointer loads, sym and asym, split or not
        x = x_of(3, k).to(dtype)
        for cfg in (dict(BN=32, SPLIT_K=1), dict(BN=32, SPLIT_K=4), dict(BN=64, SPLIT_K=2, KU=2)):
            assert torch.equal(weight_only._launch_dot4(x, st, cfg, kind=path, tma=True), weight_only._launch_dot4(x, st, cfg, kind=path))
        assert rel_err(weight_only.matmul(x, st, path=path + "-tma"), x.float() @ ref_w.t()) < (2e-3 if dtype == torch.float16 else 1e-2)
        assert not weight_only._tma_ok(st, x)  # the default takes TMA only on a CUDA device of sm_90 or later
    # the PTX decode cannot run under the interpreter: the self-check says so and the plain decode runs
    assert weight_only._ptx_ok(torch.device("cpu"), path) is False
    if path == "dot4":  # dot4t's kernel with x the left operand (XL): the same products, summed in another order
        x = x_of(5, k).to(dtype)
        for cfg in (dict(BN=32, SPLIT_K=2), dict(BN=64, SPLIT_K=4, KU=1)):
            a, b = weight_only._launch_dot4(x, st, cfg, kind="dot4"), weight_only._launch_dot4(x, st, cfg, kind="dot4t")
            assert rel_err(a, b) < 1e-3
    if path == "dot4t":  # 32-row tiles of two warps (mma.sync on the GPU instead of wgmma): the same sums
        x = x_of(5, k).to(dtype)
        assert rel_err(weight_only.matmul(x, st, path="dot4t-mma"), x.float() @ ref_w.t()) < (2e-3 if dtype == torch.float16 else 1e-2)
    if path == "dot4t":  # the large-M tiles (M = 128 on wide N by default on the GPU): 70 rows in two 64-row tiles
        x = x_of(70, k).to(dtype)
        y = weight_only._launch_dot4(x, st, dict(BM=64, BN=64, SPLIT_K=1), kind="dot4t")
        assert rel_err(y, x.float() @ ref_w.t()) < (2e-3 if dtype == torch.float16 else 1e-2)
    if path == "dot4s":  # two blocks per dot, and the block count not a multiple of split-K x KB: refused
        y3 = weight_only._launch_dot4(x_of(3, k).to(dtype), st, dict(BN=32, SPLIT_K=2, KB=2), **kw)
        assert rel_err(y3, y1) < 1e-2
        with pytest.raises(ValueError):
            weight_only._launch_dot4(x_of(3, k).to(dtype), st, dict(BN=32, SPLIT_K=2, KB=4), **kw)
    # 32-channel groups do not fit one group per packed block: another kernel takes them
    assert not weight_only.dot4_fits(kernels.prepare(int_qt(n, k, 4, 32, True)).state, x_of(1, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dot4f_nvfp4_tensor_core_path(dtype):
    """NVFP4 weights at 2 <= M <= 16 through tensor cores (dot4f, the default path there): each 16-channel
    slot is one group, its e2m1 values (exact in fp16 / bf16) one dot, the e4m3 scale and the global scale
    on the fp32 result; equal to x @ dequantized W for M = 2, 5 and 17 (two row tiles), split-K summed in the
    kernel (twice: the counters reset) or by a second kernel. (Plain decode under the interpreter; the PTX
    decode is checked against it on the GPU, once per device.)"""
    n, k = 40, 512
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    bs, gs = nm.nvfp4_qparams(w, 16)
    qt = QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, 16), bs, None, 16, global_scale=gs)
    st = kernels.prepare(qt).state
    assert weight_only.dot4f_fits(st, x_of(2, k).to(dtype)) and not weight_only.dot4_fits(st, x_of(2, k).to(dtype))
    ref_w = qt.dequantize(torch.float32)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for m in (2, 5, 17):
        x = x_of(m, k).to(dtype)
        y = weight_only.matmul(x, st, path="dot4f")
        assert y.dtype == dtype and rel_err(y, x.float() @ ref_w.t()) < tol
        if m <= 16:  # the default path at 2 <= M <= 16
            assert torch.equal(weight_only.matmul(x, st), y)
    x = x_of(3, k).to(dtype)
    ref = x.float() @ ref_w.t()
    for sk, fused in ((2, True), (2, True), (4, False), (4, True)):
        y = weight_only._launch_dot4(x, st, dict(BN=32, SPLIT_K=sk), False, "dot4f", fused=fused)
        assert rel_err(y, ref) < tol
    assert int(st._counters.abs().sum()) == 0
    assert weight_only._ptx_ok(torch.device("cpu"), "dot4f") is False


def test_group_shift_of_the_packed_blocks():
    """The kernels take the group of 128-channel block b as b >> gshift when that holds for every block (no
    table lookup): 0 for g128 (act order too: sorted into equal groups), 1 for g256, 30 for one group per
    channel; unequal groups (a hand-made g_idx) keep the table (-1), and the kernels still match."""
    n, k = 24, 1024
    for group, act_order, want in ((128, False, 0), (128, True, 0), (256, False, 1), (-1, False, 30), (512, True, 2)):
        st = kernels.prepare(int_qt(n, k, 4, group, True, act_order)).state
        assert st.uniform and st.gshift == want, (group, act_order, st.gshift)
    qt = int_qt(n, k, 4, 128, True)
    g = torch.cat([torch.zeros(256), torch.ones(128), torch.full((384,), 2), torch.full((256,), 3)]).to(torch.int32)
    qt = QTensor(qt.dtype, qt.bits, qt.codes, torch.rand(n, 4) + 0.5, None, 128, g_idx=g)
    st = kernels.prepare(qt).state
    assert st.uniform and st.gshift == -1
    x = x_of(3, k)
    ref = x.float() @ qt.dequantize(torch.float32).t()
    assert rel_err(weight_only.matmul(x, st, path="dot4t"), ref) < 1e-2
    assert rel_err(weight_only.matmul(x[:1], st, path="gemv16"), ref[:1]) < 1e-2
    assert weight_only.prepare(int_qt(n, k, 4, 32, True)).gshift == -1  # not uniform: no shift


def test_tuning_pick_warms_then_keeps_the_fastest_of_a_second_round(monkeypatch):
    """The config tuner (GPU only; here its timer is replaced): the default is run first to warm the clocks,
    every candidate is timed, the best FINALISTS again, and the fastest of that second round is kept;
    configs that fail to launch are skipped, and the choice is cached per key."""
    from runtime.kernels import tuning

    calls = []
    second = {"a": 5.0, "b": 2.0, "c": 3.0}  # 'a' looked fastest first (a clock ramp), 'b' is really faster

    def fake_bench(fn, rep):
        cfg = fn()
        calls.append((cfg, rep))
        if cfg == "bad":
            raise RuntimeError("out of resources")
        if rep == 50:
            return second[cfg]
        return {"dflt": 9.0, "a": 1.0, "b": 1.5, "c": 1.6, "d": 4.0}[cfg]

    monkeypatch.setattr(tuning, "_bench", fake_bench)
    monkeypatch.setattr(tuning, "_enabled", True)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_cache", {})
    got = tuning.pick("k", ["a", "bad", "b", "c", "d"], lambda c: c, default="dflt")
    assert got == "b"
    assert calls[0] == ("dflt", 100)  # warm-up on the default
    assert sorted(c for c, r in calls if r == 50) == ["a", "b", "c"]
    n = len(calls)
    assert tuning.pick("k", ["a"], lambda c: c, default="dflt") == "b" and len(calls) == n  # cached
    assert tuning.pick("k2", ["bad"], lambda c: c, default="dflt") == "dflt"  # nothing launched: the default


def test_dependent_launch_rule(monkeypatch):
    """gemv16's programmatic dependent launch (read weights before waiting for the previous kernel) is used only
    from a weight's second call on, where the check passed, and never under the interpreter or with QTOOL_PDL=0."""
    from types import SimpleNamespace

    st = weight_only.prepare(int_qt(32, 256, 4, 128, True))
    x = SimpleNamespace(device=torch.device("cuda", 0))
    assert weight_only._pdl_for(st, x) == 0  # the interpreter
    monkeypatch.setattr(weight_only.tuning, "interpreting", lambda: False)
    monkeypatch.setitem(weight_only._PDL_OK, ("cuda", 0), True)
    assert [weight_only._pdl_for(st, x) for _ in range(3)] == [0, 1, 1]  # the first call plain
    assert weight_only._pdl_for(st.clone(), x) == 0  # a new weight (a copy) starts plain again
    monkeypatch.setitem(weight_only._PDL_OK, ("cuda", 0), False)
    assert weight_only._pdl_for(st, x) == 0  # the check failed on this device
    monkeypatch.setitem(weight_only._PDL_OK, ("cuda", 0), True)
    monkeypatch.setattr(weight_only, "PDL_DEFAULT", False)
    assert weight_only._pdl_for(st, x) == 0
    # the default configs: o's programs load their whole K range before the wait (KU x SPLIT_K = blocks), qkv's half
    c = weight_only._gemv16_default(4096, 4096, pdl=True)
    assert c["KU"] * c["SPLIT_K"] == 4096 // 128
    c = weight_only._gemv16_default(6144, 4096, pdl=True)
    assert 2 * c["KU"] * c["SPLIT_K"] == 4096 // 128
    # SUB (int4 codes as subnormals, session 16) in qkv's, o's and (session 19) down's tiles, not gate_up's 512 columns,
    # and off with QTOOL_SUB=0; on 132 SMs qkv's 192 32-column tiles walk the whole K range in two steps (session 19)
    assert c.get("SUB") and weight_only._gemv16_default(4096, 4096, pdl=True, sms=132) == dict(
        BN=32, SPLIT_K=1, KU=32, num_warps=8, REGX=True, SUB=True)
    assert weight_only._gemv16_default(6144, 4096, pdl=True, sms=132) == dict(BN=32, SPLIT_K=1, KU=16, num_warps=4, REGX=True, SUB=True)
    assert weight_only._gemv16_default(6144, 4096, pdl=True, sms=132, s19=False)["BN"] == 256  # bench row gemv16-s18
    assert not weight_only._gemv16_default(28672, 4096, pdl=True).get("SUB")
    assert weight_only._gemv16_default(4096, 14336, pdl=True).get("SUB")
    assert not weight_only._gemv16_default(4096, 14336, pdl=True, s19=False).get("SUB")
    assert not weight_only._gemv16_default(6144, 4096, pdl=True, s16=False).get("SUB")
    assert not weight_only._gemv16_default(6144, 4096, fp4=True, pdl=True).get("SUB")
    monkeypatch.setattr(weight_only, "SUB_DEFAULT", False)
    assert not weight_only._gemv16_default(6144, 4096, pdl=True).get("SUB")
