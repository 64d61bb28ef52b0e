"""The `qtool` command line: a thin typer layer over quantize_cli.api.

Human output and progress go to stderr; `--json` prints one JSON object on stdout.
Bad input: one line `error: ...` and exit 2. A failed eval gate: exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from qtensor.errors import GateFailed, QtoolError

import logging as _logging

_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)  # torchao's import-time chatter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ARGV: list[str] = []  # the arguments main() was called with (--gpus re-launches them)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="qtool: quantize LLM checkpoints, convert formats, check accuracy.")
err = Console(stderr=True)


@contextmanager
def _progress(enabled: bool = True):
    if not enabled:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err, transient=False) as p:
        yield p


_BIDI = {0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0xFEFF}  # invisible / reordering


def one_line(msg: str) -> str:
    """A message safe to print as one line: control characters (newlines, escape sequences from
    hostile file names) and undecodable bytes are shown escaped."""
    out = []
    for ch in str(msg):
        o = ord(ch)
        if 0xDC80 <= o < 0xDD00:  # an undecodable byte of a file name (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 32 or o == 127 or 0x80 <= o < 0xA0 or 0xD800 <= o < 0xE000 or o in _BIDI:
            out.append(repr(ch)[1:-1] if not 0xD800 <= o < 0xE000 else "?")
        else:
            out.append(ch)
    return "".join(out)


def _error(line: str) -> None:
    """The error line; processes started by --gpus/--nproc hand it to the launcher, which prints each
    distinct one once (quantize_cli/launch.py)."""
    where = os.environ.get("QTOOL_ERROR_DIR")
    if where and os.path.isdir(where):
        try:
            Path(where, f"rank{int(os.environ.get('RANK', '0')):05d}").write_text(line)
            return
        except (OSError, ValueError):
            pass
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def _run(fn, as_json: bool):
    """Call the API; map errors to exit codes; never let a traceback reach the user."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        rank0 = os.environ.get("RANK", "0") == "0"  # data-parallel processes: the bars of rank 0 only
        # --json: stdout carries the one JSON object alone; what libraries print on the way goes to stderr
        quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
        with quiet, _progress(rank0 and (sys.stderr.isatty() or os.environ.get("QTOOL_PROGRESS") == "1")) as p:
            return fn(p)
    except GateFailed as e:
        if as_json:
            print(json.dumps(e.result, default=str))
        err.print(f"[red]eval gate failed:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except QtoolError as e:
        _error(f"error: {one_line(e)}")
        raise typer.Exit(2)
    except OSError as e:  # the file system said no (name too long, disk full, permission): bad input, not a bug
        where = f": {one_line(e.filename)}" if getattr(e, "filename", None) else ""
        _error(f"error: {one_line(e.strerror or e)}{where}")
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False)
        raise typer.Exit(130)
    except MemoryError:
        err.print("error: out of memory", markup=False)
        raise typer.Exit(2)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("QTOOL_DEBUG"):
            raise
        msg = one_line(str(e).strip().splitlines()[0]) if str(e).strip() else ""
        _error(f"error: internal error ({type(e).__name__}): {msg} (set QTOOL_DEBUG=1 for the traceback)")
        raise typer.Exit(1)


def _emit(result: dict, as_json: bool, human) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        human(result)


def _key_value(o: str) -> tuple[str, str]:
    k, sep, v = o.partition("=")
    if not sep or not k.strip():
        err.print(f"error: --option {o}: expected KEY=VALUE", markup=False)
        raise typer.Exit(2)
    return k.strip(), v.strip()


