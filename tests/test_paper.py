"""The paper presets (configs/paper), `migu run --dry-run`, and the paper's numbers beside a run's AA."""

import math
from pathlib import Path

import pytest

from migu.cli import main
from migu.config import ConfigError, load_config
from migu.dryrun import format_plan, parameter_counts, plan
from migu.models import tiny_model
from migu.report.paper import paper_aa, paper_rows

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs" / "paper").glob("*.yaml"))


def test_presets_cover_the_papers_grid():
    names = {p.stem for p in PRESETS}
    for short in ("ft", "lora"):
        for o in range(1, 7):
            assert {f"t5-large-{short}-order{o}", f"t5-large-{short}-migu-order{o}"} <= names
    assert {f"llama2-7b-lora{m}-order{o}" for m in ("", "-migu") for o in (1, 2, 3)} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_dry_runs(path):
    cfg = load_config(path)
    p = plan(cfg, flops=4e14)
    assert p["global_batch"] == 64 and p["eval_matrix"] == "last"
    assert p["eval_cells"] == len(p["tasks"])  # only after the last task
    assert p["train_flops"] > 0 and p["eval_flops"] > 0 and math.isfinite(p["wall_time_s"])
    for row, task in zip(p["phases"], p["tasks"]):
        assert row["steps"] == math.ceil(math.ceil(task["train"] / 8) / 8) * row["epochs"]
    if "t5" in path.stem:
        assert p["encoder_decoder"] and 7.3e8 < p["parameters"]["total"] < 7.5e8  # T5-large: 738M
        assert {r["lr"] for r in p["phases"]} == {1e-4}
        epochs = {r["phase"]: r["epochs"] for r in p["phases"]}
        two = {"order5": {"WiC"}, "order6": {"MNLI"}}.get(path.stem[-6:], set())
        assert {t for t, e in epochs.items() if e == 2} == two
    else:
        assert not p["encoder_decoder"] and 6.7e9 < p["parameters"]["total"] < 6.8e9  # Llama-2-7B
        assert [r["lr"] for r in p["phases"]] == [1e-3, 1e-4, 1e-4, 1e-4]
    assert "estimated wall time" in format_plan(p)


def test_dry_run_cli_prints_the_plan_of_a_tiny_model(tmp_path, capsys, tiny_llama_dir):
    from tests.runner_helpers import tiny_yaml, write_stream

    stream = write_stream(tmp_path / "data")
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny_llama_dir, stream, tmp_path / "out")
    assert main(["run", str(cfg), "--dry-run", "--flops", "1e9", "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps: 18" in out  # 3 tasks x ceil(12 / 4) x 2 epochs
    assert "evaluation: eval.matrix=full: 12 cells" in out  # 3 x 3 + the untrained row
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_parameter_count_matches_the_real_model():
    model, _ = tiny_model("t5")
    counts = parameter_counts(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_task_epochs_must_name_a_task_of_the_stream():
    cfg = load_config(PRESETS[0], ["train.task_epochs={Nope: 2}"])
    with pytest.raises(ConfigError, match="train.task_epochs.Nope: not a task"):
        plan(cfg, flops=1e12)


def test_paper_numbers_match_the_issue_and_runs_find_them():
    rows = paper_rows()
    assert paper_aa("google-t5/t5-large", "standard", 2, "seq-ft", False, rows) == (75.7, "avg")
    assert paper_aa("/m/t5-large", "standard", 1, "seq-ft", True, rows) == (78.8, "avg")
    assert paper_aa("t5-large", "long", 4, "seq-ft", False, rows)[0] == 68.3
    assert paper_aa("t5-large", "long", 4, "seq-ft", True, rows)[0] == 73.8
    assert paper_aa("t5-large", "standard", 3, "seq-lora", False, rows)[0] == 67.9
    assert paper_aa("t5-large", "standard", 3, "seq-lora", True, rows)[0] == 73.3
    assert paper_aa("t5-large", "long", 6, "seq-lora", False, rows)[0] == 46.0
    assert paper_aa("t5-large", "long", 6, "seq-lora", True, rows)[0] == 61.2
    assert paper_aa("smollm2-135m", "standard", 1, "seq-ft", False, rows) is None


def test_dry_run_of_compare_migu_counts_what_the_second_run_reuses(tmp_path, tiny_llama_dir):
    from tests.runner_helpers import tiny_config, write_stream

    stream = write_stream(tmp_path / "data")
    rate = 1e9
    single = plan(tiny_config(tiny_llama_dir, stream, tmp_path / "o"), flops=rate)
    both = plan(tiny_config(tiny_llama_dir, stream, tmp_path / "o", compare_migu=True), flops=rate)
    masked = plan(tiny_config(tiny_llama_dir, stream, tmp_path / "o", compare_migu=True,
                              **{"migu.first_task": "mask"}), flops=rate)
    cell = single["eval_flops"] / single["eval_cells"]  # 3 tasks, full matrix: 4 rows of 3 cells
    assert single["eval_cells"] == 12 and both["runs"] == 2
    # the untrained row is always shared; under first_task skip also task 1's training and its row
    assert masked["wall_time_s"] == pytest.approx(2 * single["wall_time_s"] - 3 * cell / rate)
    assert both["wall_time_s"] == pytest.approx(masked["wall_time_s"] - (single["phases"][0]["flops"] + 3 * cell) / rate)
