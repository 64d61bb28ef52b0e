"""Calibration and evaluation text, per shared/EVAL.md.

The built-in corpus is Python's pydoc topics text, tokenized once without special tokens:
the evaluation split is its last `eval_windows * window` tokens, the calibration split everything
before. User data (.txt, .jsonl, .parquet, a `datasets` directory) is read the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qtensor.errors import QtoolError

BUILTIN_DATA = "pydoc"
EVAL_WINDOWS = 40
WINDOW = 512


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _one_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def read_texts(spec: str | None, field: str = "text") -> list[str]:
    """The texts of a data spec: None/'pydoc' (built-in), .txt, .jsonl, .parquet, or a datasets dir."""
    if spec is None or spec == BUILTIN_DATA:
        return [pydoc_text()]
    p = Path(spec).expanduser()
    try:
        if not p.exists():
            raise QtoolError(f"data not found: {spec}")
        if not p.is_dir() and not p.is_file():
            raise QtoolError(f"data {spec} is not a regular file or directory")
    except OSError as e:
        raise QtoolError(f"cannot read data {spec}: {e.strerror}") from None
    try:
        if p.is_dir():
            texts = _dataset_dir(p, field)
        elif p.suffix == ".txt":
            texts = [_read_text(p, spec)]
        elif p.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(_read_text(p, spec).splitlines()):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or field not in row:
                    raise QtoolError(f"{spec}: line {i + 1} has no field '{field}'")
                if not isinstance(row[field], str):
                    raise QtoolError(f"{spec}: line {i + 1}: field '{field}' is not a string")
                texts.append(row[field])
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            if field not in table.column_names:
                raise QtoolError(f"{spec}: no column '{field}' (columns: {', '.join(table.column_names)})")
            texts = [t for t in table.column(field).to_pylist() if isinstance(t, str)]
        else:
            raise QtoolError(f"unsupported data file {spec}: use .txt, .jsonl, .parquet or a datasets directory")
    except QtoolError:
        raise
    except UnicodeDecodeError:
        raise QtoolError(f"data file {spec} is not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001 - json/pyarrow/datasets raise many types
        raise QtoolError(f"cannot read data {spec}: {_one_line(e)}") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QtoolError(f"data {spec} holds no text")
    return texts


def _read_text(p: Path, spec: str) -> str:
    """A text file as UTF-8; NUL bytes mean binary data (checked on the first MiB before the rest is read)."""
    with p.open("rb") as f:
        head = f.read(1 << 20)
        if b"\0" in head:
            raise QtoolError(f"data file {spec} holds binary data (NUL bytes), not text")
        data = head + f.read()
    if b"\0" in data:
        raise QtoolError(f"data file {spec} holds binary data (NUL bytes), not text")
    return data.decode("utf-8")


def _dataset_dir(p: Path, field: str) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if field not in ds.column_names:
        raise QtoolError(f"{p}: no column '{field}' (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[field] if isinstance(t, str)]


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Split:
    calib: torch.Tensor  # 1-D token ids
    eval: torch.Tensor  # 1-D token ids
    digest: str  # sha256 of all token ids


def split(tokenizer, spec: str | None, field: str = "text", eval_tokens: int = EVAL_WINDOWS * WINDOW) -> Split:
    ids = tokenize(tokenizer, read_texts(spec, field))
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    if spec is None or spec == BUILTIN_DATA:
        if len(ids) <= eval_tokens + WINDOW:
            raise QtoolError("built-in corpus is too short for this tokenizer")
        return Split(ids[:-eval_tokens], ids[-eval_tokens:], digest)
    # user data: evaluation uses the tail, calibration the rest; a short file serves both roles
    n_eval = min(eval_tokens, (len(ids) // WINDOW) * WINDOW)
    return Split(ids[:-n_eval] if len(ids) - n_eval >= WINDOW else ids, ids[-n_eval:] if n_eval else ids, digest)


def with_bos(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    bos = tokenizer.bos_token_id
    return ids if bos is None else torch.cat([torch.tensor([bos]), ids])


def calibration_samples(tokenizer, spec: str | None, samples: int = 64, seqlen: int = 512, seed: int = 0, field: str = "text") -> torch.Tensor:
    """[samples, seqlen (+1 with BOS)] token ids drawn from the calibration split, deterministically."""
    if samples < 1 or seqlen < 1:
        raise QtoolError("--samples and --seqlen must be positive")
    ids = split(tokenizer, spec, field).calib
    if len(ids) < seqlen:
        raise QtoolError(f"calibration data has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=g)
    return torch.stack([with_bos(tokenizer, ids[s : s + seqlen]) for s in starts.tolist()])


def eval_windows(tokenizer, spec: str | None, windows: int = EVAL_WINDOWS, window: int = WINDOW, field: str = "text") -> list[torch.Tensor]:
    """The evaluation windows, each with BOS prepended where the tokenizer has one."""
    ids = split(tokenizer, spec, field, eval_tokens=EVAL_WINDOWS * WINDOW).eval
    n = min(windows, len(ids) // window)
    if n < 1:
        raise QtoolError(f"evaluation data has {len(ids)} tokens, fewer than one window of {window}")
    return [with_bos(tokenizer, ids[i * window : (i + 1) * window]) for i in range(n)]
