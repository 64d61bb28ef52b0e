"""Accuracy of every native method on Gemma-3-270M under shared/EVAL.md, optionally beside the peers.

    python bench/accuracy.py                     # qtool's native methods
    python bench/accuracy.py --peers             # + GPTQModel, AutoRound, ModelOpt, msModelSlim side by side
    python bench/accuracy.py --rows gptq-w4a16,peer-gptqmodel-w4a16
    python bench/accuracy.py --list

Every row is `qtool quantize gemma-3-270m ... --format qtool` in its own process (the peers through
qtool's library backends, so every row calibrates on the same 64 x 512 samples: the default
calibration set, seed 0) followed by `qtool eval` (40 windows x 512 tokens against the bf16
reference). Peak RSS is the quantize process's (and its children's) maximum resident set, from wait4.
Peers write their library's native format and are exported to a second format (bench/backends.py
shows those rows with the library backends' table). Rows accumulate in bench/results/accuracy.json
(shared with bench/backends.py; a row measured earlier is kept unless re-run; its date is recorded);
the table and the side-by-side verdicts are printed and written to bench/results/accuracy.md.
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
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def qtool(*args) -> tuple[int, dict, str, float]:
    """Run `python -m quantize_cli ARGS --json`; (exit code, JSON result, stderr tail, peak RSS GiB of the
    process and its children, from wait4)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "quantize_cli", *map(str, args), "--json"], stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    try:
        res = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    except ValueError:
        res = {}
    return code, res, etext[-600:], ru.ru_maxrss / 2**20

