"""Tables of runs: one run's summary (report.md) and the comparison of many runs (`migu compare`).

    rows = [run_record(load_run(p)) for p in find_run_dirs(["runs/"])]
    groups = aggregate(rows)               # runs that differ only by seed → mean ± sample std, n
    print(markdown_table(groups, GROUP_COLUMNS))

Grouping: two runs fall in one group when their resolved configs (config.yaml) are equal except for
the seed and the places the output goes (`seed`, `data.seed`, `output_dir`, `name`, `threads`,
`compare_migu`, `provenance`); the MIGU settings count only when MIGU is on. Config keys that differ
between groups (other than method and MIGU) are shown in the `setting` column, e.g. `data.order=2`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from migu.metrics import METRIC_KEYS, PPL_METRIC_KEYS, perplexity_metric_line
from migu.report.plots import fmt_cell, new_figure, save
from migu.report.rundata import Run

# config keys that do not make two runs different experiments
_SEED_LIKE = ("seed", "data.seed", "output_dir", "name", "threads", "compare_migu", "provenance")
_SHOWN = ("method.name", "migu.enabled", "migu.threshold")  # already columns of their own

RUN_COLUMNS = ("run", "method", "migu", "threshold", "setting", "seed", "aa", "bwt", "fwt", "forgetting",
               "wall_time_s")
GROUP_COLUMNS = ("method", "migu", "threshold", "setting", "n", "seeds", "aa", "bwt", "fwt", "forgetting",
                 "wall_time_s")
# a comparison of perplexity runs (scenario: pretrain) shows these instead of AA/BWT/FWT/forgetting
PPL_COMPARE_KEYS = ("ppl_avg", "ppl_forgetting", "ppl_general_drift", "ppl_general_drift_rel")
PPL_RUN_COLUMNS = RUN_COLUMNS[:6] + PPL_COMPARE_KEYS + ("wall_time_s",)
PPL_GROUP_COLUMNS = GROUP_COLUMNS[:6] + PPL_COMPARE_KEYS + ("wall_time_s",)
_ALL_METRICS = METRIC_KEYS + PPL_COMPARE_KEYS
HEADERS = {"ppl_avg": "avg ppl", "ppl_forgetting": "ppl forgetting", "ppl_general_drift": "general drift",
           "ppl_general_drift_rel": "general drift (rel.)", "run": "run", "method": "method", "migu": "MIGU", "threshold": "T", "setting": "setting",
           "seed": "seed", "seeds": "seeds", "n": "n", "aa": "AA", "bwt": "BWT", "fwt": "FWT",
           "forgetting": "forgetting", "wall_time_s": "wall time (s)"}


# ------------------------------------------------------------------------------------------ records
def flatten(config: dict) -> dict:
    """{"migu": {"threshold": 0.7}} → {"migu.threshold": 0.7} (pandas.json_normalize); lists become tuples."""
    return {k: _hashable(v) for k, v in pd.json_normalize(config, sep=".").to_dict("records")[0].items()}


def _hashable(value):
    """Lists become tuples and dicts sorted item tuples, recursively (pretrain.domains is a list of dicts)."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _experiment_key(run: Run) -> dict:
    """The flattened config without seed-like keys (and without migu.* when MIGU is off)."""
    flat = flatten(run.config) if run.config else {}
    flat["method.name"] = run.method
    flat["migu.enabled"] = run.migu_enabled
    flat["migu.threshold"] = run.threshold
    if run.migu_enabled:
        for key in ("mode", "target_modules"):
            if run.migu.get(key) is not None or f"migu.{key}" in flat:
                value = run.migu.get(key)
                flat[f"migu.{key}"] = tuple(value) if isinstance(value, list) else value
    else:
        flat = {k: v for k, v in flat.items() if not k.startswith("migu.") or k == "migu.enabled"}
        flat["migu.threshold"] = None
    drop = tuple(_SEED_LIKE)
    flat = {k: v for k, v in flat.items()
            if not any(k == d or k.startswith(d + ".") for d in drop)}
    # method options of methods other than the chosen one never matter
    chosen = "method." + run.method.replace("-", "_") + "."
    return {k: v for k, v in flat.items() if not k.startswith("method.") or k == "method.name" or k.startswith(chosen)}


