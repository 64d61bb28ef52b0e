"""bench/e2e_gpu.py's CUDA-graph decode step, run eagerly on the CPU: a StaticCache, the step writing its own next
token and position, gives the tokens of an ordinary greedy decode with a dynamic cache. (Recent transformers keep the
write position in the cache itself, a tensor updated in place; older ones take it from cache_position: the step
advances both.)"""

import os

import torch

# bench.e2e_gpu imports runtime.kernels, which defines the Triton kernels: under the interpreter, as tests/test_kernels.py
# (run after this file in one process) needs them (Triton decides at definition)
os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.e2e_gpu import decode_graph  # noqa: E402


def test_static_decode_step_matches_greedy_decode():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.inference_mode():
        torch.manual_seed(1)
        got = decode_graph(model, 100, 2, steps=6, prompt=8)
        torch.manual_seed(1)
        ids = torch.randint(0, 100, (2, 8))  # the prompt decode_graph draws
        res = model(ids, use_cache=True)
        toks = [res.logits[:, -1:].argmax(-1)]
        for _ in range(6):
            res = model(toks[-1], past_key_values=res.past_key_values, use_cache=True)
            toks.append(res.logits[:, -1:].argmax(-1))
    assert got.shape == (2, 7)
    assert torch.equal(got, torch.cat(toks, 1))
