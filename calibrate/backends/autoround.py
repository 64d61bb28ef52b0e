"""Intel AutoRound as a backend: sign-gradient rounding/clipping tuning (SignRound) on qtool's samples.

AutoRound runs block by block on the float32 model with qtool's calibration samples as its dataset
(one dict of input_ids per sample; `nsamples` and `seqlen` default to the samples given). Its result is
saved with AutoRound's own packer in the `auto_gptq` layout into a temporary directory and decoded
with exporters.gptq, so the QTensors are exactly what AutoRound writes. `iters=0` is AutoRound's
optimized RTN (its RTN with the error-minimising scale search). Knobs (`--option KEY=VALUE`): iters,
nsamples, seqlen, lr, minmax_lr, enable_minmax_tuning, batch_size, group_size, sym, bits,
disable_opt_rtn; `--group-size`, `--bits` and `--asym` set the last three as well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from calibrate import models as cmodels
from qtensor.errors import QtoolError

from . import BackendResult, register
from .common import library_error, model_dtype, other_tensors, quiet_stdout, take_options, work_dir


def _version() -> str:
    try:
        import auto_round

        return getattr(auto_round, "__version__", "?")
    except ImportError:
        return "not installed"


def build_autoround(model_dir: Path, samples: torch.Tensor, opts: dict, device: str):
    """An AutoRound compressor over the float32 model with qtool's samples as its dataset."""
    from auto_round import AutoRound

    model = cmodels.load_model(model_dir, torch.float32, device)
    tok = cmodels.load_tokenizer(model_dir)
    seqlen = opts["seqlen"] or samples.shape[1]
    if seqlen > samples.shape[1]:
        raise QtoolError(f"autoround seqlen {seqlen} is longer than the calibration samples ({samples.shape[1]} tokens; raise --seqlen)")
    nsamples = opts["nsamples"] or len(samples)
    rows = samples[:nsamples, :seqlen]
    data = [{"input_ids": r[None].clone(), "attention_mask": torch.ones(1, seqlen, dtype=torch.long)} for r in rows]
    kw = dict(bits=opts["bits"], group_size=opts["group_size"], sym=opts["sym"], dataset=data, iters=opts["iters"],
              nsamples=len(data), seqlen=seqlen, batch_size=min(opts["batch_size"], len(data)), device_map=device,
              enable_minmax_tuning=opts["enable_minmax_tuning"], seed=opts["seed"])
    if opts["lr"]:
        kw["lr"] = opts["lr"]
    if opts["minmax_lr"]:
        kw["minmax_lr"] = opts["minmax_lr"]
    if opts["disable_opt_rtn"]:
        kw["disable_opt_rtn"] = True
    return AutoRound(model, tok, **kw)


def run_autoround(model_dir: Path, spec, samples: torch.Tensor, opts: dict, device: str, out: Path):
    """Quantize with AutoRound and save its auto_gptq checkpoint under `out`; returns (model, saved dir)."""
    ar = build_autoround(model_dir, samples, opts, device)
    ar.quantize()
    ar.save_quantized(str(out), format="auto_gptq")
    cfgs = sorted(out.rglob("config.json"))
    if not cfgs:
        raise QtoolError(f"autoround {_version()} wrote no checkpoint")
    return ar.model, cfgs[0].parent


def decode_saved(path: Path):
    """AutoRound's auto_gptq checkpoint -> Checkpoint of QTensors (exporters.gptq decodes it)."""
    from exporters.gptq import GPTQFormat

    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") not in ("gptq", "auto-round"):
        raise QtoolError(f"autoround wrote an unexpected quantization_config ({qc.get('quant_method')})")
    if qc.get("extra_config"):
        raise QtoolError("autoround wrote per-layer overrides (extra_config); qtool's autoround backend reads uniform checkpoints only")
    return GPTQFormat().decode(path, dict(config, quantization_config=dict(qc, quant_method="gptq")))


@register
class AutoRoundBackend:
    name = "autoround"
    schemes = ("w4a16", "w8a16")
    OPTIONS = {"iters": 200, "nsamples": 0, "seqlen": 0, "lr": 0.0, "minmax_lr": 0.0, "enable_minmax_tuning": True,
               "batch_size": 8, "group_size": 0, "sym": True, "bits": 0, "disable_opt_rtn": False, "seed": 42}

    def quantize(self, model_dir, scheme, spec, samples, options, device, progress):
        opts = take_options(self.name, options, self.OPTIONS)
        opts["bits"] = opts["bits"] or spec.bits
        opts["group_size"] = opts["group_size"] or spec.group_size
        if "sym" not in options:
            opts["sym"] = spec.sym
        if opts["bits"] not in (2, 3, 4, 8):
            raise QtoolError(f"autoround: bits {opts['bits']} cannot be written as GPTQ tensors (2, 3, 4 or 8)")
        if opts["iters"] < 0:
            raise QtoolError("autoround: iters must be >= 0 (0 = optimized RTN)")
        try:
            import auto_round  # noqa: F401
        except ImportError as e:
            raise QtoolError(f"the autoround backend needs auto-round: {e}") from None
        config = cmodels.load_config(model_dir)
        t0 = time.time()
        with work_dir("qtool-autoround-") as tmp, quiet_stdout():
            try:
                _, saved = run_autoround(Path(model_dir).resolve(), spec, samples, opts, device, tmp / "out")
            except QtoolError:
                raise
            except Exception as e:  # noqa: BLE001
                raise library_error("auto-round", _version(), f"on this {config.get('model_type')} model", e) from None
            ckpt = decode_saved(saved)
            qts = {n: q.replace(codes=q.codes.clone(), scales=q.scales.clone()) for n, q in ckpt.qtensors.items()}
            # everything else as the library saved it (AWQ folds its smoothing into the norms)
            tensors = other_tensors({t: ckpt.tensors[t].clone() for t in ckpt.tensors}, set(qts), model_dtype(config))
        notes = [f"auto-round {_version()}: iters={opts['iters']}" + (" (optimized RTN)" if opts["iters"] == 0 and not opts["disable_opt_rtn"] else "")]
        return BackendResult(qts, tensors, notes, {"library": f"auto-round {_version()}", **opts, "seconds": round(time.time() - t0, 2)})
