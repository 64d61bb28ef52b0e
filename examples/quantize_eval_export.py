"""The Python API end to end: quantize the bundled Gemma-3-270M with GPTQ, check it, convert it.

    .venv/bin/python examples/quantize_eval_export.py [OUT_DIR] [--windows N]
"""

import argparse
import json

from quantize_cli import api


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="out/example")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens (40 = the full protocol)")
    a = ap.parse_args()
    gptq = f"{a.out}-gptq"
    print(api.quantize("gemma-3-270m", scheme="w4a16", method="gptq", format="gptq", out=gptq, group_size=128, force=True))
    # fail loudly if the checkpoint lost more than 25% perplexity against the bf16 model it came from
    print(json.dumps(api.evaluate(gptq, windows=a.windows, max_ppl_increase=25), indent=2, default=str))
    print(api.export(gptq, format="compressed-tensors", out=f"{a.out}-ct", force=True))
    info = api.inspect(f"{a.out}-ct")
    print(info["format"], info["bits_per_weight_quantized"], [e["engine"] for e in info["engines"] if e["loads"]])


if __name__ == "__main__":
    main()
