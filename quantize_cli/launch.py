"""`qtool quantize ... --gpus K` / `--nproc K`: qtool launches its own data-parallel processes.

    --gpus K    K GPUs of this host (CUDA, NCCL). As many processes as the largest decoder layer
                allows: one per GPU when a layer (parameters, hidden states of the process's share
                of the samples, quantization work) fits one GPU, else one per group of M GPUs that
                the layer is split over (QTOOL_RANK_GPUS=M). One process needs no launcher.
    --nproc K   K processes on the CPU (gloo): CPU hosts, and tests of the multi-process path.

The processes are started with torch.distributed.run (torchrun's own code, --standalone) running
`python -m quantize_cli` with the same arguments minus --gpus/--nproc; their output goes straight to
this process's stdout/stderr (progress bars and the result from rank 0 only); the exit code is rank
0's, or the first failing process's when rank 0 was stopped because another one failed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from qtensor.errors import QtoolError

_FLAGS = ("--gpus", "--nproc")


def child_argv(argv: list[str], device: str) -> list[str]:
    """The arguments minus --gpus/--nproc (either spelling), with --device set."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _FLAGS:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in _FLAGS):
            continue
        out.append(a)
    if "--device" not in out and not any(a.startswith("--device=") for a in out):
        out += ["--device", device]
    return out


def validate(gpus: int | None, nproc: int | None, device: str | None, backend: str, method: str, allow_pickle: bool = False, max_gpu_memory: float | None = None) -> tuple[int, str]:
    """(processes or GPUs asked for, device) or a one-line QtoolError."""
    if gpus is not None and nproc is not None:
        raise QtoolError("--gpus and --nproc exclude each other (--gpus K: K GPUs; --nproc K: K CPU processes)")
    flag, k = ("--gpus", gpus) if gpus is not None else ("--nproc", nproc)
    if k < 1:
        raise QtoolError(f"{flag} must be at least 1, not {k}")
    if max_gpu_memory is not None and not max_gpu_memory > 0:
        raise QtoolError(f"--max-gpu-memory must be a positive number of GiB, not {max_gpu_memory}")
    if allow_pickle:
        raise QtoolError(f"--allow-pickle works in one process; convert the weights first (qtool quantize without {flag}, or save them as safetensors)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise QtoolError(f"{flag} launches the processes itself; do not run it under torchrun")
    if backend != "native":
        raise QtoolError(f"{flag} runs qtool's native pipeline; --backend {backend} calibrates in one process")
    if k > 1:
        from calibrate.algorithms import get_method

        if get_method(method).prepare is not None:
            raise QtoolError(f"method {method} calibrates in one process only (drop {flag})")
    if gpus is not None:
        if device not in (None, "cuda"):
            raise QtoolError("--gpus runs on CUDA; for processes on the CPU use --nproc K")
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > n:
            raise QtoolError(f"--gpus {gpus} asked for, but {n} CUDA device(s) are visible")
        return gpus, "cuda"
    if device not in (None, "cpu"):
        raise QtoolError("--nproc runs CPU processes (gloo); on CUDA use --gpus K")
    return nproc, "cpu"


def plan_ranks(model_dir: Path, gpus: int, samples: int, seqlen: int, max_gpu_memory: float | None) -> tuple[int, int, str]:
    """(processes, GPUs per process, why) for --gpus: the largest decoder layer, measured on the meta
    skeleton, against the per-GPU budget (--max-gpu-memory GiB, else 90% of the first GPU's memory)."""
    import torch

    from calibrate import placement as pl
    from calibrate.models import build_skeleton, load_config
    from calibrate.pipeline import find_decoder_layers

    model = build_skeleton(load_config(model_dir))
    _, layers = find_decoder_layers(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(cfg.hidden_size)
    budget = int(max_gpu_memory * pl.GiB) if max_gpu_memory is not None else int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    best = None
    for layer in layers:  # the layer needing the most GPUs decides
        units = pl.layer_units(layer, 2, True)
        width = max((m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)), default=hidden)
        fixed = pl.batch_bytes(min(8, samples), seqlen, hidden, width, getattr(cfg, "num_attention_heads", 1) or 1)
        r, m = pl.choose_ranks(gpus, units, budget, pl.hidden_bytes(samples * seqlen, hidden, 2), fixed)
        if best is None or m > best[1]:
            best = (r, m)
    r, m = best
    why = f"{r} process(es) x {m} GPU(s)" + (f" (a decoder layer does not fit one GPU of {budget / pl.GiB:.1f} GiB)" if m > 1 else "")
    return r, m, why


def die_with_launcher() -> None:
    """In a process started by launch(): end when the launcher ends, even by SIGKILL (Linux), so no
    orphan keeps its GPU or waits forever in a collective."""
    pid = os.environ.get("QTOOL_LAUNCHER_PID")
    if not pid or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != int(pid):  # the launcher is already gone
        os._exit(1)


def _print_errors(where: Path, code: int) -> None:
    """Each distinct error line of the processes once (rank 0's first), naming the ranks when they differ."""
    lines: dict[str, list[int]] = {}
    for f in sorted(where.glob("rank*")):
        lines.setdefault(f.read_text().strip(), []).append(int(f.name[4:]))
    if not lines:
        sys.stderr.write(f"error: a calibration process failed (exit code {code}) without an error line\n")
    for line, ranks in lines.items():
        sys.stderr.write((line if len(lines) == 1 else f"{line} (rank {', '.join(map(str, ranks))})") + "\n")


def launch(argv: list[str], nproc: int, gpus_per_rank: int, device: str) -> int:
    """Run `python -m quantize_cli ARGV` in `nproc` processes through torch.distributed.run."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    errors = tempfile.mkdtemp(prefix="qtool-errors-")
    env = {"QTOOL_RANK_GPUS": str(gpus_per_rank), "QTOOL_ERROR_DIR": errors, "QTOOL_LAUNCHER_PID": str(os.getpid())}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "quantize_cli", *child_argv(argv, device)])
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" report: the processes' own error lines say why
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        first = e.failures.get(0)
        if first is None or first.exitcode <= 0:  # rank 0 succeeded or was stopped: the first failure's code
            first = e.get_first_failure()[1]
        code = first.exitcode if first.exitcode > 0 else 1
        _print_errors(Path(errors), code)
        return code
    finally:
        elastic.setLevel(level)
        shutil.rmtree(errors, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
