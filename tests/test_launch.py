"""runtime/kernels/launch.py without a GPU: a stand-in JIT function and compiled kernel record what is launched.
The first launch of a key goes through the JIT; later ones call the compiled kernel with the argument list the JIT
itself passes (every parameter in signature order: the per-call ones, the constexprs, the defaults, the live ones
swapped in); hooks, QTOOL_FAST_LAUNCH=0 and no key keep the JIT path. On the GPU: tests/test_kernels_cuda.py."""

import os
import types

import pytest

# importing runtime.kernels defines the Triton kernels: under the interpreter, as tests/test_kernels.py needs them
# whichever of the two modules is imported first (Triton decides at definition)
os.environ.setdefault("TRITON_INTERPRET", "1")

from runtime.kernels import launch  # noqa: E402


def kern(x_ptr, out_ptr, n, BLOCK, FLAG=False, res_ptr=None, OTHER=3):  # the stand-in kernel's signature
    pass


class Compiled:
    packed_metadata = "meta"
    function = "fn-handle"

    def __init__(self):
        self.runs = []

    def run(self, *a):
        self.runs.append(a)


class Jit:
    def __init__(self):
        self.fn = kern
        self.calls = []
        self.compiled = Compiled()

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.compiled
        return call

    def warmup(self, *args, grid, **kwargs):  # compiles only
        self.calls.append(("warmup", grid, args, kwargs))
        return self.compiled


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(launch, "_stream", lambda index: f"stream{index}")
    monkeypatch.setattr(launch, "ON", True)
    hooks = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "_knobs", lambda: hooks)
    return hooks


class T:  # a tensor stand-in: launch only reads .device.index of the first argument
    def __init__(self, name):
        self.name, self.device = name, types.SimpleNamespace(index=0)

    def __repr__(self):
        return self.name


def test_first_launch_through_the_jit_then_direct(no_gpu):
    jit, cache = Jit(), {}
    built = []

    def consts():
        built.append(1)
        return dict(BLOCK=64, FLAG=True, num_warps=4)

    x0, o0, r0 = T("x0"), T("o0"), T("r0")
    launch.launch(cache, "k", jit, (5, 2), (x0, o0, 7), consts, live=dict(res_ptr=r0))
    assert jit.calls == [((5, 2), (x0, o0, 7), dict(BLOCK=64, FLAG=True, num_warps=4, res_ptr=r0))]
    assert jit.compiled.runs == [] and built == [1]
    x1, o1, r1 = T("x1"), T("o1"), T("r1")
    launch.launch(cache, "k", jit, (5, 2), (x1, o1, 9), consts, live=dict(res_ptr=r1))
    assert len(jit.calls) == 1 and built == [1]  # no JIT, no constexprs built
    # grid padded to three, the current stream, the kernel's handle and metadata, no hooks, then every parameter
    assert jit.compiled.runs == [(5, 2, 1, "stream0", "fn-handle", "meta", None, None, None, x1, o1, 9, 64, True, r1, 3)]


def test_other_keys_hooks_and_off_take_the_jit_path(no_gpu, monkeypatch):
    jit, cache = Jit(), {}
    args = (T("x"), T("o"), 1)
    launch.launch(cache, "a", jit, (1,), args, dict(BLOCK=32))
    launch.launch(cache, "b", jit, (1,), args, dict(BLOCK=64))  # a new key compiles / binds again
    assert len(jit.calls) == 2 and set(cache) == {(0, "a"), (0, "b")}
    launch.launch(cache, "a", jit, (1,), args, dict(BLOCK=32))
    assert len(jit.calls) == 2 and jit.compiled.runs[-1][:3] == (1, 1, 1)
    no_gpu.launch_enter_hook = types.SimpleNamespace(calls=[print])  # a profiler's hook: the JIT calls it
    launch.launch(cache, "a", jit, (1,), args, dict(BLOCK=32))
    assert len(jit.calls) == 3
    no_gpu.launch_enter_hook = types.SimpleNamespace(calls=[])  # an empty HookChain (newer Triton) is no hook
    launch.launch(cache, "a", jit, (1,), args, dict(BLOCK=32))
    assert len(jit.calls) == 3
    monkeypatch.setattr(launch, "ON", False)
    launch.launch(cache, "a", jit, (1,), args, dict(BLOCK=32))
    assert len(jit.calls) == 4
    launch.launch(cache, None, jit, (1,), args, dict(BLOCK=32))  # no key: never kept
    assert (0, None) not in cache


