"""A run's pictures, drawn from its files only (headless: matplotlib's Agg canvas, no pyplot state).

    write_run_plots("runs/quickstart-seq-ft-s0/no-migu")   # -> [plots/accuracy_matrix.png, ...]

Written to `<run>/plots/`:
    accuracy_matrix.png   heatmap, rows = stages (untrained, after task 1..T), columns = tasks, value in each cell
    accuracy_curves.png   accuracy of each task across the stages (one line per task; a star where it is trained)
                          (a perplexity run, scenario: pretrain: perplexity_matrix.png and perplexity_curves.png,
                          the same figures with "perplexity (lower is better)" and a reversed colour scale)
    train_loss.png        training loss per optimizer step, coloured by phase (when metrics.jsonl has train records)
    magnitude_*.png       from magnitudes/<task>.pt when two or more tasks were measured (see migu.report.similarity)

Every figure has a fixed size in inches at `DPI`; heatmaps are seaborn's. The PNGs are deterministic (no
date in PNG metadata): the same run directory gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from migu.metrics import perplexity_metric_line
from migu.report.rundata import Run, load_run
from migu.report.similarity import (MAGNITUDES, chance_overlap, common_layers, layer_index, layer_type, load_magnitudes,
                                    overlap_by_layer, similarity_by_layer_type, similarity_matrix, similarity_range)

DPI = 100
PLOTS = "plots"
_CMAP = "viridis"
_MISSING = "#d9d9d9"


def new_figure(width: float, height: float) -> Figure:
    """A figure not managed by pyplot (safe headless and in threads), with a constrained layout."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as PNG at `DPI` (no tight bbox, so the pixel size is exactly the figure size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def fmt_cell(value: Optional[float], digits: int = 1) -> str:
    """Text drawn in a heatmap cell: `42.5`; `–` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------ heatmaps
def heatmap(ax, values: Sequence[Sequence[Optional[float]]], row_labels: Sequence[str], col_labels: Sequence[str],
            *, vmin: float, vmax: float, cmap: str = _CMAP, digits: int = 1, cbar_label: str = "",
            annotate: Optional[bool] = None, fig: Optional[Figure] = None):
    """seaborn's heatmap of `values` (rows × cols; None = missing, shown grey with `–`) on `ax`, with a colorbar
    when `fig` is given; returns the cell mesh (for a shared colorbar).

    Cell texts are `fmt_cell(value, digits)` at the cell centres (`ax.texts`); they are drawn when `annotate`
    is true (default: at most 400 cells).
    """
    frame = pd.DataFrame([[math.nan if v is None else float(v) for v in row] for row in values],
                         index=list(row_labels), columns=list(col_labels), dtype=float)
    n_rows, n_cols = frame.shape
    annotate = n_rows * n_cols <= 400 if annotate is None else annotate
    size = 9 if n_cols <= 6 else 7 if n_cols <= 12 else 6
    sns.heatmap(frame, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=annotate, fmt=f".{digits}f",
                annot_kws={"fontsize": size}, xticklabels=True, yticklabels=True, cbar=fig is not None,
                cbar_kws={"shrink": 0.9, "label": cbar_label})
    ax.set_facecolor(_MISSING)  # seaborn leaves missing (NaN) cells undrawn
    if annotate:
        for i, j in zip(*frame.isna().to_numpy().nonzero()):
            ax.text(j + 0.5, i + 0.5, fmt_cell(None), ha="center", va="center", fontsize=size)
    rotate = len(col_labels) > 3
    ax.tick_params(length=0, axis="x", labelrotation=35 if rotate else 0)
    ax.tick_params(length=0, axis="y", labelrotation=0)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right" if rotate else "center")
    return ax.collections[0]


def plot_accuracy_matrix(run: Run) -> Figure:
    """Heatmap of the accuracy matrix: rows = stages (untrained, after each phase), columns = tasks."""
    stages, tasks = run.stage_names, run.tasks
    fig = new_figure(max(5.5, 1.0 * len(tasks) + 3.5), max(3.0, 0.45 * len(stages) + 1.8))
    ax = fig.add_subplot()
    heatmap(ax, run.matrix, stages, tasks, cbar_label=run.value_label, fig=fig, **_value_scale(run))
    ax.set_xlabel("evaluated on domain" if run.is_perplexity else "evaluated on task")
    ax.set_ylabel("model state")
    ax.set_title(f"{run.label} — {run.value_label}\n{_metric_line(run)}", fontsize=10)
    return fig


def _value_scale(run: Run) -> dict:
    """Colour range of the heatmap: 0-100 for accuracies; the data's range, reversed colours, for perplexities."""
    if not run.is_perplexity:
        return {"vmin": 0.0, "vmax": 100.0}
    values = [v for row in run.matrix for v in row if v is not None and math.isfinite(v)] or [1.0]
    return {"vmin": min(values), "vmax": max(values), "cmap": _CMAP + "_r", "digits": 2 if max(values) < 100 else 1}


