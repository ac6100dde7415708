"""The `migu` command line: --help, one-line errors with exit code 2, run/resume/overwrite, the smoke config."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migu.cli import main
from migu.config import iter_options
from tests.runner_helpers import tiny_yaml, write_stream

REPO = Path(__file__).resolve().parent.parent


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_run_help_lists_every_option_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for key, kind, default, doc, is_section in iter_options():
        assert doc and " ".join(doc.split()) in out, key
        if not is_section:
            assert f"{key} ({kind}, default:" in out, key
    for flag in ("--set", "--resume", "--overwrite"):
        assert flag in out
    assert "method.seq_lora.r (int, default: 8)" in out


def test_bare_migu_prints_help(capsys):
    assert main([]) == 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--set", "migu.threshold=1.5"], "config error: migu.threshold=1.5: must be in [0, 1)"),
    (["--set", "migu.bogus=1"], "config error: migu.bogus: unknown key"),
    (["--set", "train.lr=fast"], "config error: train.lr: Value 'fast'"),
    (["--set", "method.name=nope"], "config error: method.name=nope: unknown method; known: "),
    (["missing.yaml"], "config error: config file missing.yaml not found"),
    (["--resume", "/nonexistent/run"], "run directory error: cannot resume /nonexistent/run"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["run", *args]) == 2
    assert _err_line(capsys).startswith(message)


def test_bad_data_and_model_are_one_line(tmp_path, capsys, tiny_llama_dir):
    stream = write_stream(tmp_path / "data")
    config = tiny_yaml(tmp_path / "c.yaml", tiny_llama_dir, stream, tmp_path / "out")
    assert main(["run", str(config), "--set", "data.stream=null", "--set", "data.tasks=[nosuchtask]"]) == 2
    line = _err_line(capsys)
    assert line.startswith("data error: unknown task 'nosuchtask'") and "known tasks:" in line
    assert main(["run", str(config), "--set", f"model.name={tmp_path / 'no_model'}"]) == 2
    assert _err_line(capsys).startswith("model error:")
    assert not (tmp_path / "out").exists()  # nothing was created for a failed start


def test_resume_takes_no_other_arguments(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--set", "seed=1"]) == 2
    assert "--resume continues a run with its saved config.yaml" in _err_line(capsys)


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, capsys, tiny_llama_dir):
    stream = write_stream(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "c.yaml", tiny_llama_dir, stream, out)
    assert main(["run", str(config), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy (%)" in printed and "AA" in printed and "BWT" in printed and str(out) in printed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["run", str(config), "--quiet"]) == 2
    assert _err_line(capsys) == (f"run directory error: run directory {out} already exists; "
                                 f"use --resume {out} to continue it or --overwrite to replace it")
    # a bad config with --overwrite fails before anything is deleted
    assert main(["run", str(config), "--overwrite", "--set", "train.epochs=0"]) == 2
    _err_line(capsys)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # finished: resuming just reprints
    assert "accuracy (%)" in capsys.readouterr().out
    assert main(["run", str(config), "--overwrite", "--quiet", "--set", "seed=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_module_entry_point_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "migu", "run", "--set", "migu.threshold=1.5"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: migu.threshold=1.5: must be in [0, 1)"


@pytest.mark.slow
def test_smoke_config_on_the_embedded_model(tmp_path):
    """configs/smoke.yaml end to end on SmolLM2-135M (about 2 minutes on 2 CPU cores)."""
    out = tmp_path / "smoke"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "migu", "run", str(REPO / "configs" / "smoke.yaml"), "--quiet",
                           "--set", f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no MIGU" in proc.stdout and "MIGU (T=0.7" in proc.stdout
    for sub in ("no-migu", "migu"):
        summary = json.loads((out / sub / "summary.json").read_text())
        assert summary["tasks"] == ["dbpedia", "SST-2"] and len(summary["matrix"]) == 2
        final, first = summary["matrix"][-1], summary["matrix"][0]
        assert summary["aa"] == pytest.approx(sum(final) / 2)  # the final row's mean, from the run's own matrix
        assert summary["bwt"] == pytest.approx(final[0] - first[0])
    print(proc.stdout, f"wall {time.time() - start:.0f}s")


def test_overwrite_with_a_bad_model_keeps_the_comparison(tmp_path, capsys, tiny_llama_dir):
    stream = write_stream(tmp_path / "data", tasks={"colors": ["blue", "pink"]})
    out = tmp_path / "cmp"
    config = tiny_yaml(tmp_path / "c.yaml", tiny_llama_dir, stream, out, compare_migu=True)
    assert main(["run", str(config), "--quiet"]) == 0
    assert "no MIGU" in capsys.readouterr().out
    for sub in ("no-migu", "migu"):  # every finished run gets its pictures without a separate `migu report`
        assert {p.name for p in (out / sub / "plots").glob("*.png")} >= {"accuracy_matrix.png", "accuracy_curves.png"}
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["run", str(config), "--overwrite", "--set", f"model.name={tmp_path / 'nothing'}"]) == 2
    assert _err_line(capsys).startswith("model error:")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # both finished: prints the comparison again
    assert "no MIGU" in capsys.readouterr().out
