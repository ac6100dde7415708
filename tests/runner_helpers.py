"""Helpers for the runner/CLI tests: a tiny custom task stream and configs on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from migu.config import load_config

TASKS = {"colors": ["blue", "pink"], "animals": ["cat", "dog", "cow"], "moods": ["glad", "calm"]}  # equal lengths


def write_stream(root: Path, n: int = 30, tasks: dict = TASKS) -> Path:
    """A custom stream of short, learnable tasks (the sentence names its label): returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {"tasks": []}
    for name, labels in tasks.items():
        # the first label is 3x as frequent as the others: a prior a tiny model learns in a few steps
        pool = [labels[0]] * 3 + labels[1:]
        lines = [json.dumps({"sentence": f"{pool[i % len(pool)][:2]} {i}", "label": pool[i % len(pool)]})
                 for i in range(n)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        spec["tasks"].append({"name": name, "file": f"{name}.jsonl", "instruction": "Pick."})
    path = root / "stream.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tiny_overrides(model_dir, stream, out, **extra) -> list[str]:
    """--set overrides for a fast run: 3 tasks × 3 steps, rank evaluation (non-trivial accuracies)."""
    sets = {
        "model.name": str(model_dir), "data.stream": str(stream), "data.train_per_task": 12,
        "data.test_per_task": 6, "data.max_length": 80, "train.batch_size": 4, "train.lr": 3e-3,
        "eval.mode": "rank", "eval.batch_size": 8, "threads": 1, "output_dir": str(out),
        "train.precision": "fp32",  # the tests compare numbers; auto would pick bf16 on some machines
    }
    sets.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def tiny_config(model_dir, stream, out, **extra):
    return load_config(None, tiny_overrides(model_dir, stream, out, **extra))


def train_losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in records if r["type"] == "train"]


def final_rows(run_dir: Path) -> list:
    return json.loads((Path(run_dir) / "state.json").read_text())["rows"]


def tiny_yaml(path: Path, model_dir, stream, out, **extra) -> Path:
    """The tiny run as a YAML config file (for CLI tests): returns its path."""
    doc: dict = {"compare_migu": False}
    for item in tiny_overrides(model_dir, stream, out, **extra):
        key, value = item.split("=", 1)
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text("# tiny test run\n" + yaml.safe_dump(doc))
    return path
