"""Custom task streams: a YAML file listing tasks, each read from .jsonl, .json (array) or .csv files.

    tasks:
      - name: reviews
        file: reviews.jsonl          # split here: test_fraction (default 0.2) goes to test
        instruction: "What is the sentiment? Choose one from the option."
      - name: topics
        train: topics_train.csv      # or give both splits
        test: topics_test.csv
        text_field: text             # default "sentence"
        label_field: topic           # default "label"
        labels: [world, sports]      # default: the sorted labels seen in the training data

Paths are relative to the YAML file. Prompts are built by `build_prompt` with category = the task
name unless `category` is given; `options: false` leaves out the option list.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from migu.data.prompts import build_prompt
from migu.data.records import (DataError, Example, Task, check_records, read_records, stratified_indices,
                               subsample, task_rng)

_TASK_KEYS = ("name", "file", "train", "test", "test_fraction", "text_field", "label_field",
              "instruction", "labels", "category", "options")
_STREAM_KEYS = ("tasks", "description")


def load_custom_stream(
    yaml_path: str | Path,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Loads the tasks of a custom stream file, in the order listed.

    Args:
        yaml_path: the stream file (see the module docstring for its keys).
        train_per_task: training examples to keep per task, stratified by label (None or 0: all).
        test_per_task: test examples to keep per task, stratified by label (None or 0: all).
        seed: seed of the train/test split of single-file tasks and of the subsampling.

    Raises:
        DataError: a missing or unknown key (file + key), a duplicate task name, or any bad data
            file or record (file + record index + field).
    """
    path = Path(yaml_path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DataError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict) or "tasks" not in doc:
        raise DataError(f"{path}: missing key 'tasks' (a list of tasks, each with 'name' and 'file')")
    _no_unknown_keys(doc, _STREAM_KEYS, f"{path}")
    specs = doc["tasks"]
    if not isinstance(specs, list) or not specs:
        raise DataError(f"{path}: key 'tasks' must be a non-empty list")
    tasks = [_load_task(path, i, spec, train_per_task, test_per_task, seed) for i, spec in enumerate(specs)]
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise DataError(f"{path}: task name {task.name!r} appears twice; names must be unique")
        seen.add(task.name)
    return tasks


def _load_task(yaml_path: Path, index: int, spec: object, n_train: int | None, n_test: int | None,
               seed: int) -> Task:
    where = f"{yaml_path}: tasks[{index}]"
    if not isinstance(spec, dict):
        raise DataError(f"{where}: expected a mapping with keys 'name' and 'file' (or 'train' and 'test')")
    _no_unknown_keys(spec, _TASK_KEYS, where)
    if "name" not in spec:
        raise DataError(f"{where}: missing key 'name'")
    name = str(spec["name"])
    where = f"{yaml_path}: tasks[{index}] ({name})"
    if "file" in spec and ("train" in spec or "test" in spec):
        raise DataError(f"{where}: give either 'file' or 'train' and 'test', not both")
    if "file" not in spec:
        for key in ("train", "test"):
            if key not in spec:
                raise DataError(f"{where}: missing key {key!r} (or give one 'file' to split)")
    fields = {"text_field": str(spec.get("text_field", "sentence")),
              "label_field": str(spec.get("label_field", "label"))}
    labels = spec.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels:
            raise DataError(f"{where}: key 'labels' must be a non-empty list")
        labels = [str(x) for x in labels]
    base = yaml_path.parent

    if "file" in spec:
        source = base / str(spec["file"])
        pairs = check_records(read_records(source), source, **fields, labels=labels, labels_from=f"{yaml_path}")
        # One file: labels default to all seen in it, so a rare label cannot land only in test.
        labels = labels or sorted({label for _, label in pairs})
        train_pairs, test_pairs = _split(pairs, spec.get("test_fraction", 0.2), task_rng(seed, name, "split"),
                                         where, source)
    else:
        source = base / str(spec["train"])
        train_pairs = check_records(read_records(source), source, **fields, labels=labels,
                                    labels_from=f"{yaml_path}")
        labels_from = f"{yaml_path}" if labels else "labels seen in the training file"
        labels = labels or sorted({label for _, label in train_pairs})
        test_path = base / str(spec["test"])
        test_pairs = check_records(read_records(test_path), test_path, **fields, labels=labels,
                                   labels_from=labels_from)

    category = str(spec.get("category") or name)
    instruction = None if spec.get("instruction") is None else str(spec["instruction"])
    options = labels if spec.get("options", True) else None

    def examples(pairs: list[tuple[str, str]], n: int | None, which: str) -> list[Example]:
        built = [Example(build_prompt(text, name, category, instruction, options), label) for text, label in pairs]
        return subsample(built, n, task_rng(seed, name, which))

    return Task(name=name, labels=labels, train=examples(train_pairs, n_train, "train"),
                test=examples(test_pairs, n_test, "test"), category=category, source=str(source))


def _split(pairs: list[tuple[str, str]], raw_fraction: object, rng: random.Random, where: str,
           source: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Seeded split stratified by label: round(fraction * n) records (at least one) go to test."""
    try:
        fraction = float(raw_fraction)
    except (TypeError, ValueError):
        fraction = -1.0
    if isinstance(raw_fraction, bool) or not 0.0 < fraction < 1.0:
        raise DataError(f"{where}: key 'test_fraction' must be a number between 0 and 1, got {raw_fraction!r}")
    n_test = max(1, round(fraction * len(pairs)))
    if n_test >= len(pairs):
        raise DataError(f"{source}: {len(pairs)} record(s) are too few to split with test_fraction={fraction} "
                        "(train would be empty)")
    test_ix = set(stratified_indices([label for _, label in pairs], n_test, rng))
    return ([p for i, p in enumerate(pairs) if i not in test_ix], [p for i, p in enumerate(pairs) if i in test_ix])


def _no_unknown_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise DataError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
