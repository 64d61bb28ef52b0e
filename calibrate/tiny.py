"""Tiny random-initialised decoders (Llama, Qwen2, Mistral, Gemma3, Qwen3-MoE) for fast tests and benches.

No download: the tokenizer is a small BPE trained on the built-in pydoc text, the weights are
seeded random values. Shapes are multiples of 128 so every group size and packing applies.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "gemma3", "qwen3_moe")


def make_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import pydoc_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str, vocab_size: int = 512, hidden: int = 128, layers: int = 2):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        return AutoConfig.for_model("llama", **common)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", **common)
    if arch == "mistral":
        return AutoConfig.for_model("mistral", sliding_window=None, **common)
    if arch == "gemma3":
        common.update(tie_word_embeddings=True)
        return AutoConfig.for_model("gemma3_text", head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"][:layers] * (layers // 2 or 1), query_pre_attn_scalar=32, **common)
    if arch == "qwen3_moe":
        return AutoConfig.for_model("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1, head_dim=32, **common)
    raise ValueError(f"unknown tiny architecture {arch}")


def make_tiny_model(arch: str, out: Path, seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers=layers)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out
