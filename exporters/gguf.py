"""GGUF (llama.cpp; read by transformers with `gguf_file=`): Q8_0 and Q4_0 linears in one .gguf file.

The output directory holds `model-<TYPE>.gguf` plus config.json (quantization_config {"quant_method":
"gguf", "gguf_file"}), tokenizer files and qtool.json. Tensor names come from the `gguf` package's
name maps (blk.N.attn_q.weight, ...), metadata keys from its writer. Blocks (ggml-common.h) hold
32 weights along K with an fp16 scale: Q8_0 real = d * q (q int8); Q4_0 real = d * (q - 8), q in
[0, 15]. A QTensor maps exactly when it is int 8 or 4 bit, symmetric, group 32, fp16-representable
scales, weight-only: its signed code is q (Q8_0) or q - 8 (Q4_0) and its scale is d. llama.cpp's own
Q4_0 quantizer writes negative d (max / -8); qtool keeps whatever sign the file has.
As llama.cpp's converter does, llama/mistral q_proj and k_proj rows are permuted for its rope layout
(transformers reverses it on load) and Gemma norms are stored as 1 + w. Everything else is written
in the model dtype (BF16/F16/F32), 1-D tensors in F32. Byte-level BPE tokenizers (GPT-2, Llama-3,
Qwen2 style) are written as tokenizer.ggml.* (model gpt2, tokens, types, merges); SentencePiece
tokenizers (Gemma) are not, so llama.cpp needs them from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qtensor import QTensor
from qtensor import packing as pk
from qtensor.errors import QtoolError

from .base import FORMATS, Checkpoint, Format, register
from .gptq import fp16_exact

# HF model_type -> (gguf architecture, permute q/k rows like llama.cpp, gemma norm offset)
ARCHS = {"llama": ("llama", True, False), "mistral": ("llama", True, False), "qwen2": ("qwen2", False, False),
         "gemma3_text": ("gemma3", False, True)}


def _text_config(config: dict) -> dict:
    return config.get("text_config", config) if config.get("model_type") == "gemma3" else config


def _arch(config: dict) -> tuple[str, bool, bool]:
    mt = _text_config(config).get("model_type")
    if mt not in ARCHS:
        raise QtoolError(f"format gguf cannot hold a {mt} model (qtool writes GGUF for {', '.join(ARCHS)})")
    return ARCHS[mt]


def _ggml_type(qt: QTensor) -> str:
    return "Q8_0" if qt.bits == 8 else "Q4_0"


def _permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k: reshape(n_head, 2, d/2) -> swap -> flatten."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _heads(config: dict, name: str) -> int | None:
    c = _text_config(config)
    if name.endswith("self_attn.q_proj"):
        return int(c["num_attention_heads"])
    if name.endswith("self_attn.k_proj"):
        return int(c.get("num_key_value_heads") or c["num_attention_heads"])
    return None


def _hf_names(config: dict) -> list[str]:
    """Every parameter name of the architecture (meta-device skeleton, as transformers maps GGUF)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config", "model_type")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **cfg))
    return list(model.state_dict())


def _name_map(config: dict):
    import gguf

    arch = _arch(config)[0]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, int(_text_config(config)["num_hidden_layers"]))


