import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import logging  # noqa: E402

logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


from calibrate.backends.common import pydantic_base_models, restore_pydantic  # noqa: E402

try:
    _PYDANTIC = pydantic_base_models()
except ImportError:  # the GPU machine's bare environment (tests/test_kernels_cuda.py): nothing to restore
    _PYDANTIC = None


@pytest.fixture(autouse=True)
def _pydantic_unpatched():
    """Tests that import msModelSlim directly (it replaces pydantic.BaseModel process-wide on import) must
    not break the ModelOpt tests that run after them in this process."""
    yield
    if _PYDANTIC is not None:
        restore_pydantic(_PYDANTIC)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: directory} of tiny random models, built once per session."""
    from calibrate.tiny import make_tiny_model

    base = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_model(arch, base / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def gemma_dir():
    from calibrate.models import ensure_builtin

    return ensure_builtin("gemma-3-270m")


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `qtool ARGS` in-process; returns exit code, stdout, stderr."""
    from quantize_cli.app import main

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        c = capsys.readouterr()
        return CliResult(code, c.out, c.err)

    return run
