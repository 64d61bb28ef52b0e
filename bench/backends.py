"""Library backends side by side with qtool's native backend on Gemma-3-270M (shared/EVAL.md protocol).

    python bench/backends.py                      # every row (long: each quantize+eval is minutes on CPU)
    python bench/backends.py --rows peer-modelopt-fp8,peer-gptqmodel-w4a16
    python bench/backends.py --list

Each row is a row of bench/accuracy.py (same runner, same results store bench/results/accuracy.json, so a
row measured by either script serves both): `qtool quantize ... --backend B` writes the library's native
format, `qtool export` a second format, `qtool eval` measures the first against the bf16 reference (40
windows x 512 tokens). Peak RSS is the quantize process's, from wait4. The table is printed and written to
bench/results/backends.md (pasted into the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import accuracy  # noqa: E402

ROWS = [
    "peer-modelopt-fp8", "peer-modelopt-nvfp4", "peer-modelopt-w4a16", "peer-modelopt-w8a8-int8",
    "peer-autoround-w4a16", "peer-autoround-w4a16-iters0", "peer-gptqmodel-w4a16", "peer-msmodelslim-w8a8-int8-static",
    "fp8-fp8", "nvfp4-nvfp4", "awq-w4a16", "smoothquant-w8a8-int8-static", "rtn-w4a16", "gptq-w4a16",
]


def table(done: dict) -> str:
    rows = [done[n] for n in ROWS if n in done]
    label = lambda r: ("native", accuracy._label(r)[1]) if r["who"] == "qtool" else (r["method"], r["who"])  # noqa: E731
    missing = [n for n in ROWS if n not in done]
    return accuracy.table(rows, ("backend", "algorithm"), label) + (f"\nNot run: {', '.join(missing)}.\n" if missing else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (--list shows them)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="only print the table of the rows measured so far")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default=str(accuracy.RESULTS / "accuracy-work"))
    a = ap.parse_args()
    if a.list:
        print("\n".join(ROWS))
        return
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in accuracy.ROWS]
    if bad:
        sys.exit(f"unknown row(s) {', '.join(bad)}; --list shows them")
    done = accuracy.run_rows([] if a.table else names, a.samples, a.windows, Path(a.work))
    md = table(done)
    (accuracy.RESULTS / "backends.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
