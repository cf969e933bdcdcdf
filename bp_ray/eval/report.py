"""The offline HTML report of an evaluation: table, win rates, image grid, score-difference histograms and the
training curves. Plots are PNGs made with matplotlib; the page has no scripts and no external references."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bp_ray.extensions import registry
from bp_ray.train.metrics import read_metrics

REPORT = "report.html"
PLOTS_DIR = "plots"
METRIC_LABELS = {"pickscore": "PickScore", "aesthetic": "Aesthetic", "relevance": "CLIP relevance",
                 "reward": "Reward", "words": "Words", "sd_tokens": "SD tokens"}


def label(metric: str) -> str:
    """How the report names a metric: its own label, a registered eval metric's, or the column name."""
    extra = {column: text for m in registry().eval_metrics.values() for column, text in m.labels.items()}
    return METRIC_LABELS.get(metric) or extra.get(metric, metric)


CURVES = {
    "ppo": ("reward/combined", "eval/reward", "kl", "kl_coef", "loss/policy", "loss/value"),
    "sft": ("loss/train", "loss/eval"),
    "rm": ("loss/train", "loss/eval"),
}
"""The columns of each training stage's metrics.csv worth a curve, those present are drawn."""

CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
td.best { font-weight: bold; background: #e8f5e9; }
table.grid td { vertical-align: top; text-align: left; width: 14em; }
table.grid img { width: 96px; height: 96px; image-rendering: pixelated; margin: 1px; }
.prompt { font-size: 0.8em; color: #444; word-wrap: break-word; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.note { color: #666; font-size: 0.85em; }
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    return plt


def plot_differences(per_prompt: pd.DataFrame, metrics: Sequence[str], systems: Sequence[str], baseline: str,
                     path: Path) -> bool:
    """Histograms of the per-prompt difference (system - baseline) of each metric; False if there is nothing to
    compare."""
    others = [s for s in systems if s != baseline]
    if baseline not in set(per_prompt["system"]) or not others:
        return False
    plt = _plt()
    base = per_prompt[per_prompt["system"] == baseline].set_index("prompt_id")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for system in others:
            rows = per_prompt[per_prompt["system"] == system].set_index("prompt_id")
            diff = (rows[metric] - base[metric]).dropna().to_numpy()
            ax.hist(diff, bins=min(20, max(5, len(diff) // 2)), alpha=0.5, label=system)
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_title(f"{label(metric)}: system - {baseline}", fontsize=9)
        ax.set_xlabel("per-prompt difference (mean over seeds)", fontsize=8)
    axes[0][0].set_ylabel("prompts")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_means(table: list[dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    """Bar chart of each system's mean with its 95% interval, one panel per metric."""
    plt = _plt()
    systems = [row["system"] for row in table]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = [row[f"{metric}_mean"] for row in table]
        errors = [row[f"{metric}_ci"] if row[f"{metric}_ci"] is not None else 0.0 for row in table]
        ax.bar(range(len(systems)), means, yerr=errors, capsize=3, color="#7aa6c2")
        ax.set_xticks(range(len(systems)), systems, rotation=30, fontsize=8)
        ax.set_title(label(metric), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(name: str, csv_path: Path, path: Path) -> bool:
    """The training curves of one stage's metrics.csv; False when it holds none of the known columns."""
    frame = read_metrics(csv_path)
    columns = [c for c in CURVES.get(name.split("/")[0], ()) if c in frame and frame[c].notna().any()]
    if not columns:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        points = frame[["step", column]].dropna()
        ax.plot(points["step"], points[column], marker="." if len(points) < 30 else None)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else html.escape(str(value))


def _summary_table(results: dict[str, Any]) -> str:
    metrics = [*results["metrics"], *results["prompt_metrics"]]
    head = "".join(f"<th>{label(m)}</th>" for m in metrics)
    best = {m: max(row[f"{m}_mean"] for row in results["table"]) for m in results["metrics"]}
    rows = []
    for row in results["table"]:
        cells = []
        for m in metrics:
            cls = ' class="best"' if m in best and row[f"{m}_mean"] == best[m] else ""
            cells.append(f"<td{cls}>{_fmt(row[f'{m}_mean'])} ± {_fmt(row[f'{m}_ci'], 2)}</td>")
        rows.append(f'<tr><td class="text">{html.escape(row["system"])}</td><td>{row["n"]}</td>{"".join(cells)}</tr>')
    return (f'<table id="results"><tr><th class="text">system</th><th>prompts</th>{head}</tr>{"".join(rows)}</table>')


def _comparison_table(results: dict[str, Any]) -> str:
    rows = []
    for c in results["comparisons"]:
        rows.append(
            f'<tr><td class="text">{html.escape(c["system"])}</td><td class="text">{html.escape(c["baseline"])}</td>'
            f'<td class="text">{label(c["metric"])}</td><td>{c["n"]}</td>'
            f'<td>{c["wins"]} / {c["ties"]} / {c["losses"]}</td><td>{_fmt(c["win_rate"], 3)}</td>'
            f'<td>{_fmt(c["mean_diff"])} ± {_fmt(c["ci"], 2)}</td><td>{_fmt(c["p_t"], 3)}</td>'
            f'<td>{_fmt(c["p_wilcoxon"], 3)}</td></tr>')
    return ('<table id="wins"><tr><th class="text">system</th><th class="text">over</th><th class="text">metric</th>'
            "<th>prompts</th><th>wins / ties / losses</th><th>win rate</th><th>mean difference</th>"
            f"<th>p (paired t)</th><th>p (Wilcoxon)</th></tr>{''.join(rows)}</table>")


def _grid(prompts: list[str], texts: dict[str, list[str]], image_paths: dict[str, str], seeds: list[int],
          systems: list[str]) -> str:
    head = "".join(f"<th class='text'>{html.escape(s)}</th>" for s in systems)
    rows = []
    for p in sorted({int(key.split("/")[1]) for key in image_paths}):
        cells = []
        for system in systems:
            images = "".join(f'<img src="{html.escape(image_paths[key])}" alt="{html.escape(system)} seed {seed}">'
                             for seed in seeds if (key := f"{system}/{p}/{seed}") in image_paths)
            cells.append(f'<td>{images}<div class="prompt">{html.escape(texts[system][p])}</div></td>')
        rows.append(f'<tr><td class="text prompt">{html.escape(prompts[p])}</td>{"".join(cells)}</tr>')
    return f'<table class="grid" id="grid"><tr><th class="text">user prompt</th>{head}</tr>{"".join(rows)}</table>'


def write_report(out_dir: Path, results: dict[str, Any], prompts: list[str], texts: dict[str, list[str]],
                 per_prompt: pd.DataFrame, image_paths: dict[str, str], metric_files: dict[str, Path]) -> list[str]:
    """Plots under plots/ and report.html; returns the files written, relative to out_dir.

    The page always carries the human-preference markers, filled from out_dir's votes when there are any, so
    `human_results.update_report` can refresh that section later without redoing the evaluation."""
    from bp_ray.eval.human_results import human_section  # it imports REPORT from here

    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    figures: list[tuple[str, str]] = []

    def keep(name: str, caption: str) -> None:
        written.append(f"{PLOTS_DIR}/{name}")
        figures.append((f"{PLOTS_DIR}/{name}", caption))

    plot_means(results["table"], results["metrics"], plots / "means.png")
    keep("means.png", "Mean of each metric per system, with its 95% confidence interval over prompts.")
    for baseline in ("original", "sft"):
        name = f"differences_vs_{baseline}.png"
        if plot_differences(per_prompt, results["metrics"], results["systems"], baseline, plots / name):
            keep(name, f"Per-prompt score differences against {baseline} (means over seeds).")
    curves = []
    for stage, csv_path in metric_files.items():
        name = f"curves_{stage.replace('/', '_')}.png"
        if plot_curves(stage, csv_path, plots / name):
            written.append(f"{PLOTS_DIR}/{name}")
            curves.append((f"{PLOTS_DIR}/{name}", f"Training curves of {stage} ({csv_path.name})."))

    long = results["long_prompts"]
    over = ", ".join(f"{s} {v['over_limit']}" for s, v in long["systems"].items())
    figure_html = "".join(f'<figure><img class="plot" src="{src}" alt="{html.escape(cap)}">'
                          f"<figcaption class='note'>{html.escape(cap)}</figcaption></figure>" for src, cap in figures)
    curve_html = ("".join(f'<figure><img class="plot" src="{src}" alt="{html.escape(cap)}">'
                          f"<figcaption class='note'>{html.escape(cap)}</figcaption></figure>" for src, cap in curves)
                  or "<p class='note'>No training metrics were given (pass the training stages' folders).</p>")
    render = results["render"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bp-ray evaluation ({html.escape(results['preset'])})</title>
<style>{CSS}</style></head><body>
<h1>bp-ray evaluation</h1>
<p class="note">{results['prompts']['count']} user prompts ({html.escape(results['prompts']['source'])}) x
{len(results['seeds'])} seeds {results['seeds']}; {render['width']}x{render['height']}, {render['num_inference_steps']}
steps, guidance {render['guidance_scale']}, {html.escape(render['scheduler'])}. Every image is scored against the
ORIGINAL user prompt. Reward = {results['alpha']} x PickScore + {1 - results['alpha']:.2g} x aesthetic. Values are
means over prompts (each the mean over seeds) ± the half-width of the 95% confidence interval.</p>
<h2>Results</h2>
{_summary_table(results)}
<h2>Paired comparisons</h2>
<p class="note">Per prompt, a system wins when its mean over seeds is higher; win rate = (wins + ties / 2) / prompts.
p-values are two-sided, for the paired differences.</p>
{_comparison_table(results)}
{figure_html}
{human_section(out_dir)}
<h2>Long prompts</h2>
<p class="note">Prompts longer than the text encoder's {long['limit_tokens']} tokens, per system: {html.escape(over)}.
Rendering mode: {html.escape(long['mode'])}.</p>
<h2>Images</h2>
<p class="note">Rows are user prompts, columns systems; each cell shows every seed and the rendered prompt.</p>
{_grid(prompts, texts, image_paths, results['seeds'], results['systems'])}
<h2>Training curves</h2>
{curve_html}
</body></html>
"""
    (out_dir / REPORT).write_text(page, encoding="utf-8")
    written.append(REPORT)
    written += sorted(image_paths.values())
    return written
