"""What the library backends share: option parsing, quiet library calls, temp work directories, tensors."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from qtensor.errors import QtoolError


def pydantic_base_models() -> dict:
    """{module name: its BaseModel} of the loaded pydantic modules (see keep_pydantic); pydantic itself is
    imported first, so the snapshot holds the real class even if nothing had loaded pydantic yet."""
    import pydantic  # noqa: F401
    import pydantic.main  # noqa: F401

    return {n: m.BaseModel for n, m in list(sys.modules.items()) if n.startswith("pydantic") and hasattr(m, "BaseModel")}


def restore_pydantic(saved: dict) -> None:
    """Put pydantic's BaseModel classes back where a library replaced them process-wide."""
    import pydantic

    default = saved.get("pydantic", pydantic.BaseModel)
    for n, m in list(sys.modules.items()):
        if n.startswith("pydantic") and hasattr(m, "BaseModel"):
            m.BaseModel = saved.get(n, default)


@contextlib.contextmanager
def keep_pydantic():
    """msModelSlim replaces pydantic.BaseModel process-wide when imported (msmodelslim/utils/patch/pydantic.py:
    extra='forbid' and its own error type), which breaks every pydantic model defined afterwards, ModelOpt's
    configs included. Import it inside this block: its classes keep the patch, the rest of the process not."""
    saved = pydantic_base_models()
    try:
        yield
    finally:
        restore_pydantic(saved)


def take_options(backend: str, options: dict, known: dict) -> dict:
    """`--option KEY=VALUE` strings (or typed values from the API) -> typed values; unknown keys are an error.

    `known` maps each key to its default; the default's type converts the value (bool accepts
    true/false/1/0/yes/no)."""
    bad = sorted(set(options) - set(known))
    if bad:
        raise QtoolError(f"backend {backend} does not take option(s) {', '.join(bad)} (it takes: {', '.join(sorted(known))})")
    out = dict(known)
    for k, v in options.items():
        d = known[k]
        try:
            if isinstance(d, bool):
                if isinstance(v, str):
                    if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(v)
                    v = v.lower() in ("true", "1", "yes")
                out[k] = bool(v)
            elif isinstance(d, int):
                out[k] = int(v)
            elif isinstance(d, float):
                out[k] = float(v)
            else:
                out[k] = v if d is None or isinstance(v, type(d)) else type(d)(v)
        except (TypeError, ValueError):
            raise QtoolError(f"backend {backend}: option {k}={v!r} is not a valid {type(d).__name__}") from None
    return out


@contextlib.contextmanager
def quiet_stdout():
    """Libraries print to stdout; `--json` owns stdout, so their chatter goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def work_dir(prefix: str):
    """A temporary directory that is also the working directory (for libraries that write ./logs)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(old)


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def library_error(lib: str, version: str, what: str, e: BaseException) -> QtoolError:
    return QtoolError(f"{lib} {version} failed {what}: {type(e).__name__}: {first_line(e)}")


def other_tensors(state_dict: dict, quantized: set[str], dtype: torch.dtype, skip=lambda k: False) -> dict:
    """Every tensor of a model that is not a quantized weight, in the checkpoint dtype; tied weights once."""
    seen, out = set(), {}
    for k, v in state_dict.items():
        if skip(k) or (k.endswith(".weight") and k[: -len(".weight")] in quantized):
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        v = v.detach().to("cpu")
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def model_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, str(name), torch.bfloat16)
