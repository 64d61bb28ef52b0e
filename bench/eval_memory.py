"""Peak memory and speed of `qtool eval` on a w4a16 checkpoint against evaluating the bf16 model itself.

    python bench/eval_memory.py [--ckpt /tmp/g_rtn] [--model gemma-3-270m] [--windows 4] [--threads 1] [--repeat 1] [--build]

Each evaluation runs in its own subprocess (`python -m quantize_cli eval ... --json`); its peak resident
set size comes from os.wait4's rusage of that child (ru_maxrss), so the two numbers do not mix. The
w4a16 run uses --no-reference so only the quantized model is loaded; the bf16 run evaluates the
model directory itself (no reference either). Speed is the evaluation loop's own time from the
JSON (`seconds`, model loading excluded); the ratio is bf16 seconds / w4a16 seconds, so 1.0 means as
fast as bf16 and the goal is >= 0.5. --build makes the checkpoint first:
`qtool quantize gemma-3-270m --scheme w4a16 --method rtn --format gptq --out CKPT`.
Results: one JSON object on stdout, a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(args: list[str], threads: int) -> dict:
    """Run `python -m quantize_cli ARGS`, return its JSON, wall time, exit code and peak RSS (MB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", QTOOL_PROGRESS="0")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.time()
        p = subprocess.Popen([sys.executable, "-m", "quantize_cli", *args], stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if p.returncode != 0:
        raise SystemExit(f"qtool {' '.join(args)} failed with exit {p.returncode}:\n{stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return {"result": res, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="/tmp/g_rtn", help="w4a16 checkpoint directory")
    ap.add_argument("--model", default="gemma-3-270m", help="the bf16 model (built-in name or directory)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of each child (same for both)")
    ap.add_argument("--build", action="store_true", help="quantize the checkpoint first if it is missing")
    ap.add_argument("--repeat", type=int, default=1, help="alternate bf16 / w4a16 runs this many times; the fastest of each counts")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from calibrate.models import resolve_model

    bf16_dir = resolve_model(args.model)
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        if not args.build:
            raise SystemExit(f"{ckpt} not found: pass --build to make it")
        print(f"building {ckpt} ...", file=sys.stderr)
        run_child(["quantize", args.model, "--scheme", "w4a16", "--method", "rtn", "--format", "gptq", "--out", str(ckpt), "--json"], args.threads)

    w = str(args.windows)
    cmds = {"bf16": ["eval", str(bf16_dir), "--windows", w, "--json"], "w4a16": ["eval", str(ckpt), "--windows", w, "--no-reference", "--json"]}
    all_runs = {k: [] for k in cmds}
    for i in range(args.repeat):
        for k, c in cmds.items():
            print(f"[{i + 1}/{args.repeat}] qtool {' '.join(c)} ...", file=sys.stderr)
            all_runs[k].append(run_child(c, args.threads))
    runs = {k: min(v, key=lambda r: r["result"]["seconds"]) for k, v in all_runs.items()}

    b, q = runs["bf16"], runs["w4a16"]
    summary = {
        "model": str(bf16_dir),
        "checkpoint": str(ckpt),
        "windows": args.windows,
        "threads": args.threads,
        "files_mb": {"bf16": dir_mb(bf16_dir), "w4a16": dir_mb(ckpt)},
        "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in all_runs.items()},
        "eval_seconds": {"bf16": b["result"]["seconds"], "w4a16": q["result"]["seconds"]},
        "eval_seconds_all": {k: [round(r["result"]["seconds"], 2) for r in v] for k, v in all_runs.items()},
        "wall_seconds": {"bf16": b["wall_s"], "w4a16": q["wall_s"]},
        "process_cpu_seconds": {"bf16": b["cpu_s"], "w4a16": q["cpu_s"]},
        "perplexity": {"bf16": b["result"]["perplexity"], "w4a16": q["result"]["perplexity"]},
        "rss_ratio_w4a16_over_bf16": None,
        "speed_ratio_w4a16_vs_bf16": round(b["result"]["seconds"] / q["result"]["seconds"], 3),
    }
    summary["rss_ratio_w4a16_over_bf16"] = round(summary["peak_rss_mb"]["w4a16"] / summary["peak_rss_mb"]["bf16"], 3)
    summary["rss_below_bf16"] = summary["rss_ratio_w4a16_over_bf16"] < 1.0
    summary["speed_goal_met"] = summary["speed_ratio_w4a16_vs_bf16"] >= 0.5
    print(json.dumps(summary))
    rows = [
        "| model | files MB | peak RSS MB | eval s (fastest) | process wall s | process CPU s | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("bf16", "w4a16"):
        rows.append(f"| {k} | {summary['files_mb'][k]} | {summary['peak_rss_mb'][k]} | {summary['eval_seconds'][k]:.2f} | {summary['wall_seconds'][k]:.1f} | {summary['process_cpu_seconds'][k]:.1f} | {summary['perplexity'][k]:.3f} |")
    rows.append(f"\npeak RSS w4a16 / bf16 = {summary['rss_ratio_w4a16_over_bf16']}; speed w4a16 vs bf16 = {summary['speed_ratio_w4a16_vs_bf16']}x "
                f"({args.windows} windows, {args.threads} thread(s))")
    print("\n".join(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
