"""Per-layer diagnostics for `qtool eval --report DIR`.

Every quantized linear is measured in isolation: the reference model runs over a few calibration
samples, and at each linear the input it really sees there goes through both the reference linear
and the quantized module. The relative output error ||y_q - y_ref|| / ||y_ref|| (accumulated over
all tokens) says which layers lose the most, independently of the errors upstream of them.

Outputs in DIR: report.json (every layer), layer_errors.png (bar chart in model order, the worst
layers highlighted) and report.md (overall metrics and the worst layers).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from exporters.inspect import module_kind
from qtensor.errors import QtoolError

TOP = 5
MAX_SAMPLES = 8
MAX_SEQLEN = 512


def calibration_inputs(tokenizer, meta: dict, samples: int = MAX_SAMPLES, seqlen: int = MAX_SEQLEN) -> tuple[torch.Tensor, dict]:
    """A few calibration samples drawn as the checkpoint's calibration was (its data, seed), capped small."""
    from calibrate import data as cdata

    cal = meta.get("calibration") or {}
    spec = cal.get("data") or cdata.BUILTIN_DATA
    note = None
    if spec != cdata.BUILTIN_DATA and not Path(str(spec)).expanduser().exists():
        note = f"calibration data {spec} is not here any more; used the built-in text"
        spec = cdata.BUILTIN_DATA
    n = samples  # the checkpoint's own count can be 1 (round-to-nearest needs no data): a fixed small set
    L = max(1, min(seqlen, int(cal.get("seqlen") or seqlen)))
    seed = int(cal.get("seed") or 0)
    field = cal.get("field") or "text"
    ids = cdata.calibration_samples(tokenizer, None if spec == cdata.BUILTIN_DATA else spec, n, L, seed, field)
    info = {"data": spec, "samples": int(ids.shape[0]), "seqlen": L, "seed": seed}
    if note:
        info["note"] = note
    return ids, info


@torch.no_grad()
def layer_errors(qmodel: nn.Module, reference: nn.Module, names, ids: torch.Tensor, progress=None) -> tuple[list[dict], list[str]]:
    """[{name, rel_error, tokens}] in the reference model's module order, and the names not measured."""
    wanted = set(names)
    qmods = dict(qmodel.named_modules())
    acc: dict[str, list[float]] = {}
    hooks = []
    order = []
    skipped = []
    for name, mod in reference.named_modules():
        if name not in wanted:
            continue
        if not isinstance(mod, nn.Linear) or name not in qmods:
            skipped.append(name)
            continue
        order.append(name)
        acc[name] = [0.0, 0.0, 0]
        qmod = qmods[name]

        def hook(m, inp, out, name=name, qmod=qmod):
            x = inp[0]
            yq = qmod(x.to(_dtype_of(qmod, x.dtype))).to(torch.float64)
            yr = out.to(torch.float64)
            a = acc[name]
            a[0] += float((yq - yr).pow(2).sum())
            a[1] += float(yr.pow(2).sum())
            a[2] += x.numel() // x.shape[-1]

        hooks.append(mod.register_forward_hook(hook))
    skipped += sorted(wanted - set(order) - set(skipped))
    if not order:
        raise QtoolError("--report: none of the quantized layers is a linear layer of the reference model")
    dev = next(reference.parameters()).device
    task = progress.add_task("layer report", total=len(ids)) if progress else None
    try:
        for row in ids:
            reference(input_ids=row.unsqueeze(0).to(dev), use_cache=False)
            if progress:
                progress.update(task, advance=1)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, name in enumerate(order):
        num, den, tokens = acc[name]
        rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))
        rows.append({"index": i, "name": name, "kind": module_kind(name), "rel_error": rel, "tokens": tokens})
    return rows, skipped


