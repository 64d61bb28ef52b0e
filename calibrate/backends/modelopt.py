"""NVIDIA ModelOpt as a backend: `mtq.quantize` with ModelOpt's own config, calibrated on qtool's samples.

1. Load the model in float32, run `modelopt.torch.quantization.quantize(model, CFG, loop)` where the
   loop feeds qtool's calibration samples (max calibration; AWQ-lite search for INT4/W4A8; SmoothQuant
   for INT8).
2. Run ModelOpt's own pre-export step (`requantize_resmooth_fused_llm_layers`): linears that read the
   same input (q/k/v, gate/up) get one input amax (and one weight amax where it is per tensor), AWQ
   smoothing is averaged over them and folded into the preceding norm where one exists.
3. Read every enabled weight quantizer's amax (and the input quantizer's amax and pre_quant_scale) into
   a QTensor, with the scale math of qtensor.numerics reproducing what `export_hf_checkpoint` writes:
   FP8 weight scale amax/448, INT4 per-group amax/7, INT8 per-channel amax/127, NVFP4 global
   amax/(6*448) with per-16 e4m3 scales, MX e8m0 = 2^ceil(log2(amax/elem_max)).

Config per scheme: fp8 FP8_DEFAULT_CFG (static per-tensor fp8 activations), nvfp4 NVFP4_DEFAULT_CFG,
w4a16 INT4_AWQ_CFG, w4a8 W4A8_AWQ_BETA_CFG (int4 weights, static per-tensor fp8 activations),
w8a8-int8 INT8_SMOOTHQUANT_CFG (static per-tensor int8 activations after smoothing), mxfp8 / mxfp4
MXFP8/MXFP4_DEFAULT_CFG (weights only are carried: ModelOpt's dynamic MX activation quantization has
no counterpart in qtool's schemes, noted in the result).

Every one of these configs runs on CPU with ModelOpt 0.47 (its NVFP4 fake quantization has a torch
path); `--device cuda` runs the same code on a GPU. Options (`--option KEY=VALUE`): `algorithm`
(ModelOpt calibration algorithm, e.g. max, awq_lite, awq_clip, awq_full, smoothquant) and
`config` (another ModelOpt config name from modelopt.torch.quantization, same scheme).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from calibrate import models as cmodels
from qtensor import ActQuant, QTensor
from qtensor import numerics as nm
from qtensor.errors import QtoolError

from . import BackendResult, register
from .common import library_error, model_dtype, other_tensors, quiet_stdout, take_options

CONFIGS = {
    "fp8": "FP8_DEFAULT_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "w4a16": "INT4_AWQ_CFG",
    "w4a8": "W4A8_AWQ_BETA_CFG",
    "w8a8-int8": "INT8_SMOOTHQUANT_CFG",
    "mxfp8": "MXFP8_DEFAULT_CFG",
    "mxfp4": "MXFP4_DEFAULT_CFG",
}
# ModelOpt's name for what get_quantization_format reports, per scheme
FORMAT_OF = {"fp8": "fp8", "nvfp4": "nvfp4", "w4a16": "int4_awq", "w4a8": "w4a8_awq", "w8a8-int8": "int8_sq", "mxfp8": "mxfp8", "mxfp4": "mxfp4"}


def _version() -> str:
    import modelopt

    return getattr(modelopt, "__version__", "?")


def _set_block_size(cfg, group_size: int) -> None:
    """Replace the static int4 weight block size (128 in ModelOpt's configs) by `group_size`."""
    if isinstance(cfg, dict):
        if cfg.get("num_bits") == 4 and isinstance(cfg.get("block_sizes"), dict) and cfg["block_sizes"].get("type", "static") == "static":
            cfg["block_sizes"][-1] = group_size
        for v in cfg.values():
            _set_block_size(v, group_size)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            _set_block_size(v, group_size)


def build_config(scheme, spec, opts: dict) -> dict:
    import modelopt.torch.quantization as mtq

    name = opts["config"] or CONFIGS[scheme.name]
    if not hasattr(mtq, name) or not isinstance(getattr(mtq, name), dict):
        raise QtoolError(f"modelopt {_version()} has no quantization config {name}")
    cfg = copy.deepcopy(getattr(mtq, name))
    if spec.dtype == "int":
        if not spec.sym:
            raise QtoolError("ModelOpt's integer configs are symmetric only (drop --asym)")
        if scheme.name in ("w4a16", "w4a8"):
            if spec.bits != 4:
                raise QtoolError(f"ModelOpt {CONFIGS[scheme.name]} is 4-bit only")
            if spec.group_size <= 0:
                raise QtoolError("ModelOpt INT4 AWQ needs a group size > 0 (it quantizes in blocks)")
            _set_block_size(cfg, spec.group_size)
        elif spec.group_size != -1:
            raise QtoolError("ModelOpt INT8 SmoothQuant uses per-channel weight scales (--group-size -1)")
    if opts["algorithm"]:
        cfg["algorithm"] = opts["algorithm"]
    return cfg


def calibrate(model: nn.Module, scheme, spec, samples: torch.Tensor, opts: dict, device: str, progress=None) -> nn.Module:
    """mtq.quantize with the scheme's config and a loop over `samples`, then ModelOpt's pre-export fusion."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    cfg = build_config(scheme, spec, opts)
    task = progress.add_task(f"modelopt {scheme.name} calibration", total=len(samples)) if progress else None

    def loop(m):
        for row in samples:
            m(row[None].to(device), use_cache=False)
            if progress:
                progress.update(task, advance=1)

    try:
        with quiet_stdout(), torch.no_grad():
            model = mtq.quantize(model, cfg, loop)
            requantize_resmooth_fused_llm_layers(model)
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's failure, named
        raise library_error("modelopt", _version(), f"to quantize this {model.config.model_type} model with {cfg.get('algorithm')}", e) from None
    return model


def _enabled(q) -> bool:
    return q is not None and getattr(q, "is_enabled", False)


def qtensor_of(mod: nn.Module, fmt: str) -> QTensor:
    """The QTensor ModelOpt's export would write for one calibrated linear (ModelOpt format `fmt`)."""
    w = mod.weight.detach().float().cpu()
    n, k = w.shape
    wq, iq = mod.weight_quantizer, getattr(mod, "input_quantizer", None)
    pre = getattr(iq, "_pre_quant_scale", None) if iq is not None else None
    pre = None if pre is None else pre.detach().float().cpu().reshape(-1).clone()

    def in_amax():
        a = iq.export_amax() if _enabled(iq) else None
        return None if a is None else a.detach().float().cpu().reshape(())

    if fmt == "fp8":
        scale = nm.fp8_scale_from_amax(wq.export_amax().detach().float().cpu().reshape(1))
        ia = in_amax()
        act = ActQuant("static", "fp8_e4m3", "tensor", scale=(ia / nm.FP8_MAX).reshape(1)) if ia is not None else ActQuant()
        return QTensor("fp8_e4m3", 8, nm.fp8_quantize(w, scale), scale, None, 0, act=act, pre_scale=pre)
    if fmt in ("int4_awq", "w4a8_awq"):
        q0 = wq[0] if fmt == "w4a8_awq" else wq
        gsz = q0.block_sizes[-1]
        scale = nm.int_scale_from_amax(q0.export_amax().detach().float().cpu().reshape(n, k // gsz), 4)
        act = ActQuant()
        if fmt == "w4a8_awq":
            ia = in_amax()
            act = ActQuant("static", "fp8_e4m3", "tensor", scale=(ia / nm.FP8_MAX).reshape(1))
        return QTensor("int", 4, nm.int_quantize(w, scale, None, 4, gsz), scale, None, gsz, act=act, pre_scale=pre)
    if fmt == "int8_sq":
        scale = nm.int_scale_from_amax(wq.export_amax().detach().float().cpu().reshape(n, 1), 8)
        ia = in_amax()
        act = ActQuant("static", "int8", "tensor", scale=(ia / 127.0).reshape(1)) if ia is not None else ActQuant()
        return QTensor("int", 8, nm.int_quantize(w, scale, None, 8, -1), scale, None, -1, act=act, pre_scale=pre)
    if fmt == "nvfp4":
        block = wq.block_sizes[-1]
        bs, gs = nm.nvfp4_scales_from_amax(w, wq.export_amax().detach().float().cpu(), block)
        ia = in_amax()
        act = ActQuant("dynamic", "e2m1", "group", scale=(ia / (nm.E2M1_MAX * nm.FP8_MAX)).reshape(1) if ia is not None else None, group_size=block)
        return QTensor("e2m1", 4, nm.nvfp4_quantize(w, bs, gs, block), bs, None, block, global_scale=gs, act=act, pre_scale=pre)
    if fmt in ("mxfp8", "mxfp4"):
        block = wq.block_sizes[-1]
        emax = nm.FP8_MAX if fmt == "mxfp8" else nm.E2M1_MAX
        e = nm.e8m0_scales_ceil(w, block, emax)
        s = nm.expand_to_columns(nm.e8m0_to_float(e), k, block)
        if fmt == "mxfp8":
            return QTensor("mxfp8", 8, nm.fp8_quantize(w, s), e, None, block, pre_scale=pre)
        return QTensor("e2m1", 4, nm.e2m1_round_half_down(w / s), e, None, block, pre_scale=pre)
    raise QtoolError(f"modelopt quantization format {fmt} has no qtool representation yet")


def read_qtensors(model: nn.Module) -> dict[str, QTensor]:
    """Every linear whose weight quantizer is enabled, as a QTensor (lm_head and routers stay as ModelOpt left them)."""
    from modelopt.torch.export.quant_utils import get_quantization_format

    qts = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not _enabled(getattr(mod, "weight_quantizer", None)):
            continue
        fmt = get_quantization_format(mod)
        if fmt is None:
            continue
        qts[name] = qtensor_of(mod, fmt)
    return qts


@register
class ModelOptBackend:
    name = "modelopt"
    schemes = tuple(CONFIGS)
    OPTIONS = {"algorithm": "", "config": ""}

    def quantize(self, model_dir, scheme, spec, samples, options, device, progress):
        opts = take_options(self.name, options, self.OPTIONS)
        try:
            import modelopt.torch.quantization  # noqa: F401
        except ImportError as e:
            raise QtoolError(f"the modelopt backend needs nvidia-modelopt: {e}") from None
        config = cmodels.load_config(model_dir)
        t0 = time.time()
        model = cmodels.load_model(model_dir, torch.float32, device)
        model = calibrate(model, scheme, spec, samples, opts, device, progress)
        qts = read_qtensors(model)
        want = FORMAT_OF[scheme.name]
        if opts["config"] == "":
            from modelopt.torch.export.quant_utils import get_quantization_format

            odd = sorted({get_quantization_format(m) for n, m in model.named_modules() if n in qts} - {want})
            if odd:
                raise QtoolError(f"modelopt produced {', '.join(map(str, odd))} layers for scheme {scheme.name} (expected {want})")
        if not qts:
            raise QtoolError("modelopt quantized no linear layer of this model")
        tensors = other_tensors(model.state_dict(), set(qts), model_dtype(config), skip=lambda k: "_quantizer" in k)
        notes = []
        n_pre = sum(q.pre_scale is not None for q in qts.values())
        if n_pre:
            notes.append(f"{n_pre} layers keep ModelOpt's pre_quant_scale (smoothing with no preceding norm to fold into)")
        if scheme.name in ("mxfp8", "mxfp4"):
            notes.append("ModelOpt also quantizes activations dynamically in MX format; qtool's scheme carries the weights only")
        if scheme.name == "w4a8":
            notes.append("ModelOpt W4A8_AWQ activations are static per-tensor fp8 (input_scale), not dynamic")
        if scheme.name == "w8a8-int8":
            notes.append("ModelOpt INT8 SmoothQuant activations are static per-tensor int8 (one calibrated input_scale after "
                         "pre_quant_scale), not the dynamic per-token int8 of qtool's native w8a8-int8")
        cfg = build_config(scheme, spec, opts)
        return BackendResult(qts, tensors, notes, {"library": f"modelopt {_version()}", "config": opts["config"] or CONFIGS[scheme.name],
                                                   "algorithm": str(cfg.get("algorithm")), "seconds": round(time.time() - t0, 2)})
