"""Reports from hand-made run directories: plots, compare tables, sweeps, magnitude analysis, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from migu.core import MIGU
from migu.data import Example, collate, encode
from migu.metrics import summarize
from migu.report import ReportError, find_run_dirs, load_run
from migu.cli import main as migu_main
from migu.magnitudes import collect_task_magnitudes, save_task_magnitudes
from migu.report.plots import write_magnitude_plots
from migu.report.similarity import (chance_overlap, kept_overlap, kept_set, layer_type, load_magnitudes,
                                    overlap_by_layer, similarity_matrix)
from migu.report.plots import (DPI, fmt_cell, plot_accuracy_curves, plot_accuracy_matrix, plot_training_loss,
                               write_run_plots)
from migu.sweep import (expand_grid, parse_grid, plan, point_name, point_status, run_sweep, split_values,
                               write_sweep_report)
from migu.report.tables import aggregate, plot_compare_bars, run_records, write_compare

TASKS = ["dbpedia", "sst2", "agnews"]
R0 = [10.0, 40.0, 20.0]
MATRIX = [[90.0, 45.0, 22.0], [70.0, 88.0, 30.0], [55.0, 60.0, 85.5]]


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in `markdown` (padding stripped)."""
    return [[c.strip() for c in line.strip()[1:-1].split("|")] for line in markdown.splitlines()
            if line.startswith("|")]


def make_run(path: Path, matrix=MATRIX, r0=R0, tasks=TASKS, method="seq-ft", migu=False, threshold=0.7, seed=0,
             wall=12.5, summary=True, config_extra=None) -> Path:
    """A run directory as migu.train writes it: config.yaml, state.json, accuracy_matrix.csv, summary.json."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"name": "test", "seed": seed, "output_dir": str(path), "compare_migu": False,
              "model": {"name": "smollm2-135m"}, "data": {"tasks": tasks, "order": 1, "seed": None},
              "train": {"lr": 5e-5, "batch_size": 8}, "eval": {"mode": "generate"},
              "migu": {"enabled": migu, "threshold": threshold, "mode": "grad", "target_modules": None},
              "method": {"name": method}, "provenance": {"git_commit": "abc"}}
    for dotted, value in (config_extra or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    names = tasks[: len(matrix)]
    lines = ["after_task," + ",".join(tasks)]
    for name, row in [("untrained", r0)] + list(zip(names, matrix)):
        lines.append(name + "," + ",".join(f"{x:.4f}".rstrip("0").rstrip(".") for x in row))
    (path / "accuracy_matrix.csv").write_text("\n".join(lines) + "\n")
    done = len(matrix) == len(tasks)
    (path / "state.json").write_text(json.dumps({
        "tasks": tasks, "finished_tasks": len(matrix), "r0": r0, "rows": matrix, "row_names": names,
        "phases": tasks, "status": "done" if done and summary else "running", "elapsed_s": wall}))
    records = [{"type": "train", "stage": i, "task": t, "epoch": 0, "step": s + 1, "loss": 2.0 - 0.1 * s, "tokens": 9}
               for i, t in enumerate(names) for s in range(4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        m = summarize(matrix, r0)
        (path / "summary.json").write_text(json.dumps({
            "aa": m["aa"], "bwt": m["bwt"], "fwt": m["fwt"], "forgetting": m["forgetting"], "tasks": tasks,
            "row_names": names, "matrix": matrix, "r0": r0, "diagonal": m["diagonal"], "method": method,
            "method_options": {}, "lr": 5e-5,
            "migu": {"enabled": migu, "threshold": threshold, "mode": "grad", "target_modules": None},
            "seed": seed, "model": "smollm2-135m", "wall_time_s": wall, "git_commit": "abc", "versions": {}}))
    return path


def png_bytes(fig) -> bytes:
    """The PNG `migu.report.plots.save` writes for `fig`."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    return buf.getvalue()


