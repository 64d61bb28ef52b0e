"""Kernels in a model on the GPU (skipped without CUDA; runs on the GPU machine): the M = 1 GEMV launched as a
programmatic dependent launch gives the same logits, bit for bit, as plain launches, in a small Llama decoder whose
linears are int4 QuantLinears, with norms, attention and other GEMVs (q, k, v back to back) interleaved."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")


@torch.inference_mode()
def test_dependent_launch_decode_matches_plain_launches():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtensor import QTensor
    from runtime.kernels import weight_only
    from runtime.qlinear import QuantLinear

    if not weight_only._pdl_ok(torch.device("cuda")):
        pytest.skip(f"no dependent launches here: {weight_only._PDL_OK.get('why')}")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=1000, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    n, k = lin.weight.shape
                    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
                    scales = (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.002).half()
                    setattr(parent, name, QuantLinear(QTensor("int", 4, codes, scales, None, 128)))

    def decode():
        ids = torch.randint(0, 1000, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        res = model(ids, use_cache=True)
        logits = []
        for _ in range(8):
            nxt = res.logits[:, -1:].argmax(-1)
            res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
            logits.append(res.logits[:, -1].float())
        return torch.stack(logits)

    old = weight_only.PDL_DEFAULT
    try:
        weight_only.PDL_DEFAULT = False
        plain = decode()
        weight_only.PDL_DEFAULT = True
        dep = decode()  # every weight has had its first (plain) call: these are dependent launches
        st = model.model.layers[0].self_attn.q_proj._kernel_prep.state
        assert getattr(st, "_pdl_ready", False)
    finally:
        weight_only.PDL_DEFAULT = old
    assert torch.isfinite(plain).all()
    assert torch.equal(plain, dep)


@torch.inference_mode()
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("zero", [False, True])
def test_direct_relaunch_matches_the_jit_launch(m, zero, monkeypatch):
    """runtime/kernels/launch.py: after a key's first launch the compiled kernel is launched directly. The same
    outputs bit for bit as launches through Triton's JIT, for x contiguous, a row-strided view and a view whose
    data pointer is not 16-byte aligned (each a key of its own, but a single row's stride, which reshape may
    rewrite, is none), and the direct path is the one taken."""
    from qtensor import QTensor
    from runtime.kernels import launch, weight_only

    torch.manual_seed(0)
    n, k = 384, 1024
    codes = torch.randint(0 if zero else -8, 16 if zero else 8, (n, k), device="cuda").to(torch.uint8 if zero else torch.int8)
    zeros = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda") if zero else None
    st = weight_only.prepare(QTensor("int", 4, codes, (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.002).half(), zeros, 128))
    big = torch.randn(m, 2 * k + 8, device="cuda", dtype=torch.bfloat16)
    xs = {"contiguous": big[:, :k].contiguous(), "row-strided": big[:, :k], "unaligned": big[:, 1:k + 1]}

    class Counting:  # the JIT kernel, counting launches through Triton's binding
        def __init__(self, f):
            self.f, self.fn, self.n = f, f.fn, 0

        def __getitem__(self, grid):
            self.n += 1
            return self.f[grid]

    monkeypatch.setattr(weight_only, "_clu_for", lambda x: False)  # cluster launches are always direct (next test)
    jit = {name: Counting(getattr(weight_only, name)) for name in ("_wo_gemv16_kernel", "_wo_dot4t_kernel")}
    for name, c in jit.items():
        monkeypatch.setattr(weight_only, name, c)
    seen = set()  # (row stride, alignment) of the [M, K] view the kernels get: a single row's stride is any
    for name, x in xs.items():
        monkeypatch.setattr(launch, "ON", False)
        ref = [weight_only.matmul(x, st) for _ in range(2)]
        monkeypatch.setattr(launch, "ON", True)
        keys = len(weight_only._launches(st))
        first = weight_only.matmul(x, st)  # through the JIT (a new key), the compiled kernel kept
        x2 = x.reshape(-1, k)
        new = (x2.stride(0), x2.data_ptr() % 16) not in seen
        seen.add((x2.stride(0), x2.data_ptr() % 16))
        assert len(weight_only._launches(st)) == keys + int(new), name
        through_jit = sum(c.n for c in jit.values())
        again = [weight_only.matmul(x, st) for _ in range(3)]  # direct
        assert sum(c.n for c in jit.values()) == through_jit, name
        for y in [first] + again:
            assert torch.equal(y, ref[-1]), name


def _replays_equal(fn) -> None:
    """fn() captured in a CUDA graph and replayed gives what an eager call gives, bit for bit."""
    y0 = fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


def _random_qt(wtype: str, n: int, k: int):
    """A random CUDA weight: int4 g128 sym ("int4") or asym ("int4-asym"), or NVFP4 ("nvfp4") with e4m3 scales from
    0.01 to 400 (N not a multiple of the kernels' tiles at n = 1000)."""
    from qtensor import QTensor

    if wtype == "nvfp4":
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        bs = (torch.rand(n, k // 16, device="cuda") * 400 + 0.01).to(torch.float8_e4m3fn)
        return QTensor("e2m1", 4, codes, bs, None, 16, global_scale=torch.tensor(3e-3, device="cuda"))
    zero = wtype == "int4-asym"
    codes = torch.randint(0 if zero else -8, 16 if zero else 8, (n, k), device="cuda").to(torch.uint8 if zero else torch.int8)
    zeros = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda") if zero else None
    return QTensor("int", 4, codes, (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.002).half(), zeros, 128)


@torch.inference_mode()
@pytest.mark.parametrize("wtype", ["int4", "int4-asym", "nvfp4"])
def test_cluster_split_k_sum_matches_the_global_sum(wtype, monkeypatch):
    """runtime/kernels/cluster.py: split-K partials summed through the tile's cluster (distributed shared memory)
    give the global-memory sums bit for bit (the same fp32 additions in the same order): gemv16 at M = 1 for splits
    2 .. 8 and tiles of 32 .. 512 columns, plain and as dependent launches, eagerly and replayed from a CUDA graph;
    dot4t (int4) / dot4f (NVFP4) at M = 4 and 16 against their two-kernel sum; N not a multiple of the tile."""
    from runtime.kernels import cluster, weight_only

    monkeypatch.setattr(cluster, "ON", True)  # (whatever QTOOL_CLUSTER says)
    dev = torch.device("cuda")
    if not weight_only._clu_ok(dev):
        pytest.skip(f"no cluster sums here: {weight_only._CLU_OK.get('why')} / {cluster.WHY}")
    torch.manual_seed(0)
    n, k = 1000, 2048
    qt = _random_qt(wtype, n, k)
    st = weight_only.prepare(qt)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for bn, sk, ku in [(32, 2, 2), (64, 4, 1), (128, 8, 1), (256, 8, 2), (512, 8, 1), (256, 16, 1)]:
        cfg = dict(BN=bn, SPLIT_K=sk, KU=ku)
        for pdl in (0, 1):
            ref = weight_only._launch_gemv16(x, st, cfg, True, pdl=pdl)
            got = weight_only._launch_gemv16(x, st, cfg, True, pdl=pdl, clu=True)
            assert torch.equal(got, ref), (bn, sk, ku, pdl)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gy = weight_only._launch_gemv16(x, st, cfg, True, pdl=1, clu=True)
        for _ in range(3):
            x.normal_()
            g.replay()
            assert torch.equal(gy, weight_only._launch_gemv16(x, st, cfg, True)), (bn, sk, ku, "graph")
    kind = "dot4f" if wtype == "nvfp4" else "dot4t"
    for m in (4, 16):
        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for bn, sk in [(64, 4), (128, 8), (128, 2)] + ([(32, 8)] if kind == "dot4f" else [(256, 2)]):
            cfg = dict(BN=bn, SPLIT_K=sk, num_warps=2 if bn == 32 else 4)
            ref = weight_only._launch_dot4(xm, st, cfg, kind=kind)
            got = weight_only._launch_dot4(xm, st, cfg, kind=kind, clu=True)
            assert torch.equal(got, ref), (kind, m, bn, sk)
    # with the switch on, the default path takes the cluster where it can
    assert weight_only._clu_for(x)


@torch.inference_mode()
@pytest.mark.parametrize("wtype", ["int4", "int4-asym", "nvfp4"])
def test_split_k_sum_as_dependent_launch(wtype):
    """The M <= 16 tensor-core kernels (dot4, dot4t; dot4f for NVFP4) with their split-K sum launched as a
    programmatic dependent (triggered at the first kernel's start, waiting for its writes): the plain launch's
    outputs bit for bit, eagerly and replayed from a CUDA graph with new x each time; and the partials are summed
    (the dependent kernel ran) against the fp32 reference. gemv16 (M = 1) likewise against its in-kernel sum."""
    from runtime.kernels import weight_only

    dev = torch.device("cuda")
    if not weight_only._pdl_ok(dev):
        pytest.skip(f"no dependent launches here: {weight_only._PDL_OK.get('why')}")
    torch.manual_seed(0)
    n, k = 1000, 2048
    qt = _random_qt(wtype, n, k)
    st = weight_only.prepare(qt)
    w = qt.dequantize(torch.float32).to("cuda")
    for kind in (("dot4f",) if wtype == "nvfp4" else ("dot4", "dot4t")):
        for m in (4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for bn, sk in [(64, 4), (128, 8), (128, 2)]:
                cfg = dict(BN=bn, SPLIT_K=sk)
                ref = weight_only._launch_dot4(x, st, cfg, kind=kind, rpdl=False)
                got = weight_only._launch_dot4(x, st, cfg, kind=kind, rpdl=True)
                assert torch.equal(got, ref), (kind, m, bn, sk)
                exact = x.float() @ w.t()
                assert float((got.float() - exact).abs().max()) < 8e-3 * float(exact.abs().max()), (kind, m, bn, sk)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                gy = weight_only._launch_dot4(x, st, dict(BN=128, SPLIT_K=8), kind=kind, rpdl=True)
            for _ in range(3):
                x.normal_()
                g.replay()
                assert torch.equal(gy, weight_only._launch_dot4(x, st, dict(BN=128, SPLIT_K=8), kind=kind, rpdl=False)), (kind, m)
    # gemv16 (M = 1) as a dependent launch handing its partials to the dependent second kernel (the default where
    # gemv16 launches dependently): the in-kernel sum's output bit for bit (the same fp32 additions in the same order)
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for bn, sk in [(64, 4), (128, 8), (256, 16)]:
        cfg = dict(BN=bn, SPLIT_K=sk, KU=1)
        ref = weight_only._launch_gemv16(x1, st, cfg, True)
        got = weight_only._launch_gemv16(x1, st, cfg, True, fused=False, pdl=1)
        assert torch.equal(got, ref), ("gemv16", bn, sk)
    assert weight_only._pdl_dev(torch.empty(1, device="cuda"))  # the default launches them so here


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["int8", "int8-static-asym", "fp8-block", "fp8-token"])
def test_direct_relaunch_w8a8(kind, monkeypatch):
    """The activation quantizer and the Triton scaled GEMM relaunched directly: the same outputs bit for bit as
    launches through Triton's JIT, for M = 1 and 16, x contiguous and x a view whose pointer is not 16-byte aligned."""
    from qtensor import ActQuant, QTensor
    from runtime.kernels import launch, w8a8

    torch.manual_seed(0)
    n, k = 256, 512
    if kind.startswith("int8"):
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        scales = torch.rand(n, 1, device="cuda") * 1e-3 + 1e-4
        act = (ActQuant("static", "int8", "tensor", scale=torch.tensor([0.02], device="cuda"), offset=torch.tensor([3.0], device="cuda"))
               if kind == "int8-static-asym" else ActQuant("dynamic", "int8", "token"))
        qt = QTensor("int", 8, codes, scales, None, -1, act=act)
    else:
        codes = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        if kind == "fp8-block":
            qt = QTensor("fp8_e4m3", 8, codes, torch.rand(n // 128, k // 128, device="cuda") * 1e-4 + 1e-5, None, 128,
                         block=(128, 128), act=ActQuant("dynamic", "fp8_e4m3", "group", group_size=128))
        else:
            qt = QTensor("fp8_e4m3", 8, codes, torch.rand(n, 1, device="cuda") * 1e-4 + 1e-5, None, -1,
                         act=ActQuant("dynamic", "fp8_e4m3", "token"))
    st = w8a8.prepare(qt)
    assert st is not None
    for m in (1, 16):
        big = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)
        for name, x in (("contiguous", big[:, :k].contiguous()), ("unaligned", big[:, 1:k + 1])):
            monkeypatch.setattr(launch, "ON", False)
            ref = w8a8.matmul(x, st)
            monkeypatch.setattr(launch, "ON", True)
            ys = [w8a8.matmul(x, st) for _ in range(3)]  # the first through the JIT, then direct
            for y in ys:
                assert torch.equal(y, ref), (kind, m, name)


@torch.inference_mode()
def test_nvfp4_pair_summed_word_sum():
    """gemv16-fp4q (the NVFP4 word pairs summed before their scale, _FP4Q_ASM) against the plain-Triton gemv16
    (fp32 products) and the default PTX sum: within the same fp16 rounding, at the default tiles and a split-K one."""
    from qtensor import QTensor
    from runtime.kernels import weight_only

    torch.manual_seed(0)
    n, k = 1000, 4096
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    bs = (torch.rand(n, k // 16, device="cuda") * 400 + 0.01).to(torch.float8_e4m3fn)
    st = weight_only.prepare(QTensor("e2m1", 4, codes, bs, None, 16, global_scale=torch.tensor(3e-3, device="cuda")))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for cfg in (dict(BN=128, SPLIT_K=8, KU=1), dict(BN=256, SPLIT_K=1, KU=2)):
        plain = weight_only._launch_gemv16(x, st, cfg, False).float()
        ptx = weight_only._launch_gemv16(x, st, cfg, True).float()
        q = weight_only._launch_gemv16(x, st, cfg, True, fp4q=True).float()
        scale = plain.abs().max()
        # (bf16 outputs: one unit in the last place of the largest is up to 2^-7 of it; H100: 2.0 at 498)
        assert (q - plain).abs().max() <= 8e-3 * scale, cfg
        assert (q - ptx).abs().max() <= 8e-3 * scale, cfg
    y = weight_only.matmul(x, st, "gemv16-fp4q").float()
    assert (y - weight_only.matmul(x, st, "gemv16").float()).abs().max() <= 8e-3 * y.abs().max()


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_int4_subnormal_decode(sym, act_order):
    """gemv16-sub (int4 codes as fp16 subnormals, _H2S_ASM, the zero point per block after) against the plain-Triton
    SUB twin (fp32 products), the default PTX sum and the fp32 reference, through the scratch row and REGX, with a
    split-K sum and without, and with x spanning several orders of magnitude (subnormal products)."""
    from qtensor import QTensor
    from runtime.kernels import weight_only

    torch.manual_seed(0)
    n, k = 1000, 4096
    codes = torch.randint(-8 if sym else 0, 8 if sym else 16, (n, k), device="cuda").to(torch.int8 if sym else torch.uint8)
    s = (torch.rand(n, k // 128, device="cuda") * 0.02 + 1e-3).half()
    z = None if sym else torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda")
    g = (torch.randperm(k, device="cuda") // 128).to(torch.int32) if act_order else None
    qt = QTensor("int", 4, codes, s, z, 128, g_idx=g)
    st = weight_only.prepare(qt)
    ref_w = qt.dequantize(torch.float32)
    for x in (torch.randn(1, k, device="cuda", dtype=torch.bfloat16),
              (torch.randn(1, k, device="cuda") * torch.logspace(-4, 2, k, device="cuda")).to(torch.bfloat16)):
        ref = x.float() @ ref_w.t()
        scale = ref.abs().max()
        for cfg in (dict(BN=256, SPLIT_K=8, KU=2), dict(BN=32, SPLIT_K=1, KU=32, num_warps=8, REGX=True),
                    dict(BN=32, SPLIT_K=1, KU=16, num_warps=4, REGX=True)):  # (o's default; qkv's since session 19)
            plain = weight_only._launch_gemv16(x, st, cfg, False, sub=True).float()
            sub = weight_only._launch_gemv16(x, st, cfg, True, sub=True).float()
            ptx = weight_only._launch_gemv16(x, st, cfg, True).float()
            # (bf16 outputs: one unit in the last place of the largest is 2^-8 of it)
            assert (sub - plain).abs().max() <= 8e-3 * scale, cfg
            assert (sub - ptx).abs().max() <= 8e-3 * scale, cfg
            assert (sub - ref).abs().max() <= 1e-2 * scale, cfg
    y = weight_only.matmul(x, st, "gemv16-sub").float()
    assert (y - ref).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("wtype", ["int4", "int4-asym"])
@pytest.mark.parametrize("m", [2, 16])
def test_tma_word_tiles_match_pointer_loads(wtype, m):
    """dot4 with its word tiles read by TMA (the M <= 16 default on sm_90+, session 18): bit for bit dot4 with pointer
    loads, eagerly and from a CUDA graph (N = 1000: the last tile's rows past N read as zeros by the TMA unit)."""
    from runtime import kernels
    from runtime.kernels import weight_only

    st = kernels.prepare(_random_qt(wtype, 1000, 1024)).state
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability()[0] < 9:
        assert not weight_only._tma_ok(st, x)
        return
    assert weight_only._tma_ok(st, x)
    cfg = weight_only._dot4t_default(st.n, st.k, m)
    ref = weight_only._launch_dot4(x, st, cfg, kind="dot4")
    assert torch.equal(weight_only._launch_dot4(x, st, cfg, kind="dot4", tma=True), ref)
    assert torch.equal(weight_only.matmul(x, st), ref)  # the default path
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = weight_only.matmul(x, st)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("n", [1000, 4096])
def test_nvfp4_packed_scales_match_byte_loads(n):
    """gemv16 on NVFP4 with the block scales packed (SPK, the default since session 18): bit for bit the byte loads."""
    from runtime import kernels
    from runtime.kernels import weight_only

    st = kernels.prepare(_random_qt("nvfp4", n, 4096)).state
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = weight_only._gemv16_default(st.n, st.k, True)
    assert cfg.get("SPK") is True
    a = weight_only._launch_gemv16(x, st, cfg, True)
    b = weight_only._launch_gemv16(x, st, dict(cfg, SPK=False), True)
    assert torch.equal(a, b)


@torch.inference_mode()
@pytest.mark.parametrize("wtype", ["int4", "int4-asym"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma16_matches_reference(wtype, m, dtype):
    """mma16 (Gluon: the repacked words loaded straight into mma.sync's operand registers) against x @ the dequantized
    weight in fp32, at split-K 1 .. 8 (3: a short last split) and tiles of 64 .. 256 columns on 2 .. 8 warps, x from L1 or
    staged in shared memory (XS), one or two blocks ahead, weights the left operand (WA) or the right, the offset off
    through x's row sums (BIAS) or per pair; a CUDA graph replays it."""
    from runtime import kernels
    from runtime.kernels import mma16, weight_only

    qt = _random_qt(wtype, 1024, 2048)
    st = kernels.prepare(qt).state
    x = torch.randn(m, 2048, device="cuda", dtype=dtype)
    ref = x.float() @ qt.dequantize(torch.float32).t()
    scale = ref.abs().max().item()
    for cfg in (dict(BN=128, SPLIT_K=8, NW=4), dict(BN=256, SPLIT_K=2, NW=8), dict(BN=64, SPLIT_K=1, NW=2),
                dict(BN=128, SPLIT_K=4, NW=4, XS=True, PF=2, EVF=True), dict(BN=64, SPLIT_K=3, NW=2, XS=True),
                dict(BN=128, SPLIT_K=8, NW=4, WA=True), dict(BN=256, SPLIT_K=2, NW=8, WA=True, XS=True, PF=2),
                dict(BN=128, SPLIT_K=4, NW=4, XS=True, BIAS=True), dict(BN=128, SPLIT_K=8, NW=4, WA=True, XS=True, BIAS=True),
                mma16.default_config(st.n, st.k)):
        y = mma16.matmul(x, st, cfg)
        assert y.dtype == dtype and y.shape == (m, 1024)
        assert (y.float() - ref).abs().max().item() <= 1e-2 * scale, cfg
    _replays_equal(lambda: weight_only.matmul(x, st, "mma16"))


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gv16s_matches_reference(dtype):
    """gv16s (Gluon, M = 1: the words staged in shared memory by cp.async) against x @ the dequantized weight in fp32:
    whole K and split-K (3: a split of 6 blocks, not a power of two; 4), 32 and 64 columns, 4 and 8 warps, one to
    eight blocks a copy group, evict-first; as a dependent launch bit for bit the plain launch; a CUDA graph replays it;
    what it refuses."""
    from runtime import kernels
    from runtime.kernels import gv16s, weight_only

    qt = _random_qt("int4", 1024, 2304)
    st = kernels.prepare(qt).state
    x = torch.randn(1, 2304, device="cuda", dtype=dtype)
    ref = x.float() @ qt.dequantize(torch.float32).t()
    scale = ref.abs().max().item()
    base = gv16s.matmul(x, st, None, pdl=0)
    for cfg in (dict(BN=32, NW=8, SPLIT_K=1, CH=4), dict(BN=32, NW=8, SPLIT_K=3, CH=2), dict(BN=64, NW=8, SPLIT_K=1, CH=8),
                dict(BN=32, NW=4, SPLIT_K=2, CH=1, EVF=True), dict(BN=64, NW=4, SPLIT_K=9, CH=2), gv16s.default_config(st.n, st.k)):
        y = gv16s.matmul(x, st, cfg, pdl=0)
        assert y.dtype == dtype and y.shape == (1, 1024)
        assert (y.float() - ref).abs().max().item() <= 1e-2 * scale, cfg
        if weight_only._pdl_dev(x):
            assert torch.equal(gv16s.matmul(x, st, cfg, pdl=1), y), cfg
    assert torch.equal(weight_only.matmul(x, st, "gv16s"), base)
    _replays_equal(lambda: weight_only.matmul(x, st, "gv16s"))
    assert "symmetric" in gv16s.fits(kernels.prepare(_random_qt("int4-asym", 256, 1024)).state, x[:, :1024])
    # NVFP4 (its e4m3 block scales packed, gemv16's FP4 decode), whole K and split
    fq = _random_qt("nvfp4", 1024, 2304)
    fst = kernels.prepare(fq).state
    fref = x.float() @ fq.dequantize(torch.float32).t()
    for cfg in (dict(BN=32, NW=8, SPLIT_K=1, CH=4), dict(BN=32, NW=8, SPLIT_K=3, CH=2)):
        y = gv16s.matmul(x, fst, cfg, pdl=0)
        assert (y.float() - fref).abs().max().item() <= 1e-2 * fref.abs().max().item(), cfg
    with pytest.raises(ValueError, match="gv16s"):
        gv16s.matmul(torch.randn(2, 2304, device="cuda", dtype=dtype), st)
