"""benchmarks/results.py: the run grid, sharding, and docs/RESULTS.md rendered from summary JSONs."""

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


class _Args:
    def __init__(self, orders=None, seeds=None):  # None: each table's default
        self.orders, self.seeds = orders, seeds


def test_grid_is_seed_major_and_settings_differ_only_per_run():
    runs = results.TABLES["table1"](_Args())
    assert len(runs) == 4 * 2 * 3
    assert [name for name, _ in runs[:8]] == [f"o1-{m}-{t}-s0" for m in ("seq-ft", "seq-lora", "replay", "o-lora")
                                              for t in ("base", "migu0.7")]
    shared = [{k: v for k, v in s.items() if k not in results._PER_RUN} for _, s in runs]
    assert all(x == shared[0] for x in shared) and shared[0]["data.train_per_task"] == 64
    long = results.TABLES["table2"](_Args())
    assert len(long) == 8 and all(s["data.benchmark"] == "long" and s["eval.matrix"] == "diagonal" for _, s in long)
    ablation = results.TABLES["table3"](_Args())
    assert [s["migu.threshold"] for _, s in ablation[:5]] == [0.0, 0.3, 0.5, 0.7, 0.9]
    assert [s["seed"] for _, s in ablation] == [0] * 5 + [1] * 5 + [2] * 5
    picked = _Args()
    picked.seeds = [1]
    assert {s["seed"] for _, s in results.TABLES["table2"](picked)} == {1}


def test_shards_partition_the_runs():
    runs = list(range(11))
    parts = [results.shard(runs, f"{k}/3") for k in range(3)]
    assert sorted(sum(parts, [])) == runs and parts[1] == [1, 4, 7, 10]
    assert results.shard(runs, None) == runs
    with pytest.raises(SystemExit, match="--shard must be K/N"):
        results.shard(runs, "3/3")


def test_methods_filter_keeps_the_grid_order():
    runs = results.TABLES["table1"](_Args())
    picked = results.pick_methods(runs, ["seq-ft"])
    assert [n for n, _ in picked] == [f"o1-seq-ft-{t}-s{s}" for s in (0, 1, 2) for t in ("base", "migu0.7")]
    assert results.pick_methods(runs, None) == runs
    with pytest.raises(SystemExit, match="--methods: ewc not in this table"):
        results.pick_methods(runs, ["seq-ft", "ewc"])


def _summary(method, migu, seed, aa, bwt, wall):
    settings = {"model.name": "m", "data.train_per_task": 64, "data.order": 1, "method.name": method,
                "train.lr": 1e-3, "seed": seed, "migu.enabled": migu}
    if migu:
        settings["migu.threshold"] = 0.7
    return {"aa": aa, "bwt": bwt, "fwt": 10.0, "forgetting": -bwt, "matrix": [[50.0, 0.0], [30.0, 70.0]],
            "r0": [0.0, 2.0], "seed": seed, "lr": 1e-3, "wall_time_s": wall, "settings": settings,
            "code_version": "abc1234", "threads": 1}


def test_render_groups_seeds_and_pairs_migu_with_base(tmp_path):
    out = tmp_path / "results" / "table1"
    out.mkdir(parents=True)
    cases = [("seq-lora", False, 0, 40.0, -10.0, 100.0), ("seq-lora", False, 1, 50.0, -20.0, 110.0),
             ("seq-lora", True, 0, 45.0, -4.0, 105.0), ("seq-lora", True, 1, 48.0, -6.0, 115.0)]
    for method, migu, seed, aa, bwt, wall in cases:
        name = f"o1-{method}-{'migu0.7' if migu else 'base'}-s{seed}.json"
        (out / name).write_text(json.dumps(_summary(method, migu, seed, aa, bwt, wall)))
    text = results.render(tmp_path).read_text()
    # base: AA mean 45.0, sample std 7.1; BWT −15.0 ± 7.1; learned = mean(50, 70) = 60; untrained 1.0
    sd = statistics.stdev([40.0, 50.0])
    assert f"| 1 | seq-lora | – | 0.001 | 0,1 | 45.0 ± {sd:.1f} | -15.0 ± {sd:.1f} | +10.0 ± 0.0 | 15.0 ± {sd:.1f} | " \
           f"60.0 ± 0.0 | 1.0 ± 0.0 | 105 |" in text
    assert "| 1 | seq-lora | 0.7 | 0.001 | 0,1 | 46.5 ± 2.1 | -5.0 ± 1.4 |" in text
    # paired deltas: AA +5, −2 → +1.5 ± 4.9; BWT +6, +14 → +10.0 ± 5.7; MIGU higher in 1 of 2
    assert "MIGU − no MIGU, paired by seed" in text
    assert "| 1 | seq-lora | 0.7 | 2 | +1.5 ± 4.9 | [-43.0, +46.0] | +10.0 ± 5.7 | +0.0 ± 0.0 | 1/2 |" in text
    assert "`data.train_per_task=64`" in text and "`seed=" not in text and "code versions: abc1234" in text
    assert "| table1 | 1 | seq-lora | 1 | not recorded | 2 / 2 | 105 | 110 | ×1.05 |" in text
    assert "Table 2" in text and "Not run yet." in text
    # one figure per table that has runs, from the same per-condition statistics
    assert "![Table 1" in text and "(images/results_table1.png)" in text and "results_table2.png" not in text
    assert (tmp_path / "docs" / "images" / "results_table1.png").stat().st_size > 10_000
    base, migu = results.condition_stats(json.loads(f.read_text()) for f in sorted(out.glob("*.json")))
    assert (base["migu"], migu["migu"], migu["threshold"], base["seeds"]) == (False, True, 0.7, [0, 1])
    assert base["aa_mean"] == 45.0 and base["aa_std"] == pytest.approx(sd) and base["diag_mean"] == 60.0
    assert migu["bwt_mean"] == -5.0 and migu["bwt_std"] == pytest.approx(statistics.stdev([-4.0, -6.0]))