def cells(ax) -> tuple[list[list], list[list]]:
    """(values, texts) of a heatmap, rows × columns: the mesh's colour values (None where missing) and the
    annotation drawn at each cell's centre."""
    rows, cols = len(ax.get_yticks()), len(ax.get_xticks())
    mesh = np.ma.getmaskarray(ax.collections[0].get_array()).reshape(rows, cols), \
        np.asarray(ax.collections[0].get_array()).reshape(rows, cols)
    values = [[None if mesh[0][i, j] else float(mesh[1][i, j]) for j in range(cols)] for i in range(rows)]
    texts = [[None] * cols for _ in range(rows)]
    for t in ax.texts:
        x, y = t.get_position()
        texts[int(y)][int(x)] = t.get_text()
    return values, texts


# ------------------------------------------------------------------------------------------ run plots
def test_heatmap_cells_come_from_the_csv(tmp_path):
    run_dir = make_run(tmp_path / "run")
    run = load_run(run_dir)
    fig = plot_accuracy_matrix(run)
    values, texts = cells(fig.axes[0])
    with open(run_dir / "accuracy_matrix.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert values == [[float(v) for v in row[1:]] for row in rows] == [R0, *MATRIX]
    assert texts == [[fmt_cell(float(v)) for v in row[1:]] for row in rows]
    assert texts[0] == ["10.0", "40.0", "20.0"] and texts[-1][-1] == "85.5"
    ylabels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ylabels == ["untrained", "after dbpedia", "after sst2", "after agnews"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == TASKS
    assert fig.axes[1].get_ylabel() == "accuracy (%)"  # the colorbar


def test_write_run_plots_writes_the_figures_of_the_run_deterministically(tmp_path):
    run_dir = make_run(tmp_path / "run")
    written = write_run_plots(run_dir)
    names = sorted(p.name for p in written)
    assert names == ["accuracy_curves.png", "accuracy_matrix.png", "train_loss.png"]
    run = load_run(run_dir)
    # each file is the figure drawn from the run's files, byte for byte (no date or other varying metadata)
    for fig, name in ((plot_accuracy_matrix(run), "accuracy_matrix.png"),
                      (plot_accuracy_curves(run), "accuracy_curves.png"),
                      (plot_training_loss(run), "train_loss.png")):
        assert (run_dir / "plots" / name).read_bytes() == png_bytes(fig)
    assert write_run_plots(run_dir) == written and (run_dir / "plots" / "accuracy_matrix.png").read_bytes() == \
        png_bytes(plot_accuracy_matrix(run))


def test_curves_one_line_per_task_with_the_matrix_values(tmp_path):
    run = load_run(make_run(tmp_path / "run"))
    ax = plot_accuracy_curves(run).axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert lines == {t: [R0[j]] + [row[j] for row in MATRIX] for j, t in enumerate(TASKS)}


def test_unfinished_run_is_plotted_from_the_csv(tmp_path):
    run_dir = make_run(tmp_path / "run", matrix=MATRIX[:2], summary=False)
    run = load_run(run_dir)
    assert run.status == "running" and run.summary is None
    assert run.metrics["aa"] == pytest.approx((70 + 88) / 2)  # computed by migu.metrics over the 2x2 part
    assert len(write_run_plots(run_dir)) == 3
    with pytest.raises(ReportError, match="summary.json"):
        load_run(run_dir, require_summary=True)


def test_empty_cells_are_missing_values(tmp_path):
    run_dir = make_run(tmp_path / "run")
    (run_dir / "accuracy_matrix.csv").write_text("after_task,a,b\nuntrained,,5\na,50,\n")
    run = load_run(run_dir)
    assert run.r0 == [None, 5.0] and run.rows == [[50.0, None]]
    values, texts = cells(plot_accuracy_matrix(run).axes[0])
    assert values == [[None, 5.0], [50.0, None]]
    assert texts == [["–", "5.0"], ["50.0", "–"]]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "summary.json").write_text("{not json"), r"summary\.json: invalid JSON"),
    (lambda d: (d / "summary.json").write_text('{"aa": "high"}'), r"summary\.json: field 'aa'"),
    (lambda d: (d / "summary.json").write_text("[1, 2]"), r"summary\.json: expected a JSON object"),
    (lambda d: (d / "accuracy_matrix.csv").write_text("task,a\n"), r"accuracy_matrix\.csv: line 1"),
    (lambda d: (d / "accuracy_matrix.csv").write_text("after_task,a,b\nuntrained,1,x\n"),
     r"accuracy_matrix\.csv: line 2, column 'b': not a number"),
    (lambda d: (d / "accuracy_matrix.csv").write_text("after_task,a,b\nuntrained,1\n"),
     r"accuracy_matrix\.csv: line 2"),
    (lambda d: (d / "config.yaml").write_text("a: [\n"), r"config\.yaml: line \d+ invalid YAML"),
])
def test_corrupt_files_raise_report_error_naming_the_file(tmp_path, damage, match):
    run_dir = make_run(tmp_path / "run")
    damage(run_dir)
    with pytest.raises(ReportError, match=match):
        load_run(run_dir)


