"""Grid sweeps over config keys, resumable, and the ablation plot (AA / BWT vs the swept value).

    migu sweep configs/standard/order1.yaml --threshold 0,0.3,0.5,0.7,0.9 --grid seed=0,1,2
    migu sweep configs/quickstart.yaml --grid train.lr=1e-5,5e-5 --set data.test_per_task=10 --out runs/lr

Each grid point is one run (`migu.train.run`) into `<out>/<key=value,...>/`. Re-running the same command
skips points whose summary.json (or, for compare_migu configs, comparison.json) exists and resumes
unfinished ones (`run(..., resume=True)`), so a sweep can be killed and restarted at any time. At the
end `<out>/sweep.csv`, `<out>/sweep.md` and `<out>/sweep.png` (AA and BWT against the first numeric
non-seed grid key, one line per combination of the other keys, mean ± std over `seed` when it is swept)
are written from the finished points' files.

`--threshold a,b,...` is `--grid migu.threshold=a,b,...` plus `--set migu.enabled=true
--set compare_migu=false` (before your own `--set`, which can override them); its figure is
`threshold_ablation.png`.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from migu.config import load_config
from migu.report.plots import new_figure, save
from migu.metrics import METRIC_KEYS
from migu.report.rundata import ReportError, find_run_dirs, load_run
from migu.report.tables import fmt_mean_std, markdown_cells, seed_stats
from migu.train import run

THRESHOLD_KEY = "migu.threshold"
THRESHOLD_FIXED = ("migu.enabled=true", "compare_migu=false")


# ------------------------------------------------------------------------------------------ the grid
def split_values(text: str) -> list[str]:
    """`0,0.3,[a,b]` → ["0", "0.3", "[a,b]"]: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(specs: Sequence[str], threshold: Optional[str] = None) -> dict[str, list[str]]:
    """{key: [values]} from `--grid key=v1,v2` items (and `--threshold v1,v2`), in the order given.

    Raises:
        ReportError: an item without `=`, an empty key or value, or a key given twice.
    """
    grid: dict[str, list[str]] = {}
    items = list(specs) + ([f"{THRESHOLD_KEY}={threshold}"] if threshold is not None else [])
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ReportError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid migu.threshold=0.3,0.7")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ReportError(f"--grid {item!r}: empty value in the list")
        if key in grid:
            raise ReportError(f"--grid: key {key!r} given twice (--threshold sets {THRESHOLD_KEY})")
        if len(set(values)) != len(values):
            raise ReportError(f"--grid {item!r}: a value appears twice")
        grid[key] = values
    if not grid:
        raise ReportError("nothing to sweep: give --threshold v1,v2,... or --grid key=v1,v2,...")
    return grid