def test_paired_deltas_are_also_pooled_over_orders(tmp_path):
    # order 1: Δ AA +5, −2 (seeds 0, 1); order 2: Δ AA +3 (seed 0) → all orders: +5, −2, +3 = 2.0 ± 3.6, 2 of 3
    runs = [_summary("seq-lora", False, 0, 40.0, -10.0, 100.0), _summary("seq-lora", False, 1, 50.0, -20.0, 100.0),
            _summary("seq-lora", True, 0, 45.0, -4.0, 100.0), _summary("seq-lora", True, 1, 48.0, -6.0, 100.0)]
    for migu, aa in ((False, 30.0), (True, 33.0)):
        r = _summary("seq-lora", migu, 0, aa, -10.0, 100.0)
        runs.append({**r, "settings": {**r["settings"], "data.order": 2}})
    text = "\n".join(results.delta_lines(runs))
    assert "| 1 | seq-lora | 0.7 | 2 | +1.5 ± 4.9 |" in text and "| 2 | seq-lora | 0.7 | 1 | +3.0 |" in text
    sd = statistics.stdev([5.0, -2.0, 3.0])
    assert f"| all 1,2 | seq-lora | 0.7 | 3 | +2.0 ± {sd:.1f} |" in text and text.count("| all") == 1
    assert text.splitlines()[-1].endswith("| 2/3 |")
    # Student-t 95% intervals of the mean Δ AA: order 1 n=2 (t=12.71); pooled over orders the variance is the
    # within-order one, df = 3 pairs − 2 orders: var(+5, −2) = 24.5, half-width 12.71·√(24.5/3) = 36.3
    assert "| +1.5 ± 4.9 | [-43.0, +46.0] |" in text and f"| +2.0 ± {sd:.1f} | [-34.3, +38.3] |" in text
    assert "| +3.0 | – |" in text  # one pair: no interval
    assert "In a row pooled over orders" in text
    one_order = "\n".join(results.delta_lines(runs[:4]))
    assert "| all" not in one_order and "pooled" not in one_order  # one order: nothing to pool, nothing to explain


def test_paired_interval_pools_the_variance_within_orders():
    # orders (1, 2, 3) and (4, 6, 8): mean 4, pooled variance (2·1 + 2·4)/4 = 2.5, t(0.975, 4) = 2.776
    assert results._ci([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]]) == "[+2.2, +5.8]"
    assert results._ci([[5.0, -2.0, 3.0]]) == "[-7.0, +11.0]"  # one order: the one-sample interval
    assert results._ci([[2.0, 2.0, 2.0]]) == "[+2.0, +2.0]"  # no spread: no nan
    assert results._ci([[1.0], [2.0]]) == "–"  # one pair per order: no degrees of freedom left


def test_threshold_ablation_figure(tmp_path):
    out = tmp_path / "results" / "table3"
    out.mkdir(parents=True)
    for t, seed, aa in [(0.0, 0, 50.0), (0.0, 1, 54.0), (0.7, 0, 40.0)]:
        summary = _summary("seq-ft", True, seed, aa, -1.0, 10.0)
        summary["settings"]["migu.threshold"] = t
        (out / f"o1-seq-ft-migu{t}-s{seed}.json").write_text(json.dumps(summary))
    stats = results.condition_stats(json.loads(f.read_text()) for f in sorted(out.glob("*.json")))
    assert [(g["threshold"], g["n"], g["aa_mean"]) for g in stats] == [(0.0, 2, 52.0), (0.7, 1, 40.0)]
    assert stats[1]["aa_std"] is None  # one seed: no spread, not zero
    # no run without MIGU: T = 0 (plain training) is the reference, paired by seed (seed 0 only for T = 0.7)
    text = results.render(tmp_path).read_text()
    assert "MIGU − T = 0, paired by seed" in text and "| 1 | seq-ft | 0.7 | 1 | -10.0 | – | +0.0 | +0.0 | 0/1 |" in text
    fig = results.plot_table("table3", [json.loads(f.read_text()) for f in out.glob("*.json")])
    assert [len(ax.lines) > 0 for ax in fig.axes] == [True, True, True]
    assert "1/2 seed(s)" in fig.get_suptitle()


def _committed(root, table, name, settings):
    path = root / "results" / table / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"table": table, "run": name, "settings": settings}))


