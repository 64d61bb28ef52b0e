"""Huawei msModelSlim as a backend: its own W8A8 / W8A8_DYNAMIC quantizer on qtool's calibration samples.

msModelSlim's Python API (`msmodelslim.pytorch.llm_ptq.llm_ptq_tools`, the documented LLM PTQ route)
takes token ids directly, so it sees exactly qtool's samples:

1. Load the model in float32 on CPU (msModelSlim's CPU path wants an fp32 model; a bf16 source is
   upcast exactly and the config still names bf16, which msModelSlim honours when it saves).
2. `Calibrator(model, QuantConfig(...), calib_data=[[ids[None]] for each sample], disable_level)`,
   `calibrator.run()`, `calibrator.save(tmp, save_type=["safe_tensor"])`: msModelSlim writes
   quant_model_weight_<type>.safetensors + quant_model_description_<type>.json.
3. That output is decoded with exporters.msmodelslim (the same reader that takes msModelSlim's CLI
   output), so the QTensors are exactly what msModelSlim saved: int8 codes, per-channel float32
   weight_scale, and for W8A8 the static per-tensor asymmetric input_scale / input_offset.

Schemes: w8a8-int8-static -> msModelSlim "W8A8" (QuantConfig(w_bit=8, a_bit=8, is_dynamic=False)),
w8a8-int8 -> "W8A8_DYNAMIC" (is_dynamic=True). Defaults are msModelSlim's documented W8A8 settings:
act_method=1 (min-max activation ranges), symmetric per-channel weights (w_sym=True, mm_tensor=False),
w_method MinMax, pr=1.0, disable_level L0, disable_last_linear (lm_head stays float).

Not offered: msModelSlim's W4A8_DYNAMIC does run on CPU through this API, but it writes a two-level
per-group layout (weight_scale_second / weight_offset_second) with int8 per-token activations, which
is neither qtool's w4a8 scheme (fp8 activations) nor a layout qtool's msModelSlim reader holds; W4A4
needs is_dynamic int4 activations that msModelSlim's CPU path does not implement.

`--device cuda` is refused: msModelSlim targets CPU and Ascend NPUs, and qtool runs it on CPU only.
Options (`--option KEY=VALUE`, passed to QuantConfig/Calibrator): act_method (1 min-max, 2 histogram,
3 auto-mixed), pr, w_method (26.1 takes only MinMax for W8A8), disable_names (comma-separated module names kept
float), disable_last_linear, disable_level (L0 = no automatic rollback, Ln = roll back the n linears
with the widest activation range). Not passed: mm_tensor=True (per-tensor weights: msModelSlim then
writes a [1] deq_scale that the W8A8 layout here does not hold) and msModelSlim's AntiOutlier (its
m1..m6 smoothing wraps the norms and adds norm biases, which HF decoders and qtool's runtime lack).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from calibrate import models as cmodels
from qtensor.errors import QtoolError

from . import BackendResult, register
from .common import first_line, keep_pydantic, model_dtype, other_tensors, quiet_stdout, take_options, work_dir

QUANT_TYPE = {"w8a8-int8-static": "W8A8", "w8a8-int8": "W8A8_DYNAMIC"}
TRIM_HEAP = True  # see _trim_after_each_forward


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("msmodelslim")
    except Exception:  # noqa: BLE001
        return "not installed"


def _import():
    try:
        with keep_pydantic():  # msModelSlim patches pydantic process-wide on import
            from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig
    except ImportError as e:
        raise QtoolError(f"the msmodelslim backend needs msmodelslim (pip install msmodelslim): {e}") from None
    return Calibrator, QuantConfig


def _cause(e: BaseException) -> BaseException:
    """msModelSlim wraps failures as Exception("Please check the model and configuration.", inner): the inner one."""
    while isinstance(e, Exception) and len(e.args) == 2 and isinstance(e.args[1], BaseException):
        e = e.args[1]
    return e


def _error(what: str, e: BaseException) -> QtoolError:
    c = _cause(e)
    return QtoolError(f"msmodelslim {_version()} failed {what}: {type(c).__name__}: {first_line(c)}")


def quant_config(scheme, opts: dict):
    """msModelSlim's QuantConfig for the scheme with the options applied."""
    _, QuantConfig = _import()
    names = [n.strip() for n in opts["disable_names"].split(",") if n.strip()]
    try:
        cfg = QuantConfig(w_bit=8, a_bit=8, dev_type="cpu", act_method=opts["act_method"], pr=opts["pr"], w_method=opts["w_method"],
                          w_sym=True, mm_tensor=False, disable_names=names, disable_last_linear=opts["disable_last_linear"],
                          is_dynamic=scheme.name == "w8a8-int8")
    except Exception as e:  # noqa: BLE001 - msModelSlim's own validation, named
        raise _error("to build its QuantConfig", e) from None
    want = QUANT_TYPE[scheme.name]
    if str(getattr(cfg.model_quant_type, "value", cfg.model_quant_type)) != want:
        raise QtoolError(f"msmodelslim QuantConfig gives {cfg.model_quant_type} for scheme {scheme.name} (expected {want})")
    return cfg


