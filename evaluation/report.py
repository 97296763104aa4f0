"""Evaluation outputs: images, grids, plots, metrics.json/csv and report.html (relative links, no server)."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from typing import Any

from evaluation.metrics import DIRECTION, LEAKAGE_LIMIT, METRICS, NOTICEABLE_DELTA_E
from inference.grids import make_grid
from inference.provenance import save_png

# the smallest y-range a plot shows: about 2.5 noticeable colour differences, a tenth of a [0, 1] score
MIN_SPAN = {
    "colour_delta_e": 2.5 * NOTICEABLE_DELTA_E,
    "reference_similarity": 0.1,
    "leakage": 0.1,
    "diversity": 0.1,
    "text_error": 0.1,
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _plots(root: Path, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in result["columns"] if c["adapter"] != "base"]
    adapters = list(dict.fromkeys(c["adapter"] for c in columns))
    written = []
    for metric in METRICS:
        if all(c["metrics"][metric] is None for c in columns):
            continue
        fig, (by_step, by_scale) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
        for scale in sorted({c["scale"] for c in columns if c["scale"] > 0}):
            pts = [
                (i, c["metrics"][metric])
                for i, a in enumerate(adapters)
                for c in columns
                if c["adapter"] == a and c["scale"] == scale and c["metrics"][metric] is not None
            ]
            if pts:
                by_step.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"scale {scale:g}"
                )
        by_step.set_xticks(range(len(adapters)), adapters, rotation=30, fontsize=8)
        by_step.set_title(f"{metric} by checkpoint ({DIRECTION[metric]})", fontsize=10)
        for adapter in adapters:
            pts = sorted(
                (c["scale"], c["metrics"][metric])
                for c in columns
                if c["adapter"] == adapter and c["metrics"][metric] is not None
            )
            if pts:
                by_scale.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=adapter)
        by_scale.set_xlabel("LoRA scale", fontsize=9)
        by_scale.set_title(f"{metric} by scale ({DIRECTION[metric]})", fontsize=10)
        for ax in (by_step, by_scale):
            ax.grid(alpha=0.3)
            _honest_axis(ax, metric)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"plots/{metric}.png"
        fig.savefig(root / name, metadata={"Software": None})
        plt.close(fig)
        written.append(name)
    return written


def _honest_axis(ax, metric: str) -> None:
    """A y-range at least as wide as a difference people would notice, so noise does not look like a trend."""
    low, high = ax.get_ylim()
    span = MIN_SPAN[metric]
    if high - low < span:
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
        if metric != "reference_similarity":
            low, high = max(0.0, low), max(0.0, low) + span  # the other metrics are >= 0
        ax.set_ylim(low, high)
    values = [float(v) for line in ax.get_lines() for v in line.get_ydata()]
    if metric == "colour_delta_e" and values:
        best = min(values)
        ax.axhspan(
            best,
            best + NOTICEABLE_DELTA_E,
            color="#2e7d32",
            alpha=0.1,
            label=f"within ΔE {NOTICEABLE_DELTA_E:g} of the best: hard to tell apart",
        )


def write_outputs(root: Path, result: dict[str, Any], suite, columns, seeds: int) -> None:
    (root / "plots").mkdir()
    for column, images in columns:
        folder = root / "images" / _slug(column.label)
        folder.mkdir(parents=True)
        for prompt in suite.prompts:
            for s in range(seeds):
                save_png(
                    images[(prompt.id, s)],
                    folder / f"{_slug(prompt.id)}_s{s}.png",
                    {
                        "prompt_id": prompt.id,
                        "seed": s,
                        "column": column.label,
                        "base_model": result["model"],
                    },
                )
    grids = []
    for s in range(seeds):
        tiles, labels = [], []
        for prompt in suite.prompts:
            for column, images in columns:
                tiles.append(images[(prompt.id, s)])
                labels.append(column.label)
        name = f"grid_seed{s}.png"
        make_grid(
            tiles,
            columns=len(columns),
            labels=labels,
            row_labels=[p.id for p in suite.prompts],
            title=f"seed {s}: rows are prompts, columns are checkpoint x scale",
        ).save(root / name)
        grids.append(name)
    plots = _plots(root, result)
    (root / "metrics.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    with open(root / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["column", "adapter", "step", "scale", "prompt", "kind", *METRICS]
        )
        writer.writeheader()
        for row in result["prompts"]:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    (root / "report.html").write_text(_html(result, grids, plots), encoding="utf-8")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def recommendation_text(rec: dict[str, Any] | None) -> str:
    """The recommendation as one sentence, for the command's summary, report.html and scripts."""
    if rec is None:
        return "no adapter column to recommend"
    if rec["adapter"] is None:
        return f"nothing recommended: {rec['why']}"
    return f"recommended: {rec['adapter']} at scale {rec['scale']:g} ({rec['why']})"