def test_evidence_measures_the_base_and_final_models_over_all_and_answer_tokens(tmp_path, tiny_llama_dir):
    from migu.train import run
    from tests.runner_helpers import tiny_config, write_stream

    stream = write_stream(tmp_path / "data")
    table, (base_name, migu_name) = results.EVIDENCE
    # the base run was copied from the regime table (trained there); the MIGU run was trained in its own table
    _committed(tmp_path, "regime", "o1-seq-ft-lr1e-5-n64-s0", {"x": 1})
    _committed(tmp_path, table, base_name, {"x": 1})
    _committed(tmp_path, table, migu_name, {"x": 2})
    run(tiny_config(tiny_llama_dir, stream, tmp_path / "runs" / "results" / "regime" / "o1-seq-ft-lr1e-5-n64-s0"),
        quiet=True)
    run(tiny_config(tiny_llama_dir, stream, tmp_path / "runs" / "results" / table / migu_name,
                    **{"migu.enabled": True}), quiet=True)
    for t, name, src in (("regime", "o1-seq-ft-lr1e-5-n64-s0", "regime/o1-seq-ft-lr1e-5-n64-s0"),
                         (table, base_name, "regime/o1-seq-ft-lr1e-5-n64-s0"), (table, migu_name, f"{table}/{migu_name}")):
        path = tmp_path / "results" / t / f"{name}.json"  # what run_table commits: the run's summary + settings
        trained = json.loads((tmp_path / "runs" / "results" / src / "summary.json").read_text())
        path.write_text(json.dumps({**trained, **json.loads(path.read_text())}))
    assert results.trained_run_dir(table, base_name, tmp_path)[0].parent.name == "regime"
    e = json.loads(results.evidence(n=6, root=tmp_path).read_text())
    assert list(e["models"]) == ["untrained", base_name, migu_name] and e["tokens"] == ["all", "answer"]
    assert e["retrained"] == {}  # both models are the committed runs themselves
    for by_tokens in e["models"].values():
        for m in by_tokens.values():
            k = len(m["tasks"])
            assert m["tasks"] == ["colors", "animals", "moods"] and m["layers"] == 2 * 7  # 2 blocks × 7 linears
            assert all(m["cosine"][i][i] == pytest.approx(1.0) for i in range(k))
            assert all(0.0 < m["cosine"][i][j] <= 1.0 for i in range(k) for j in range(k))
            assert all(0.0 <= v <= 1.0 for v in m["kept_overlap"].values()) and len(m["kept_overlap"]) == 3
            assert 0.2 < m["chance_overlap"] < 0.4  # ≈ 1 − T = 0.3 for layers of a few dozen units
        # the answer positions are a few of each prompt's tokens: their statistics are not the whole prompt's
        assert by_tokens["all"]["cosine"] != by_tokens["answer"]["cosine"]
    # training changed the model, so the final model's magnitudes differ from the base model's
    assert e["models"]["untrained"]["all"]["cosine"] != e["models"][migu_name]["all"]["cosine"]
    text = "\n".join(results.evidence_lines(tmp_path))
    assert "| untrained | all | " in text and f"| {migu_name} | answer | " in text
    with pytest.raises(SystemExit, match="not run yet"):
        results.evidence(n=6, root=tmp_path / "other")
    (tmp_path / "runs" / "results" / table / migu_name / "summary.json").unlink()
    with pytest.raises(SystemExit, match="directory is not here"):
        results.trained_run_dir(table, migu_name, tmp_path)


def test_evidence_trains_again_a_model_whose_run_directory_is_gone(tmp_path, tiny_llama_dir):
    import shutil

    from tests.runner_helpers import tiny_overrides, write_stream

    stream = write_stream(tmp_path / "data")
    sets = dict(item.split("=", 1) for item in tiny_overrides(tiny_llama_dir, stream, "unused"))
    del sets["output_dir"]
    results.run_table("regime", [("tiny-s0", sets)], False, root=tmp_path)
    results.run_table("plateau1", [("tiny-copy", sets)], False, root=tmp_path)  # copied, not trained
    assert not (tmp_path / "runs" / "results" / "plateau1").exists()
    assert results.trained_run_dir("plateau1", "tiny-copy", tmp_path) == (
        tmp_path / "runs" / "results" / "regime" / "tiny-s0", None)
    shutil.rmtree(tmp_path / "runs")  # another session: run directories are not committed
    with pytest.raises(SystemExit, match="directory is not here"):
        results.trained_run_dir("plateau1", "tiny-copy", tmp_path)
    e = json.loads(results.evidence(n=4, root=tmp_path, spec=("plateau1", ("tiny-copy",))).read_text())
    r = e["retrained"]["tiny-copy"]
    assert r["run_dir"] == "runs/results/plateau1/tiny-copy" and (tmp_path / r["run_dir"] / "summary.json").is_file()
    assert (r["cells"], r["cells_differing"], r["max_abs_cell_diff"]) == (12, 0, 0.0)  # deterministic retrain
    assert list(e["models"]) == ["untrained", "tiny-copy"]
    # a later call finds the retrained directory and still reports it as a retrain, not as the committed run
    assert results.trained_run_dir("plateau1", "tiny-copy", tmp_path)[1] == r
    text = "\n".join(results.evidence_lines(tmp_path))
    assert "`tiny-copy` was trained in another session" in text and "in 12 of 12 cells (largest change 0.0" in text


