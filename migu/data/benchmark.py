"""Reader for the CL_Benchmark layout: `<data_dir>/<category>/<task>/{train,test,labels}.json`,
plus `orders.json` (the published task orders) and `instruction_config.json` (one instruction per
category) at the top.

    tasks = load_benchmark_stream(None, "standard", 1, train_per_task=200, test_per_task=100, seed=0)
"""

from __future__ import annotations

import os
from pathlib import Path

from migu.data.prompts import build_prompt
from migu.data.records import DataError, Example, Task, check_records, load_json, read_records, subsample, task_rng

ENV_VAR = "MIGU_DATA_DIR"
# The checkout's sibling `shared/` folder: <repo>/migu/data/benchmark.py → <repo>/../shared/...
_REPO_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "CL_Benchmark"
_LOCAL_DATA = Path("data") / "CL_Benchmark"
# GLUE's mark for "annotators did not agree": 131 records of MNLI's test split carry it. No answer
# can match it, so those records are dropped rather than counted as unanswerable.
NO_GOLD_LABEL = "-"


def default_data_dir() -> Path:
    """The CL_Benchmark directory used when the config gives none.

    Order: `$MIGU_DATA_DIR` if set (it must exist), else the first existing of
    `<repo>/../shared/data/CL_Benchmark` and `./data/CL_Benchmark`.

    Raises:
        DataError: `$MIGU_DATA_DIR` names no directory, or no candidate exists.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"{ENV_VAR}={env} is not a directory; point it at the CL_Benchmark folder")
        return path
    for candidate in (_REPO_DATA, _LOCAL_DATA):
        if candidate.is_dir():
            return candidate
    raise DataError(f"no CL_Benchmark data found (looked in {_REPO_DATA} and ./{_LOCAL_DATA}); "
                    f"set data.data_dir in the config or the {ENV_VAR} environment variable")


def list_tasks(data_dir: str | Path | None = None) -> dict[str, str]:
    """Maps every task name under `data_dir` to its category, e.g. {"agnews": "TC", ...}.

    Raises:
        DataError: the directory is missing, or a task name appears in two categories.
    """
    root = _root(data_dir)
    found: dict[str, str] = {}
    for category in _subdirs(root):
        for task in _subdirs(category):
            if task.name in found:
                raise DataError(f"{root}: task {task.name!r} is in both {found[task.name]}/ and "
                                f"{category.name}/; task names must be unique")
            found[task.name] = category.name
    return found


def resolve_order(data_dir: str | Path | None, benchmark: str, order: int | str) -> list[str]:
    """The task names of a published order, from `orders.json`.

    Args:
        data_dir: the CL_Benchmark directory (None: `default_data_dir()`).
        benchmark: "standard" (orders 1-3) or "long" (orders 4-6).
        order: the order number, as int or string.

    Raises:
        DataError: an unknown benchmark, an order of another benchmark, or a task of the order that
            is not in `data_dir`; the message lists the valid combinations.
    """
    root = _root(data_dir)
    path = root / "orders.json"
    orders = load_json(path)
    if not isinstance(orders, dict) or not all(isinstance(v, dict) for v in orders.values()):
        raise DataError(f"{path}: expected {{benchmark: {{order: [task, ...]}}}}")
    valid = "; ".join(f"{b}: orders {', '.join(sorted(o, key=lambda s: (len(s), s)))}" for b, o in orders.items())
    if benchmark not in orders:
        raise DataError(f"unknown benchmark {benchmark!r} (from {path}); valid: {valid}")
    key = str(order)
    if key not in orders[benchmark]:
        owner = [b for b in orders if key in orders[b]]
        hint = f" (order {key} belongs to benchmark {owner[0]!r})" if owner else ""
        raise DataError(f"benchmark {benchmark!r} has no order {order!r}{hint}; valid: {valid}")
    names = orders[benchmark][key]
    known = list_tasks(root)
    for name in names:
        if name not in known:
            raise DataError(f"{path}: {benchmark} order {key} names task {name!r}, which is not in {root}")
    return list(names)


def load_benchmark_task(
    data_dir: str | Path | None,
    name: str,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    seed: int = 0,
) -> Task:
    """Loads one task, builds its prompts and subsamples it.

    The prompt follows `build_prompt` with the category's instruction from
    `instruction_config.json` and the labels of `labels.json` as options. A category without an
    instruction there (COPA) gets neither an instruction nor an option list. Records labelled "-"
    (no gold label, MNLI's test split) are dropped; any other label outside labels.json is an error.

    Args:
        data_dir: the CL_Benchmark directory (None: `default_data_dir()`).
        name: the task name (e.g. "agnews"); a case-insensitive match is accepted.
        train_per_task: training examples to keep, stratified by label (None or 0: all).
        test_per_task: test examples to keep, stratified by label (None or 0: all).
        seed: subsampling seed; the draw also depends on the task name and the split.

    Raises:
        DataError: unknown task (the message lists the known ones) or any bad file or record.
    """
    root = _root(data_dir)
    name, category = _find_task(root, name)
    task_dir = root / category / name
    labels = _load_labels(task_dir / "labels.json")
    instruction = _load_instruction(root, category)
    options = labels if instruction is not None else None

    def split(which: str, n: int | None) -> list[Example]:
        path = task_dir / f"{which}.json"
        pairs = check_records(read_records(path), path, labels=labels, labels_from="labels.json",
                              skip_labels=(NO_GOLD_LABEL,))
        examples = [Example(build_prompt(text, name, category, instruction, options), label)
                    for text, label in pairs]
        return subsample(examples, n, task_rng(seed, name, which))

    return Task(name=name, labels=labels, train=split("train", train_per_task), test=split("test", test_per_task),
                category=category, source=str(task_dir))


def load_benchmark_stream(
    data_dir: str | Path | None,
    benchmark: str,
    order: int | str,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Loads every task of a published order, in sequence (see `resolve_order`, `load_benchmark_task`)."""
    root = _root(data_dir)
    return [load_benchmark_task(root, name, train_per_task, test_per_task, seed)
            for name in resolve_order(root, benchmark, order)]


def _root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist; set data.data_dir or {ENV_VAR}")
    return path


def _subdirs(path: Path) -> list[Path]:
    # Skip hidden and private folders (.git, __pycache__) that are not categories or tasks.
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _find_task(root: Path, name: str) -> tuple[str, str]:
    known = list_tasks(root)
    if name in known:
        return name, known[name]
    folded = [k for k in known if k.lower() == str(name).lower()]
    if len(folded) == 1:
        return folded[0], known[folded[0]]
    raise DataError(f"unknown task {name!r} in {root}; known tasks: {', '.join(sorted(known, key=str.lower))}")


def _load_labels(path: Path) -> list[str]:
    labels = load_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: expected a non-empty JSON list of label strings")
    return labels


def _load_instruction(root: Path, category: str) -> str | None:
    path = root / "instruction_config.json"
    config = load_json(path)
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected {{category: [{{\"instruction\": ...}}, ...]}}")
    entries = config.get(category)
    if not entries:
        return None
    first = entries[0] if isinstance(entries, list) else None
    if not isinstance(first, dict) or not isinstance(first.get("instruction"), str):
        raise DataError(f"{path}: {category}[0]: missing key 'instruction'")
    return first["instruction"]
