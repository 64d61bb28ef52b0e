"""Library backends side by side with qtool's native backend on Gemma-3-270M (shared/EVAL.md protocol).

    python bench/backends.py                      # every row (long: each quantize+eval is minutes on CPU)
    python bench/backends.py --rows modelopt-fp8,gptqmodel-w4a16
    python bench/backends.py --list

Each row runs `qtool quantize ... --json` in its own process (peak RSS of that process and its children,
from wait4), writes the library's native format and a second one with `qtool export`, then
`qtool eval --json` (40 windows x 512 tokens against the bf16 reference). Results accumulate in
bench/results/backends.json (a row measured earlier is kept unless re-run); the table is printed and
written to bench/results/backends.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name: (backend, method, scheme, first format, second format (export), extra quantize args)
ROWS = {
    "native-rtn-w4a16": ("native", "rtn", "w4a16", "gptq", "qtool", []),
    "native-gptq-w4a16": ("native", "gptq", "w4a16", "gptq", "qtool", ["--no-act-order"]),
    "native-rtn-fp8": ("native", "rtn", "fp8", "qtool", None, []),
    "native-rtn-nvfp4": ("native", "rtn", "nvfp4", "qtool", None, []),
    "modelopt-fp8": ("modelopt", "rtn", "fp8", "modelopt", "qtool", []),
    "modelopt-nvfp4": ("modelopt", "rtn", "nvfp4", "modelopt", "qtool", []),
    "modelopt-w4a16": ("modelopt", "rtn", "w4a16", "modelopt", "qtool", []),
    "modelopt-w4a8": ("modelopt", "rtn", "w4a8", "qtool", None, []),
    "modelopt-w8a8-int8": ("modelopt", "rtn", "w8a8-int8", "qtool", None, []),
    "autoround-w4a16-iters0": ("autoround", "rtn", "w4a16", "auto-round", "gptq", ["--option", "iters=0"]),
    "autoround-w4a16-iters20": ("autoround", "rtn", "w4a16", "auto-round", "gptq", ["--option", "iters=20"]),
    "gptqmodel-w4a16": ("gptqmodel", "rtn", "w4a16", "gptq", "qtool", []),
    "msmodelslim-w8a8-static": ("msmodelslim", "rtn", "w8a8-int8-static", "msmodelslim", "qtool", []),
}


def qtool(*args) -> tuple[int, dict, str, float]:
    """Run `python -m quantize_cli ARGS --json`; (exit code, JSON result, stderr tail, peak RSS GiB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "quantize_cli", *map(str, args), "--json"], stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    try:
        res = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    except ValueError:
        res = {}
    return p.returncode, res, etext[-600:], ru.ru_maxrss / 2**20


def run_row(name: str, work: Path, samples: int, windows: int) -> dict:
    backend, method, scheme, fmt, fmt2, extra = ROWS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    rc, res, err, rss = qtool("quantize", "gemma-3-270m", "--scheme", scheme, "--method", method, "--format", fmt, "--out", out,
                              "--backend", backend, "--samples", samples, *extra)
    row = {"name": name, "backend": backend, "method": method, "scheme": scheme, "formats": [fmt], "peak_rss_gib": round(rss, 2)}
    if rc != 0:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
        return row
    row["quantize_seconds"] = res.get("seconds", round(time.time() - t0, 1))
    if fmt2:
        rc2, _, err2, _ = qtool("export", out, "--format", fmt2, "--out", work / f"{name}-{fmt2}", "--force")
        row["formats"].append(fmt2 if rc2 == 0 else f"{fmt2} (failed: {err2.strip().splitlines()[-1] if err2.strip() else rc2})")
    rc, ev, err, _ = qtool("eval", out, "--windows", windows)
    if rc not in (0, 1) or not ev:
        row["error"] = "eval: " + (err.strip().splitlines()[-1] if err.strip() else f"exit {rc}")
        return row
    row.update(perplexity=ev["perplexity"], reference_perplexity=ev.get("reference_perplexity"), ppl_increase_pct=ev.get("ppl_increase_pct"),
               kl=ev.get("kl_divergence"), top1=ev.get("top1_agreement"))
    return row


def table(rows: list[dict]) -> str:
    ref = next((r["reference_perplexity"] for r in rows if r.get("reference_perplexity")), None)
    lines = ["| backend / method | scheme | formats written | perplexity | vs bf16 | KL | top-1 | quantize s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    if ref:
        lines.append(f"| bf16 reference | — | — | {ref:.3f} | — | 0 | 1 | — | — |")
    for r in rows:
        who = r["backend"] if r["backend"] != "native" else f"native {r['method']}"
        if r["name"].startswith("autoround"):
            who += " " + r["name"].rsplit("-", 1)[-1]
        if "error" in r:
            lines.append(f"| {who} | {r['scheme']} | {', '.join(r['formats'])} | failed: {r['error']} | | | | | {r['peak_rss_gib']} |")
            continue
        lines.append(f"| {who} | {r['scheme']} | {', '.join(r['formats'])} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.1f}% | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['quantize_seconds']:.0f} | {r['peak_rss_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (--list shows them)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "backends-work"))
    a = ap.parse_args()
    if a.list:
        print("\n".join(ROWS))
        return
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        sys.exit(f"unknown row(s) {', '.join(bad)}; --list shows them")
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "backends.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for n in names:
        print(f"[{time.strftime('%H:%M:%S')}] {n} ...", file=sys.stderr, flush=True)
        done[n] = run_row(n, work, a.samples, a.windows)
        store.write_text(json.dumps(done, indent=2) + "\n")
        print(json.dumps(done[n]), file=sys.stderr, flush=True)
    rows = [done[n] for n in ROWS if n in done]
    md = table(rows)
    missing = [n for n in ROWS if n not in done]
    if missing:
        md += f"\nNot run: {', '.join(missing)}.\n"
    (RESULTS / "backends.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