def test_answer_token_magnitudes_are_the_mean_over_answer_positions(tmp_path, tiny_llama_dir):
    import torch

    from migu.checkpoint import load_trained
    from migu.magnitudes import task_batches
    from migu.masking import answer_positions
    from migu.scenarios import get_scenario
    from migu.train import run
    from tests.runner_helpers import tiny_config, write_stream

    run_dir = tmp_path / "run"
    run(tiny_config(tiny_llama_dir, write_stream(tmp_path / "data"), run_dir), quiet=True)
    mags = results.measure_magnitudes(run_dir, n=6)
    # by hand: |output| of one layer summed over the answer positions of every batch, L1-normalised
    model, tokenizer, cfg, _, _ = load_trained(run_dir)
    scenario = get_scenario(cfg)
    task = scenario.load_tasks()[1]
    scenario.prepare(tokenizer)
    layer = "model.layers.1.mlp.down_proj"
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    total = 0
    model.eval()
    with torch.no_grad():
        for batch in task_batches(tokenizer, task.train[:6], cfg.data.max_length, 8, cfg.seed,
                                  encoder=lambda ex: scenario.encode(tokenizer, ex)):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total = total + (seen.pop().abs() * answer_positions(batch["labels"])[..., None]).sum((0, 1))
    handle.remove()
    torch.testing.assert_close(mags["answer"][task.name][layer], total / total.sum(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(mags["all"][task.name][layer], mags["answer"][task.name][layer], atol=1e-4)


def test_ablation_rows_are_conditions_with_their_variant_paired_with_the_base(tmp_path, monkeypatch):
    rows = [("seq-ft", False, {}, 0, 50.0, -10.0, 70.0), ("seq-ft", False, {}, 1, 54.0, -12.0, 72.0),
            ("seq-ft", True, {}, 0, 52.0, -6.0, 68.0), ("seq-ft", True, {}, 1, 55.0, -5.0, 70.0),
            ("seq-ft", True, {"migu.first_task": "mask"}, 0, 40.0, -4.0, 60.0),
            ("seq-ft", True, {"migu.first_task": "mask"}, 1, 46.0, -2.0, 62.0)]
    runs = []
    for method, migu, variant, seed, aa, bwt, diag in rows:
        r = _summary(method, migu, seed, aa, bwt, 10.0)
        r["settings"].update(variant)
        r["matrix"] = [[diag, 0.0], [0.0, diag]]
        runs.append(r)
    assert [c for c, _ in results._groups(runs)] == [(1, "seq-ft", None, ""), (1, "seq-ft", 0.7, ""),
                                                    (1, "seq-ft", 0.7, "first_task=mask")]
    text = "\n".join(results.delta_lines(runs))
    # default MIGU: ΔAA +2, +1; ΔBWT +4, +7; Δlearned −2, −2.  mask: ΔAA −10, −8; ΔBWT +6, +10; Δlearned −10, −10
    assert "| 1 | seq-ft | 0.7 | 2 | +1.5 ± 0.7 | [-4.9, +7.9] | +5.5 ± 2.1 | -2.0 ± 0.0 | 2/2 |" in text
    assert "| 1 | seq-ft | 0.7 (first_task=mask) | 2 | -9.0 ± 1.4 | [-21.7, +3.7] | +8.0 ± 2.8 | -10.0 ± 0.0 | 0/2 |" in text
    assert "| 1 | seq-ft | 0.7 (first_task=mask) | 0.001 | 0,1 | 43.0 ± 4.2 | -3.0 ± 1.4 |" in "\n".join(results.table_lines(runs))
    # the option against MIGU's defaults: ΔAA −12, −9; ΔBWT +2, +3; Δlearned −8, −8 (t=12.71: ±19.1)
    options = results.option_lines(runs)
    assert options[0].startswith("Each option − MIGU with its defaults (T=0.7, first task skip,")
    assert [r for r in options if r.startswith("| 1 |")] == [
        "| 1 | seq-ft | 0.7 (first_task=mask) | 2 | -10.5 ± 2.1 | [-29.6, +8.6] | +2.5 ± 0.7 | -8.0 ± 0.0 | 0/2 |"]
    assert results.option_lines(runs[:4]) == []  # no option run: no table
    fig = results.plot_deltas(runs, "Ablation")
    assert [ax.get_xlabel().split(" (")[0] for ax in fig.axes] == ["Δ AA", "Δ BWT", "Δ learned R[i][i]"]
    # a partial table says how much of its grid has run
    for r in runs:
        r["table"], r["run"] = "ablation", f"o1-{r['settings']['method.name']}-{r['seed']}-{len(r['settings'])}"
        _write(tmp_path, r)
    monkeypatch.setattr(results, "_grid", lambda table, root: [r["run"] for r in runs] + ["o1-x"] if table ==
                        "ablation" else None)
    text = "\n".join(results.plateau_lines(tmp_path))
    assert "**6 of 7 runs done; the rows below are partial** (to run: o1-x)." in text
    assert "| 1 | seq-ft | 0.7 (first_task=mask) | 2 | -10.5 ± 2.1 |" in text  # the option table, ablation only
    assert "(images/results_ablation.png)" in text and (tmp_path / "docs" / "images" / "results_ablation.png").exists()
    assert "## Table 1 anew" in text and "Not run yet (it needs the regime's plateau size first)." in text


def test_reproduce_compares_a_rerun_cell_by_cell(tmp_path, tiny_llama_dir):
    import yaml

    from migu.provenance import provenance
    from tests.runner_helpers import tiny_overrides, write_stream

    stream = write_stream(tmp_path / "data")
    sets = dict(item.split("=", 1) for item in tiny_overrides(tiny_llama_dir, stream, "unused"))
    del sets["output_dir"]
    results.run_table("table1", [("tiny-s0", sets)], False, root=tmp_path)
    committed = tmp_path / "results" / "table1" / "tiny-s0.json"
    orig = json.loads(committed.read_text())
    # provenance: the machine and the commit the run started with (config.yaml's), in the committed summary
    config = yaml.safe_load((tmp_path / "runs" / "results" / "table1" / "tiny-s0" / "config.yaml").read_text())
    assert orig["machine"] == provenance()["machine"] and orig["machine"]["cores"] >= 1
    assert orig["code_version"] == (config["provenance"]["git_commit"] or "unknown")[:7]

    (out,) = results.reproduce(["table1/tiny-s0"], root=tmp_path)
    r = json.loads(out.read_text())
    assert r["rerun"]["matrix"] == orig["matrix"] and r["cells"] == 12  # untrained row + 3 tasks, 3 tasks each
    assert r["cells_differing"] == 0 and r["max_abs_cell_diff"] == 0.0
    # the rerun runs what the committed run ran, even where a default has changed since
    assert orig["attention"] == config["model"]["attention"] and orig["precision"] == config["train"]["precision"]
    assert r["settings"] == {"model.attention": orig["attention"], "train.precision": orig["precision"], **sets}
    # a committed cell that the rerun does not reproduce is counted and measured; a run from before the
    # attention option ran the model's sdpa
    orig["matrix"][1][0] += 12.5
    del orig["attention"], orig["precision"]
    committed.write_text(json.dumps(orig))
    out.unlink()
    (out,) = results.reproduce(["table1/tiny-s0"], root=tmp_path)  # the finished rerun resumes at once
    r = json.loads(out.read_text())
    assert r["cells_differing"] == 1 and r["max_abs_cell_diff"] == 12.5
    assert r["settings"] == {"model.attention": "sdpa", **sets}
    text = results.render(tmp_path).read_text()
    assert f"| table1/tiny-s0 | {orig['code_version']}, " in text and "| 1/12 | 12.5 |" in text
    with pytest.raises(SystemExit, match="no such committed run"):
        results.reproduce(["table1/missing"], root=tmp_path)


def test_compare_cells_counts_only_cells_both_runs_evaluated():
    a = {"r0": [0.0, 5.0, 2.0], "matrix": [[50.0, 10.0, None], [40.0, 60.0, 20.0], [45.0, 55.0, 70.0]]}
    b = {"r0": [0.0, 5.0, 2.0], "matrix": [[50.0, 10.0, None], [40.0, 60.0, None], [45.0, 62.5, 70.0]]}
    assert results.compare_cells(a, b) == {"cells": 10, "cells_differing": 1, "max_abs_cell_diff": 7.5}


def test_a_run_that_shared_the_cores_is_noted_and_left_out_of_wall_times(tmp_path):
    out = tmp_path / "results" / "table1"
    out.mkdir(parents=True)
    for migu, seed, wall in [(False, 0, 100.0), (True, 0, 110.0), (True, 1, 900.0)]:
        summary = {**_summary("seq-ft", migu, seed, 40.0, -1.0, wall), "run": f"r{seed}{migu}", "threads": None}
        if wall == 900.0:
            summary.update(wall_time_shared=True, note="cores shared with a CI run")
        (out / f"o1-seq-ft-{migu}-s{seed}.json").write_text(json.dumps(summary))
    text = results.render(tmp_path).read_text()
    assert "- `r1True`: cores shared with a CI run" in text
    assert "| 1 | seq-ft | 0.7 | 0.001 | 0,1 | 40.0 ± 0.0 |" in text and "| 110 |" in text and "| 505 |" not in text
    assert "| table1 | 1 | seq-ft | default | not recorded | 1 / 1 | 100 | 110 | ×1.10 |" in text


# ------------------------------------------------------------------------------------------ plateau regime
def _regime_summary(table, method, lr, n, diag, aa=50.0):
    name, sets = results._plateau_run(method, n, lr)
    k = 4
    matrix = [[diag if j == i else (10.0 if j < i else 0.0) for j in range(k)] for i in range(k)]
    return {"table": table, "run": name, "settings": sets, "aa": aa, "bwt": -5.0, "fwt": 0.0, "forgetting": 5.0,
            "matrix": matrix, "r0": [0.0] * k, "seed": 0, "lr": lr, "wall_time_s": 60.0, "code_version": "abc", "code": "f00d",
            "machine": None, "threads": 1}


def _write(root, summary):
    path = root / "results" / summary["table"] / f"{summary['run']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def test_lr_grid_runs_at_the_largest_size_and_regime_needs_the_lr_table(tmp_path):
    runs = results.TABLES["lr"](_Args())
    assert [n for n, _ in runs] == ["o1-seq-ft-lr1e-5-n400-s0", "o1-seq-ft-lr5e-5-n400-s0", "o1-seq-ft-lr1e-4-n400-s0",
                                    "o1-seq-lora-lr1e-4-n400-s0", "o1-seq-lora-lr3e-4-n400-s0",
                                    "o1-seq-lora-lr1e-3-n400-s0"]
    assert all(s["data.test_per_task"] == 100 and not s["migu.enabled"] for _, s in runs)
    with pytest.raises(SystemExit, match="results/lr holds 0 of 3 seq-ft runs"):
        results.chosen_lr("seq-ft", tmp_path)


def test_chosen_lr_is_the_best_aa_and_a_tie_goes_to_the_higher_learned_diagonal(tmp_path):
    for lr, aa, diag in ((1e-5, 40.0, 60.0), (5e-5, 55.0, 70.0), (1e-4, 55.0, 80.0)):
        _write(tmp_path, _regime_summary("lr", "seq-ft", lr, 400, diag, aa))
    assert results.chosen_lr("seq-ft", tmp_path) == 1e-4


def test_plateau_size_is_the_smallest_within_the_gap_for_both_methods():
    def curve(method, values):
        return [_regime_summary("regime", method, 1e-3, n, v) for n, v in zip(results.REGIME_SIZES, values)]
    ft = curve("seq-ft", [40.0, 60.0, 78.0, 80.0])   # 256 is within 3 points of 80
    lora = curve("seq-lora", [30.0, 70.0, 71.0, 72.0])  # 128 is
    assert results.plateau_size(ft + lora) == 256
    assert results.plateau_size(ft[:3] + lora) is None  # a missing size: not decided


def test_an_identical_committed_run_is_reused_not_trained_again(tmp_path, monkeypatch):
    done = _regime_summary("lr", "seq-ft", 5e-5, 400, 70.0)
    _write(tmp_path, done)
    monkeypatch.setattr(results, "_run_one", lambda *a, **k: pytest.fail("trained a run that was committed"))
    name, sets = results._plateau_run("seq-ft", 400, 5e-5)
    results.run_table("regime", [(name, sets)], list_only=False, root=tmp_path)
    copy = json.loads((tmp_path / "results" / "regime" / f"{name}.json").read_text())
    assert copy["table"] == "regime" and copy["aa"] == done["aa"] and copy["settings"] == sets


def test_shards_deal_out_only_the_runs_to_train(tmp_path, monkeypatch):
    # the regime's 400-example runs are the lr table's: copied by every shard, the other six split 3 + 3
    for method, lrs in results.LR_GRID.items():
        for lr in lrs:
            _write(tmp_path, _regime_summary("lr", method, lr, 400, 80.0, aa=60.0 if lr == lrs[1] else 50.0))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    dealt = {}
    monkeypatch.setattr(results, "run_table", lambda table, runs, *a: dealt.setdefault(len(dealt), [n for n, _ in runs]))
    monkeypatch.setattr(results, "render", lambda *a: None)
    monkeypatch.setattr(results, "chosen_lr", lambda m, root=None: results.LR_GRID[m][1])
    for k in (0, 1):
        results.main(["regime", "--shard", f"{k}/2"])
    copies = ["o1-seq-ft-lr5e-5-n400-s0", "o1-seq-lora-lr3e-4-n400-s0"]
    assert dealt[0] == copies + ["o1-seq-ft-lr5e-5-n64-s0", "o1-seq-ft-lr5e-5-n256-s0", "o1-seq-lora-lr3e-4-n128-s0"]
    assert dealt[1] == copies + ["o1-seq-ft-lr5e-5-n128-s0", "o1-seq-lora-lr3e-4-n64-s0", "o1-seq-lora-lr3e-4-n256-s0"]


def test_regime_section_renders_the_curve_and_the_choices(tmp_path):
    for method, lrs in results.LR_GRID.items():
        for lr in lrs:
            _write(tmp_path, _regime_summary("lr", method, lr, 400, 80.0, aa=60.0 if lr == lrs[1] else 50.0))
        for n, v in zip(results.REGIME_SIZES, (40.0, 60.0, 79.0, 80.0)):
            _write(tmp_path, _regime_summary("regime", method, lrs[1], n, v))
    text = "\n".join(results.regime_lines(tmp_path))
    assert "(`provenance.code`): f00d — one code version." in text
    assert "machines: not recorded × 12 runs." in text  # 6 lr + 8 regime runs, two of them the lr runs again
    assert "Chosen lr: seq-ft 5e-05, seq-lora 0.0003." in text
    assert "Plateau size: **256 training examples per task**." in text
    assert "| regime | seq-ft | 5e-05 | 256 | 32 | 50.0 | -5.0 | 79.0 | 0.0 | 60 |" in re.sub(r" +", " ", text)
    assert (tmp_path / "docs" / "images" / "results_regime.png").stat().st_size > 0
    assert "has not flattened" not in text  # 256 is within the gap of 400: nothing to explain


def test_a_curve_still_rising_at_the_largest_size_is_said_so(tmp_path):
    for method, lrs in results.LR_GRID.items():
        # the chosen (best AA) lr is the middle one; LoRA's largest lr learned more than it
        for lr, learned in zip(lrs, (70.0, 72.5, 69.0) if method == "seq-ft" else (70.0, 68.0, 74.0)):
            _write(tmp_path, _regime_summary("lr", method, lr, 400, learned, aa=60.0 if lr == lrs[1] else 50.0))
        for n, v in zip(results.REGIME_SIZES, (40.0, 50.0, 60.0, 72.5 if method == "seq-ft" else 61.0)):
            _write(tmp_path, _regime_summary("regime", method, lrs[1], n, v))
    text = "\n".join(results.regime_lines(tmp_path))
    assert "Size of the tables below: **400 training examples per task**, the largest measured." in text
    assert ("From 256 to 400 examples learned R[i][i] rose +12.5 (seq-ft), +1.0 (seq-lora): the curve has not "
            "flattened." in text and "train at that size, not at a measured plateau." in text)
    assert "seq-ft learned the most at its chosen lr; seq-lora +6.0 at a larger lr." in text


def test_plateau_tables_use_the_regime_size_and_the_chosen_lrs(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="results/regime is incomplete"):
        results.plateau_grid(tmp_path)
    for method, lrs in results.LR_GRID.items():
        for lr in lrs:
            _write(tmp_path, _regime_summary("lr", method, lr, 400, 80.0, aa=60.0 if lr == lrs[1] else 50.0))
        for n, v in zip(results.REGIME_SIZES, (40.0, 60.0, 79.0, 80.0)):
            _write(tmp_path, _regime_summary("regime", method, lrs[1], n, v))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    table1 = results.TABLES["plateau1"](_Args())
    assert len(table1) == 4 * 2 * 3 + 2 * 2 * 2 * 3
    assert {s["data.train_per_task"] for _, s in table1} == {256} and {s["data.test_per_task"] for _, s in table1} == {100}
    lr = {s["method.name"]: s["train.lr"] for _, s in table1}
    assert lr == {"seq-ft": 5e-5, "replay": 5e-5, "seq-lora": 3e-4, "o-lora": 3e-4}
    assert {s["data.order"] for _, s in table1 if s["method.name"] == "replay"} == {1}
    ablation = dict(results.TABLES["ablation"](_Args()))
    assert ablation["o1-seq-ft-migu0.7-mask-s2"] == {**ablation["o1-seq-ft-migu0.7-s2"], "migu.first_task": "mask"}
    assert ablation["o1-seq-lora-migu0.7-own-s0"]["migu.lora_b"] == "own"
    assert ablation["o1-seq-ft-migu0.9-s1"]["migu.threshold"] == 0.9
    shared = [n for n in ablation if n in dict(table1)]  # copied from Table 1, not trained twice
    assert sorted(shared) == sorted(f"o1-{m}-{t}-s{s}" for m in ("seq-ft", "seq-lora") for t in ("base", "migu0.7")
                                    for s in (0, 1, 2))
    assert all(ablation[n] == dict(table1)[n] for n in shared)
    # --orders picks orders of the grid as it stands (order 1 here has the two extra methods)
    assert results.TABLES["plateau1"](_Args(orders=[2])) == [r for r in table1 if r[1]["data.order"] == 2]
    assert [n for n, _ in results.TABLES["plateau1"](_Args(orders=[1], seeds=[0]))] == [
        f"o1-{m}-{t}-s0" for m in ("seq-ft", "seq-lora", "replay", "o-lora") for t in ("base", "migu0.7")]
    long = results.TABLES["plateau_long"](_Args())
    assert [n for n, _ in long] == ["o4-seq-ft-base-s0", "o4-seq-ft-migu0.7-s0", "o4-seq-lora-base-s0",
                                    "o4-seq-lora-migu0.7-s0"]
    assert all(s["eval.matrix"] == "diagonal" and s["data.train_per_task"] == 128 for _, s in long)


def test_a_table_refuses_a_run_of_other_code_than_its_committed_runs(tmp_path, monkeypatch):
    # the plateau family ran one migu fingerprint ("f00d"); this checkout's differs: no run is trained, a copy is fine
    done = _regime_summary("lr", "seq-ft", 5e-5, 400, 70.0)
    _write(tmp_path, {**done, "git_commit": "9437ce0e764a20d293b33040927717460bc507c3-dirty"})
    monkeypatch.setattr(results, "_run_one", lambda *a, **k: pytest.fail("trained with other code"))
    results.run_table("regime", [results._plateau_run("seq-ft", 400, 5e-5)], list_only=False, root=tmp_path)
    with pytest.raises(SystemExit, match=r"results/plateau1: its runs ran migu code f00d .*commit 9437ce0e764a.*"
                                         r"git checkout 9437ce0e764a -- migu"):
        results.run_table("plateau1", [results._plateau_run("seq-ft", 64, 5e-5)], list_only=False, root=tmp_path)
    assert not (tmp_path / "results" / "plateau1" / f"{results._plateau_run('seq-ft', 64, 5e-5)[0]}.json").exists()
    results.run_table("table1", [], list_only=False, root=tmp_path)  # another table: its own runs only


def test_a_run_of_the_same_code_is_trained(tmp_path, monkeypatch):
    from migu.provenance import code_fingerprint

    _write(tmp_path, {**_regime_summary("lr", "seq-ft", 5e-5, 400, 70.0), "code": code_fingerprint()})
    trained = []
    monkeypatch.setattr(results, "_run_one", lambda table, name, *a: trained.append(name) or (
        {"aa": 1.0, "git_commit": "x", "code": code_fingerprint()}, type("C", (), {"threads": 1})))
    name, sets = results._plateau_run("seq-ft", 64, 5e-5)
    results.run_table("regime", [(name, sets)], list_only=False, root=tmp_path)
    assert trained == [name]


def _reproduced(root, table, run):
    side = {"code_version": "abc1234", "machine": None, "aa": 50.0, "bwt": -1.0}
    path = root / "results" / "reproduce" / f"{table}--{run}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"table": table, "run": run, "original": side, "rerun": side, "cells": 20,
                                "cells_differing": 0, "max_abs_cell_diff": 0.0}))