# name: (who, method, scheme, format written by quantize, format exported to afterwards or None, extra quantize arguments)
NATIVE = {
    "rtn-w4a16": ("qtool", "rtn", "w4a16", "gptq", None, []),
    "rtn-w4a16-mseclip": ("qtool", "rtn", "w4a16", "gptq", None, ["--mse-clip"]),
    "gptq-w4a16": ("qtool", "gptq", "w4a16", "gptq", "qtool", []),
    "gptq-w4a16-noclip": ("qtool", "gptq", "w4a16", "gptq", None, ["--no-mse-clip"]),
    "gptq-w4a16-asym": ("qtool", "gptq", "w4a16", "gptq", None, ["--asym"]),
    "gptq-w4a16-group": ("qtool", "gptq", "w4a16", "gptq", None, ["--group-order"]),
    "awq-w4a16": ("qtool", "awq", "w4a16", "awq", None, []),
    "awq-w4a16-asym": ("qtool", "awq", "w4a16", "awq", None, ["--asym"]),
    "awq-w4a16-asym-duo": ("qtool", "awq", "w4a16", "awq", None, ["--asym", "--option", "duo_scaling=true"]),
    "awq-w4a16-duo": ("qtool", "awq", "w4a16", "awq", None, ["--option", "duo_scaling=true"]),
    "awq-gptq-w4a16": ("qtool", "awq-gptq", "w4a16", "gptq", None, []),
    "awq-gptq-w4a16-asym": ("qtool", "awq-gptq", "w4a16", "gptq", None, ["--asym"]),
    "fp8-fp8": ("qtool", "fp8", "fp8", "compressed-tensors", None, []),
    "fp8-fp8-dynamic": ("qtool", "fp8", "fp8-dynamic", "compressed-tensors", None, []),
    "gptq-fp8-dynamic": ("qtool", "gptq", "fp8-dynamic", "compressed-tensors", None, []),
    "gptq-fp8": ("qtool", "gptq", "fp8", "compressed-tensors", None, []),
    "smoothquant-w8a8-int8": ("qtool", "smoothquant", "w8a8-int8", "compressed-tensors", None, []),
    "smoothquant-w8a8-int8-static": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, []),
    "smoothquant-w8a8-int8-static-a05": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--option", "alpha=0.5"]),
    "smoothquant-w8a8-int8-static-a08": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--option", "alpha=0.8"]),
    "smoothquant-w8a8-int8-static-a10": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--option", "alpha=1.0"]),
    "smoothquant-w8a8-int8-static-search": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--option", "alpha=search"]),
    "smoothquant-w8a8-int8-static-prescale": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--option", "pre_scale=true"]),
    "smoothquant-w8a8-int8-static-p9999": ("qtool", "smoothquant", "w8a8-int8-static", "qtool", None, ["--act-observer", "percentile:99.99"]),
    "smoothquant-gptq-w8a8-int8-static": ("qtool", "smoothquant-gptq", "w8a8-int8-static", "qtool", None, []),
    "smoothquant-gptq-w8a8-int8": ("qtool", "smoothquant-gptq", "w8a8-int8", "compressed-tensors", None, []),
    "nvfp4-nvfp4": ("qtool", "nvfp4", "nvfp4", "compressed-tensors", None, []),
    "mx-mxfp4": ("qtool", "mx", "mxfp4", "qtool", None, []),
    "rtn-w4a4": ("qtool", "rtn", "w4a4", "qtool", None, []),
}
# peers run through qtool's library backends (calibrate/backends): the library's own algorithm on qtool's
# samples; its result is written in the library's native format, then exported to a second one
PEERS = {
    "peer-gptqmodel-w4a16": ("GPTQModel GPTQ", "gptqmodel", "w4a16", "gptq", "qtool", ["--backend", "gptqmodel"]),
    "peer-gptqmodel-w4a16-asym": ("GPTQModel GPTQ", "gptqmodel", "w4a16", "gptq", "qtool", ["--backend", "gptqmodel", "--asym"]),
    "peer-autoround-w4a16": ("AutoRound (default, iters=200)", "autoround", "w4a16", "auto-round", "gptq", ["--backend", "autoround"]),
    "peer-modelopt-fp8": ("ModelOpt FP8", "modelopt", "fp8", "modelopt", "qtool", ["--backend", "modelopt"]),
    "peer-modelopt-w8a8-int8": ("ModelOpt INT8 SmoothQuant", "modelopt", "w8a8-int8", "modelopt", "qtool", ["--backend", "modelopt"]),
    "peer-modelopt-w4a16": ("ModelOpt INT4_AWQ", "modelopt", "w4a16", "modelopt", "qtool", ["--backend", "modelopt"]),
    "peer-modelopt-nvfp4": ("ModelOpt NVFP4", "modelopt", "nvfp4", "modelopt", "qtool", ["--backend", "modelopt"]),
    "peer-msmodelslim-w8a8-int8-static": ("msModelSlim W8A8", "msmodelslim", "w8a8-int8-static", "msmodelslim", "qtool", ["--backend", "msmodelslim"]),
}
EXTRA = {  # further backend rows for bench/backends.py
    "peer-autoround-w4a16-iters0": ("AutoRound iters=0 (optimized RTN)", "autoround", "w4a16", "auto-round", "gptq", ["--backend", "autoround", "--option", "iters=0"]),
}
ROWS = {**NATIVE, **PEERS, **EXTRA}
# side by side: (qtool row, peer row) where qtool's perplexity must be no worse than the peer's
VERSUS = [
    ("gptq-w4a16", "peer-gptqmodel-w4a16"),
    ("gptq-w4a16", "peer-autoround-w4a16"),
    ("gptq-w4a16-asym", "peer-gptqmodel-w4a16-asym"),
    ("awq-w4a16", "peer-modelopt-w4a16"),
    ("awq-gptq-w4a16", "peer-modelopt-w4a16"),
    ("awq-w4a16-asym", "peer-modelopt-w4a16"),
    ("fp8-fp8", "peer-modelopt-fp8"),
    ("gptq-fp8", "peer-modelopt-fp8"),
    ("smoothquant-w8a8-int8", "peer-modelopt-w8a8-int8"),
    ("smoothquant-w8a8-int8-static", "peer-modelopt-w8a8-int8"),
    ("smoothquant-w8a8-int8-static-a10", "peer-modelopt-w8a8-int8"),
    ("smoothquant-w8a8-int8-static", "peer-msmodelslim-w8a8-int8-static"),
    ("smoothquant-gptq-w8a8-int8-static", "peer-modelopt-w8a8-int8"),
    ("smoothquant-gptq-w8a8-int8-static", "peer-msmodelslim-w8a8-int8-static"),
    ("smoothquant-gptq-w8a8-int8", "peer-modelopt-w8a8-int8"),
    ("smoothquant-w8a8-int8", "peer-msmodelslim-w8a8-int8-static"),
    ("nvfp4-nvfp4", "peer-modelopt-nvfp4"),
    ("rtn-w4a16-mseclip", "rtn-w4a16"),
]
# goals from issue 5 (perplexity increase over bf16, percent)
GOALS = {"gptq-w4a16": 10, "gptq-w4a16-asym": 10, "awq-w4a16": 12, "awq-w4a16-asym": 12, "awq-gptq-w4a16": 12, "fp8-fp8-dynamic": 1, "gptq-fp8-dynamic": 1, "smoothquant-w8a8-int8": 3, "smoothquant-w8a8-int8-static": 3,
         "smoothquant-gptq-w8a8-int8": 3, "smoothquant-gptq-w8a8-int8-static": 3}


