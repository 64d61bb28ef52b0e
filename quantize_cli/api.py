"""The Python API; the CLI is a thin layer over these functions.

    from quantize_cli import api
    api.quantize("gemma-3-270m", scheme="w4a16", method="gptq", format="gptq", out="out/g")
    api.evaluate("out/g")
    api.export("out/g", format="qtool", out="out/q")
    api.inspect("out/g")
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from calibrate import data as cdata
from calibrate import models as cmodels
from calibrate.algorithms import METHODS, get_method
from calibrate.pipeline import quantize_layers
from exporters import FORMATS, Checkpoint, get_format, read_checkpoint, write_checkpoint
from exporters.base import check_free_space, check_model_files, checkpoint_size, detect_format, estimate_size, file_sha256, prepare_out
from exporters.io import pickle_files
from qtensor import SCHEMES, __version__, get_scheme
from qtensor.errors import GateFailed, QtoolError
from qtensor.schemes import WeightSpec

BACKENDS = ("native", "modelopt", "autoround", "gptqmodel", "msmodelslim")


def combinations() -> list[tuple[str, str, str]]:
    """(backend/method, scheme, format) triples that work today, from the registries."""
    out = []
    for m in METHODS.values():
        for s in SCHEMES.values():
            if not m.accepts(s):
                continue
            for f in FORMATS.values():
                if s.name in getattr(f, "schemes", ()):
                    out.append((f"native/{m.name}", s.name, f.name))
    return out


def _combo_error(what: str) -> QtoolError:
    lines = sorted({f"{m} --scheme {s} --format {f}" for m, s, f in combinations()})
    return QtoolError(f"{what} is not built yet; working combinations: " + "; ".join(lines))


def check_combination(scheme: str, method: str, fmt: str, backend: str = "native") -> None:
    sch = get_scheme(scheme)
    if fmt not in FORMATS:
        get_format(fmt)  # raises the unknown-format error
    if backend not in BACKENDS:
        raise QtoolError(f"unknown backend '{backend}' (choose from: {', '.join(BACKENDS)})")
    if backend != "native":
        from calibrate.backends import get_backend

        b = get_backend(backend)
        if scheme not in b.schemes:
            raise QtoolError(f"backend {backend} with scheme {scheme} is not built yet (backend {backend} supports: {', '.join(b.schemes)})")
        if scheme not in getattr(FORMATS[fmt], "schemes", ()):
            raise _combo_error(f"scheme {scheme} in format {fmt}")
        return
    m = get_method(method)
    if not m.accepts(sch):
        raise _combo_error(f"method {method} with scheme {scheme}")
    if scheme not in getattr(FORMATS[fmt], "schemes", ()):
        raise _combo_error(f"scheme {scheme} in format {fmt}")


def _model_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, str(name), torch.bfloat16)


def quantize(
    model: str,
    scheme: str,
    method: str = "rtn",
    format: str = "gptq",
    out: str | Path = "",
    calib: str | None = None,
    samples: int = 64,
    seqlen: int = 512,
    group_size: int | None = None,
    bits: int | None = None,
    sym: bool | None = None,
    backend: str = "native",
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    field: str = "text",
    options: dict | None = None,
    progress=None,
    resume: bool = False,
    allow_pickle: bool = False,
    compute_dtype: str = "auto",
    max_gpu_memory: float | None = None,
    devices: list[str] | None = None,
    rules: str | Path | None = None,
    kv_cache: str | None = None,
    act_observer: str | None = None,
    act_asym: bool = False,
) -> dict:
    """max_gpu_memory: GiB each GPU may take for one decoder layer (default: 90% of its free memory); a
    layer that does not fit one GPU is split over the GPUs the process owns. devices: the devices to
    calibrate on instead of those of `device` (e.g. ["cpu", "cpu"] to exercise the split on a CPU).
    rules: a YAML/JSON rules file of per-module schemes (calibrate/rules.py; native backend).
    act_observer / act_asym: how static activation ranges are measured (calibrate/observers.py:
    minmax, mean-minmax, percentile:P) and whether static int8 activations get an input offset."""
    t0 = time.time()
    if not out:
        raise QtoolError("--out is required")
    if allow_pickle and pickle_files(Path(model)):
        return _from_pickle(model, Path(out), force, lambda src: quantize(src, scheme, method, format, out, calib, samples, seqlen, group_size, bits, sym, backend, device, seed, force, field, options, progress, resume,
                                                                                 compute_dtype=compute_dtype, max_gpu_memory=max_gpu_memory, devices=devices, rules=rules, kv_cache=kv_cache,
                                                                                 act_observer=act_observer, act_asym=act_asym))
    check_combination(scheme, method, format, backend)
    kv_cache = _check_kv_cache(kv_cache, format, backend)
    sch = get_scheme(scheme)
    if bits is not None:
        if sch.weight_dtype != "int" or sch.act_kind != "none" or bits not in (2, 3, 4, 8):
            raise QtoolError(f"--bits {bits} is not valid for scheme {scheme} (weight-only int schemes take 2, 3, 4 or 8)")
        from dataclasses import replace

        sch = replace(sch, weight_bits=bits)
    if device not in ("cpu", "cuda"):
        raise QtoolError(f"unknown device '{device}' (cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise QtoolError("--device cuda asked for, but no CUDA device is available")
    if max_gpu_memory is not None and not max_gpu_memory > 0:
        raise QtoolError(f"--max-gpu-memory must be a positive number of GiB, not {max_gpu_memory}")
    if (max_gpu_memory is not None or devices) and backend != "native":
        raise QtoolError(f"--max-gpu-memory applies to the native pipeline, not --backend {backend}")
    spec = WeightSpec.of(sch, group_size, sym)
    from calibrate.rules import Resolver, load_rules

    if rules is not None and backend != "native":
        raise QtoolError(f"--rules works with the native backend only (not --backend {backend})")
    resolver = Resolver(sch, spec, load_rules(rules) if rules is not None else [])
    act = _check_act(act_observer, act_asym, resolver, format, backend)
    prepare_out(Path(out), force)
    mdir = cmodels.resolve_model(model, progress=progress)
    config, td = check_model_files(mdir)
    check_free_space(Path(out), estimate_quantized_size(td, spec, get_format(format)))
    tok = cmodels.load_tokenizer(mdir)
    meth = get_method(method, **(options or {})) if backend == "native" else None
    n_samples = samples if (meth is None or meth.stats or meth.prepare or any(s.calibrated_acts for s in resolver.schemes) or kv_cache) else 1
    ids = cdata.calibration_samples(tok, calib, n_samples, seqlen, seed, field)
    torch.manual_seed(seed)
    src_dtype = _model_dtype(config)
    safetensors = sorted(mdir.glob("*.safetensors"))
    import hashlib

    calibration = {
        "data": calib or cdata.BUILTIN_DATA,
        "samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "field": field,
        "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
    }
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    src_hash = pool.submit(file_sha256, safetensors)  # overlaps with calibration
    meta = {
        "source": model,
        "source_path": str(mdir.resolve()),
        "source_sha256": None,
        "scheme": scheme,
        "method": method,
        "backend": backend,
        "weight": {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym},
        "calibration": calibration,
        "device": device,
        "compute_dtype": str(cmodels.compute_dtype(compute_dtype, _model_dtype(config), device, meth is not None and meth.prepare is not None)).replace("torch.", ""),
    }
    if resolver.rules:
        meta["rules"] = resolver.describe()
    if kv_cache:
        meta["kv_cache"] = {"dtype": kv_cache}
    if not act.default:
        meta["activations"] = act.describe()
    work = None
    if backend != "native":
        from calibrate.backends import get_backend

        res = get_backend(backend).quantize(mdir, sch, spec, ids, options or {}, device, progress)
        qts, tensors, notes = res.qtensors, res.tensors, list(res.notes)
        meta["options"] = res.options
        for qt in qts.values():
            qt.orig_dtype = src_dtype
    else:
        source_files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in safetensors]
        fingerprint = {**{k: v for k, v in meta.items() if k not in ("source", "source_sha256")}, "source_files": source_files,
                       "options": meth.options, "qtool": __version__}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process's work directory holds its share of the samples
            fingerprint["world_size"] = int(os.environ["WORLD_SIZE"])
        qts, tensors, notes, work = _native(mdir, config, ids, sch, spec, meth, device, progress, out, resume, src_dtype, fingerprint, max_gpu_memory, devices, compute_dtype, resolver, get_format(format), kv_cache, act)
        meta["options"] = meth.options
    meta["notes"] = notes
    phases["calibrate"] = time.time() - t0
    from calibrate import distributed

    if distributed.rank() != 0:  # data-parallel: only rank 0 writes
        if work is not None:
            work.remove()
        distributed.barrier()
        return {"out": str(out), "rank": distributed.rank(), "format": format, "scheme": scheme, "method": method, "backend": backend,
                "modules": len(qts), "seconds": round(time.time() - t0, 2), "notes": []}
    t1 = time.time()
    meta["source_sha256"] = src_hash.result()
    pool.shutdown()
    phases["hash_wait"] = time.time() - t1
    t1 = time.time()
    ckpt = Checkpoint(config, qts, tensors, mdir, meta)
    if kv_cache:
        ckpt.kv_scales, ckpt.kv_cache_dtype = work.kv_scales(), kv_cache
        if not ckpt.kv_scales:
            raise QtoolError("--kv-cache: no attention module of this model went through transformers' attention interface, so no KV-cache scales were calibrated")
    write_checkpoint(ckpt, format, Path(out), force=force, progress=progress)
    if work is not None:
        work.remove()
    distributed.barrier()
    phases["write"] = time.time() - t1
    seconds = time.time() - t0
    _update_meta(Path(out), {"quantize_seconds": round(seconds, 2)})
    return {"out": str(out), "format": format, "scheme": scheme, "method": method, "backend": backend, "modules": len(qts), "seconds": round(seconds, 2), "notes": notes}


def _from_pickle(model: str, out: Path, force: bool, run) -> dict:
    """--allow-pickle: the pickle weights become safetensors in a temporary directory beside --out
    (torch.load weights_only=True: no code runs), `run` quantizes that, the directory goes."""
    import shutil
    import tempfile

    from exporters.base import COPY_FILES
    from exporters.io import pickle_to_safetensors

    prepare_out(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.pickle-", dir=out.resolve().parent))
    try:
        pickle_to_safetensors(Path(model), tmp, COPY_FILES)
        res = run(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = f"weights read from pickle files with torch.load(weights_only=True) (--allow-pickle)"
    _update_meta(out, {"source": model, "source_path": str(Path(model).resolve()), "source_pickle": True})
    res["notes"] = [note, *res["notes"]]
    return res


def estimate_quantized_size(td, spec: WeightSpec, fmt) -> int:
    """Output size of quantizing a source directory: its decoder-layer linear weights (2-D, not norms
    or embeddings) at spec.bits, every other tensor as stored, its tokenizer files."""
    quantized, other = [], 0
    for k in td:
        shape = td.shape(k)
        if k.endswith(".weight") and len(shape) == 2 and ".layers." in k and "norm" not in k and "embed" not in k:
            quantized.append((shape[0], shape[1], spec.bits, spec.group_size))
        else:
            other += td.nbytes_of(k)
    return estimate_size(quantized, other, fmt, td.path)


def passthrough_tensors(net, qts: dict, dtype: torch.dtype) -> dict:
    """Every tensor of a model that is not a quantized weight, in the checkpoint dtype; tied weights once."""
    seen_ptrs = set()
    tensors = {}
    for k, v in net.state_dict().items():
        if k.endswith(".weight") and k[: -len(".weight")] in qts:
            continue
        ptr = (v.data_ptr(), tuple(v.shape))
        if ptr in seen_ptrs:
            continue
        seen_ptrs.add(ptr)
        tensors[k] = v.detach().to("cpu").to(dtype) if v.is_floating_point() else v.detach().cpu()
    return tensors


layer_seconds: list = []  # seconds per layer of the last native run in this process (bench/quantize_speed.py)
phases: dict = {}  # seconds per phase of the last quantize in this process


def _holds_pre_scale(fmt, sch, spec) -> bool:
    """Whether the format stores a linear of this scheme together with a pre_quant_scale (probed on a small
    weight through the format's own can_hold)."""
    from calibrate.algorithms.rtn import quantize_weight
    from calibrate.pipeline import _act_quant

    try:
        qt = quantize_weight(torch.randn(128, 256, generator=torch.Generator().manual_seed(0)), spec)
    except Exception:  # a spec the probe cannot build: assume not
        return False
    qt.act = _act_quant(sch, torch.tensor(1.0))
    qt.pre_scale = torch.ones(256)
    qt.orig_dtype = torch.bfloat16
    return fmt.can_hold("model.layers.0.self_attn.o_proj", qt) is None


def _check_act(observer: str | None, asym: bool, resolver, fmt: str, backend: str):
    """--act-observer / --act-asym -> calibrate.observers.ActObserver, refused up front (one line) where
    nothing they set exists: no static-activation scheme, a non-int8 static scheme with --act-asym, a
    format that cannot store an input offset, another backend."""
    from calibrate import observers
    from qtensor import ActQuant, QTensor

    act = observers.parse(observer, asym)
    if act.default and observer is None:
        return act
    flags = " ".join(f for f, on in (("--act-observer", observer is not None), ("--act-asym", asym)) if on)
    if backend != "native":
        raise QtoolError(f"{flags}: activation observers are the native pipeline's (not --backend {backend})")
    static = [s for s in resolver.schemes if s.act_kind == "static"]
    if not static:
        names = ", ".join(sorted({s.name for s in resolver.schemes}))
        raise QtoolError(f"{flags}: scheme {names} has no static activations to calibrate (use w8a8-int8-static or fp8)")
    if asym:
        other = next((s for s in static if s.act_dtype != "int8"), None)
        if other is not None:
            raise QtoolError(f"--act-asym: asymmetric activations are int8 only (msModelSlim W8A8), not the {other.act_dtype} activations of scheme {other.name}")
        probe = QTensor("int", 8, torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), act=ActQuant("static", "int8", "tensor", torch.ones(1), torch.ones(1)))
        why = get_format(fmt).can_hold("model.layers.0.mlp.down_proj", probe)
        if why:
            raise QtoolError(f"--act-asym: format {fmt} cannot store it ({why}); use --format msmodelslim or qtool")
    return act