def test_the_8_step_tables_leave_the_page_once_every_plateau_table_is_complete(tmp_path, monkeypatch):
    for table in ("table1", *results.PLATEAU_TITLES):
        for migu in (False, True):
            r = {**_summary("seq-ft", migu, 0, 45.0 if migu else 40.0, -5.0, 100.0), "table": table, "code": "f00d",
                 "run": f"o1-seq-ft-{'migu0.7' if migu else 'base'}-s0"}
            _write(tmp_path, r)
    _reproduced(tmp_path, "table1", "o1-seq-lora-base-s0")
    _reproduced(tmp_path, "lr", "o1-seq-ft-lr1e-5-n400-s0")
    done = ["o1-seq-ft-base-s0", "o1-seq-ft-migu0.7-s0"]
    monkeypatch.setattr(results, "_grid", lambda table, root: done)
    assert results.plateau_complete(tmp_path)
    text = results.render(tmp_path).read_text()
    assert "What changed since the 8-step tables (no longer shown:" in text
    assert "## The earlier tables" not in text and "## Table 1 — standard benchmark" not in text
    assert "| lr/o1-seq-ft-lr1e-5-n400-s0 |" in text and "| table1/" not in text
    assert "| plateau1 | 1 | seq-ft | 1 | not recorded | 1 / 1 | 100 | 100 | ×1.00 |" in text and "| table1 | 1 |" not in text
    assert "2.5 points of a cell" not in text and "one test example is 1 point of a cell in the plateau tables" in text
    assert "The plateau tables ran one code version" in text
    assert "## Same numbers from today's code? Reruns" in text and "## Cost\n" in text and "Table 4" not in text
    assert "conditions: `1` = two 1-thread runs side by side" in text and "`default` =" not in text  # only what ran
    # one run of one plateau grid still to run: the 8-step tables stay, as before
    monkeypatch.setattr(results, "_grid", lambda table, root: done + (["o1-seq-ft-base-s1"] if table == "ablation" else []))
    assert not results.plateau_complete(tmp_path)
    text = results.render(tmp_path).read_text()
    assert "(kept at the end of this page until the plateau tables are complete)" in text
    assert "## The earlier tables" in text and "## Table 1 — standard benchmark" in text
    assert "## Table 4 — cost" in text and "## Same numbers from every code version and machine? Reruns" in text
    assert "| table1/o1-seq-lora-base-s0 |" in text and "| table1 | 1 | seq-ft | 1 | not recorded | 1 / 1 |" in text
    assert "**2 of 3 runs done; the rows below are partial** (to run: o1-seq-ft-base-s1)." in text
    monkeypatch.undo()
    assert not results.plateau_complete(tmp_path / "empty")  # no regime yet: no grid, nothing complete


