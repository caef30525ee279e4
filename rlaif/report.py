"""The evaluation report: one self-contained HTML page (images inlined, curves as inline SVG, no scripts)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import polars as pl

from rlaif.files import atomic_path
from rlaif.stats import bounds_text, interval_decimals, interval_text, significance

CURVES = ("loss", "implicit_acc", "reward_margin", "val_implicit_acc", "val_reward_margin")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.good { color: #0a7d2c; font-weight: bold; } .bad { color: #b3261e; font-weight: bold; }
.curves { display: flex; flex-wrap: wrap; gap: 1.5em; }
.curve text { font-size: 11px; fill: #444; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(370px, 1fr)); gap: 1em; }
.pair { border: 1px solid #ddd; padding: 0.5em; }
.pair p { margin: 0 0 0.4em 0; font-size: 13px; }
.pair figure { display: inline-block; vertical-align: top; width: 164px; margin: 0 0.5em 0 0; text-align: center;
               font-size: 12px; }
.pair img { width: 160px; height: 160px; image-rendering: pixelated; display: block; }
"""


def _image_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


SIGNIFICANCE_CLASS = {1: "good", -1: "bad", 0: ""}


def _win_table(table: pl.DataFrame, table_id: str, extra: tuple[str, ...] = ()) -> str:
    header = "".join(f"<th>{html.escape(c)}</th>" for c in (*extra, "scorer", "prompts", "n", "win rate", "95% CI",
                                                             "mean base", "mean tuned", "delta (95% CI)",
                                                             "relative (95% CI)", "p"))
    rows = []
    for row in table.iter_rows(named=True):
        means = interval_decimals(row["delta_low"], row["delta_high"])  # to the digits the delta shows
        p = row["p_value"]  # coloured only where the interval and the signed-rank test agree
        verdict = SIGNIFICANCE_CLASS[significance(row["ci_low"], row["ci_high"], p, null=0.5)]
        change = SIGNIFICANCE_CLASS[significance(row["delta_low"], row["delta_high"], p)]
        relative = SIGNIFICANCE_CLASS[significance(row["relative_low"], row["relative_high"], p)]
        cells = [html.escape(str(row[c])) for c in extra] + [
            html.escape(row["scorer"]), str(row["prompts"]), str(row["n"]),
            f'<span class="{verdict}">{row["win_rate"]:.3f}</span>',
            bounds_text(row["ci_low"], row["ci_high"], " - "),
            f"{row['mean_base']:.{means}f}",
            f"{row['mean_tuned']:.{means}f}",
            f'<span class="{change}">{interval_text(row["delta"], row["delta_low"], row["delta_high"])}</span>',
            f'<span class="{relative}">'
            f'{interval_text(row["relative"], row["relative_low"], row["relative_high"], percent=True)}</span>',
            f"{row['p_value']:.2g}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def curve_svg(steps: list[float], values: list[float], name: str, width: int = 320, height: int = 180) -> str:
    """A line chart of ``values`` against ``steps`` as an SVG element, with its range labelled."""
    pad = 34
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    first, last = steps[0], steps[-1]
    extent = (last - first) or 1.0
    points = " ".join(f"{pad + (s - first) / extent * (width - 2 * pad):.1f},"
                      f"{height - pad - (v - low) / span * (height - 2 * pad):.1f}" for s, v in zip(steps, values,
                                                                                                    strict=True))
    return (f'<svg class="curve" data-metric="{name}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{name}">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>'
            f'<polyline fill="none" stroke="#3465a4" stroke-width="1.5" points="{points}"/>'
            f'<text x="{pad}" y="14">{name}</text>'
            f'<text x="2" y="{pad}">{high:.3g}</text><text x="2" y="{height - pad}">{low:.3g}</text>'
            f'<text x="{pad}" y="{height - 8}">step {first:g}</text>'
            f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{last:g}</text></svg>')


def _pairs_grid(paired: pl.DataFrame, scorers: list[str], grid: int) -> str:
    wide = paired.pivot(on="scorer", index=["prompt", "candidate", "seed", "image_base", "image_tuned"],
                        values=["score_base", "score_tuned"], aggregate_function="first")
    cards = []
    for row in wide.head(grid).iter_rows(named=True):
        figures = []
        for side in ("base", "tuned"):
            scores = ", ".join(f"{s} {row[f'score_{side}_{s}']:.4g}" for s in scorers)
            figures.append(f'<figure><img class="{side}" alt="{side}" src="{_image_uri(row[f"image_{side}"])}">'
                           f"<figcaption>{side}<br>{html.escape(scores)}</figcaption></figure>")
        cards.append(f'<div class="pair"><p>{html.escape(row["prompt"])} &middot; seed {row["seed"]}</p>'
                     f'{"".join(figures)}</div>')
    shown = min(grid, wide.height)
    return f"<p>{shown} of {wide.height} prompt-seed pairs, same seed on both sides.</p>" \
           f'<div class="grid">{"".join(cards)}</div>'


def write_report(path: Path, summary: pl.DataFrame, by_category: pl.DataFrame | None, paired: pl.DataFrame,
                 scorers: list[str], train_log: list[dict], title: str, grid: int = 24,
                 warnings: list[str] = (), settings: dict | None = None) -> Path:
    """Write the report: warnings first, win rates and effects (overall, marked optimised or held-out, and per
    category), training curves from ``train_log`` (when given) and a base | tuned image grid with scores;
    ``paired`` holds one row per scorer and comparison; ``settings``, what the numbers were measured under, in a
    line below the title (two reports of one model at two guidance scales look alike otherwise)."""
    measured = "; ".join(f"{key.replace('_', ' ')} {value}" for key, value in (settings or {}).items()
                         if value not in (None, [], ""))
    parts = [f"<h1>rlaif evaluation</h1><p>{html.escape(title)}</p>",
             *([f'<p class="settings">Measured under: {html.escape(measured)}</p>'] if measured else []),
             "<h2>Win rate of tuned over base</h2>",
             "<p>Per prompt and seed: 1 if the tuned image scores higher, 0.5 on a tie. Beside it the size of the "
             "change: the mean delta (tuned - base), absolute and relative to the base mean. Intervals are 95% "
             "bootstraps over prompts (a prompt's seeds are correlated); p: Wilcoxon signed-rank test of the "
             "per-prompt mean deltas. Green: the interval lies above 0.5 (win rate) or 0 (delta) and p < 0.05; "
             "red: below it and p < 0.05 (with fewer than 6 prompts p cannot be below 0.05).</p>",
             "<p>Role: <i>optimised</i> scorers are the ones the model was trained on (their rise measures "
             "optimisation); <i>held-out</i> ones were not (a fall there while the optimised ones rise suggests "
             "reward hacking).</p>",
             _win_table(summary, "win-rates", ("role",))]
    parts[1:1] = [f'<p class="bad warning">{html.escape(line)}</p>' for line in warnings]
    if by_category is not None:
        parts += ["<h2>By category</h2>", _win_table(by_category, "by-category", ("column", "category"))]
    if train_log:
        charts = []
        for name in CURVES:  # held-out ("val_") figures are measured every --val-every steps, the others each step
            points = [(entry["step"], entry[name]) for entry in train_log if name in entry]
            if len(points) > 1:
                charts.append(curve_svg([p[0] for p in points], [p[1] for p in points], name))
        parts += ['<h2>Training</h2><div class="curves" id="curves">', *charts, "</div>"]
    parts += ["<h2>Base | tuned</h2>", _pairs_grid(paired, scorers, grid)]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body>{"".join(parts)}</body></html>\n')
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