def run_records(runs: Sequence[Run]) -> list[dict]:
    """One record per run: the RUN_COLUMNS plus `key` (the grouping key) and `path`."""
    keys = [_experiment_key(run) for run in runs]
    all_keys = sorted({k for key in keys for k in key})
    # a key varies when runs that have it disagree (migu.mode exists only for runs with MIGU on)
    varying = [k for k in all_keys if k not in _SHOWN and len({key[k] for key in keys if k in key}) > 1]
    records = []
    for run, key in zip(runs, keys):
        setting = ", ".join(f"{k}={_show(key.get(k))}" for k in varying if k in key)
        record = {"run": run.name, "path": str(run.path), "method": run.method, "migu": run.migu_enabled,
                  "threshold": run.threshold, "setting": setting, "seed": run.seed,
                  "wall_time_s": run.wall_time_s, "key": tuple(sorted(key.items(), key=lambda kv: kv[0]))}
        record.update({k: run.metrics.get(k) for k in _ALL_METRICS})
        records.append(record)
    return records


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def seed_stats(records: Sequence[dict], by: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Per group of `by` (first-seen order): `n` and `<v>_mean`, `<v>_std` (sample std, n-1), `<v>_n` of each
    value over the group's records (None/NaN left out; std None for one value, mean None for none)."""
    frame = pd.DataFrame(list(records), columns=list(dict.fromkeys([*by, *values])), dtype=object)
    frame[list(values)] = frame[list(values)].astype(float)
    grouped = frame.groupby(list(by), sort=False, dropna=False)
    stats = grouped[list(values)].agg(["mean", "std", "count"]).astype(float)
    stats.columns = [f"{v}_{'n' if s == 'count' else s}" for v, s in stats.columns]
    stats.insert(0, "n", grouped.size())
    stats = stats.reset_index()
    for v in values:
        stats[f"{v}_n"] = stats[f"{v}_n"].astype(int)
    return stats.astype(object).where(stats.notna(), None)


def aggregate(records: Sequence[dict]) -> list[dict]:
    """Groups of runs that differ only by seed (same `key`), in first-seen order.

    Each group: method, migu, threshold, setting, n (runs), seeds ("0,1,2"), runs (names), and for
    every metric and wall time `<m>_mean`, `<m>_std` (sample std, None for one run), `<m>_n`.
    """
    stats = seed_stats(records, ["key"], _ALL_METRICS + ("wall_time_s",)).to_dict("records")
    for group in stats:
        members = [r for r in records if r["key"] == group["key"]]
        group.update({k: members[0][k] for k in ("method", "migu", "threshold", "setting")}, runs=[m["run"] for m in members],
                     seeds=",".join(str(m["seed"]) for m in sorted(members, key=lambda m: (m["seed"] is None, m["seed"] or 0))))
    return stats


# ------------------------------------------------------------------------------------------ formatting
def fmt_value(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_mean_std(mean: Optional[float], std: Optional[float], digits: int = 2) -> str:
    """`45.20 ± 1.30`; just the mean for one run; `–` for none."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def display_rows(rows: Sequence[dict], columns: Sequence[str], digits: int = 2) -> list[list[str]]:
    """Rows as strings; for group rows a metric column shows `mean ± std`."""
    out = []
    for row in rows:
        cells = []
        for col in columns:
            if f"{col}_mean" in row:
                places = 1 if col == "wall_time_s" else digits
                cells.append(fmt_mean_std(row[f"{col}_mean"], row[f"{col}_std"], places))
            elif col == "threshold":
                cells.append("–" if row.get(col) is None else f"{row[col]:g}")
            elif col == "wall_time_s":
                cells.append(fmt_value(row.get(col), 1))
            else:
                cells.append(fmt_value(row.get(col), digits))
        out.append(cells)
    return out


def _drop_empty(columns: Sequence[str], rows: Sequence[dict]) -> list[str]:
    # the setting column only when some runs differ in more than method/MIGU/seed
    return [c for c in columns if c != "setting" or any(r.get("setting") for r in rows)]


def markdown_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 2) -> str:
    """A GitHub Markdown table of `rows` (run records or groups)."""
    columns = _drop_empty(columns, rows)
    numeric = {c for c in columns if c in _ALL_METRICS + ("wall_time_s", "n", "seed", "threshold")}
    return markdown_cells([[cell.replace("|", "\\|") for cell in cells] for cells in display_rows(rows, columns, digits)],
                     [HEADERS.get(c, c) for c in columns], [c in numeric for c in columns])


def markdown_cells(body: Sequence[Sequence[str]], head: Sequence[str], right: Sequence[bool]) -> str:
    """A GitHub Markdown table of text cells (DataFrame.to_markdown); `right`: right-align that column."""
    # cells are formatted text already: tabulate must not re-parse them as numbers
    return pd.DataFrame(list(body), columns=list(head), dtype=object).to_markdown(
        index=False, colalign=["right" if r else "left" for r in right], disable_numparse=True)


def text_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 2) -> str:
    """The same table aligned for a terminal."""
    columns = _drop_empty(columns, rows)
    head = [HEADERS.get(c, c) for c in columns]
    body = display_rows(rows, columns, digits)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(lines)


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV with raw numbers: group metrics become `<m>_mean`, `<m>_std`, `<m>_n` columns."""
    fields = [f for col in columns for f in ([f"{col}_{x}" for x in ("mean", "std", "n")]
                                              if rows and f"{col}_mean" in rows[0] else [col])]
    return pd.DataFrame(list(rows), columns=fields, dtype=object).to_csv(index=False, lineterminator="\n")


# ------------------------------------------------------------------------------------------ one run
def run_report_markdown(run: Run, plots: Sequence[Path] = ()) -> str:
    """report.md of one run: settings, metrics, the accuracy matrix, links to its plots."""
    migu = f"on, T={run.threshold:g}, mode {run.migu.get('mode', 'grad')}" if run.migu_enabled else "off"
    lines = [f"# {run.name}", "", f"- method: `{run.method}`", f"- MIGU: {migu}", f"- seed: {run.seed}",
             f"- status: {run.status}"]
    model = (run.summary or {}).get("model") or (run.config.get("model") or {}).get("name")
    if model:
        lines.append(f"- model: `{model}`")
    if run.wall_time_s is not None:
        lines.append(f"- wall time: {run.wall_time_s:.1f} s")
    if run.is_perplexity:
        heads = ["avg ppl", "forgetting", "forgetting (rel.)", "general before", "general after", "general drift",
                 "general drift (rel.)"]
        values = [fmt_value(run.metrics.get(k), 4 if k.endswith("_rel") else 2) for k in PPL_METRIC_KEYS]
        lines += ["", markdown_cells([values], heads, [True] * len(heads)), "",
                  f"{perplexity_metric_line(run.metrics)} (forgetting: rise of each earlier domain's perplexity "
                  "over its best value; drift: general held-out set, never trained on, before → after)", "",
                  "## Perplexity matrix (lower is better)"]
    else:
        values = [fmt_value(run.metrics.get(k)) for k in METRIC_KEYS]
        lines += ["", markdown_cells([values], ["AA", "BWT", "FWT", "forgetting"], [True] * 4), "",
                  "## Accuracy matrix (%)"]
    digits = 2 if run.is_perplexity else 1
    matrix = [[stage] + [fmt_cell(v, digits) for v in row] for stage, row in zip(run.stage_names, run.matrix)]
    lines += ["", markdown_cells(matrix, ["model state", *run.tasks], [False] + [True] * len(run.tasks))]
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = p.relative_to(run.path) if p.is_relative_to(run.path) else p
            lines.append(f"![{p.stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def run_summary_text(run: Run) -> str:
    """A few terminal lines: the matrix and the metrics."""
    width = max([len(t) for t in run.tasks] + [6]) + 2
    title = "perplexity" if run.is_perplexity else "accuracy (%)"
    digits = 2 if run.is_perplexity else 1
    label_w = max(len(s) for s in run.stage_names + [title]) + 2
    lines = [f"{run.name}: {run.label}  [{run.status}]",
             title.ljust(label_w) + "".join(t.rjust(width) for t in run.tasks)]
    for stage, row in zip(run.stage_names, run.matrix):
        lines.append(stage.ljust(label_w) + "".join(fmt_cell(v, digits).rjust(width) for v in row))
    if run.is_perplexity:
        lines.append(perplexity_metric_line(run.metrics))
    else:
        lines.append("   ".join(f"{HEADERS[k]} {fmt_value(run.metrics.get(k))}" for k in METRIC_KEYS))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ bar chart
_BAR_TITLES = {"aa": "AA (higher is better)", "bwt": "BWT (closer to 0 is better)",
               "ppl_avg": "avg perplexity (lower is better)", "ppl_forgetting": "perplexity forgetting (lower is better)"}


def plot_compare_bars(groups: Sequence[dict], metrics: Sequence[tuple[str, str]] = (("aa", "AA (%)"), ("bwt", "BWT (%)"))):
    """AA and BWT (or other `(key, axis label)` pairs) per method (x), bars without / with MIGU side by side,
    error bars = sample std."""
    def x_name(g):
        return g["method"] + (f"\n{g['setting']}" if g.get("setting") else "")

    def variant(g):
        return "no MIGU" if not g["migu"] else f"MIGU T={g['threshold']:g}"

    xs = list(dict.fromkeys(x_name(g) for g in groups))
    variants = sorted(dict.fromkeys(variant(g) for g in groups), key=lambda v: (v != "no MIGU", v))
    fig = new_figure(max(7.0, 1.3 * len(xs) * max(1, len(variants)) / 2 + 4), 4.4)
    axes = fig.subplots(1, 2)
    colors = {v: c for v, c in zip(variants, _variant_colors(len(variants)))}
    width = 0.8 / max(1, len(variants))
    for ax, (metric, name) in zip(axes, metrics):
        for k, v in enumerate(variants):
            heights, errs, pos = [], [], []
            for i, x in enumerate(xs):
                match = [g for g in groups if x_name(g) == x and variant(g) == v]
                if not match or match[0][f"{metric}_mean"] is None:
                    continue
                g = match[0]
                pos.append(i - 0.4 + width * (k + 0.5))
                heights.append(g[f"{metric}_mean"])
                errs.append(g[f"{metric}_std"] or 0.0)
            if not pos:
                continue
            bars = ax.bar(pos, heights, width * 0.92, yerr=errs, capsize=3, color=colors[v], label=v)
            ax.bar_label(bars, labels=[f"{h:.1f}" for h in heights], fontsize=7, padding=2)
        ax.set_xticks(range(len(xs)), labels=xs, fontsize=8)
        ax.set_ylabel(name)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(_BAR_TITLES.get(metric, name),
                     fontsize=10)
        ax.margins(y=0.15)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(variants)), frameon=False)
    n_note = "mean ± sample std over seeds" if any(g["n"] > 1 for g in groups) else "one run each"
    fig.suptitle(f"Methods with and without MIGU ({n_note})", fontsize=11)
    return fig


def _variant_colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return ["#9e9e9e"] + [cmap(i) for i in range(n - 1)] if n else []


def write_compare(runs: Sequence[Run], out: str | Path) -> dict:
    """Write compare.md, compare.csv (groups), compare_runs.csv (one row per run), compare.png into `out`.

    Returns {"records", "groups", "markdown", "text", "files"}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_cols, group_cols, bars = compare_columns(runs)
    records = run_records(runs)
    groups = aggregate(records)
    md = ["# Comparison", "", f"{len(records)} run(s), {len(groups)} group(s) of runs that differ only by seed; "
          "metrics are mean ± sample std (n-1) over the group's seeds.", "",
          markdown_table(groups, group_cols), "", "## Runs", "", markdown_table(records, run_cols), "",
          "![AA and BWT](compare.png)", ""]
    files = []
    (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
    (out / "compare.csv").write_text(csv_text(groups, group_cols), encoding="utf-8")
    (out / "compare_runs.csv").write_text(csv_text(records, run_cols + ("path",)), encoding="utf-8")
    files += [out / "compare.md", out / "compare.csv", out / "compare_runs.csv"]
    files.append(save(plot_compare_bars(groups, bars), out / "compare.png"))
    text = text_table(groups, group_cols) if len(groups) < len(records) else text_table(records, run_cols)
    return {"records": records, "groups": groups, "markdown": "\n".join(md), "text": text, "files": files,
            "run_columns": run_cols}


def compare_columns(runs: Sequence[Run]) -> tuple[tuple, tuple, tuple]:
    """(run columns, group columns, bar-chart metrics): the perplexity ones when every run is a pretrain run."""
    if runs and all(run.is_perplexity for run in runs):
        return PPL_RUN_COLUMNS, PPL_GROUP_COLUMNS, (("ppl_avg", "avg perplexity"), ("ppl_forgetting", "forgetting"))
    return RUN_COLUMNS, GROUP_COLUMNS, (("aa", "AA (%)"), ("bwt", "BWT (%)"))


__all__ = ["RUN_COLUMNS", "GROUP_COLUMNS", "aggregate", "csv_text", "flatten", "markdown_cells", "markdown_table",
           "seed_stats", "plot_compare_bars", "run_records", "run_report_markdown", "run_summary_text", "text_table",
           "write_compare"]
