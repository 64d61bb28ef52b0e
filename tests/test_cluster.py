"""runtime/kernels/cluster.py without a GPU: how gemv16 and dot4t / dot4f are launched when their split-K partials
are summed through a thread-block cluster (the kernels' own code runs only on Hopper: tests/test_kernels_cuda.py;
their SASS: tests/test_kernel_sm90.py). The launcher is replaced by a recorder, so nothing runs."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # importing the kernels defines them: under the interpreter

from qtensor import QTensor  # noqa: E402
from runtime.kernels import cluster, weight_only  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def rec(cache, key, fn, grid, args, consts, live=None, ctas=1, smem_extra=0):
        calls.append(dict(key=key, fn=fn, grid=grid, consts=consts() if callable(consts) else consts, ctas=ctas,
                          smem=smem_extra))

    monkeypatch.setattr(weight_only, "launch", rec)
    monkeypatch.setattr(weight_only, "_reduce", lambda *a, pdl=False: calls.append(("reduce", pdl)))
    return calls


def _int4(n=96, k=1024):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    return weight_only.prepare(QTensor("int", 4, codes, (torch.rand(n, k // 128, generator=g) + 0.5).half(), None, 128))


@pytest.mark.parametrize("sk,bn,clu", [(4, 32, True), (8, 64, True), (8, 256, True), (16, 256, False),
                                        (32, 64, False), (8, 4, False), (1, 32, False)])
def test_gemv16_cluster_launch(recorded, sk, bn, clu):
    """A split of 2 .. 8 (cluster.MAX) that divides the tile: one cluster of the tile's programs along grid axis 0 (one cluster per
    tile where the launcher counts clusters), the tile's BN fp32 partials as extra shared memory, CLU set, no counter
    sum and no second kernel; otherwise (split 1 or 32, a tile narrower than the split) the usual grid."""
    st, x = _int4(), torch.randn(1, 1024, dtype=torch.bfloat16)
    weight_only._launch_gemv16(x, st, dict(BN=bn, SPLIT_K=sk, KU=1), False, clu=True)
    c = recorded[0]
    tiles = -(-96 // bn)
    assert c["consts"]["CLU"] is clu and c["key"][-5] is clu  # (key: ..., clu, fp4q, sub, spk, maxnreg)
    if clu:
        assert c["grid"] == (cluster.grid_x(x.device, sk), tiles, 1) and c["ctas"] == sk and c["smem"] == bn * 4
        assert c["consts"]["FUSED_REDUCE"] is False and recorded[1:] == []
    else:
        assert c["grid"] == (1, tiles, sk) and c["ctas"] == 1 and c["smem"] == 0
        assert c["consts"]["FUSED_REDUCE"] is (sk > 1)


def test_gemv16_ablation_never_clusters(recorded):
    st, x = _int4(), torch.randn(1, 1024, dtype=torch.bfloat16)
    weight_only._launch_gemv16(x, st, dict(BN=32, SPLIT_K=4, KU=1), False, clu=True, abl=2)
    assert recorded[0]["ctas"] == 1 and recorded[0]["consts"]["CLU"] is False


@pytest.mark.parametrize("kind", ["dot4t", "dot4f"])
def test_dot4_cluster_launch(recorded, kind):
    """dot4t / dot4f: the [BN, BM] fp32 partial tile in shared memory, grid (splits, N tiles, M tiles), the output
    written by the kernel itself (no partials buffer, no _splitk_reduce); without clu the second kernel sums."""
    if kind == "dot4t":
        st = _int4()
    else:
        g = torch.Generator().manual_seed(1)
        st = weight_only.prepare(QTensor("e2m1", 4, torch.randint(0, 16, (96, 1024), generator=g, dtype=torch.uint8),
                                         (torch.rand(96, 64, generator=g) + 0.5).to(torch.float8_e4m3fn), None, 16,
                                         global_scale=torch.tensor(1.0)))
    x = torch.randn(5, 1024, dtype=torch.bfloat16)
    y = weight_only._launch_dot4(x, st, dict(BN=64, SPLIT_K=4), False, kind, clu=True)
    c = recorded[0]
    assert c["grid"] == (cluster.grid_x(x.device, 4), 2, 1) and c["ctas"] == 4 and c["smem"] == 64 * 16 * 4
    assert c["consts"]["CLU"] is True and c["consts"]["FUSED"] is False and recorded[1:] == []
    assert y.shape == (5, 96)
    recorded.clear()
    weight_only._launch_dot4(x, st, dict(BN=64, SPLIT_K=4), False, kind)
    assert recorded[0]["grid"] == (2, 4, 1) and recorded[0]["ctas"] == 1 and recorded[1:] == [("reduce", False)]
    assert recorded[0]["consts"]["TRIG"] is False  # no dependent launches under the interpreter


@pytest.mark.parametrize("kind", ["dot4", "dot4t", "dot4f"])
def test_split_k_sum_as_dependent_launch(recorded, kind):
    """rpdl: the first kernel triggers (TRIG) and the second kernel is a dependent launch (pdl); nothing to trigger
    without a split, with the cluster sum or with the sum in the kernel (fused)."""
    st = _int4() if kind != "dot4f" else weight_only.prepare(QTensor(
        "e2m1", 4, torch.randint(0, 16, (96, 1024), dtype=torch.uint8), torch.ones(96, 64).to(torch.float8_e4m3fn), None, 16,
        global_scale=torch.tensor(1.0)))
    x = torch.randn(5, 1024, dtype=torch.bfloat16)
    weight_only._launch_dot4(x, st, dict(BN=64, SPLIT_K=4), False, kind, rpdl=True)
    assert recorded[0]["consts"]["TRIG"] is True and recorded[1:] == [("reduce", True)]
    assert recorded[0]["key"][-2] is True  # (key: ..., trig, tma)
    cases = [(dict(BN=64, SPLIT_K=1), {}), (dict(BN=64, SPLIT_K=4), dict(fused=True))]
    if kind != "dot4":  # (dot4 has no cluster sum)
        cases.append((dict(BN=64, SPLIT_K=4), dict(clu=True)))
    for cfg, kw in cases:
        recorded.clear()
        weight_only._launch_dot4(x, st, cfg, False, kind, rpdl=True, **kw)
        assert recorded[0]["consts"]["TRIG"] is False and recorded[1:] == [], (cfg, kw)


def test_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    """The default path never asks for clusters here (CPU tensors, interpreter), even with the switch on."""
    monkeypatch.setattr(cluster, "ON", True)
    assert not cluster.ok(torch.device("cpu"))
    assert not weight_only._clu_for(torch.randn(1, 8))


def test_a_refused_cluster_launch_falls_back_to_the_global_sum(monkeypatch):
    """A cluster launch the driver refuses raises before anything runs: that call runs again with the global-memory
    sum, and later calls of that kernel, shape and config go there at once; other configs still try the cluster."""
    monkeypatch.setattr(weight_only, "_CLU_BAD", set())
    monkeypatch.setitem(weight_only._CLU_OK, "why", "")
    calls = []

    def f(cfg, clu):
        calls.append((cfg["BN"], clu))
        if clu and cfg["BN"] == 256:
            raise RuntimeError("Triton Error [CUDA]: cluster out of resources")
        return ("cluster" if clu else "global", cfg["BN"])

    what = ("dot4t", 96, 1024, 5)
    assert weight_only._clu_run(f, dict(BN=256, SPLIT_K=4), True, what) == ("global", 256)
    assert calls == [(256, True), (256, False)] and "cluster out of resources" in weight_only._CLU_OK["why"]
    calls.clear()
    assert weight_only._clu_run(f, dict(BN=256, SPLIT_K=4), True, what) == ("global", 256)
    assert weight_only._clu_run(f, dict(BN=64, SPLIT_K=4), True, what) == ("cluster", 64)
    assert weight_only._clu_run(f, dict(BN=64, SPLIT_K=4), False, what) == ("global", 64)
    assert calls == [(256, False), (64, True), (64, False)]
    with pytest.raises(ValueError):  # anything but a launch error is not swallowed
        weight_only._clu_run(lambda cfg, clu: (_ for _ in ()).throw(ValueError("bad")), dict(BN=8), True, what)


@pytest.mark.parametrize("path,pdl,rsum_on,want", [
    ("gemv16", 1, True, "second"),  # the default as a dependent launch: a dependent second kernel sums
    ("gemv16", 1, False, "cluster"),  # QTOOL_RSUM=0: session 16's cluster sum
    ("gemv16", 0, True, "cluster"),  # a plain launch (a weight's first call): the cluster
    ("gemv16-s16", 1, True, "cluster"),
    ("gemv16-rpdl", 1, False, "second"),
    ("gemv16-noclu", 1, True, "fused"),
])
def test_gemv16_split_k_sum_by_launch_kind(recorded, monkeypatch, path, pdl, rsum_on, want):
    """Which split-K sum matmul's gemv16 paths take (the launcher recorded, nothing runs): as a dependent launch the
    default hands its partials to a second kernel, itself a dependent launch (pdl); plainly launched it sums through
    the tile's cluster; -noclu in the kernel (the tile's last program)."""
    monkeypatch.setattr(weight_only, "_pdl_for", lambda st, x: pdl)
    monkeypatch.setattr(weight_only, "_clu_for", lambda x: True)
    monkeypatch.setattr(weight_only, "RSUM_DEFAULT", rsum_on)
    monkeypatch.setattr(weight_only.tuning, "pick", lambda key, configs, run, default: dict(BN=32, SPLIT_K=4, KU=1))
    st, x = _int4(), torch.randn(1, 1024, dtype=torch.bfloat16)
    weight_only.matmul(x, st, path)
    c = recorded[0]
    assert c["consts"]["PDL"] == pdl
    assert c["consts"]["CLU"] is (want == "cluster") and c["consts"]["FUSED_REDUCE"] is (want == "fused")
    assert recorded[1:] == ([("reduce", bool(pdl))] if want == "second" else [])