def _dtype_of(mod: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in mod.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def _short(name: str) -> str:
    return re.sub(r"^(model\.)?(language_model\.)?(model\.)?layers\.", "L", name)


def write_chart(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    errs = [r["rel_error"] for r in rows]
    worst = set(sorted(range(len(rows)), key=lambda i: -errs[i])[:TOP])
    fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 0.12 * len(rows) + 3)), 5), dpi=100)
    colors = ["#d62728" if i in worst else "#7f7f7f" for i in range(len(rows))]
    ax.bar(range(len(rows)), errs, color=colors, width=0.85)
    positive = [e for e in errs if e > 0]
    top = max(errs) if errs and max(errs) > 0 else 1.0
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, top * 8)  # room for the labels above the bars
    else:
        ax.set_ylim(0, top * 1.45)
    for i in worst:
        ax.annotate(_short(rows[i]["name"]), (i, errs[i]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7, color="#d62728", rotation=60)
    # one tick per decoder layer (its first module), module names would not fit
    ticks, labels, seen = [], [], set()
    for i, r in enumerate(rows):
        m = re.search(r"layers\.(\d+)\.", r["name"])
        key = m.group(1) if m else r["name"]
        if key not in seen:
            seen.add(key)
            ticks.append(i)
            labels.append(key if m else _short(r["name"]))
            if i:
                ax.axvline(i - 0.5, color="#dddddd", linewidth=0.6, zorder=0)
    step = max(1, len(ticks) // 40)
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels(labels[::step], fontsize=7)
    ax.set_xlabel("decoder layer (modules in model order)")
    ax.set_ylabel("||y_q - y_ref|| / ||y_ref||")
    ax.set_title(title or "per-layer relative output error", fontsize=10)
    ax.set_xlim(-1, len(rows))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def summarize(rows: list[dict], skipped: list[str], calib: dict) -> dict:
    errs = sorted(r["rel_error"] for r in rows)
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["rel_error"])
    return {
        "layers": len(rows),
        "mean_rel_error": sum(errs) / len(errs),
        "median_rel_error": errs[len(errs) // 2],
        "max_rel_error": errs[-1],
        "worst": [{"name": r["name"], "rel_error": r["rel_error"]} for r in sorted(rows, key=lambda r: -r["rel_error"])[:TOP]],
        "mean_rel_error_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "not_measured": skipped,
        "calibration": calib,
    }


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def write_markdown(path: Path, ckpt_path: Path, summary: dict, rows: list[dict], metrics: dict) -> None:
    cal = summary["calibration"]
    lines = [
        f"# qtool eval report: `{ckpt_path}`",
        "",
        "## Overall",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity | {_fmt(metrics.get('perplexity'))} |",
        f"| reference perplexity | {_fmt(metrics.get('reference_perplexity'))} |",
        f"| perplexity increase | {_fmt(metrics.get('ppl_increase_pct'), '+.2f')}% |",
        f"| KL divergence | {_fmt(metrics.get('kl_divergence'), '.5f')} |",
        f"| top-1 agreement | {_fmt(metrics.get('top1_agreement'))} |",
        f"| evaluation tokens | {metrics.get('tokens', '—')} |",
        f"| gate | {'passed' if metrics.get('passed', True) else 'FAILED: ' + '; '.join(metrics.get('failed', []))} |",
        "",
        "## Per-layer relative output error",
        "",
        f"{summary['layers']} quantized linears measured on {cal['samples']} calibration samples x {cal['seqlen']} tokens "
        f"({cal['data']}, seed {cal['seed']}); each layer gets the input it sees in the reference model.",
        "",
        f"mean {summary['mean_rel_error']:.4f}, median {summary['median_rel_error']:.4f}, max {summary['max_rel_error']:.4f}",
        "",
        "| module type | mean relative error |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in summary["mean_rel_error_by_kind"].items()],
        "",
        f"### Worst {min(TOP * 2, len(rows))} layers",
        "",
        "| rank | layer | relative error | x median |",
        "|---|---|---|---|",
    ]
    med = summary["median_rel_error"] or float("nan")
    for i, r in enumerate(sorted(rows, key=lambda r: -r["rel_error"])[: TOP * 2]):
        lines.append(f"| {i + 1} | `{r['name']}` | {r['rel_error']:.4f} | {r['rel_error'] / med:.1f} |")
    lines += ["", "![per-layer relative output error](layer_errors.png)", ""]
    if summary["not_measured"]:
        lines += [f"Not measured (not a linear of the reference model): {', '.join(summary['not_measured'])}", ""]
    if cal.get("note"):
        lines += [f"Note: {cal['note']}", ""]
    path.write_text("\n".join(lines))


def check_report_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QtoolError(f"--report {out} exists and is not a directory")
    if not out.resolve().parent.exists():
        raise QtoolError(f"parent directory of --report {out} does not exist")
    return out


def write_report(out_dir: str | Path, ckpt_path: Path, qmodel: nn.Module, reference: nn.Module, names, tokenizer, meta: dict, metrics: dict, progress=None) -> dict:
    """Measure, then write report.json, layer_errors.png and report.md into out_dir; returns the summary."""
    out = check_report_dir(out_dir)
    ids, calib = calibration_inputs(tokenizer, meta)
    rows, skipped = layer_errors(qmodel, reference, names, ids, progress)
    summary = summarize(rows, skipped, calib)
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps({"summary": summary, "layers": rows, "metrics": metrics}, indent=2) + "\n")
    write_chart(rows, out / "layer_errors.png", f"{ckpt_path.name}: per-layer relative output error (worst {TOP} in red)")
    write_markdown(out / "report.md", ckpt_path, summary, rows, metrics)
    summary["dir"] = str(out)
    return summary