def expand_grid(grid: dict[str, list[str]]) -> list[list[str]]:
    """The cartesian product as override lists, last key varying fastest:
    {"a": [1, 2], "b": [x]} → [["a=1", "b=x"], ["a=2", "b=x"]]."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(overrides: Sequence[str]) -> str:
    """Directory name of a grid point: `migu.threshold=0.3,seed=1` (unsafe characters replaced by `_`)."""
    return ",".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", item) for item in overrides)


@dataclass
class Point:
    """One grid point: its overrides, directory and status (`new`, `unfinished` or `done`)."""

    overrides: list[str]
    path: Path
    status: str

    @property
    def values(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.overrides)


def point_status(path: Path) -> str:
    """`done` (summary.json or comparison.json), `unfinished` (a started run), or `new`."""
    if (path / "summary.json").is_file() or (path / "comparison.json").is_file():
        return "done"
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "state.json").is_file()):
        return "unfinished"
    return "new"


def plan(grid: dict[str, list[str]], out: str | Path) -> list[Point]:
    """Every point of the grid with its directory under `out` and its status."""
    out = Path(out)
    return [Point(o, out / point_name(o), point_status(out / point_name(o))) for o in expand_grid(grid)]


# ------------------------------------------------------------------------------------------ running
def default_runner(config_path: Optional[str], overrides: list[str], path: Path, resume: bool, quiet: bool) -> None:
    """Run one point with the runner's Python API (`migu.train.run`); a resumed point uses its config.yaml."""
    if resume and (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml")  # continue exactly what was started
    else:
        cfg = load_config(config_path, [*overrides, f"output_dir={path}"])
    run(cfg, resume=resume, output_dir=str(path), quiet=quiet)


def run_sweep(config_path: Optional[str], grid: dict[str, list[str]], out: str | Path,
              overrides: Sequence[str] = (), runner: Optional[Callable] = None, quiet: bool = False,
              log: Callable[[str], None] = None) -> list[Point]:
    """Run every unfinished point of the grid (skipping finished ones); returns the points.

    Args:
        config_path: the base YAML config (None: defaults).
        grid: {key: [values]} (see `parse_grid`).
        out: the sweep directory.
        overrides: `--set` items applied before each point's grid values.
        runner: `runner(config_path, overrides, path, resume, quiet)`; default `default_runner`.
    """
    runner = runner or default_runner
    log = log or (lambda text: tqdm.write(text, file=sys.stderr))
    points = plan(grid, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    todo = [p for p in points if p.status != "done"]
    log(f"sweep {out}: {len(points)} point(s), {len(points) - len(todo)} already done")
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", disable=quiet or None,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for point in todo:
            resume = point.status == "unfinished"
            log(f"== {'resume' if resume else 'run'} {point.path.name}")
            runner(config_path, [*overrides, *point.overrides], point.path, resume, quiet)
            point.status = point_status(point.path)
            bar.update(1)
    finally:
        bar.close()
    return points


# ------------------------------------------------------------------------------------------ results
def sweep_records(points: Sequence[Point]) -> list[dict]:
    """One record per finished run of the sweep: the grid values (strings), `migu`, and the metrics."""
    records = []
    for point in points:
        if point_status(point.path) != "done":
            continue
        for run_dir in find_run_dirs([point.path]):
            run = load_run(run_dir, require_summary=True)
            record = dict(point.values)
            record.update({"point": point.path.name, "run": run.name, "method": run.method,
                           "migu": run.migu_enabled, "wall_time_s": run.wall_time_s})
            record.update({k: run.metrics.get(k) for k in METRIC_KEYS})
            records.append(record)
    return records


def _as_float(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def x_key(grid: dict[str, list[str]]) -> Optional[str]:
    """The key on the plot's x axis: migu.threshold if swept, else the first numeric non-seed key."""
    if THRESHOLD_KEY in grid:
        return THRESHOLD_KEY
    for key, values in grid.items():
        if key != "seed" and all(_as_float(v) is not None for v in values):
            return key
    return None


def summarize_sweep(records: Sequence[dict], grid: dict[str, list[str]]) -> list[dict]:
    """Records grouped over `seed` (when swept): one row per combination of the other keys (+ MIGU on/off)."""
    keys = [k for k in grid if k != "seed"]
    rows = seed_stats(records, [*keys, "method", "migu"], METRIC_KEYS + ("wall_time_s",)).to_dict("records")
    # grid order: sort by each key's position in its value list
    order = {k: {v: i for i, v in enumerate(grid[k])} for k in keys}
    rows.sort(key=lambda r: tuple(order[k].get(r[k], 0) for k in keys) + (r["migu"],))
    return rows


def sweep_markdown(rows: Sequence[dict], grid: dict[str, list[str]]) -> str:
    keys = [k for k in grid if k != "seed"]
    seeds = f" (mean ± sample std over seeds {','.join(grid['seed'])})" if "seed" in grid else ""
    head = [*keys, "method", "MIGU", "n", "AA", "BWT", "FWT", "forgetting", "wall time (s)"]
    body = [[str(r[k]) for k in keys] + [r["method"], "on" if r["migu"] else "off", str(r["n"])]
            + [fmt_mean_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRIC_KEYS]
            + [fmt_mean_std(r["wall_time_s_mean"], r["wall_time_s_std"], 1)] for r in rows]
    table = markdown_cells(body, head, [False] * (len(keys) + 2) + [True] * 6)
    return f"# Sweep{seeds}\n\n{table}\n"


def sweep_csv(rows: Sequence[dict], grid: dict[str, list[str]]) -> str:
    import csv
    import io

    keys = [k for k in grid if k != "seed"]
    fields = [*keys, "method", "migu", "n"] + [f"{m}_{s}" for m in METRIC_KEYS + ("wall_time_s",)
                                               for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for r in rows:
        writer.writerow(["" if r.get(f) is None else r.get(f) for f in fields])
    return buf.getvalue()


def plot_sweep(records: Sequence[dict], grid: dict[str, list[str]], key: str, title: str = ""):
    """AA and BWT against `key`: seaborn point plots of the runs' records (mean ± sample std over seeds, the
    mean written beside each point), one line per combination of the other keys (+ method and MIGU)."""
    others = [k for k in grid if k not in ("seed", key)]
    frame = pd.DataFrame(list(records))
    frame["x"] = frame[key].astype(float)
    several = frame[["method", "migu"]].drop_duplicates().shape[0] > 1
    frame["line"] = [", ".join([f"{k}={r[k]}" for k in others] + ([r["method"] + (" + MIGU" if r["migu"] else "")]
                                                                  if several else [])) for r in records]
    fig = new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("aa", "bwt"), ("AA (%)", "BWT (%)")):
        data = frame.dropna(subset=[metric])
        if data.empty:
            continue
        sns.pointplot(data, x="x", y=metric, hue="line", native_scale=True, errorbar="sd", capsize=0.05,
                      markers="o", linewidth=1.5, ax=ax, legend=metric == "aa" and any(frame["line"]))
        for (_, x), y in data.groupby(["line", "x"], sort=False)[metric].mean().items():
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(5, 4), ha="left", fontsize=7)
        ax.set_xlabel("MIGU threshold T (fraction of units masked)" if key == THRESHOLD_KEY else key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({float(v) for v in grid[key]}))
        ax.margins(y=0.15)
        if metric == "bwt":
            ax.axhline(0, color="black", linewidth=0.6)
    if axes[0].get_legend() is not None:
        axes[0].legend(fontsize=8, frameon=False)
    seeds = f", mean ± std over {len(grid['seed'])} seeds" if "seed" in grid else ""
    what = "threshold ablation" if key == THRESHOLD_KEY else f"sweep over {key}"
    fig.suptitle((f"{title}: " if title else "") + what + seeds, fontsize=11)
    return fig


def write_sweep_report(points: Sequence[Point], grid: dict[str, list[str]], out: str | Path,
                       title: str = "") -> dict:
    """sweep.csv, sweep.md and the plot (threshold_ablation.png or sweep.png) from the finished points."""
    out = Path(out)
    records = sweep_records(points)
    if not records:
        raise ReportError(f"{out}: no finished grid point (no summary.json under it yet)")
    rows = summarize_sweep(records, grid)
    md = sweep_markdown(rows, grid)
    files = [out / "sweep.md", out / "sweep.csv"]
    files[0].write_text(md, encoding="utf-8")
    files[1].write_text(sweep_csv(rows, grid), encoding="utf-8")
    key = x_key(grid)
    if key is not None:
        name = "threshold_ablation.png" if key == THRESHOLD_KEY else "sweep.png"
        files.append(save(plot_sweep(records, grid, key, title), out / name))
    return {"records": records, "rows": rows, "markdown": md, "files": files}