def _check_kv_cache(kv_cache: str | None, fmt: str, backend: str) -> str | None:
    """--kv-cache: the dtype name, refused up front where the format or backend cannot carry it."""
    from calibrate.kvcache import check_kv_dtype

    kv = check_kv_dtype(kv_cache)
    if kv is None:
        return None
    if backend != "native":
        raise QtoolError(f"--kv-cache is calibrated by the native backend only (not --backend {backend})")
    get_format(fmt).check_kv_cache(kv)
    return kv


def _native(mdir, config, ids, sch, spec, meth, device, progress, out, resume, src_dtype, fingerprint, max_gpu_memory=None, devices=None, compute_dtype="auto", resolver=None, fmt=None, kv_cache=None, act=None):
    """The native layer-wise pipeline, streamed from the safetensors, with per-layer results on disk."""
    from collections import ChainMap

    from calibrate.pipeline import find_decoder_layers
    from calibrate.stream import StreamedModel
    from calibrate.workdir import WorkDir
    from exporters.io import Subset

    # the calibration forwards run in the compute dtype (calibrate.models.compute_dtype), with
    # Hessians and the GPTQ solve in fp32
    t0 = time.time()
    from calibrate import distributed

    distributed.init(device)
    if distributed.active():
        ids = distributed.shard(ids)
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
    placement = None
    if devices or device.startswith("cuda"):
        from calibrate.placement import device_budgets

        devs = list(devices) if devices else distributed.local_gpus()
        device = devs[0]
        if len(devs) > 1 or max_gpu_memory is not None:
            placement = list(zip(devs, device_budgets(devs, max_gpu_memory)))
    sm = StreamedModel(mdir, cmodels.compute_dtype(compute_dtype, src_dtype, device, meth.prepare is not None), device)
    prefix, layers = find_decoder_layers(sm.model)
    plan_notes = _plan(sm.model, prefix, layers, resolver, meth, fmt) if resolver is not None else []
    # rank 0 keeps the work directory and writes the checkpoint; other ranks keep theirs apart
    work = WorkDir(Path(out) if distributed.rank() == 0 else Path(out).with_name(f"{Path(out).name}.rank{distributed.rank()}"), fingerprint, resume)
    start = work.done
    hidden = work.load_hidden(start - 1, device) if 0 < start < len(layers) else None

    layer_seconds.clear()
    phases.clear()

    # a layer's results are saved in a background thread while the next layer calibrates (one save in
    # flight; its error surfaces at the next layer). Data-parallel ranks save in step (collectives inside).
    from concurrent.futures import ThreadPoolExecutor

    saver = None if distributed.active() else ThreadPoolExecutor(1, thread_name_prefix="qtool-save")
    pending: list = []

    def on_layer(li, layer_q, others, hidden_after, rep):
        layer_seconds.append(round(rep.seconds, 3))
        for qt in layer_q.values():
            qt.orig_dtype = src_dtype
        others = {k: (v.to(src_dtype) if v.is_floating_point() else v) for k, v in others.items()}
        if saver is None:
            work.save_layer(li, layer_q, others, hidden_after, rep.notes, rep.kv)
            return
        if pending:
            pending.pop().result()
        pending.append(saver.submit(work.save_layer, li, layer_q, others, hidden_after, rep.notes, rep.kv))

    if start < len(layers):
        phases["setup"] = time.time() - t0
        try:
            quantize_layers(sm.model, ids, sch, spec, meth, device, progress, on_layer=on_layer, stream=sm, start_layer=start, resume_hidden=hidden, placement=placement, resolve=resolver,
                            kv_cache=kv_cache, act=act, pre_scale_ok=_holds_pre_scale(fmt, sch, spec))
            if pending:
                pending.pop().result()
        finally:
            if saver is not None:
                saver.shutdown(wait=True)
    phases["layers_total"] = time.time() - t0 - phases.get("setup", 0)
    qts, layer_tensors = work.results(len(layers))
    outside = [k for k in sm.td if not k.startswith(prefix + ".") and not (sm.tied and k.endswith("lm_head.weight"))]
    tensors = ChainMap(layer_tensors, Subset(sm.td, outside))
    return qts, tensors, plan_notes + work.notes(), work