def _trim_after_each_forward(model) -> None:
    """Hand freed heap back to the OS after every calibration forward (glibc malloc_trim). msModelSlim's
    calibration holds no tensors from one sample to the next, yet without this the process RSS grows by
    about the size of one sample's linear inputs per sample (64 x 512 on Gemma-3-270M: 15 GiB)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    model.register_forward_hook(lambda *_: trim(0))


def run_msmodelslim(model_dir: Path, scheme, samples: torch.Tensor, opts: dict, out: Path) -> list[str]:
    """Quantize with msModelSlim on CPU and save its safe_tensor output under `out`; returns the rolled-back layer names."""
    Calibrator, _ = _import()
    cfg = quant_config(scheme, opts)
    if not re.fullmatch(r"L\d+", opts["disable_level"]):
        raise QtoolError(f"msmodelslim: disable_level must be L0, L1, ... (got {opts['disable_level']!r})")
    model = cmodels.load_model(model_dir, torch.float32, "cpu")
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        # tied head (Gemma): msModelSlim's safetensors save refuses shared tensors; give the head its own copy
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone(), requires_grad=False)
    calib = [[row[None].clone()] for row in samples]
    if TRIM_HEAP:
        _trim_after_each_forward(model)
    out = Path(out).resolve()
    try:
        with work_dir("qtool-msmodelslim-cwd-"):  # msModelSlim writes features.npy into the working directory
            cal = Calibrator(model, cfg, calib_data=calib, disable_level=opts["disable_level"])
            cal.run()
            cal.save(str(out), save_type=["safe_tensor"])
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's failure, named
        raise _error(f"to quantize this {model.config.model_type} model to {QUANT_TYPE[scheme.name]}", e) from None
    return sorted(cal.rollback_names or [])


def decode_saved(path: Path, config: dict):
    """msModelSlim's saved output (no config.json of its own) -> Checkpoint, with qtool's msModelSlim reader."""
    from exporters.msmodelslim import MsModelSlimFormat

    fmt = MsModelSlimFormat()
    if not fmt.detect(path, config):
        raise QtoolError(f"msmodelslim {_version()} wrote no quant_model_description*.json")
    return fmt.decode(path, config)


@register
class MsModelSlimBackend:
    name = "msmodelslim"
    schemes = tuple(QUANT_TYPE)
    OPTIONS = {"act_method": 1, "pr": 1.0, "w_method": "MinMax", "disable_names": "", "disable_last_linear": True, "disable_level": "L0"}

    def quantize(self, model_dir, scheme, spec, samples, options, device, progress):
        if device != "cpu":
            raise QtoolError("backend msmodelslim runs msModelSlim's quantizer on CPU only (msModelSlim targets CPU and Ascend NPUs); use --device cpu")
        if scheme.name not in QUANT_TYPE:
            raise QtoolError(f"backend msmodelslim does not support scheme {scheme.name} (it supports: {', '.join(QUANT_TYPE)})")
        if not spec.sym:
            raise QtoolError("msModelSlim's W8A8 weights are symmetric (w_sym must be true with 8-bit activations): drop --asym")
        if spec.group_size != -1:
            raise QtoolError("msModelSlim's W8A8 weights are per channel (--group-size -1)")
        opts = take_options(self.name, options, self.OPTIONS)
        _import()
        config = cmodels.load_config(model_dir)
        t0 = time.time()
        task = progress.add_task(f"msmodelslim {QUANT_TYPE[scheme.name]}", total=None) if progress else None
        with work_dir("qtool-msmodelslim-") as tmp, quiet_stdout():
            rolled = run_msmodelslim(Path(model_dir).resolve(), scheme, samples, opts, tmp / "out")
            ckpt = decode_saved(tmp / "out", config)
            qts = {n: q.replace(codes=q.codes.clone(), scales=q.scales.clone(), zeros=None if q.zeros is None else q.zeros.clone())
                   for n, q in ckpt.qtensors.items()}
            tensors = other_tensors({t: ckpt.tensors[t].clone() for t in ckpt.tensors}, set(qts), model_dtype(config))
        if progress:
            progress.update(task, completed=1, total=1)
        if config.get("tie_word_embeddings") and "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors \
                and torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            del tensors["lm_head.weight"]  # msModelSlim saves the tied head as its own copy
        kept = [n for n in rolled if n not in qts]
        notes = [f"msmodelslim {_version()} {QUANT_TYPE[scheme.name]} (act_method={opts['act_method']}, w_method={opts['w_method']})",
                 "msModelSlim kept in float: " + (", ".join(kept) if kept else "none")]
        return BackendResult(qts, tensors, notes, {"library": f"msmodelslim {_version()}", "quant_type": QUANT_TYPE[scheme.name], **opts,
                                                   "rolled_back": kept, "seconds": round(time.time() - t0, 2)})
