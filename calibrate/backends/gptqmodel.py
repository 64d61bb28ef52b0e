"""GPTQModel as a backend: its GPTQ (and AWQ where it works) on qtool's calibration samples.

GPTQModel loads the model itself (QuantizeConfig(device="cpu" or "cuda")), quantizes with qtool's
samples as its calibration dataset and saves its checkpoint into a temporary directory, which is also
the working directory while it runs (GPTQModel writes ./logs and offload folders). The saved checkpoint
(GPTQ v1, or AWQ gemm for method=awq) is decoded with qtool's exporters, so the QTensors are exactly
what GPTQModel writes. Options (`--option KEY=VALUE`): method (gptq | awq), damp_percent, desc_act
(default false so vLLM loads the result), act_group_aware, static_groups, mse, batch_size.
An architecture GPTQModel does not know is refused before loading, naming the version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from calibrate import models as cmodels
from qtensor.errors import QtoolError

from . import BackendResult, register
from .common import model_dtype, other_tensors, quiet_stdout, take_options, work_dir


def _import():
    # GPTQModel sizes its CPU thread pool from os.cpu_count() and refuses to start with fewer than the
    # two loader workers it asks for (a 2-core machine gets 1): give it two.
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import gptqmodel
    except ImportError as e:
        raise QtoolError(f"the gptqmodel backend needs gptqmodel: {e}") from None
    return gptqmodel


def _version() -> str:
    try:
        return _import().__version__
    except QtoolError:
        return "not installed"


def check_architecture(config: dict) -> None:
    from gptqmodel.models.auto import SUPPORTED_MODELS

    mt = config.get("model_type")
    if mt not in SUPPORTED_MODELS:
        raise QtoolError(f"gptqmodel {_version()} does not support the {mt} architecture ({len(SUPPORTED_MODELS)} model types known; upgrade gptqmodel or use --backend native)")


def run_gptqmodel(model_dir: Path, spec, samples: torch.Tensor, opts: dict, device: str, out: Path):
    """Quantize with GPTQModel and save under `out`; returns the quantized GPTQModel wrapper."""
    gm = _import()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD

    kw = dict(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=opts["desc_act"], device=device,
              damp_percent=opts["damp_percent"], act_group_aware=opts["act_group_aware"], static_groups=opts["static_groups"])
    if opts["mse"]:
        kw["mse"] = opts["mse"]
    if opts["method"] == "awq":
        kw = dict(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, device=device, method=METHOD.AWQ, format=FORMAT.GEMM)
    elif opts["method"] != "gptq":
        raise QtoolError(f"gptqmodel backend: method must be gptq or awq, not {opts['method']!r}")
    qc = QuantizeConfig(**kw)
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in samples]
    model = GPTQModel.load(str(model_dir), qc)
    model.quantize(data, batch_size=opts["batch_size"])
    model.save(str(out))
    del gm
    return model


def run_isolated(model_dir: Path, spec, samples: torch.Tensor, opts: dict, device: str, tmp: Path) -> Path:
    """run_gptqmodel in a child process with cwd `tmp`: GPTQModel's worker threads end the whole
    interpreter (os._exit(1)) when a task fails, which must not take qtool down with it. Returns the
    saved checkpoint directory; a failure becomes a QtoolError with the library's own last error line."""
    import re
    import subprocess
    import sys

    torch.save({"samples": samples, "spec": [spec.bits, spec.group_size, spec.sym], "opts": opts, "device": device,
                "model_dir": str(model_dir)}, tmp / "job.pt")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    if (os.cpu_count() or 1) < 4:
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with open(tmp / "gptqmodel.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "calibrate.backends.gptqmodel", str(tmp / "job.pt"), str(tmp / "out")],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (tmp / "out" / "config.json").is_file():
        text = (tmp / "gptqmodel.log").read_text(errors="replace")
        errs = [m.group(0).strip() for m in re.finditer(r"(?m)^[A-Za-z_.]*(Error|Exception)\b[^\n]*", text)]
        why = errs[-1][:300] if errs else f"exit code {rc}"
        raise QtoolError(f"gptqmodel {_version()} failed to run {opts['method']} on this {_model_type(model_dir)} model: {why}")
    return tmp / "out"


def _model_type(model_dir: Path) -> str:
    return str(cmodels.load_config(model_dir).get("model_type"))


def _child(job: str, out: str) -> None:
    """Entry point of the child process (python -m calibrate.backends.gptqmodel JOB OUT)."""
    from qtensor.schemes import WeightSpec

    j = torch.load(job, weights_only=False)
    bits, gs, sym = j["spec"]
    spec = WeightSpec("int", bits, gs, sym, None, torch.float16)
    run_gptqmodel(Path(j["model_dir"]), spec, j["samples"], j["opts"], j["device"], Path(out))


def decode_saved(path: Path):
    """GPTQModel's saved checkpoint (gptq v1 or awq gemm) -> Checkpoint of QTensors."""
    from exporters import FORMATS

    config = json.loads((path / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in ("gptq", "awq") or method not in FORMATS:
        raise QtoolError(f"gptqmodel wrote a {method} checkpoint, which qtool cannot read")
    return FORMATS[method].decode(path, config)


@register
class GPTQModelBackend:
    name = "gptqmodel"
    schemes = ("w4a16", "w8a16")
    OPTIONS = {"method": "gptq", "damp_percent": 0.01, "desc_act": False, "act_group_aware": True, "static_groups": False,
               "mse": 0.0, "batch_size": 1}

    def quantize(self, model_dir, scheme, spec, samples, options, device, progress):
        opts = take_options(self.name, options, self.OPTIONS)
        if spec.bits not in (2, 3, 4, 8):
            raise QtoolError(f"gptqmodel: {spec.bits}-bit weights are not supported (2, 3, 4, 8)")
        _import()
        config = cmodels.load_config(model_dir)
        check_architecture(config)
        t0 = time.time()
        model_dir = Path(model_dir).resolve()
        with work_dir("qtool-gptqmodel-") as tmp, quiet_stdout():
            ckpt = decode_saved(run_isolated(model_dir, spec, samples, opts, device, tmp))
            qts = {n: q.replace(codes=q.codes.clone(), scales=q.scales.clone(), zeros=None if q.zeros is None else q.zeros.clone())
                   for n, q in ckpt.qtensors.items()}
            # everything else as the library saved it (AWQ folds its smoothing into the norms)
            tensors = other_tensors({t: ckpt.tensors[t].clone() for t in ckpt.tensors}, set(qts), model_dtype(config))
        notes = [f"gptqmodel {_version()} {opts['method']}"]
        return BackendResult(qts, tensors, notes, {"library": f"gptqmodel {_version()}", **opts, "seconds": round(time.time() - t0, 2)})


if __name__ == "__main__":
    import sys

    _child(sys.argv[1], sys.argv[2])