def _html(result: dict[str, Any], grids: list[str], plots: list[str]) -> str:
    e = html.escape
    rec = result["recommendation"]
    rec_html = (
        f"<p class='rec'>Recommended: <b>{e(rec['adapter'])}</b> at scale <b>{rec['scale']:g}</b> — {e(rec['why'])}</p>"
        if rec and rec["adapter"]
        else f"<p class='rec'>{e(recommendation_text(rec).capitalize())}.</p>"
    )
    head = "".join(f"<th>{m}<br><small>{DIRECTION[m]}</small></th>" for m in METRICS)
    body = "".join(
        f"<tr class='{'best' if rec and c['column'] == rec['column'] else ''}'><td>{e(c['column'])}</td>"
        + "".join(f"<td>{_fmt(c['metrics'][m])}</td>" for m in METRICS)
        + "</tr>"
        for c in result["columns"]
    )
    missing = "".join(
        f"<li><code>{m}</code>: unavailable — {e(why)}</li>"
        for m, why in result["unavailable"].items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Adapter evaluation</title><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}}
table{{border-collapse:collapse;font-size:13px;background:#fff}}
td,th{{padding:4px 10px;border:1px solid #e3e3e3;text-align:right}}
td:first-child{{text-align:left}}th small{{font-weight:normal;color:#777}}
tr.best td{{background:#e6f4ea;font-weight:600}}
.rec{{font-size:16px;padding:10px 14px;background:#e6f4ea;border-radius:8px;display:inline-block}}
img{{max-width:100%;border:1px solid #ddd;background:#fff}}.muted{{color:#777}}
</style></head><body>
<h1>Adapter evaluation</h1>
<p class="muted">suite {e(result["suite"])} · base {e(result["model"])} · trigger “{e(result["trigger"])}” · scales
{", ".join(f"{s:g}" for s in result["scales"])} · {result["seeds"]} seed(s) · {result["width"]}×{result["height"]}</p>
{rec_html}
<h2>Metrics</h2><table><tr><th>column</th>{head}</tr>{body}</table>
<ul class="muted">{missing}</ul>
<p class="muted">Rule: among columns with scale &gt; 0 and leakage &le; {LEAKAGE_LIMIT}, maximise fidelity − leakage
(fidelity = reference similarity, else 1 − min(ΔE, 50)/50, else 1 − character error rate);
ties go to the smaller scale, then the earlier checkpoint.</p>
<h2>Plots</h2>{"".join(f'<p><img src="{p}" alt="{p}"></p>' for p in plots) or '<p class="muted">no metric to plot</p>'}
<h2>Grids</h2><p class="muted">rows: prompts · columns: checkpoint × scale · one grid per seed</p>
{"".join(f'<h3>{g}</h3><p><img src="{g}" alt="{g}"></p>' for g in grids)}
<p class="muted">Per-prompt numbers: <a href="metrics.csv">metrics.csv</a>, <a href="metrics.json">metrics.json</a>.</p>
</body></html>
"""