def run_row(name: str, work: Path, samples: int, windows: int) -> dict:
    who, method, scheme, fmt, fmt2, extra = ROWS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    native_method = method if who == "qtool" else "rtn"
    rc, res, err, rss = qtool("quantize", "gemma-3-270m", "--scheme", scheme, "--method", native_method, "--format", fmt,
                              "--out", out, "--samples", samples, *extra)
    flags = [a for a in extra if a not in ("--backend", method, "--option")]  # what sets the row apart: --asym, duo_scaling=true ...
    row = {"name": name, "who": who, "method": method, "flags": flags, "scheme": scheme, "formats": [fmt], "peak_rss_gib": round(rss, 2),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if rc != 0:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
        return row
    row["quantize_seconds"] = res.get("seconds", round(time.time() - t0, 1))
    row["notes"] = len(res.get("notes", []))
    if fmt2:
        rc2, _, err2, _ = qtool("export", out, "--format", fmt2, "--out", work / f"{name}-{fmt2}", "--force")
        row["formats"].append(fmt2 if rc2 == 0 else f"{fmt2} (failed: {err2.strip().splitlines()[-1] if err2.strip() else rc2})")
        shutil.rmtree(work / f"{name}-{fmt2}", ignore_errors=True)
    rc, ev, err, _ = qtool("eval", out, "--windows", windows)
    if rc not in (0, 1) or not ev:
        row["error"] = "eval: " + (err.strip().splitlines()[-1] if err.strip() else f"exit {rc}")
        return row
    row.update(perplexity=ev["perplexity"], reference_perplexity=ev.get("reference_perplexity"), ppl_increase_pct=ev.get("ppl_increase_pct"),
               kl=ev.get("kl_divergence"), top1=ev.get("top1_agreement"))
    shutil.rmtree(out, ignore_errors=True)  # the checkpoint is not needed once measured
    return row


def run_rows(names: list[str], samples: int, windows: int, work: Path) -> dict:
    """Run the named rows (one at a time: each is a heavy process) into the shared results store."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "accuracy.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    work.mkdir(parents=True, exist_ok=True)
    for n in names:
        print(f"[{time.strftime('%H:%M:%S')}] {n} ...", file=sys.stderr, flush=True)
        done[n] = run_row(n, work, samples, windows)
        store.write_text(json.dumps(done, indent=2) + "\n")
        print(json.dumps(done[n]), file=sys.stderr, flush=True)
    return done


def _label(r: dict) -> tuple[str, str]:
    return r["who"], r["method"] + (f" ({' '.join(r['flags'])})" if r.get("flags") else "")


def table(rows: list[dict], head: tuple[str, str] = ("who", "method"), label=_label) -> str:
    """Markdown table of measured rows; `label(row)` gives the first two columns (named by `head`)."""
    ref = next((r["reference_perplexity"] for r in rows if r.get("reference_perplexity")), None)
    lines = [f"| {head[0]} | {head[1]} | scheme | formats written | perplexity | vs bf16 | KL | top-1 | quantize s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if ref:
        lines.append(f"| bf16 reference | — | — | — | {ref:.3f} | — | 0 | 1 | — | — |")
    for r in rows:
        a, b = label(r)
        if "error" in r:
            lines.append(f"| {a} | {b} | {r['scheme']} | {', '.join(r['formats'])} | failed: {r['error']} | | | | | {r['peak_rss_gib']} |")
            continue
        lines.append(f"| {a} | {b} | {r['scheme']} | {', '.join(r['formats'])} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.1f}% | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} | {r['quantize_seconds']:.0f} | {r['peak_rss_gib']} |")
    return "\n".join(lines) + "\n"


def verdicts(done: dict) -> str:
    out = []
    for a, b in VERSUS:
        ra, rb = done.get(a), done.get(b)
        if not ra or not rb or "perplexity" not in ra or "perplexity" not in rb:
            continue
        ok = ra["perplexity"] <= rb["perplexity"]
        out.append(f"- {a} {ra['perplexity']:.3f} vs {b} {rb['perplexity']:.3f}: {'no worse' if ok else 'WORSE'}"
                   f" (KL {ra['kl']:.4f} vs {rb['kl']:.4f})")
    for a, goal in GOALS.items():
        r = done.get(a)
        if r and "ppl_increase_pct" in r:
            out.append(f"- goal {a} <= +{goal}%: {r['ppl_increase_pct']:+.1f}% ({'met' if r['ppl_increase_pct'] <= goal else 'not met'})")
    return ("\nSide by side (same calibration samples):\n" + "\n".join(out) + "\n") if out else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="", help="comma-separated row names (--list shows them); default: the native rows (+ peers with --peers)")
    ap.add_argument("--peers", action="store_true", help="also run the peer libraries on the same samples")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="only print (and write) the table of the rows measured so far")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default=str(RESULTS / "accuracy-work"))
    a = ap.parse_args()
    if a.list:
        print("\n".join(f"{n}: {ROWS[n][0]} {ROWS[n][1]} {ROWS[n][2]}" for n in ROWS))
        return
    names = [n.strip() for n in a.rows.split(",") if n.strip()] or [*NATIVE, *(PEERS if a.peers else [])]
    bad = [n for n in names if n not in ROWS]
    if bad:
        sys.exit(f"unknown row(s) {', '.join(bad)}; --list shows them")
    done = run_rows([] if a.table else names, a.samples, a.windows, Path(a.work))
    rows = [done[n] for n in [*NATIVE, *PEERS] if n in done]
    md = table(rows) + verdicts(done)
    (RESULTS / "accuracy.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