def test_missing_or_not_a_directory(tmp_path):
    with pytest.raises(ReportError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        find_run_dirs([tmp_path / "file"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="summary.json"):
        find_run_dirs([tmp_path / "empty"])
    with pytest.raises(ReportError, match="summary.json: missing, and no accuracy_matrix.csv"):
        load_run(tmp_path / "empty")


def _cli(argv):
    return migu_main(argv)


def test_cli_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    (run_dir / "summary.json").write_text("{")
    assert _cli(["compare", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "summary.json" in err and "Traceback" not in err
    assert _cli(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_cli_report_writes_plots_and_report_md(tmp_path, capsys):
    parent = tmp_path / "cmp"
    make_run(parent / "no-migu")
    make_run(parent / "migu", migu=True)
    (parent / "config.yaml").write_text("compare_migu: true\n")  # a compare_migu parent: no summary.json
    assert _cli(["report", str(parent)]) == 0
    out = capsys.readouterr().out
    assert "cmp/migu: seq-ft + MIGU (T=0.7)" in out
    for sub in ("no-migu", "migu"):
        md = (parent / sub / "report.md").read_text()
        assert ["after agnews", "55.0", "60.0", "85.5"] in table_rows(md) and "plots/accuracy_matrix.png" in md
        assert (parent / sub / "plots" / "accuracy_curves.png").is_file()


# ------------------------------------------------------------------------------------------ compare
def _seed_matrix(seed: int, shift: float):
    return [[x + shift * (seed + 1) for x in row] for row in MATRIX]


def test_compare_aggregates_seeds_by_method_migu_threshold(tmp_path):
    runs_dir = tmp_path / "runs"
    expected = {}
    for migu, threshold, shift in ((False, 0.7, 1.0), (True, 0.7, 2.0), (True, 0.5, -1.5)):
        aas, bwts = [], []
        for seed in (0, 1, 2):
            m = _seed_matrix(seed, shift) if seed != 2 else _seed_matrix(seed, -shift)
            make_run(runs_dir / f"{migu}-{threshold}-s{seed}", matrix=m, migu=migu, threshold=threshold, seed=seed,
                     wall=10.0 + seed)
            s = summarize(m, R0)
            aas.append(s["aa"])
            bwts.append(s["bwt"])
        expected[(migu, threshold if migu else None)] = aas, bwts
    runs = [load_run(p, require_summary=True) for p in find_run_dirs([runs_dir])]
    assert len(runs) == 9
    groups = aggregate(run_records(runs))
    assert len(groups) == 3
    for g in groups:
        aas, bwts = expected[(g["migu"], g["threshold"])]
        assert g["n"] == 3 and g["seeds"] == "0,1,2" and g["setting"] == ""
        assert g["aa_mean"] == pytest.approx(sum(aas) / 3)
        assert g["aa_std"] == pytest.approx(math.sqrt(sum((a - sum(aas) / 3) ** 2 for a in aas) / 2))  # n-1
        assert g["bwt_std"] == pytest.approx(statistics.stdev(bwts))
        assert g["wall_time_s_mean"] == pytest.approx(11.0)

    result = write_compare(runs, tmp_path / "out")
    assert {f.name for f in result["files"]} == {"compare.md", "compare.csv", "compare_runs.csv", "compare.png"}
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    off = next(r for r in rows if r["migu"] == "False")
    assert float(off["aa_mean"]) == pytest.approx(sum(expected[(False, None)][0]) / 3) and off["aa_n"] == "3"
    assert off["threshold"] == ""
    md = (tmp_path / "out" / "compare.md").read_text()
    aas = expected[(True, 0.5)][0]
    assert f"{statistics.fmean(aas):.2f} ± {statistics.stdev(aas):.2f}" in md
    fig = plot_compare_bars(result["groups"])  # the bars: each group's mean AA / BWT, labelled, ± its std
    for ax, key in zip(fig.axes, ("aa", "bwt")):
        assert sorted(p.get_height() for p in ax.patches) == pytest.approx(sorted(g[f"{key}_mean"] for g in groups))
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"{g[f'{key}_mean']:.1f}" for g in groups)
    assert (tmp_path / "out" / "compare.png").read_bytes() == png_bytes(fig)


def test_compare_keeps_different_settings_apart(tmp_path):
    make_run(tmp_path / "a", seed=0, config_extra={"data.order": 1})
    make_run(tmp_path / "b", seed=1, config_extra={"data.order": 1})
    make_run(tmp_path / "c", seed=0, config_extra={"data.order": 2})
    groups = aggregate(run_records([load_run(p) for p in find_run_dirs([tmp_path])]))
    assert [(g["setting"], g["n"]) for g in groups] == [("data.order=1", 2), ("data.order=2", 1)]
    assert groups[1]["aa_std"] is None


def test_cli_compare_default_out_is_the_parent(tmp_path, capsys):
    make_run(tmp_path / "p" / "no-migu")
    make_run(tmp_path / "p" / "migu", migu=True)
    assert _cli(["compare", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "compare.md").is_file() and (tmp_path / "p" / "compare.png").is_file()
    assert "seq-ft" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ sweep
def test_grid_parsing_expansion_and_naming():
    assert split_values("0,0.3, [a,b] ,'x,y'") == ["0", "0.3", "[a,b]", "'x,y'"]
    grid = parse_grid(["seed=0,1"], threshold="0,0.5,0.9")
    assert grid == {"seed": ["0", "1"], "migu.threshold": ["0", "0.5", "0.9"]}
    points = expand_grid(grid)
    assert len(points) == 6
    assert points[:2] == [["seed=0", "migu.threshold=0"], ["seed=0", "migu.threshold=0.5"]]
    assert point_name(points[1]) == "seed=0,migu.threshold=0.5"
    assert point_name(["migu.target_modules=[q_proj, v_proj]"]) == "migu.target_modules=_q_proj_v_proj_"
    for bad in (["seed"], ["=1"], ["seed=1,"], ["seed=1,1"]):
        with pytest.raises(ReportError):
            parse_grid(bad)
    with pytest.raises(ReportError, match="twice"):
        parse_grid(["migu.threshold=0.1"], threshold="0.2")
    with pytest.raises(ReportError, match="nothing to sweep"):
        parse_grid([])


def _fake_sweep(tmp_path, grid):
    """Finished points as fake run dirs: AA falls with T (by 10 per 0.5), seeds shift it by ±1."""
    out = tmp_path / "sweep"
    for point in plan(grid, out):
        v = point.values
        t, seed = float(v["migu.threshold"]), int(v.get("seed", 0))
        m = [[x - 20 * t + (seed - 1) for x in row] for row in MATRIX]
        make_run(point.path, matrix=m, migu=True, threshold=t, seed=seed)
    return out


def test_sweep_skips_finished_and_resumes_unfinished(tmp_path):
    grid = parse_grid(["seed=0,1"], threshold="0.3,0.7")
    out = tmp_path / "sweep"
    make_run(out / "seed=0,migu.threshold=0.3", threshold=0.3)                          # done
    make_run(out / "seed=0,migu.threshold=0.7", matrix=MATRIX[:1], summary=False)      # unfinished
    assert [p.status for p in plan(grid, out)] == ["done", "unfinished", "new", "new"]
    calls = []

    def runner(config, overrides, path, resume, quiet):
        calls.append((path.name, resume, overrides))
        make_run(path, threshold=float(overrides[-1].split("=")[1]), seed=int(overrides[-2].split("=")[1]))

    points = run_sweep("base.yaml", grid, out, overrides=["data.test_per_task=5"], runner=runner, quiet=True,
                       log=lambda text: None)
    assert calls == [("seed=0,migu.threshold=0.7", True, ["data.test_per_task=5", "seed=0", "migu.threshold=0.7"]),
                     ("seed=1,migu.threshold=0.3", False, ["data.test_per_task=5", "seed=1", "migu.threshold=0.3"]),
                     ("seed=1,migu.threshold=0.7", False, ["data.test_per_task=5", "seed=1", "migu.threshold=0.7"])]
    assert all(p.status == "done" for p in points)
    calls.clear()
    run_sweep("base.yaml", grid, out, runner=runner, quiet=True, log=lambda text: None)
    assert calls == []  # everything finished: nothing runs again
    assert point_status(tmp_path / "none") == "new"


def test_sweep_report_table_and_ablation_plot(tmp_path):
    grid = parse_grid(["seed=0,1,2"], threshold="0,0.5,0.9")
    out = _fake_sweep(tmp_path, grid)
    result = write_sweep_report(plan(grid, out), grid, out, title="t")
    assert {f.name for f in result["files"]} == {"sweep.md", "sweep.csv", "threshold_ablation.png"}
    rows = result["rows"]
    assert [r["migu.threshold"] for r in rows] == ["0", "0.5", "0.9"] and all(r["n"] == 3 for r in rows)
    base_aa = summarize(MATRIX, R0)["aa"]
    for r in rows:
        assert r["aa_mean"] == pytest.approx(base_aa - 20 * float(r["migu.threshold"]))
        assert r["aa_std"] == pytest.approx(1.0)  # seeds shift by -1, 0, +1
    from migu.sweep import plot_sweep

    fig = plot_sweep(result["records"], grid, "migu.threshold", title="t")
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert list(line.get_xdata()) == [0.0, 0.5, 0.9]
    assert list(line.get_ydata()) == pytest.approx([r["aa_mean"] for r in rows])
    # seaborn's error bars: mean ± sample std of the seeds, as the table's
    bars = sorted((np.nanmin(ln.get_ydata()), np.nanmax(ln.get_ydata())) for ln in fig.axes[0].get_lines()
                  if ln.get_marker() in (None, "None", ""))
    assert bars == pytest.approx(sorted((r["aa_mean"] - r["aa_std"], r["aa_mean"] + r["aa_std"]) for r in rows))
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(f"{r['aa_mean']:.1f}" for r in rows)
    assert (out / "threshold_ablation.png").read_bytes() == png_bytes(fig)


def test_cli_sweep_no_run_rebuilds_the_report(tmp_path, capsys):
    grid = parse_grid([], threshold="0.3,0.7")
    out = _fake_sweep(tmp_path, grid)
    config = tmp_path / "base.yaml"
    config.write_text("seed: 0\n")
    assert _cli(["sweep", str(config), "--threshold", "0.3,0.7", "--out", str(out), "--no-run"]) == 0
    assert ["0.7", "seq-ft", "on", "1"] in [row[:4] for row in table_rows(capsys.readouterr().out)]
    assert (out / "threshold_ablation.png").is_file()


def test_sweep_runs_a_tiny_point_with_the_runner(tmp_path, tiny_llama_dir):
    """One real grid point on the tiny model (about a second), then a rerun that skips it."""
    stream = tmp_path / "stream.yaml"
    lines = [json.dumps({"sentence": f"{lab} {i}", "label": lab}) for i, lab in enumerate(["yes", "no"] * 5)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    stream.write_text(yaml.safe_dump({"tasks": [{"name": "a", "file": "t.jsonl"}, {"name": "b", "file": "t.jsonl"}]}))
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama_dir)}, "data": {"stream": str(stream), "max_length": 32},
        "train": {"batch_size": 4, "lr": 1e-3, "checkpoint": False}, "eval": {"mode": "rank"}, "threads": 1}))
    out = tmp_path / "sweep"
    assert _cli(["sweep", str(config), "--threshold", "0.5", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "migu.threshold=0.5" / "summary.json").read_text())
    assert summary["migu"]["enabled"] is True and summary["migu"]["threshold"] == 0.5
    assert (out / "sweep.csv").is_file() and (out / "threshold_ablation.png").is_file()
    mtime = (out / "migu.threshold=0.5" / "summary.json").stat().st_mtime_ns
    assert _cli(["sweep", str(config), "--threshold", "0.5", "--out", str(out), "--quiet"]) == 0
    assert (out / "migu.threshold=0.5" / "summary.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------ magnitudes
def _synthetic():
    a = {"l.0.q_proj": torch.tensor([4.0, 3.0, 2.0, 1.0]), "l.0.up_proj": torch.tensor([1.0, 0.0, 0.0, 1.0])}
    b = {"l.0.q_proj": torch.tensor([1.0, 2.0, 3.0, 4.0]), "l.0.up_proj": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    c = {"l.0.q_proj": torch.tensor([4.0, 3.0, 2.0, 1.0]), "l.0.up_proj": torch.tensor([0.0, 0.0, 1.0, 0.0])}
    return {"a": a, "b": b, "c": c}


def test_similarity_is_mean_layer_cosine():
    mags = _synthetic()
    tasks, S = similarity_matrix(mags)
    assert tasks == ["a", "b", "c"]
    cos_q_ab = (4 + 6 + 6 + 4) / 30  # [4,3,2,1]·[1,2,3,4] / (|.|·|.|) = 20 / 30
    cos_up_ab = 1 / (math.sqrt(2) * math.sqrt(2))
    assert S[0][1] == pytest.approx((cos_q_ab + cos_up_ab) / 2) and S[1][0] == S[0][1]
    assert S[0][2] == pytest.approx((1.0 + 0.0) / 2)
    assert S[1][2] == pytest.approx((cos_q_ab + 0.0) / 2)
    assert all(S[i][i] == pytest.approx(1.0) for i in range(3))


def test_centered_similarity_is_mean_layer_pearson():
    mags = _synthetic()
    _, C = similarity_matrix(mags, centered=True)
    # q_proj: [4,3,2,1] vs [1,2,3,4] is r = -1; up_proj: [1,0,0,1] vs [1,1,0,0] centred ±0.5 → r = 0
    assert C[0][1] == pytest.approx((-1.0 + 0.0) / 2)
    # a vs c: q_proj r = 1; up_proj [.5,-.5,-.5,.5]·[-.25,-.25,.75,-.25] / (1 · sqrt(.75)) = -.5 / sqrt(.75)
    assert C[0][2] == pytest.approx((1.0 - 0.5 / math.sqrt(0.75)) / 2)


def test_kept_overlap_by_hand():
    a, b = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    # T = 0.5 keeps ceil(0.5 * 4) = 2 units: a keeps {0, 1}, b keeps {2, 3}
    assert kept_set(a, 0.5) == {0, 1} and kept_set(b, 0.5) == {2, 3}
    assert kept_overlap(a, b, 0.5) == 0.0
    # T = 0.25 keeps 3: {0,1,2} vs {1,2,3}: |A∩B| = 2, |A∪B| = 4
    assert kept_overlap(a, b, 0.25, "fraction") == pytest.approx(2 / 3)
    assert kept_overlap(a, b, 0.25, "jaccard") == pytest.approx(2 / 4)
    assert kept_set(torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.5) == {0, 1}  # ties: lower index, as MIGU ranks
    assert chance_overlap(4, 0.5) == pytest.approx(0.5)
    layers, pairs, values = overlap_by_layer(_synthetic(), 0.5)
    assert pairs == [("a", "b"), ("a", "c"), ("b", "c")]
    assert values[0] == [0.0, 1.0, 0.0]  # q_proj
    assert values[1] == [0.5, 0.5, 0.5]  # up_proj: a {0,3}, b {0,1}, c {2,0}: every pair shares unit 0


def test_layer_types():
    assert layer_type("model.layers.3.self_attn.q_proj") == "q_proj"
    assert layer_type("base_model.model.model.layers.0.self_attn.v_proj.lora_A.default") == "v_proj.lora_A"
    assert layer_type("transformer.h.1.mlp.c_fc") == "c_fc"


def test_magnitude_files_and_plots(tmp_path):
    mdir = tmp_path / "run" / "magnitudes"
    for task, mags in _synthetic().items():
        save_task_magnitudes(mags, mdir / f"{task}.pt")
    loaded = load_magnitudes(mdir, task_order=["c", "a", "b"])
    assert list(loaded) == ["c", "a", "b"] and torch.equal(loaded["a"]["l.0.q_proj"], _synthetic()["a"]["l.0.q_proj"])
    written = write_magnitude_plots(mdir, tmp_path / "plots", threshold=0.5)
    assert [p.name for p in written] == ["magnitude_similarity.png", "magnitude_similarity_by_type.png",
                                         "kept_overlap.png"]
    from migu.report.plots import plot_similarity

    tasks, S = similarity_matrix(load_magnitudes(mdir))
    _, C = similarity_matrix(load_magnitudes(mdir), centered=True)
    fig = plot_similarity(tasks, S, centered=C)
    for ax, M in zip(fig.axes, (S, C)):
        values, texts = cells(ax)
        assert sum(values, []) == pytest.approx(sum(map(list, M), []))
        assert texts == [[f"{v:.3f}" for v in row] for row in M]
    with pytest.raises(ReportError, match="zz.pt: missing"):
        load_magnitudes(mdir, tasks=["a", "zz"])
    (mdir / "bad.pt").write_text("garbage")
    with pytest.raises(ReportError, match="bad.pt"):
        load_magnitudes(mdir)


def test_run_plots_include_magnitudes_when_present(tmp_path):
    run_dir = make_run(tmp_path / "run")
    for task, mags in zip(TASKS, _synthetic().values()):
        save_task_magnitudes(mags, run_dir / "magnitudes" / f"{task}.pt")
    names = [p.name for p in write_run_plots(run_dir)]
    assert "magnitude_similarity.png" in names and "kept_overlap.png" in names


def _batches(tokenizer):
    texts = [("a short one", "yes"), ("a rather longer sentence here", "no"), ("mid size text", "yes"),
             ("x", "no"), ("another example of text", "yes")]
    items = encode(tokenizer, [Example(p, t) for p, t in texts], max_length=64)
    return [collate(items[:2], tokenizer.pad_token_id), collate(items[2:], tokenizer.pad_token_id)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_collect_task_magnitudes_equals_migu_with_grad(arch):
    from migu.models import tiny_model

    model, tokenizer = tiny_model(arch, seed=0)
    batches = _batches(tokenizer)
    model.train()
    got = collect_task_magnitudes(model, batches, {"threshold": 0.7})
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # no hook left behind

    model.eval()  # the same forward (dropout off), with autograd on, measured by a plain MIGU
    migu = MIGU(model, threshold=0.7)
    for batch in batches:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = migu.magnitudes()
    migu.remove()
    assert list(got) == list(expected) and len(got) >= 8
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-8)
        assert got[name].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_collect_task_magnitudes_honours_target_modules(tiny_llama):
    model, tokenizer = tiny_llama
    got = collect_task_magnitudes(model, _batches(tokenizer), {"target_modules": ["q_proj"]})
    assert sorted(got) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
