"""Models larger than memory: peak RSS stays flat (about one layer plus activations) and time grows
linearly with the number of layers.

    python bench/scale.py                      # 1.5B (32 layers) and 3B (64 layers) Llama-shaped models
    python bench/scale.py --hidden 1024 --layers 8 16   # a quicker pair
    python bench/scale.py --gemma                       # Gemma-3-270M beside the same model 2x deeper

Each model is random-weight bf16, sharded safetensors (one shard per 4 layers), written once. Each
`qtool quantize --method gptq` runs in its own process; the child reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the script's own folder off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def write_model(d: Path, layers: int, hidden: int, inter: int, vocab: int = 32000) -> int:
    from safetensors.torch import save_file

    from calibrate.tiny import make_tokenizer

    heads, kv = max(1, hidden // 64), max(1, hidden // 256)
    hd = hidden // heads
    per_layer = hidden * heads * hd * 2 + hidden * kv * hd * 2 + 3 * hidden * inter
    total = per_layer * layers + 2 * vocab * hidden
    if (d / "config.json").exists():
        return total
    d.mkdir(parents=True, exist_ok=True)
    make_tokenizer(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}
    shard: dict = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    n_shard = 0

    def flush():
        nonlocal shard, n_shard
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, n_shard = {}, n_shard + 1

    for li in range(layers):
        p = f"model.layers.{li}."
        shard.update({p + "self_attn.q_proj.weight": rnd(heads * hd, hidden), p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
                      p + "self_attn.v_proj.weight": rnd(kv * hd, hidden), p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
                      p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden), p + "mlp.down_proj.weight": rnd(hidden, inter),
                      p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16), p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
        if li % 4 == 3:
            flush()
    if shard:
        flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def write_deeper(src: Path, d: Path, times: int = 2) -> int:
    """Gemma-3-270M (or any single-file model) with its decoder layers repeated `times` over: the same
    shapes, vocabulary and activations, `times` x the layers (layer i + k*L = layer i)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n = text["num_hidden_layers"]
    if (d / "config.json").exists():
        return n * times
    d.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file() and f.name != "config.json" and not f.name.endswith(".index.json"):
            (d / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out, weight_map = {}, {}
    for k, v in tensors.items():
        parts = k.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            i = parts.index("layers") + 1
            for t in range(times):
                out[".".join(parts[:i] + [str(int(parts[i]) + t * n)] + parts[i + 1:])] = v if t == 0 else v.clone()
        else:
            out[k] = v
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    text["num_hidden_layers"] = n * times
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"] * times
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return n * times


def child(model: str, out: str, samples: int, seqlen: int) -> None:
    import resource

    from quantize_cli import api

    t0 = time.time()
    api.quantize(model, "w4a16", "gptq", "gptq", out, samples=samples, seqlen=seqlen, force=True, options={"act_order": True})
    secs = time.time() - t0
    per = api.layer_seconds
    print(json.dumps({"seconds": secs, "layer_seconds": per, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/qtool-scale")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gemma", action="store_true", help="Gemma-3-270M and the same model 2x deeper (64 x 512 samples unless --samples)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"))
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.samples, a.seqlen)
        return
    if a.gemma:
        gemma(a)
        return
    inter = a.inter or a.hidden * 11 // 4
    rows = []
    for n in a.layers:
        d = Path(a.dir) / f"llama-h{a.hidden}-l{n}"
        params = write_model(d, n, a.hidden, inter)
        disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        r = subprocess.run([sys.executable, __file__, "--child", str(d), str(d) + "-gptq", "--samples", str(a.samples), "--seqlen", str(a.seqlen)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            print(r.stderr[-3000:])
            raise SystemExit(1)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        per = res["layer_seconds"]
        rows.append((n, params / 1e9, disk / 2**30, res["peak_rss_gib"], res["seconds"], sum(per) / len(per)))
    print(f"\nGPTQ w4a16 g128, {a.samples} x {a.seqlen} calibration tokens, hidden {a.hidden}, intermediate {inter}")
    print("| layers | params (B) | bf16 on disk (GiB) | peak RSS (GiB) | total s | s / layer |")
    print("|---|---|---|---|---|---|")
    for n, p, disk, rss, secs, spl in rows:
        print(f"| {n} | {p:.2f} | {disk:.2f} | {rss:.2f} | {secs:.0f} | {spl:.2f} |")
    if len(rows) >= 2:
        (n0, *_, s0, l0), (n1, *_, s1, l1) = rows[0], rows[-1]
        print(f"peak RSS ratio {rows[-1][3] / rows[0][3]:.2f} for {n1 / n0:.1f}x the layers; total time ratio {s1 / s0:.2f}")


def run_child(model: str, out: str, samples: int, seqlen: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", model, out, "--samples", str(samples), "--seqlen", str(seqlen)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        print(r.stderr[-3000:])
        raise SystemExit(1)
    return json.loads(r.stdout.strip().splitlines()[-1])


def gemma(a) -> None:
    from calibrate import models as cmodels

    samples = a.samples if a.samples != 16 else 64
    src = cmodels.resolve_model("gemma-3-270m")
    deep = Path(a.dir) / "gemma-3-270m-x2"
    n2 = write_deeper(src, deep, 2)
    rows = []
    for name, model in (("gemma-3-270m (18 layers)", "gemma-3-270m"), (f"same, layers repeated ({n2} layers)", str(deep))):
        res = run_child(model, str(Path(a.dir) / (Path(model).name + "-gptq")), samples, a.seqlen)
        rows.append((name, res["peak_rss_gib"], res["seconds"]))
    print(f"\nGPTQ w4a16 g128, {samples} x {a.seqlen} calibration tokens, this machine")
    print("| model | peak RSS (GiB) | quantize s |")
    print("|---|---|---|")
    for name, rss, secs in rows:
        print(f"| {name} | {rss:.2f} | {secs:.0f} |")
    print(f"peak RSS ratio {rows[1][1] / rows[0][1]:.2f} for 2x the layers (must stay well below 2)")


if __name__ == "__main__":
    main()