@app.command()
def quantize(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, built-in name (gemma-3-270m) or hub id"),
    scheme: str = typer.Option(..., "--scheme", help="w4a16, w8a16, w8a8-int8, fp8, nvfp4, ..."),
    method: str = typer.Option("rtn", "--method", help="rtn, gptq, awq, awq-gptq, smoothquant, smoothquant-gptq, fp8, nvfp4, mx"),
    format: str = typer.Option(..., "--format", help="gptq, qtool, ..."),
    out: str = typer.Option(..., "--out", help="output directory"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration data: .txt, .jsonl, .parquet, datasets dir (default: built-in pydoc)"),
    field: str = typer.Option("text", "--field", help="text field of .jsonl/.parquet/datasets"),
    samples: int = typer.Option(64, "--samples"),
    seqlen: int = typer.Option(512, "--seqlen"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="-1 = per channel"),
    bits: Optional[int] = typer.Option(None, "--bits", help="weight bits for weight-only int schemes (2, 3, 4, 8)"),
    asym: bool = typer.Option(False, "--asym", help="asymmetric int weights (zero points)"),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="GPTQ: columns by descending Hessian diagonal"),
    group_order: bool = typer.Option(False, "--group-order", help="GPTQ: act order that keeps groups whole (groups by their largest Hessian diagonal, columns within each by theirs: GPTQModel's act_group_aware)"),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ: damping as a fraction of the mean Hessian diagonal"),
    mse_clip: Optional[bool] = typer.Option(None, "--mse-clip/--no-mse-clip", help="MSE-optimal clipping search for int scales (default: on for gptq, off for rtn)"),
    backend: str = typer.Option("native", "--backend", help="native, modelopt, autoround, gptqmodel, msmodelslim"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="knob KEY=VALUE of the backend or of the native method, repeatable (e.g. --option iters=0, --option duo_scaling=true)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cpu; cuda with --gpus)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="calibrate on K GPUs of this host: data-parallel processes, a layer too large for one GPU split over several"),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="dtype of the calibration forwards: auto (bf16 on GPUs, and on CPUs with bf16 units for bf16 models), float32, bfloat16"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="calibrate in K data-parallel CPU processes (gloo)"),
    max_gpu_memory: Optional[float] = typer.Option(None, "--max-gpu-memory", help="GiB per GPU for one decoder layer (default: 90 percent of its free memory); a layer needing more is split over the process's GPUs"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its work directory (.OUT.qtool-work)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt weights (torch.load weights_only=True) when MODEL has no safetensors"),
    rules: Optional[str] = typer.Option(None, "--rules", help="YAML/JSON file of per-module schemes: [{match: REGEX, scheme: S | skip: true}, ...]"),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="fp8: also calibrate FP8 KV-cache scales (compressed-tensors, modelopt, qtool)"),
    act_observer: Optional[str] = typer.Option(None, "--act-observer", help="static activation ranges: minmax (default), mean-minmax (msModelSlim: per-sample min/max averaged), percentile:P"),
    act_asym: bool = typer.Option(False, "--act-asym", help="asymmetric static int8 activations (input_scale + input_offset, msModelSlim W8A8)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Calibrate MODEL and write a quantized checkpoint."""
    from . import api

    options = {}
    if method in ("gptq", "awq-gptq", "smoothquant-gptq"):  # the GPTQ flags
        options = {"act_order": act_order, "damp": damp, "mse_clip": True if mse_clip is None else mse_clip}
        if group_order and act_order:  # groups whole: their parameters come from the updated weights, as GPTQModel's
            options.update(act_order="group", static_groups=False)
    elif method == "rtn" and mse_clip:
        options = {"mse_clip": True}
    if option:  # a backend's knobs replace the native flags; a native method's are added to them
        given = dict(_key_value(o) for o in option)
        options = given if backend != "native" else {**options, **given}
    if allow_pickle:
        err.print(f"warning: --allow-pickle: pickle weights in {one_line(model)} are read with torch.load(weights_only=True)", markup=False, highlight=False, soft_wrap=True)
    devices = None
    if gpus is not None or nproc is not None:
        from . import launch

        def plan(p):
            from calibrate.models import resolve_model

            k, dev = launch.validate(gpus, nproc, device, backend, method, allow_pickle, max_gpu_memory)
            api.check_combination(scheme, method, format, backend)
            from exporters.base import prepare_out

            prepare_out(Path(out), force)
            mdir = resolve_model(model, progress=p)  # once here, not raced by every process
            if dev == "cpu":
                return k, 1, dev, f"{k} CPU process(es)"
            r, m, why = launch.plan_ranks(mdir, k, samples, seqlen, max_gpu_memory)
            return r, m, dev, why

        nranks, per_rank, device, why = _run(plan, False)
        if nranks > 1:
            err.print(f"qtool: calibrating in {why}", markup=False, highlight=False)
            raise typer.Exit(launch.launch(list(_ARGV), nranks, per_rank, device))
        if device == "cuda":
            devices = [f"cuda:{j}" for j in range(per_rank)]
    device = device or "cpu"
    res = _run(
        lambda p: api.quantize(model, scheme, method, format, out, calib, samples, seqlen, group_size, bits, False if asym else None, backend, device, seed, force, field, options, p, resume, allow_pickle,
                               compute_dtype=compute_dtype, max_gpu_memory=max_gpu_memory, devices=devices, rules=rules, kv_cache=kv_cache,
                               act_observer=act_observer, act_asym=act_asym),
        as_json,
    )
    if res.get("rank"):  # data-parallel: rank 0 reports
        return

    def human(r):
        err.print(f"wrote {r['format']} checkpoint ({r['scheme']}, {r['method']}, {r['modules']} modules) to {r['out']} in {r['seconds']:.1f} s")
        for n in r["notes"]:
            err.print(f"  note: {n}", markup=False)

    _emit(res, as_json, human)


@app.command()
def export(
    src: str = typer.Argument(..., help="a quantized checkpoint directory qtool can read"),
    format: str = typer.Option(..., "--format"),
    out: str = typer.Option(..., "--out"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Write a quantized checkpoint in another format, exactly."""
    from . import api

    res = _run(lambda p: api.export(src, format, out, force, p), as_json)
    _emit(res, as_json, lambda r: err.print(f"converted {r['from']} -> {r['format']} ({r['modules']} modules): {r['out']}"))


@app.command("eval")
def eval_(
    path: str = typer.Argument(..., help="quantized checkpoint directory (or a plain model)"),
    reference: Optional[str] = typer.Option(None, "--reference", help="reference model (default: the source recorded in qtool.json)"),
    data: Optional[str] = typer.Option(None, "--data", help="evaluation data (default: built-in pydoc split)"),
    field: str = typer.Option("text", "--field"),
    windows: int = typer.Option(40, "--windows", help="number of 512-token windows"),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="fail (exit 1) above this perplexity increase, in percent"),
    max_kl: Optional[float] = typer.Option(None, "--max-kl"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="also generate a greedy continuation from both models"),
    report: Optional[str] = typer.Option(None, "--report", help="write per-layer diagnostics (report.md, layer_errors.png, report.json) into this directory"),
    no_reference: bool = typer.Option(False, "--no-reference", help="perplexity only: do not load the reference model"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Perplexity, KL divergence and top-1 agreement against the unquantized model; gate on thresholds."""
    from . import api

    res = _run(lambda p: api.evaluate(path, reference, data, windows, max_ppl_increase, max_kl, min_top1, prompt, field, "cpu", p, report, no_reference), as_json)

    def human(r):
        t = Table(title=f"qtool eval {path}", show_header=True)
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("perplexity", f"{r['perplexity']:.4f}")
        if r["reference_perplexity"] is not None:
            t.add_row("reference perplexity", f"{r['reference_perplexity']:.4f}")
            t.add_row("perplexity increase", f"{r['ppl_increase_pct']:+.2f}%")
            t.add_row("KL divergence", f"{r['kl_divergence']:.5f}")
            t.add_row("top-1 agreement", f"{r['top1_agreement']:.4f}")
        t.add_row("tokens", str(r["tokens"]))
        t.add_row("seconds", f"{r['seconds']:.1f}")
        err.print(t)
        if r.get("report"):
            rep = r["report"]
            err.print(f"layer report: {rep['dir']}/report.md; mean relative output error {rep['mean_rel_error']:.4f}, worst layers:", markup=False, soft_wrap=True)
            for w in rep["worst"]:
                err.print(f"  {w['rel_error']:.4f}  {w['name']}", markup=False)
        if r.get("generation") is not None:
            err.print(f"[bold]quantized:[/] {r['generation']}", highlight=False)
            err.print(f"[bold]reference:[/] {r['reference_generation']}", highlight=False)

    _emit(res, as_json, human)


@app.command()
def inspect(path: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """What a checkpoint is, layer by layer."""
    from . import api

    res = _run(lambda p: api.inspect(path), as_json)

    def human(r):
        if not r["quantized"]:
            err.print(f"{r['path']}: unquantized {r['model_type']} model, {r['tensors']} tensors, {r['size_bytes'] / 1e6:.1f} MB")
            return
        err.print(f"[bold]{r['path']}[/]: format [bold]{r['format']}[/], {r['model_type']}, {r['quantized_modules']} quantized linears")
        err.print(f"bits per weight: {r['bits_per_weight_quantized']} (quantized linears), {r['bits_per_weight_overall']} (whole model)")
        s = r["size_bytes"]
        err.print(f"size: {s['quantized'] / 1e6:.1f} MB quantized + {s['unquantized'] / 1e6:.1f} MB unquantized; files {s['files'] / 1e6:.1f} MB")
        for sch, c in r["schemes"].items():
            err.print(f"  {c:4d} x {sch}", markup=False)
        if r.get("unquantized_linears"):
            u = r["unquantized_linears"]
            err.print(f"  {len(u):4d} x full precision (decoder linears): {', '.join(u[:6])}{' ...' if len(u) > 6 else ''}", markup=False)
        for e in r["engines"]:
            err.print(f"  {e['engine']}: {'loads' if e['loads'] else 'does NOT load'} ({e['note']})", markup=False)
        for c in r.get("convert_to", []):
            err.print(f"  qtool export --format {c['format']} -> loads in {', '.join(c['engines'])}", markup=False)
        sk = Table(show_header=True, title="size by module type")
        for c in ("module type", "quantized MB", "unquantized MB", "total MB"):
            sk.add_column(c, justify="right" if c != "module type" else "left")
        for kind, v in r.get("size_by_kind", {}).items():
            sk.add_row(kind, f"{v['quantized'] / 1e6:.2f}", f"{v['unquantized'] / 1e6:.2f}", f"{v['total'] / 1e6:.2f}")
        err.print(sk)
        t = Table(show_header=True, title="quantized layers")
        for c in ("layer", "shape", "scheme", "bits/weight", "KB"):
            t.add_column(c, justify="right" if c in ("bits/weight", "KB") else "left", no_wrap=c == "layer", overflow="fold")
        for l in r["layers"]:
            name = l["name"][len("model."):] if l["name"].startswith("model.") else l["name"]
            t.add_row(name, "x".join(map(str, l["shape"])), l["scheme"], f"{l['bits_per_weight']:.3f}", f"{l.get('bytes', 0) / 1e3:.1f}")
        err.print(t)
        for w in r.get("warnings", []):
            err.print(f"[yellow]warning:[/] {w}", highlight=False)

    _emit(res, as_json, human)


@app.command()
def models(as_json: bool = typer.Option(False, "--json")):
    """List the built-in model names."""
    from . import api

    res = _run(lambda p: api.models(), as_json)
    _emit(res, as_json, lambda r: [print(f"{k}\t{'cached' if v['cached'] else 'not yet built'}\t{v['description']}") for k, v in r.items()])


def main(argv: list[str] | None = None) -> None:
    """Entry point: click usage errors become one line and exit 2 as well."""
    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("QTOOL_LAUNCHER_PID"):  # a process of `--gpus`/`--nproc`
        from .launch import die_with_launcher

        die_with_launcher()
    try:
        rc = app(args=argv, standalone_mode=False)
    except cx.UsageError as e:
        err.print(f"error: {one_line(e.format_message())}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except cx.Abort:
        err.print("error: aborted", markup=False)
        sys.exit(130)
    except cx.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)