def _plan(model, prefix, layers, resolver, meth, fmt) -> list[str]:
    """Check the per-module schemes of every decoder linear before any work; the notes that say
    which modules stay in full precision and what each rule matched."""
    from torch import nn

    from calibrate.rules import default_skip

    linears = {f"{prefix}.{n}": m.in_features for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
    routers = [f"{prefix}.{n}" for n, m in layers.named_modules() if not isinstance(m, nn.Linear) and default_skip(f"{prefix}.{n}") == "MoE router"]
    notes = resolver.plan(linears, meth, fmt)
    if routers:
        notes.insert(0, f"full precision (default skip: MoE router): {len(routers)} router(s): {', '.join(routers[:4])}{' ...' if len(routers) > 4 else ''}")
    outside = sorted({default_skip(n) for n, _ in model.named_modules() if n and not n.startswith(prefix + ".") and n != prefix} - {None})
    if outside:
        notes.insert(0, f"full precision outside the decoder layers: {', '.join(outside)}")
    return notes


def _update_meta(path: Path, fields: dict) -> None:
    p = path / "qtool.json"
    meta = json.loads(p.read_text()) if p.is_file() else {}
    meta.update(fields)
    tmp = p.with_name(f".qtool.json.{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


def export(src: str | Path, format: str, out: str | Path, force: bool = False, progress=None) -> dict:
    src = Path(src)
    if not src.exists():
        raise QtoolError(f"path not found: {src}")
    fmt = get_format(format)
    prepare_out(Path(out), force)
    ckpt = read_checkpoint(src)
    check_free_space(Path(out), checkpoint_size(ckpt, fmt))
    write_checkpoint(ckpt, fmt.name, Path(out), force=force, progress=progress)
    return {"out": str(out), "from": ckpt.format, "format": fmt.name, "modules": len(ckpt.qtensors)}


def _reference_dir(path: Path, reference: str | None, meta: dict) -> Path | None:
    if reference:
        return cmodels.resolve_model(reference)
    src = meta.get("source")
    if src in cmodels.BUILTIN:
        return cmodels.resolve_model(src)
    sp = meta.get("source_path")
    if sp and Path(sp).is_dir():
        return Path(sp)
    return None


def evaluate(
    path: str | Path,
    reference: str | None = None,
    data: str | None = None,
    windows: int = cdata.EVAL_WINDOWS,
    max_ppl_increase: float | None = None,
    max_kl: float | None = None,
    min_top1: float | None = None,
    prompt: str | None = None,
    field: str = "text",
    device: str = "cpu",
    progress=None,
    report: str | None = None,
    no_reference: bool = False,
) -> dict:
    from runtime.eval import evaluate as run_eval
    from runtime.eval import greedy
    from runtime.loader import load_quantized

    path = Path(path)
    if not path.exists():
        raise QtoolError(f"path not found: {path}")
    if windows < 1:
        raise QtoolError("--windows must be at least 1")
    quantized = path.is_dir() and detect_format(path) is not None
    if quantized:
        model, ckpt = load_quantized(path, torch.float32, device)
        meta = ckpt.meta
    else:
        mdir = cmodels.resolve_model(str(path))
        model, meta = cmodels.load_model(mdir, torch.float32, device), {}
    if no_reference and reference:
        raise QtoolError("--no-reference and --reference exclude each other")
    if no_reference and report:
        raise QtoolError("--report compares every layer with the reference model: drop --no-reference")
    if report and not quantized:
        raise QtoolError(f"--report needs a quantized checkpoint; {path} is not one")
    if report:
        from runtime.report import check_report_dir

        check_report_dir(report)
    ref_dir = _reference_dir(path, reference, meta) if (quantized or reference) and not no_reference else None
    if report and ref_dir is None:
        raise QtoolError("--report needs a reference model: pass --reference (the checkpoint records none)")
    if (max_kl is not None or min_top1 is not None or max_ppl_increase is not None) and ref_dir is None:
        raise QtoolError("thresholds need a reference model: pass --reference (the checkpoint records none)")
    tok_dir = path if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists() else ref_dir
    if tok_dir is None:
        raise QtoolError(f"no tokenizer in {path} and no reference model to take one from")
    tok = cmodels.load_tokenizer(tok_dir)
    wins = cdata.eval_windows(tok, data, windows, field=field)
    ref = cmodels.load_model(ref_dir, torch.float32, device) if ref_dir is not None else None
    res = run_eval(model, wins, ref, progress)
    out = res.to_dict()
    out["ppl_increase_pct"] = res.ppl_increase_pct
    out["data"] = data or cdata.BUILTIN_DATA
    out["reference"] = str(ref_dir) if ref_dir else None
    if prompt:
        out["prompt"] = prompt
        out["generation"] = greedy(model, tok, prompt)
        out["reference_generation"] = greedy(ref, tok, prompt) if ref is not None else None
    failed = []
    if max_ppl_increase is not None and res.ppl_increase_pct is not None and res.ppl_increase_pct > max_ppl_increase:
        failed.append(f"perplexity increase {res.ppl_increase_pct:.2f}% > --max-ppl-increase {max_ppl_increase}%")
    if max_kl is not None and res.kl_divergence is not None and res.kl_divergence > max_kl:
        failed.append(f"KL divergence {res.kl_divergence:.4f} > --max-kl {max_kl}")
    if min_top1 is not None and res.top1_agreement is not None and res.top1_agreement < min_top1:
        failed.append(f"top-1 agreement {res.top1_agreement:.4f} < --min-top1 {min_top1}")
    out["passed"] = not failed
    out["failed"] = failed
    if report:
        from runtime.report import write_report

        out["report"] = write_report(report, path, model, ref, list(ckpt.qtensors), tok, meta, out, progress)
    if quantized and os.access(path, os.W_OK):
        _update_meta(path, {"eval": {k: v for k, v in out.items() if k not in ("generation", "reference_generation")}})
    if failed:
        raise GateFailed("; ".join(failed), out)
    return out


def inspect(path: str | Path) -> dict:
    from exporters.inspect import summarize

    path = Path(path)
    if not path.exists():
        raise QtoolError(f"path not found: {path}")
    return summarize(path)


def models() -> dict:
    return {name: {"description": desc, "cached": (cmodels.cache_dir() / name / "config.json").is_file()} for name, desc in cmodels.BUILTIN.items()}
