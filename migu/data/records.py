"""What both readers share: the data types, reading record files, checking records, and seeded
stratified subsampling.

Record indices in error messages count from 0 in file order (blank JSONL lines are skipped).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad data or a bad data setting; the message is one line naming the file, record and field."""


@dataclass
class Example:
    """One training or test example: the model sees `prompt` and must answer `target`."""

    prompt: str
    target: str


@dataclass
class Task:
    """One task of a continual-learning stream.

    Attributes:
        name: the dataset name, unique within a stream (e.g. "agnews").
        labels: the label strings, in the order of labels.json (the option list of the prompt).
        train: training examples (after subsampling).
        test: test examples (after subsampling).
        category: the task family shown in the prompt (e.g. "TC").
        source: the directory or file the task was read from.
    """

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    category: str | None = None
    source: str | None = None


def load_json(path: Path) -> object:
    """Reads one JSON document; a missing or malformed file raises DataError with the position."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_records(path: Path) -> list[object]:
    """Reads the records of a .json (array), .jsonl (one object a line) or .csv (with a header) file.

    Raises:
        DataError: unknown extension, missing file, or a parse error (with its position).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json (array), .jsonl or .csv")
    if suffix == ".json":
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
        return data
    text = _read_text(path)
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text)))
        except csv.Error as e:
            raise DataError(f"{path}: invalid CSV: {e}") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    return records


def check_records(
    records: Sequence[object],
    path: Path,
    text_field: str = "sentence",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    labels_from: str = "",
    skip_labels: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """Checks records and returns their (text, label) pairs; labels are turned into strings.

    Args:
        records: parsed records (dicts).
        path: the file they came from (for messages).
        text_field: key of the text.
        label_field: key of the label.
        labels: allowed labels; None allows any.
        labels_from: where the allowed labels come from, for the message (e.g. "labels.json").
        skip_labels: labels whose records are dropped instead of rejected (MNLI's "-": no gold label).

    Raises:
        DataError: no records, a record that is not an object, a missing or empty field, a text
            that is not a string, or a label outside `labels`.
    """
    if not records:
        raise DataError(f"{path}: no records (empty split)")
    allowed = None if labels is None else set(labels)
    pairs = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with fields {text_field!r} and {label_field!r}, "
                            f"got {type(rec).__name__}")
        for field in (text_field, label_field):
            if rec.get(field) is None:
                raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(map(str, rec))})")
            if rec[field] == "":
                raise DataError(f"{where}: field {field!r} is empty")
        text, label = rec[text_field], rec[label_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        if isinstance(label, (dict, list)):
            raise DataError(f"{where}: field {label_field!r} must be a string or number, got {type(label).__name__}")
        label = str(label)
        if label in skip_labels:
            continue
        if allowed is not None and label not in allowed:
            source = f" ({labels_from})" if labels_from else ""
            raise DataError(f"{where}: field {label_field!r}: label {label!r} is not one of the task's labels"
                            f"{source}: {list(labels)}")
        pairs.append((text, label))
    if not pairs:
        raise DataError(f"{path}: no records left after dropping labels {list(skip_labels)} (empty split)")
    return pairs


def task_rng(seed: int, task: str, purpose: str) -> random.Random:
    """An RNG that depends only on (seed, task, purpose): the same in every process and Python run.

    Python's hash() is salted per process, so the task name is hashed with SHA-256 instead. Each
    purpose ("train", "test", "split") gets its own stream, so changing the number of training
    examples never changes which test examples are drawn.
    """
    digest = hashlib.sha256(f"{task}/{purpose}".encode()).digest()
    return random.Random(int(seed) + int.from_bytes(digest[:8], "big"))


def stratified_indices(keys: Sequence[str], n: int, rng: random.Random) -> list[int]:
    """Draws `n` indices stratified by key; returned in increasing order (file order).

    Allocation is proportional (largest remainder), with at least one index per key when `n` is at
    least the number of keys; with fewer, the most frequent keys get one each (ties broken by `rng`).
    """
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    counts = {key: len(ix) for key, ix in by_key.items()}
    alloc = _allocate(counts, n, rng)
    chosen = []
    for key in sorted(by_key):
        chosen += rng.sample(by_key[key], alloc[key])
    return sorted(chosen)


def subsample(examples: Sequence[Example], n: int | None, rng: random.Random) -> list[Example]:
    """Keeps `n` examples stratified by target (the label); None, 0 or n >= len keeps all of them."""
    if not n or n >= len(examples):
        return list(examples)
    if n < 0:
        raise DataError(f"the number of examples per task must be >= 0, got {n}")
    return [examples[i] for i in stratified_indices([e.target for e in examples], n, rng)]


def _allocate(counts: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    keys = sorted(counts)
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    if n < len(keys):
        order = keys[:]
        rng.shuffle(order)
        order.sort(key=lambda k: -counts[k])  # stable sort: ties keep the random order
        return {k: int(k in order[:n]) for k in keys}
    quota = {k: n * counts[k] / total for k in keys}
    alloc = {k: max(1, int(quota[k])) for k in keys}
    # The at-least-one floor can overshoot: take back from the keys furthest above their quota.
    while sum(alloc.values()) > n:
        k = max((k for k in keys if alloc[k] > 1), key=lambda k: alloc[k] - quota[k])
        alloc[k] -= 1
    # Rounding down undershoots: give the rest to the largest remainders.
    while sum(alloc.values()) < n:
        k = max((k for k in keys if alloc[k] < counts[k]), key=lambda k: quota[k] - alloc[k])
        alloc[k] += 1
    return alloc


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
