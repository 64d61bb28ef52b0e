"""GPTQ calibration speed on a GPU: qtool end to end on a random-weight Llama-3-8B-shaped model,
per layer, beside a textbook GPTQ (IST-DASLab gptq.py style Python column loop) on the same layer.

    python bench/quantize_speed.py --layers 32 --samples 128 --seqlen 2048 --device cuda --dir /tmp/l8b

Writes the checkpoint (bf16 safetensors, one shard per layer) once, then times
`api.quantize(..., method="gptq", format="gptq", device=...)`: calibration forwards, Hessians,
GPTQ and writing included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the script's own folder off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 bos_token_id=2, eos_token_id=1, pad_token_id=0)


def write_model(d: Path, layers: int, device: str, **shape) -> None:
    from safetensors.torch import save_file

    from calibrate.tiny import make_tokenizer

    if (d / "config.json").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    make_tokenizer(d)
    cfg = {**LLAMA3_8B, **shape, "num_hidden_layers": layers, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16"}
    h, i, nh, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, std=0.02):
        return (torch.randn(*s, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    weight_map = {}
    files = []
    outside = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rnd(cfg["vocab_size"], h)}
    save_file(outside, str(d / "outside.safetensors"), metadata={"format": "pt"})
    files.append(("outside.safetensors", outside))
    for li in range(layers):
        p = f"model.layers.{li}."
        t = {p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h), p + "self_attn.v_proj.weight": rnd(kv * hd, h),
             p + "self_attn.o_proj.weight": rnd(h, nh * hd), p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
             p + "mlp.down_proj.weight": rnd(h, i), p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"layer-{li:03d}.safetensors"
        save_file(t, str(d / name), metadata={"format": "pt"})
        files.append((name, t))
    for name, t in files:
        for k in t:
            weight_map[k] = name
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def textbook_gptq(W: torch.Tensor, H: torch.Tensor, blocksize=128, percdamp=0.01, groupsize=128, bits=4):
    """IST-DASLab gptq.py fasterquant (sym, no act order), written as in the paper's code."""
    W = W.clone().float()
    n, k = W.shape
    maxq = 2**bits - 1
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    H[torch.arange(k), torch.arange(k)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                x = W[:, i1 + i : i1 + i + groupsize]
                xmax = torch.maximum(x.abs().amax(1), torch.tensor(1e-8, device=W.device))
                scale = 2 * xmax / maxq
                zero = torch.full_like(scale, (maxq + 1) / 2)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (q - zero)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/qtool-l8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=None, help="smaller shapes for a CPU smoke run")
    ap.add_argument("--skip-textbook", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="also profile a 2-layer run of the same shapes (torch.profiler, CPU + CUDA); "
                    "prints the top ops by device and host time and writes the full tables to FILE")
    a = ap.parse_args()
    shape = {} if a.hidden is None else {"hidden_size": a.hidden, "intermediate_size": a.hidden * 7 // 2, "vocab_size": 1024}
    d = Path(a.dir)
    t0 = time.time()
    write_model(d, a.layers, a.device, **shape)
    print(f"model written in {time.time() - t0:.1f} s: {d}", flush=True)

    from quantize_cli import api

    out = d.parent / (d.name + "-gptq")
    sync(a.device)
    t0 = time.time()
    res = api.quantize(str(d), "w4a16", "gptq", "gptq", str(out), samples=a.samples, seqlen=a.seqlen, group_size=128, device=a.device, force=True,
                       options={"act_order": False})
    sync(a.device)
    total = time.time() - t0
    per = api.layer_seconds
    print(f"qtool gptq w4a16 g128 end to end: {total:.1f} s for {a.layers} layers ({a.samples} x {a.seqlen} tokens, device {a.device})")
    print(f"per layer: mean {sum(per) / len(per):.2f} s, min {min(per):.2f}, max {max(per):.2f}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in api.phases.items()))
    result = {"end_to_end_s": total, "phases": api.phases, "layers": a.layers, "layer_seconds": per, "device": a.device,
              "card": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}

    if not a.skip_textbook:
        # the same layer-0 shapes: the 7 linears with Hessians from random correlated inputs of the same token count
        from calibrate.algorithms.gptq import HessianAccumulator, gptq_quantize
        from exporters.io import TensorDir
        from qtensor import get_scheme
        from qtensor.schemes import WeightSpec

        td = TensorDir(d)
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        ws = {n: td[f"model.layers.0.{n}.weight"].to(a.device).float() for n in names}
        Hs = {}
        for kdim in {w.shape[1] for w in ws.values()}:
            acc = HessianAccumulator(kdim, a.device)
            for _ in range(4):
                acc.add(torch.randn(4096, kdim, device=a.device))
            Hs[kdim] = acc.H
        spec = WeightSpec.of(get_scheme("w4a16"), 128)
        sync(a.device)
        t0 = time.time()
        for n in names:
            textbook_gptq(ws[n], Hs[ws[n].shape[1]])
        sync(a.device)
        tb = time.time() - t0
        t0 = time.time()
        for n in names:
            gptq_quantize(ws[n], Hs[ws[n].shape[1]], spec, act_order=False)
        sync(a.device)
        ours = time.time() - t0
        print(f"GPTQ solve of one 8B-shaped layer (7 linears), same run: textbook {tb:.2f} s, qtool {ours:.2f} s, ratio {tb / ours:.1f}x")
        result.update(textbook_layer_s=tb, qtool_layer_solve_s=ours)
    if a.profile:
        profile_run(d.parent / (d.name + "-2"), a, shape, Path(a.profile))
    print(json.dumps(result))


def profile_run(d2: Path, a, shape: dict, out: Path) -> None:
    """Where a layer's time goes: the same calibration on a 2-layer model under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from quantize_cli import api

    write_model(d2, 2, a.device, **shape)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.time()
        api.quantize(str(d2), "w4a16", "gptq", "gptq", str(d2) + "-gptq", samples=a.samples, seqlen=a.seqlen, group_size=128, device=a.device,
                     force=True, options={"act_order": False})
        sync(a.device)
    print(f"profiled 2-layer run: {time.time() - t0:.1f} s; phases " + ", ".join(f"{k} {v:.1f}" for k, v in api.phases.items()))
    ka = prof.key_averages()
    tables = []
    for key in (["self_cuda_time_total"] if a.device == "cuda" else []) + ["self_cpu_time_total", "cpu_time_total"]:
        tables.append(f"## sorted by {key}\n" + ka.table(sort_by=key, row_limit=40, max_name_column_width=60))
    out.write_text("\n\n".join(tables))
    short = ka.table(sort_by=("self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"), row_limit=15, max_name_column_width=45)
    print(short)


if __name__ == "__main__":
    main()
