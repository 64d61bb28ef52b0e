"""The hostile-input corpus (tests/hostile/corpus.py) through the CLI, in-process.

Every malformed checkpoint, config or data file must end with exactly one `error:` line naming the
problem, exit code 2, no traceback, no output or temporary directory left behind, and nothing
written anywhere else (the case workspace, the model cache and the shared base checkpoints are
snapshotted before and after).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.hostile.corpus import EVIL_MARK, OWNER_FAILING, build_bases, cases

CASES = cases()


def _param(c):
    marks = [pytest.mark.xfail(strict=True, reason="owner fixing")] if c.id in OWNER_FAILING else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.fixture(scope="session")
def hostile_bases(tiny_models, tmp_path_factory):
    return build_bases(tmp_path_factory.mktemp("hostile-bases"), tiny_models("llama"))


def snapshot(*roots: Path) -> dict:
    """Every entry under the roots (not following links): type, size and modification time."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                seen[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def test_corpus_size_and_categories():
    counts = Counter(c.category for c in CASES)
    assert len(CASES) >= 200, len(CASES)
    assert len(counts) >= 8, counts


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_input(case, hostile_bases, cli, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("QTOOL_CACHE", str(cache))
    if case.owner and f"fmt:{case.owner}" not in hostile_bases:
        pytest.fail(f"no valid {case.owner} checkpoint to start from: {hostile_bases['failed'].get(case.owner)}")
    argv = case.build(ws, hostile_bases)
    out_existed = (ws / "out").exists()
    roots = (ws, cache, *(p for k, p in hostile_bases.items() if k != "failed"))
    before = snapshot(*roots)

    def hung(*_):
        raise TimeoutError(f"{case.id} hung (blocked on a FIFO?)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        r = cli(*argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

    lines = [l for l in r.err.splitlines() if l.strip() and not l.startswith("warning: --allow-pickle")]
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    line = lines[0].replace(str(ws), "WS")  # the workspace path holds the case id: match the rest
    assert case.needle in line, (case.needle, line)
    assert "internal error" not in lines[0]
    after = snapshot(*roots)
    assert out_existed or not (ws / "out").exists()
    assert not (ws / EVIL_MARK).exists(), "hostile code ran"
    assert before == after, sorted(set(before.items()) ^ set(after.items()))


def test_remote_code_in_a_valid_model_never_runs(cli, tiny_models, tmp_path):
    """A valid Llama whose config and tokenizer config point at a module of its own: qtool quantizes
    and evaluates it with transformers' built-in classes; the module is never imported."""
    import json
    import shutil

    m = tmp_path / "m"
    shutil.copytree(tiny_models("llama"), m)
    (m / "evil.py").write_text(f"from pathlib import Path\nPath({str(tmp_path / EVIL_MARK)!r}).write_text('ran')\n")
    for fname, auto in (("config.json", {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}), ("tokenizer_config.json", {"AutoTokenizer": ["evil.T", None]})):
        c = json.loads((m / fname).read_text())
        c["auto_map"] = auto
        (m / fname).write_text(json.dumps(c))
    r = cli("quantize", m, "--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--out", tmp_path / "o", "--samples", "1", "--seqlen", "32")
    assert r.code == 0, r.err
    r = cli("eval", tmp_path / "o", "--windows", "1")
    assert r.code == 0, r.err
    assert not (tmp_path / EVIL_MARK).exists(), "remote code ran without --trust-remote-code"


def test_allow_pickle_reads_weights_only_and_matches_safetensors(cli, tiny_models, tmp_path):
    """--allow-pickle: a .bin copy of a model quantizes to the same tensors as its safetensors, with a
    warning, and leaves no converted copy behind."""
    import hashlib
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tiny_models("llama")
    m = tmp_path / "m"
    shutil.copytree(src, m)
    torch.save(load_file(str(m / "model.safetensors")), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    args = ("--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--samples", "1", "--seqlen", "32")
    r = cli("quantize", m, *args, "--out", tmp_path / "refused")
    assert r.code == 2 and "pickle" in r.err
    r = cli("quantize", m, *args, "--out", tmp_path / "o", "--allow-pickle")
    assert r.code == 0, r.err
    assert r.err.startswith("warning: --allow-pickle") and "weights_only=True" in r.err
    assert cli("quantize", src, *args, "--out", tmp_path / "ref").code == 0
    sha = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("o", "ref")]
    assert sha[0] == sha[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "o", "ref"]  # the converted copy is gone
    meta = json.loads((tmp_path / "o" / "qtool.json").read_text())
    assert meta["source_path"] == str(m.resolve()) and meta["source_pickle"] is True