def _metric_line(run: Run) -> str:
    status = "" if run.status == "done" else f"  [{run.status}: {len(run.rows)} phase(s) finished]"
    if run.is_perplexity:
        return perplexity_metric_line(run.metrics) + status
    parts = []
    for key, name in (("aa", "AA"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting")):
        value = run.metrics.get(key)
        parts.append(f"{name} {value:.1f}" if isinstance(value, (int, float)) else f"{name} –")
    return "   ".join(parts) + status


# ------------------------------------------------------------------------------------------ curves
def plot_accuracy_curves(run: Run) -> Figure:
    """Accuracy of every task across the stages; a star marks the stage right after the task is trained."""
    stages = run.stage_names
    matrix = run.matrix
    fig = new_figure(max(6.5, 0.8 * len(stages) + 4.0), 4.2)
    ax = fig.add_subplot()
    x = list(range(len(stages)))
    colors = _task_colors(len(run.tasks))
    offset = 1 if run.r0 is not None else 0
    for j, task in enumerate(run.tasks):
        ys = [row[j] if j < len(row) else None for row in matrix]
        pts = [(xi, y) for xi, y in zip(x, ys) if y is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colors[j], label=task)
        if task in run.row_names:  # the stage right after this task was trained
            k = run.row_names.index(task) + offset
            if k < len(ys) and ys[k] is not None:
                ax.plot([k], [ys[k]], marker="*", markersize=13, color=colors[j], markeredgecolor="black",
                        markeredgewidth=0.6, linestyle="none")
    ax.set_xticks(x, labels=stages, rotation=30 if len(stages) > 4 else 0, ha="right" if len(stages) > 4 else "center")
    if not run.is_perplexity:
        ax.set_ylim(-2, 102)
    ax.set_xlim(-0.3, max(len(stages) - 0.7, 0.3))
    ax.set_xlabel("stage of the task sequence")
    ax.set_ylabel(run.value_label)
    ax.grid(alpha=0.3)
    what = "perplexity of each domain" if run.is_perplexity else "accuracy of each task"
    ax.set_title(f"{run.label} — {what} across the sequence (★ = just trained)", fontsize=10)
    ax.legend(title="domain" if run.is_perplexity else "task", loc="center left", bbox_to_anchor=(1.01, 0.5),
              fontsize=8, frameon=False)
    return fig


def _task_colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_training_loss(run: Run, records: Optional[list[dict]] = None) -> Optional[Figure]:
    """Training loss per optimizer step over the whole sequence, one colour per phase (None: no records)."""
    records = run.training_losses() if records is None else records
    if not records:
        return None
    fig = new_figure(8.0, 3.6)
    ax = fig.add_subplot()
    phases: dict = {}
    for r in records:
        phases.setdefault((r.get("stage", 0), r.get("task", "?")), []).append(float(r["loss"]))
    colors = _task_colors(len(phases))
    start = 0
    for color, ((_, name), losses) in zip(colors, sorted(phases.items(), key=lambda kv: kv[0][0])):
        xs = list(range(start, start + len(losses)))
        ax.plot(xs, losses, color=color, linewidth=1.0, label=str(name))
        if start:
            ax.axvline(start - 0.5, color="grey", linewidth=0.6, linestyle=":")
        start += len(losses)
    ax.set_xlabel("optimizer step (over the whole sequence)")
    ax.set_ylabel("loss (all tokens)" if run.is_perplexity else "loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.label} — training loss", fontsize=10)
    ax.legend(title="phase", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------ a run
def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Write every plot of a run directory into `<run_dir>/plots/`; returns the PNG paths written.

    Reads accuracy_matrix.csv / summary.json (and metrics.jsonl, magnitudes/*.pt when present); needs no
    model. Raises `ReportError` (one line naming the file) for a directory that is not a readable run.
    """
    run = load_run(run_dir)
    out = run.path / PLOTS
    kind = "perplexity" if run.is_perplexity else "accuracy"
    written = [save(plot_accuracy_matrix(run), out / f"{kind}_matrix.png"),
               save(plot_accuracy_curves(run), out / f"{kind}_curves.png")]
    loss = plot_training_loss(run)
    if loss is not None:
        written.append(save(loss, out / "train_loss.png"))
    mag_dir = run.path / MAGNITUDES
    if mag_dir.is_dir() and len(list(mag_dir.glob("*.pt"))) >= 2:
        threshold = run.migu.get("threshold", 0.7)
        written += write_magnitude_plots(mag_dir, out, threshold=float(threshold if threshold is not None else 0.7),
                                         task_order=run.tasks, title=run.label)
    return written


# ------------------------------------------------------------------------------------------ plots
def plot_similarity(tasks: Sequence[str], S: Sequence[Sequence[float]], title: str = "", n_layers: int = 0,
                    centered: Optional[Sequence[Sequence[float]]] = None):
    """Task × task cosine-similarity heatmap (values in the cells); with `centered`, a second panel of the
    centred (Pearson) similarities. The colour scale starts just below the smallest value."""
    n = len(tasks)
    panels = [("cosine similarity", S)] + ([("centred cosine (Pearson r)", centered)] if centered is not None else [])
    fig = new_figure(len(panels) * max(4.6, 0.9 * n + 2.8) + 0.4, max(4.0, 0.8 * n + 2.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, M) in zip(axes, panels):
        heatmap(ax, M, tasks, tasks, vmin=similarity_range([M]), vmax=1.0, cmap="magma", digits=3,
                cbar_label=label, fig=fig)
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        ax.set_title(label, fontsize=10)
    layers = f" (mean over {n_layers} layers)" if n_layers else ""
    fig.suptitle((f"{title}\n" if title else "") + f"How similar are the tasks' magnitude vectors?{layers}",
                 fontsize=10)
    return fig


def plot_similarity_by_type(tasks: Sequence[str], by_type: dict[str, list[list[float]]], title: str = ""):
    """One small task × task heatmap per layer type (shared colour scale)."""
    kinds = list(by_type)
    cols = min(4, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    n = len(tasks)
    fig = new_figure(cols * max(2.6, 0.55 * n + 1.6) + 1.0, rows * max(2.4, 0.5 * n + 1.5) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmin = similarity_range(by_type.values())
    image = None
    for ax, kind in zip(axes.flat, kinds):
        image = heatmap(ax, by_type[kind], tasks, tasks, vmin=vmin, vmax=1.0, cmap="magma", digits=2,
                        annotate=n <= 6)
        ax.set_title(kind, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle((f"{title} — " if title else "") + "magnitude cosine similarity by layer type", fontsize=10)
    return fig


def plot_overlap(layers: Sequence[str], pairs: Sequence[tuple[str, str]], values: Sequence[Sequence[float]],
                 threshold: float, metric: str = "fraction", title: str = "",
                 sizes: Optional[Sequence[int]] = None):
    """Kept-unit overlap: a layers × task-pairs heatmap (top) and one line per pair over layers (bottom).

    `sizes` (units per layer) adds the chance level of two random kept sets as a dashed line.
    """
    import numpy as np

    data = np.array(values, dtype=float).T  # pairs × layers
    pair_names = [f"{a} ∩ {b}" for a, b in pairs]
    n_layers = len(layers)
    fig = new_figure(max(8.0, min(18.0, 0.09 * n_layers + 5.0)), 3.0 + 0.35 * len(pairs) + 3.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[max(1.0, 0.35 * len(pairs) + 0.8), 3.0])
    image = top.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    top.set_yticks(range(len(pairs)), labels=pair_names, fontsize=8)
    ticks = _layer_ticks(layers)
    top.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks], fontsize=7, rotation=90)
    top.set_title("overlap of kept-unit sets per layer (columns: layers in model order)", fontsize=9)
    fig.colorbar(image, ax=top, label="|A∩B|/k" if metric == "fraction" else "Jaccard", shrink=0.9)
    blocks = [layer_index(n) for n in layers]
    by_block = n_layers > 40 and None not in blocks  # many units: one point per block (mean over its units)
    if by_block:
        xs = sorted(set(blocks))
        groups = [[i for i, b in enumerate(blocks) if b == x] for x in xs]
    else:
        xs = list(range(n_layers))
        groups = [[i] for i in xs]
    for p, name in enumerate(pair_names):
        bottom.plot(xs, [float(data[p, g].mean()) for g in groups], linewidth=1.2,
                    marker="." if len(xs) <= 60 else None, label=name)
    if sizes is not None:
        chance = [float(np.mean([chance_overlap(int(sizes[i]), threshold, metric) for i in g])) for g in groups]
        bottom.plot(xs, chance, color="black", linestyle="--", linewidth=1.0, label="chance (random sets)")
    if by_block:
        step = max(1, math.ceil(len(xs) / 40))
        bottom.set_xticks(xs[::step], labels=[str(x) for x in xs[::step]], fontsize=7)
        bottom.set_xlabel("block (mean over the block's ranked layers)")
        bottom.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    else:
        bottom.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks], fontsize=7, rotation=90)
        bottom.set_xlabel("layer (unit ranked by MIGU)")
        bottom.set_xlim(-0.5, n_layers - 0.5)
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("|A∩B| / k" if metric == "fraction" else "Jaccard |A∩B|/|A∪B|")
    bottom.grid(alpha=0.3)
    fig.legend(*bottom.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(pairs) + 1),
               fontsize=8, frameon=False)
    fig.suptitle((f"{title}\n" if title else "") + f"kept units per task (top {100 * (1 - threshold):.0f}% by "
                 f"magnitude, T={threshold:g}): how much do two tasks share?", fontsize=10)
    return fig


def _layer_ticks(layers: Sequence[str]) -> list[tuple[int, str]]:
    """At most ~40 x ticks: every layer when few, else the first unit of each block."""
    if len(layers) <= 40:
        return [(i, _short(n)) for i, n in enumerate(layers)]
    ticks, seen = [], set()
    for i, name in enumerate(layers):
        block = layer_index(name)
        if block not in seen:
            seen.add(block)
            ticks.append((i, f"block {block}" if block is not None else _short(name)))
    step = max(1, math.ceil(len(ticks) / 40))
    return ticks[::step]


def _short(name: str) -> str:
    block = layer_index(name)
    kind = layer_type(name)
    return f"{block}.{kind}" if block is not None else kind


def write_magnitude_plots(directory: str | Path, out_dir: str | Path, threshold: float = 0.7,
                          tasks: Optional[Sequence[str]] = None, task_order: Optional[Sequence[str]] = None,
                          metric: str = "fraction", title: str = "") -> list[Path]:
    """Similarity and overlap plots from `directory/*.pt` into `out_dir`; returns the PNG paths.

    Needs two or more tasks (one task: nothing to compare, returns []).
    """
    mags = load_magnitudes(directory, tasks, task_order)
    if len(mags) < 2:
        return []
    out_dir = Path(out_dir)
    names, S = similarity_matrix(mags)
    _, C = similarity_matrix(mags, centered=True)
    n_layers = len(common_layers(mags))
    written = [save(plot_similarity(names, S, title, n_layers, C), out_dir / "magnitude_similarity.png")]
    by_type = similarity_by_layer_type(mags)
    if len(by_type) > 1:
        written.append(save(plot_similarity_by_type(names, by_type, title),
                            out_dir / "magnitude_similarity_by_type.png"))
    layers, pairs, values = overlap_by_layer(mags, threshold, metric)
    sizes = [mags[names[0]][n].numel() for n in layers]
    written.append(save(plot_overlap(layers, pairs, values, threshold, metric, title, sizes),
                        out_dir / "kept_overlap.png"))
    return written