def _gguf_name(nmap, hf_name: str) -> str:
    g = nmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if g is None:
        raise QtoolError(f"tensor {hf_name} has no GGUF name in the gguf package's {nmap.__class__.__name__}")
    return g


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _bpe_pre(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or None when qtool cannot tell."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "default"  # GPT-2's split, ByteLevel's built-in regex
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
            regex = (parts[0].get("pattern") or {}).get("Regex")
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:
                return None
            return next((name for name, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    return None


def _add_tokenizer(w, source_dir) -> bool:
    """tokenizer.ggml.* for byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 style), as llama.cpp's
    converter writes them; other tokenizers (SentencePiece, e.g. Gemma) are left out (False)."""
    import json

    import gguf

    f = Path(source_dir) / "tokenizer.json" if source_dir else None
    if f is None or not f.is_file():
        return False
    try:
        tok = json.loads(f.read_text())
    except ValueError:
        return False
    model = tok.get("model") or {}
    pre = _bpe_pre(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        return False
    vocab = dict(model.get("vocab") or {})
    types = {}
    for a in tok.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([types.get(i, gguf.TokenType.NORMAL if tokens[i] in vocab else gguf.TokenType.UNUSED) for i in range(n)])
    w.add_token_merges(merges)
    return True


@register
class GGUFFormat(Format):
    name = "gguf"
    description = "GGUF Q8_0 / Q4_0 (llama.cpp, transformers gguf_file=)"
    schemes = ("w8a16", "w4a16")
    safetensors = False

    def can_hold(self, name, qt):
        if qt.dtype != "int" or qt.bits not in (4, 8):
            return f"{qt.dtype}{qt.bits} weights (GGUF Q8_0/Q4_0 hold 8/4-bit integers)"
        if not qt.sym:
            return "asymmetric weights (Q4_0/Q8_0 are symmetric; Q4_1 is not written)"
        if qt.group_size != 32 or qt.block is not None:
            return f"group size {qt.group_size} (GGUF blocks are 32 weights along K)"
        if qt.act.kind != "none" or qt.pre_scale is not None or qt.act_order or qt.global_scale is not None:
            return "activation quantization, pre_scale, act order or a second-level scale"
        if qt.shape[1] % 32:
            return f"in_features {qt.shape[1]} not a multiple of 32"
        if not fp16_exact(qt.scales):
            return "scales not representable in fp16"
        return None

    def encode(self, name, qt):  # the .gguf is written whole by write_files
        raise NotImplementedError

    def _file(self, ckpt: Checkpoint) -> str:
        kinds = sorted({_ggml_type(q) for q in ckpt.qtensors.values()})
        return f"model-{'-'.join(kinds)}.gguf"

    def quant_config(self, ckpt):
        return {"quant_method": "gguf", "gguf_file": self._file(ckpt), "types": sorted({_ggml_type(q) for q in ckpt.qtensors.values()})}

    def write_files(self, ckpt: Checkpoint, out: Path) -> None:
        import gguf

        config = ckpt.config
        arch, permute, gemma = _arch(config)
        c = _text_config(config)
        nmap = _name_map(config)
        w = gguf.GGUFWriter(str(out / self._file(ckpt)), arch)
        # not exactly "mistral": transformers 5.24 would then look for a gguf-py arch "mistral", which gguf
        # 0.19 lacks; as llama.cpp does, a Mistral is a llama-architecture GGUF and loads as Llama
        w.add_name(f"{c['model_type']}-qtool")
        w.add_context_length(int(c.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(c["hidden_size"]))
        w.add_block_count(int(c["num_hidden_layers"]))
        w.add_feed_forward_length(int(c["intermediate_size"]))
        w.add_head_count(int(c["num_attention_heads"]))
        w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
        w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        w.add_rope_freq_base(float(theta))
        w.add_vocab_size(int(c["vocab_size"]))
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        w.add_rope_dimension_count(int(head_dim))
        if c.get("sliding_window"):
            w.add_sliding_window(int(c["sliding_window"]))
        for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id), ("pad_token_id", w.add_pad_token_id)):
            v = c.get(key)
            if isinstance(v, int):
                fn(v)
        _add_tokenizer(w, ckpt.source_dir)
        dtype = ckpt.weight_dtype
        for name, qt in sorted(ckpt.qtensors.items()):
            reason = self.can_hold(name, qt)  # checked here too: a lazily decoded source is checked on access
            if reason:
                raise QtoolError(f"format gguf cannot hold {name}: {reason}")
            codes, scales = qt.codes, qt.scales.to(torch.float16)
            h = _heads(config, name) if permute else None
            if h:
                p = _permutation(qt.shape[0], h)
                codes, scales = codes[p], scales[p]
            if qt.bits == 8:
                raw, kind = pk.pack_gguf_q8_0(codes, scales), gguf.GGMLQuantizationType.Q8_0
            else:
                raw, kind = pk.pack_gguf_q4_0(pk.signed_to_offset(codes, 4), scales), gguf.GGMLQuantizationType.Q4_0
            w.add_tensor(_gguf_name(nmap, f"{name}.weight"), raw.numpy(), raw_dtype=kind)
        for key in sorted(ckpt.tensors):
            t = ckpt.tensors[key]
            if not t.is_floating_point():
                raise QtoolError(f"tensor {key}: {t.dtype} cannot be written to GGUF")
            base = key.rsplit(".", 1)[0]
            h = _heads(config, base) if permute else None
            if h and key.endswith(".weight"):
                t = t[_permutation(t.shape[0], h)]
            if t.dim() == 1:
                t = t.float() + (1.0 if gemma and key.endswith("norm.weight") else 0.0)
            elif t.dtype != dtype and t.element_size() > 1:
                t = t.to(dtype)
            if t.dtype == torch.float32:
                w.add_tensor(_gguf_name(nmap, key), t.contiguous().numpy())
            elif t.dtype == torch.float16:
                w.add_tensor(_gguf_name(nmap, key), t.contiguous().numpy())
            elif t.dtype == torch.bfloat16:
                w.add_tensor(_gguf_name(nmap, key), t.contiguous().view(torch.uint8).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                raise QtoolError(f"tensor {key}: {t.dtype} cannot be written to GGUF")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def detect(self, path, config):
        qc = config.get("quantization_config") or {}
        return isinstance(qc, dict) and qc.get("quant_method") == "gguf"

    def decode(self, path: Path, config: dict) -> Checkpoint:
        import gguf

        qc = config["quantization_config"]
        fname = qc.get("gguf_file")
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or not fname.endswith(".gguf"):
            raise QtoolError(f"gguf quantization_config names no valid gguf_file: {fname!r}")
        f = Path(path) / fname
        if not f.is_file():
            raise QtoolError(f"{path}: GGUF file {fname} is missing")
        return self.decode_file(f, config, Path(path))

    def decode_file(self, f: Path, config: dict, source_dir: Path | None) -> Checkpoint:
        import gguf

        fname = f.name
        try:
            reader = gguf.GGUFReader(str(f))
        except Exception as e:  # noqa: BLE001
            raise QtoolError(f"{fname}: unreadable GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        arch, permute, gemma = _arch(config)
        nmap = _name_map(config)
        reverse = {}
        for hf in _hf_names(config):
            g = nmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if g is not None:
                reverse.setdefault(g, hf)
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        qts, tensors = {}, {}
        Q = gguf.GGMLQuantizationType
        for t in reader.tensors:
            hf = reverse.get(t.name)
            if hf is None:
                raise QtoolError(f"GGUF tensor {t.name} does not belong to a {config.get('model_type')} model")
            shape = [int(x) for x in reversed(t.shape.tolist())]  # ggml ne[] is innermost first
            data = torch.from_numpy(np.array(t.data, copy=True))
            base = hf.rsplit(".", 1)[0]
            h = _heads(config, base) if (permute and hf.endswith(".weight")) else None
            inv = torch.argsort(_permutation(shape[0], h)) if h else None
            if t.tensor_type in (Q.Q8_0, Q.Q4_0):
                if len(shape) != 2 or shape[1] % 32:
                    raise QtoolError(f"GGUF tensor {t.name} has shape {shape}, not 2-D rows of 32-blocks")
                bpb = 34 if t.tensor_type == Q.Q8_0 else 18
                raw = data.reshape(shape[0], shape[1] // 32 * bpb)
                if t.tensor_type == Q.Q8_0:
                    codes, d = pk.unpack_gguf_q8_0(raw)
                    bits = 8
                else:
                    q, d = pk.unpack_gguf_q4_0(raw)
                    codes, bits = pk.offset_to_signed(q, 4), 4
                if inv is not None:
                    codes, d = codes[inv].contiguous(), d[inv].contiguous()
                if not torch.isfinite(d).all():
                    raise QtoolError(f"GGUF tensor {t.name} holds NaN or Inf scales")
                qts[base] = QTensor("int", bits, codes, d, None, 32, orig_dtype=dtype)
            elif t.tensor_type in (Q.F32, Q.F16, Q.BF16):
                if t.tensor_type == Q.BF16:
                    val = data.contiguous().view(torch.bfloat16).reshape(shape)
                else:
                    val = data.reshape(shape)
                if inv is not None:
                    val = val[inv]
                if gemma and hf.endswith("norm.weight"):
                    val = val.float() - 1.0
                if val.dim() == 1 or val.dtype != dtype:
                    val = val.to(dtype)
                tensors[hf] = val.contiguous()
            else:
                raise QtoolError(f"GGUF tensor {t.name} is {t.tensor_type.name}: qtool reads Q8_0, Q4_0, F32, F16, BF16")
        if not qts:
            raise QtoolError(f"{fname}: no Q8_0/Q4_0 tensors")
        return Checkpoint(config, qts, tensors, source_dir)

    def engines(self, ckpt):
        return [("llama.cpp", True, "Q8_0/Q4_0 (tokenizer metadata only for byte-level BPE tokenizers; untested in llama.cpp itself)"),
                ("transformers", True, "gguf_file= (dequantized to a plain model on load)")]


def read_gguf_file(path: Path) -> Checkpoint:
    """A bare .gguf (llama.cpp's or ours) whose linears are Q8_0/Q4_0: config from the file's metadata
    (transformers' GGUF config reader), no tokenizer files (the tokenizer stays in the .gguf)."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001
        raise QtoolError(f"{path.name}: cannot read the GGUF metadata ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    ckpt = FORMATS["gguf"].decode_file(path, config, None)
    ckpt.format = "gguf"
    return ckpt