def test_keys_are_per_device(no_gpu):
    """A compiled kernel is loaded on one device: the same key on another device goes through the JIT."""
    jit, cache = Jit(), {}
    x1 = T("x1")
    x1.device = types.SimpleNamespace(index=1)
    launch.launch(cache, "k", jit, (1,), (T("x0"), T("o"), 1), dict(BLOCK=32))
    launch.launch(cache, "k", jit, (1,), (x1, T("o"), 1), dict(BLOCK=32))
    assert len(jit.calls) == 2 and set(cache) == {(0, "k"), (1, "k")}
    launch.launch(cache, "k", jit, (1,), (x1, T("o"), 1), dict(BLOCK=32))
    assert len(jit.calls) == 2 and jit.compiled.runs[-1][3] == "stream1"


def test_a_kernel_without_a_compiled_object_is_not_kept(no_gpu):
    """Under the interpreter fn[grid](...) returns no CompiledKernel: every launch goes through it."""
    jit, cache = Jit(), {}
    jit.compiled = None
    for _ in range(2):
        launch.launch(cache, "k", jit, (1,), (T("x"), T("o"), 1), dict(BLOCK=32))
    assert len(jit.calls) == 2 and cache == {}


def test_a_parameter_left_unset_is_not_kept(no_gpu):
    """BLOCK has no default: a call that does not set it is left to the JIT (which reports the error)."""
    jit, cache = Jit(), {}
    launch.launch(cache, "k", jit, (1,), (T("x"), T("o"), 1), dict(FLAG=True))
    assert cache == {}


def test_cluster_launch_compiles_then_launches_directly_with_the_cluster_in_the_metadata(no_gpu):
    """ctas > 1 (cluster.py): the first call only compiles (JITFunction.warmup: the JIT cannot launch clusters), and
    every call, the first included, launches the compiled kernel with (num_warps, cluster size, shared + extra);
    launch hooks do not send it back through the JIT."""
    jit, cache = Jit(), {}
    jit.compiled.packed_metadata = (4, 1, 2048)
    args = (T("x"), T("o"), 1)
    launch.launch(cache, "c", jit, (1, 3, 1), args, dict(BLOCK=32, num_warps=4), ctas=8, smem_extra=1024)
    assert jit.calls == [("warmup", (1, 3, 1), args, dict(BLOCK=32, num_warps=4))]
    assert jit.compiled.runs == [(1, 3, 1, "stream0", "fn-handle", (4, 8, 3072), None, None, None, *args, 32, False, None, 3)]
    no_gpu.launch_enter_hook = types.SimpleNamespace(calls=[print])
    launch.launch(cache, "c", jit, (1, 3, 1), args, dict(BLOCK=32, num_warps=4), ctas=8, smem_extra=1024)
    assert len(jit.calls) == 1 and len(jit.compiled.runs) == 2 and jit.compiled.runs[1][5] == (4, 8, 3072)
    jit.compiled.packed_metadata = (4, 1, 2048, 1, 1, 1)  # older Triton: cluster dims after the shared size
    launch.launch(cache, "d", jit, (1,), args, dict(BLOCK=32), ctas=2, smem_extra=16)
    assert jit.compiled.runs[-1][5] == (4, 2, 2064, 2, 1, 1)