def test_cost_section_lists_each_overhead_measurement_with_its_precision(tmp_path):
    common = {"batch": 8, "length": 128, "threshold": 0.7, "threads": 2, "extra_bytes": 1000, "full_ft_units": 10}
    out = tmp_path / "results" / "overhead"
    out.mkdir(parents=True)
    (out / "overhead.json").write_text(json.dumps({**common, "full_ft_ratio": 1.024, "lora_ratio": 1.0}))
    (out / "overhead-bf16.json").write_text(json.dumps({
        **common, "precision": "bf16", "full_ft_ratio": 0.975, "lora_ratio": 0.989, "full_ft_own_share": 0.0377,
        "full_ft_own_wall_share": 0.0369, "lora_own_share": 0.0127, "lora_own_wall_share": 0.0123}))
    lines = results.overhead_lines(tmp_path)
    assert lines[0].startswith("- bf16 (`results/overhead/overhead-bf16.json`; batch 8×128, T=0.7, 2 threads)")
    assert "full FT ×0.975, LoRA ×0.989; MIGU's own time a step, CPU / wall, full FT 3.8% / 3.7%, LoRA 1.3% / 1.2%;" \
        in lines[0]
    assert lines[1].startswith("- fp32 (`results/overhead/overhead.json`") and "own time" not in lines[1]
    assert lines[1].endswith("full FT ×1.024, LoRA ×1.000; MIGU state 1,000 bytes for 10 output units.")
    assert results.overhead_lines(tmp_path / "none") == ["Overhead benchmark not run yet.", ""]
    (out / "overhead-cpu.json").write_text(json.dumps({**common, "full_ft_ratio": 1.0, "lora_ratio": 1.0,
                                                       "full_ft_own_share": 0.024, "lora_own_share": 0.008}))
    assert "MIGU's own time a step, CPU, full FT 2.4%, LoRA 0.8%;" in results.overhead_lines(tmp_path)[1]


