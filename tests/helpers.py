"""Shared test helpers: a Checkpoint built straight from a tiny model's weights."""

from pathlib import Path

import torch

from calibrate.algorithms.gptq import gptq_quantize
from calibrate.algorithms.rtn import quantize_weight
from calibrate.models import load_config
from exporters import Checkpoint
from exporters.io import TensorDir
from qtensor.schemes import WeightSpec


def linear_names(td, config) -> list[str]:
    # decoder linears, without MoE routers (`mlp.gate`: kept in full precision, as the pipeline does)
    return sorted(k[:-7] for k in td if k.endswith(".weight") and ".layers." in k and len(td.shape(k)) == 2 and "norm" not in k
                  and not k.endswith(".mlp.gate.weight"))


def make_checkpoint(model_dir: Path, spec: WeightSpec, act_order: bool = False, static_groups: bool = True, method: str = "rtn") -> Checkpoint:
    td = TensorDir(model_dir)
    config = load_config(model_dir)
    names = linear_names(td, config)
    qts = {}
    g = torch.Generator().manual_seed(0)
    for n in names:
        w = td[f"{n}.weight"].float()
        if method == "gptq" or act_order:
            x = torch.randn(256, w.shape[1], generator=g) * torch.linspace(0.1, 3, w.shape[1])
            H = 2 * x.t() @ x / x.shape[0]
            qts[n] = gptq_quantize(w, H, spec, act_order=act_order, static_groups=static_groups).qtensor
        else:
            qts[n] = quantize_weight(w, spec)
    tensors = {k: td[k] for k in td if k[:-7] not in qts}
    return Checkpoint(config, qts, tensors, model_dir, {"source": str(model_dir), "source_path": str(model_dir)})


def corrupt_scales(ckpt_dir: Path, module: str, factor: float = 4.0) -> None:
    """Multiply the stored scales of one module (`{module}.scales`, `{module}.weight_scale`, ...) in place,
    rewriting its safetensors file with the same metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    hit = False
    for p in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(p), "pt") as h:
            meta = h.metadata()
            names = [k for k in h.keys() if k.startswith(module + ".") and k[len(module) + 1 :] in ("scales", "weight_scale", "weight_scale_inv")]
        if not names:
            continue
        tensors = load_file(p)
        for k in names:
            tensors[k] = (tensors[k].float() * factor).to(tensors[k].dtype)
        save_file(tensors, str(p), metadata=meta)
        hit = True
    if not hit:
        raise KeyError(f"no scales of {module} in {ckpt_dir}")


def gluon_sm90(fn, sig: dict, constexprs: dict, num_warps: int, divisible=None):
    """A Gluon kernel compiled for sm_90 on this machine (ptxas ships with Triton; no GPU): (compiled kernel, its SASS,
    cuobjdump's resource usage). divisible: the parameters marked 16-divisible (default: all of sig)."""
    import os
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import _runtime as gluon_rt

    bin_ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (names if divisible is None else divisible)}
    k = triton.compile(gluon_rt.GluonASTSource(fn=fn, signature=dict(sig, **{c: "constexpr" for c in constexprs}),
                                               constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gluon_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    try:
        sass = subprocess.run([os.path.join(bin_, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(bin_, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    return k, sass, res
