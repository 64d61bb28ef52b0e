"""exporters.io: the streaming shard writer (in-kernel append and its fallback give the same bytes, which
safetensors' own loader reads back) and TensorFile's positional reads from several threads at once."""

import filecmp
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file

from exporters import io
from exporters.base import prefetch


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(1000 + i, 37, generator=g).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16] * 3)}


def test_shards_read_back_by_safetensors_and_fallback_is_byte_identical(tmp_path, monkeypatch):
    ts = _tensors()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    names = io.write_shards(a, iter(ts.items()), max_bytes=300_000)
    assert len(names) > 1 and (a / "model.safetensors.index.json").is_file()
    got = {}
    for n in names:
        got.update(load_file(a / n))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], v) for k, v in ts.items())

    def refuse(*_):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert io.write_shards(b, iter(ts.items()), max_bytes=300_000) == names
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    assert not list(a.glob("*.data")) and not list(b.glob("*.data"))


def test_tensor_file_threads_read_their_own_tensors(tmp_path):
    ts = _tensors()
    io.write_shards(tmp_path, iter(ts.items()))
    tf = io.TensorFile(tmp_path / "model.safetensors")
    with ThreadPoolExecutor(6) as pool:
        for _ in range(5):
            got = dict(zip(ts, pool.map(tf.get, list(ts))))
            assert all(torch.equal(got[k], v) for k, v in ts.items())


def test_prefetch_keeps_order_and_raises_at_the_failing_key():
    seen = []

    def f(k):
        if k == 5:
            raise ValueError("five")
        return k * k

    out = []
    try:
        for k, v in prefetch(f, list(range(10)), 4):
            out.append((k, v))
    except ValueError as e:
        seen.append(str(e))
    assert out == [(k, k * k) for k in range(5)] and seen == ["five"]
    assert list(prefetch(f, [1, 2, 3], 1)) == [(1, 1), (2, 4), (3, 9)]