def test_ablation_draws_the_threshold_curve_with_no_migu_at_t_0(tmp_path, monkeypatch):
    runs = []
    for t, aa in ((None, 50.0), (0.3, 52.0), (0.7, 54.0)):
        r = {**_summary("seq-ft", t is not None, 0, aa, -5.0, 10.0), "table": "ablation", "run": f"o1-{t}"}
        if t is not None:
            r["settings"]["migu.threshold"] = t
        runs.append(r)
        _write(tmp_path, r)
    monkeypatch.setattr(results, "_grid", lambda table, root: [r["run"] for r in runs] if table == "ablation" else None)
    text = "\n".join(results.plateau_lines(tmp_path))
    assert "![threshold](images/results_ablation_threshold.png)" in text
    fig = results.plot_thresholds([g for g in results.condition_stats(runs)], "t")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0.0, 0.3, 0.7] and list(line.get_ydata()) == [50.0, 52.0, 54.0]
    (tmp_path / "results" / "ablation" / "o1-0.3.json").unlink()  # two points are no curve
    assert "results_ablation_threshold" not in "\n".join(results.plateau_lines(tmp_path))


def test_runs_on_another_cpu_kind_get_their_own_wall_row_and_their_precision_is_named(tmp_path):
    out = tmp_path / "results" / "table1"
    out.mkdir(parents=True)
    avx512 = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "cores": 2}
    avx2 = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cores": 2}
    for migu, seed, wall, machine, precision in [(False, 0, 100.0, avx512, None), (True, 0, 110.0, avx512, None),
                                                 (False, 1, 300.0, avx2, "fp32"), (True, 1, 270.0, avx2, "fp32")]:
        summary = {**_summary("seq-ft", migu, seed, 40.0, -1.0, wall), "run": f"r{seed}{migu}", "threads": 1,
                   "machine": machine, **({"precision": precision} if precision else {})}
        (out / f"o1-seq-ft-{migu}-s{seed}.json").write_text(json.dumps(summary))
    text = results.render(tmp_path).read_text()
    # the mean over both kinds (200 / 190) would hide that each pair ran on one kind
    assert "| table1 | 1 | seq-ft | 1 | AMD EPYC (AVX512, 2 cores) | 1 / 1 | 100 | 110 | ×1.10 |" in text
    assert "| table1 | 1 | seq-ft | 1 | AMD EPYC (AVX2, 2 cores) | 1 / 1 | 300 | 270 | ×0.90 |" in text
    assert ("machines: AMD EPYC (AVX2, 2 cores) × 2 runs; AMD EPYC (AVX512, 2 cores) × 2 runs; precision "
            "as run: fp32 × 2 runs, not recorded × 2 runs.") in text


def test_precision_is_left_out_of_the_settings_line_when_no_run_recorded_it():
    runs = [{**_summary("seq-ft", False, 0, 40.0, -1.0, 100.0), "code_version": "abc"}]
    assert "precision" not in results.settings_line(runs)
