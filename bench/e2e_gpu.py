"""End-to-end tokens/s on the GPU: an 8B-shaped (Llama-3-8B widths) random-weight decoder with fewer
layers, bf16 vs w4a16 (int4 g128, Triton kernels) vs fp8 (fp8-dynamic: row-wise _scaled_mm), side by side.

    python bench/e2e_gpu.py [--layers 8] [--out results.json]

The decoder layers' seven linears become QuantLinear (the runtime's module, CUDA kernels dispatched
inside); embeddings and lm_head (128256 x 4096) stay bf16 in every variant. Measured: eval-style
prefill (batch 8 x 512 tokens, as qtool eval's windows) and greedy decode steps with a KV cache at
batch 1 and 16, eager (launch overhead is part of the number) and as a CUDA graph (columns `graph`: one decode step
captured with a StaticCache, position advanced inside the graph, as serving engines replay decode; GPU time).
`w4a16 no PDL`: the same with the
M = 1 GEMV launched plainly, the in-model measure of its programmatic dependent launch (norms, attention and
torch ops between the linears do not trigger it early). `w4a16 JIT launch`: every Triton launch through Triton's
own binding instead of runtime/kernels/launch.py's direct relaunch (the CPU cost per call that eager decode pays)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the script's own folder off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.kernels import rand_fp8, rand_int  # noqa: E402
from runtime.kernels import tuning  # noqa: E402
from runtime.qlinear import QuantLinear  # noqa: E402

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                      tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def swap(model, make):
    """Replace each decoder linear by make(n, k) -> QuantLinear; returns the originals to restore."""
    orig = {}
    for i, layer in enumerate(model.model.layers):
        for path in LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, attr)
            orig[(i, path)] = lin
            n, k = lin.weight.shape
            setattr(parent, attr, QuantLinear(make(n, k)) if make else lin)
    return orig


def restore(model, orig):
    for (i, path), lin in orig.items():
        parent_name, attr = path.split(".")
        setattr(getattr(model.model.layers[i], parent_name), attr, lin)


def sync_time(fn, reps):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def decode_graph(model, vocab, b, steps=32, prompt=128):
    """Greedy decode tokens/s with each step replayed from a CUDA graph: a StaticCache, the next token and the
    position kept in static tensors that the captured step updates itself (argmax into the input, position + 1)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    dev = model.device
    ids = torch.randint(0, vocab, (b, prompt), device=dev)
    out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=dev))
    nxt = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([prompt], device=dev)

    def step():
        o = model(nxt, past_key_values=cache, use_cache=True, cache_position=pos)
        nxt.copy_(o.logits[:, -1:].argmax(-1))
        pos.add_(1)

    if dev.type != "cuda":  # (CPU: the step's logic only, for tests: the prompt's next token and each step's)
        toks = [nxt.clone()]
        for _ in range(steps):
            step()
            toks.append(nxt.clone())
        return torch.cat(toks, 1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up steps outside the capture (kernel choice; a weight's first call runs plainly)
        step()
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    n = steps - 4
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del g
    return b * n / dt


@torch.inference_mode()
def measure(model, vocab):
    out = {}
    ids = torch.randint(0, vocab, (8, 512), device="cuda")
    t = sync_time(lambda: model(ids, use_cache=False), 5)
    out["prefill_tok_s"] = ids.numel() / t
    for b in (1, 16):
        prompt = torch.randint(0, vocab, (b, 128), device="cuda")
        steps = 32
        res = model(prompt, use_cache=True)
        pkv = res.past_key_values
        nxt = res.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm the decode shapes (kernel choice, cuBLAS heuristics)
            res = model(nxt, past_key_values=res.past_key_values if _ else pkv, use_cache=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
            nxt = res.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        out[f"decode_b{b}_tok_s"] = b * steps / (time.perf_counter() - t0)
    for b in (1, 16):
        try:
            out[f"graph_b{b}_tok_s"] = decode_graph(model, vocab, b)
        except Exception as e:  # report and go on: the eager columns stand
            print(f"  graph decode b{b} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            out[f"graph_b{b}_tok_s"] = float("nan")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="")
    ap.add_argument("--variants", default="", help="comma list of the quantized variants to run (default: all)")
    a = ap.parse_args()
    tuning.enable(True)
    model = build(a.layers)
    vocab = model.config.vocab_size
    res = {}
    measure(model, vocab)  # warm-up pass (first-use costs land here, not on bf16)
    res["bf16"] = measure(model, vocab)
    print("bf16", res["bf16"], flush=True)
    variants = {
        "w4a16-g128": lambda n, k: rand_int(n, k, 4, 128, True),
        "w4a16 no PDL": lambda n, k: rand_int(n, k, 4, 128, True),  # M = 1 GEMVs as plain launches (QTOOL_PDL=0)
        "w4a16 JIT launch": lambda n, k: rand_int(n, k, 4, 128, True),  # every launch through Triton's binding (QTOOL_FAST_LAUNCH=0)
        "fp8-dynamic": lambda n, k: rand_fp8(n, k, "token"),
    }
    if a.variants:
        variants = {k: v for k, v in variants.items() if k in a.variants.split(",")}
    from runtime.kernels import launch, weight_only

    pdl_default, fast_default = weight_only.PDL_DEFAULT, launch.ON
    for name, make in variants.items():
        orig = swap(model, make)
        weight_only.PDL_DEFAULT = pdl_default and name != "w4a16 no PDL"
        launch.ON = fast_default and name != "w4a16 JIT launch"
        res[name] = measure(model, vocab)
        weight_only.PDL_DEFAULT, launch.ON = pdl_default, fast_default
        q = model.model.layers[0].mlp.down_proj
        assert isinstance(q, QuantLinear) and getattr(q, "_kernel_prep", None) is not None, "kernel not dispatched"
        print(name, res[name], flush=True)
        restore(model, orig)
        torch.cuda.empty_cache()
    res["bf16 (again)"] = measure(model, vocab)
    print("bf16 again", res["bf16 (again)"], flush=True)
    dev = torch.cuda.get_device_name()
    print(f"\n# {dev}: Llama-3-8B-shaped decoder, {a.layers} layers (of 32), random weights, lm_head bf16 in all")
    keys = list(res["bf16"])
    print(f"{'variant':<17}" + "".join(f"{k:>18}" for k in keys))
    for name, r in res.items():
        print(f"{name:<17}" + "".join(f"{r[k]:>11.0f} x{r[k] / res['bf16'][k]:4.2f}" for k in keys))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=dev, layers=a.layers, results=res), f, indent=1)


if __name__ == "__main__":
    main()
