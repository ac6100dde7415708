"""Scenarios: what the one loop trains on and how it measures a model, chosen by the config's `scenario`.

    scenario = get_scenario(cfg)
    tasks = scenario.load_tasks()           # the training stream (bad data fails here, no model needed)
    scenario.prepare(tokenizer)             # after the tokenizer is loaded (pretrain: pack the blocks)
    items = scenario.encode(tokenizer, task.train)
    value, record = scenario.evaluate(model, tokenizer, eval_set, batch_size, on_batch)
    metrics = scenario.summarize(rows, r0, mtl)

`finetune` (the default): the task stream of `data.*` (CL_Benchmark order, task list or custom stream),
answer-only encoding, accuracy (exact match or label ranking) on every task's test split;
accuracy_matrix.csv; AA, BWT, FWT, forgetting.

`pretrain` (docs/pretrain.md): the domains of `pretrain.*`, each a `Task` whose `train` and `test` are
packed `Block`s of unlabelled text; the causal-LM loss on every token; perplexity on every domain's
held-out blocks and on a general held-out set never trained on (the last column);
perplexity_matrix.csv; `migu.metrics.summarize_perplexity`.

The loop sees only this interface: it never branches on the scenario (nor on a method's name).
Methods see `Task`s and `ctx.encode`, so replay, EWC, LoRA variants and MIGU work unchanged: a replayed
item of a pretrain run is a block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from migu.data import (encode, load_benchmark_task, load_custom_stream, resolve_order, task_reserve)
from migu.data.corpus import (DomainSpec, encode_blocks, is_file_source, load_domains, load_general,
                              pack_documents)
from migu.data.records import DataError, Task
from migu.metrics import METRIC_KEYS, perplexity_metric_line
from migu.rundir import MATRIX, PPL_MATRIX

GENERAL = "general"  # the name of the general held-out column of a pretrain run


class Scenario:
    """The interface (and the `finetune` implementation's shared parts); see the module docstring.

    Attributes:
        name: the config value of `scenario`.
        matrix_file: the run directory's matrix CSV (same layout for every scenario).
        metric: the key of the value in metrics.jsonl eval records (`accuracy`, `perplexity`).
        metric_keys: the summary.json keys of the scenario's headline metrics.
    """

    name: ClassVar[str] = ""
    matrix_file: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    metric_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.tasks: list[Task] = []

    def load_tasks(self) -> list[Task]:
        """Read the training stream (no tokenizer needed); raises DataError naming file, record, field."""
        raise NotImplementedError

    @property
    def eval_sets(self) -> list[Task]:
        """What is evaluated after every phase: one matrix column each, in this order."""
        return self.tasks

    @property
    def columns(self) -> list[str]:
        return [t.name for t in self.eval_sets]

    encoder_decoder: bool = False
    """The run's model is an encoder-decoder (T5, BART): seq2seq items (migu.data.seq2seq); set by `set_model`."""

    def set_model(self, model) -> None:
        """Called once the model is loaded (before `prepare`): records whether it is an encoder-decoder."""
        from migu.seq2seq import is_encoder_decoder

        self.encoder_decoder = is_encoder_decoder(model)

    def prepare(self, tokenizer) -> None:
        """Called once the tokenizer is loaded, before any training or evaluation."""

    def encode(self, tokenizer, examples: list) -> list[dict]:
        """Training items (`input_ids`, `labels`) of a task's `train` entries."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, task: Task, batch_size: int,
                 on_batch: Optional[Callable[[float], None]] = None) -> tuple[float, dict]:
        """(matrix value, extra fields of the eval record) of `model` on one evaluation set."""
        raise NotImplementedError

    def summarize(self, rows: list, r0: Optional[list], mtl: bool) -> dict:
        """The summary.json entries of the metrics of a matrix (rows after each phase, r0 before)."""
        raise NotImplementedError


class FinetuneScenario(Scenario):
    """Task-incremental fine-tuning on a labelled task stream; accuracy after every task."""

    name = "finetune"
    matrix_file = MATRIX
    metric = "accuracy"
    metric_keys = METRIC_KEYS

    def load_tasks(self) -> list[Task]:
        d = self.cfg.data
        seed = d.seed if d.seed is not None else self.cfg.seed
        n_train, n_test = d.train_per_task or None, d.test_per_task or None
        if d.stream is not None:
            self.tasks = load_custom_stream(d.stream, n_train, n_test, seed)
        else:
            names = d.tasks if d.tasks is not None else resolve_order(d.data_dir, d.benchmark, d.order)
            self.tasks = [load_benchmark_task(d.data_dir, name, n_train, n_test, seed) for name in names]
        return self.tasks

    def encode(self, tokenizer, examples):
        """Answer-only items; each prompt is truncated with its task's budget (max_length minus the task's
        longest target, as evaluation does), so the prompt's layout never reveals the label's length."""
        max_length = self.cfg.data.max_length
        if self.encoder_decoder:  # prompt and target are separate sequences: nothing to leak
            from migu.data.seq2seq import encode_seq2seq

            return encode_seq2seq(tokenizer, examples, max_length, self.cfg.data.max_target_length)
        if getattr(self, "_reserve_for", None) is not tokenizer:
            self._reserve = {}  # id(example) -> its task's reserve
            for task in self.tasks:
                labels = list(task.labels) or [e.target for e in task.train]  # evaluation's rule: the labels
                room = task_reserve(tokenizer, labels, max_length)
                self._reserve.update((id(e), room) for e in task.train + task.test)
            self._reserve_for = tokenizer
        # an example of no loaded task (built by a method) keeps its own target's length as reserve
        return encode(tokenizer, examples, max_length, reserve=[self._reserve.get(id(e)) for e in examples])

    def evaluate(self, model, tokenizer, task, batch_size, on_batch=None):
        from migu.evaluate import evaluate_task

        e = self.cfg.eval
        result = evaluate_task(model, tokenizer, task, mode=e.mode, batch_size=batch_size,
                               max_length=self.cfg.data.max_length, max_new_tokens=e.max_new_tokens,
                               on_batch=on_batch, prefix_cache=e.prefix_cache)
        return result.accuracy, {"accuracy": result.accuracy, "correct": result.correct, "n": result.n,
                                 "samples": result.samples}

    def summarize(self, rows, r0, mtl):
        from migu.metrics import summarize

        m = summarize(rows, r0, mtl=mtl)
        return {"aa": m["aa"], "bwt": m["bwt"], "fwt": m["fwt"], "forgetting": m["forgetting"],
                "diagonal": m["diagonal"]}


class PretrainScenario(Scenario):
    """Continual pre-training on unlabelled text domains; perplexity after every domain (docs/pretrain.md)."""

    name = "pretrain"
    matrix_file = PPL_MATRIX
    metric = "perplexity"
    metric_keys = ("ppl_avg", "ppl_forgetting", "ppl_general_drift", "ppl_general_drift_rel")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.domains: list = []
        self.general_docs: list[str] = []
        self.general = Task(name=GENERAL, labels=[], train=[], test=[], category="general")
        self.prepared = False

    def set_model(self, model) -> None:
        super().set_model(model)
        if self.encoder_decoder:
            from migu.config import ConfigError

            raise ConfigError(f"scenario=pretrain: continual pre-training trains a causal LM on raw text; model "
                              f"{self.cfg.model.name!r} is an encoder-decoder (use scenario: finetune)")

    def load_tasks(self) -> list[Task]:
        p, d = self.cfg.pretrain, self.cfg.data
        seed = d.seed if d.seed is not None else self.cfg.seed
        specs = None if p.domains is None else [DomainSpec(x.name, list(x.train), None if x.heldout is None
                                                           else list(x.heldout), x.text_field)
                                                for x in p.domains]
        self.domains = load_domains(specs, d.data_dir, p.text_field, p.heldout_fraction, seed)
        self.general_docs = load_general(p.general, p.text_field)
        if p.general is not None:  # the general set must never be trained on
            general = Path(p.general).expanduser().resolve()
            for domain in self.domains:
                for source in domain.sources:
                    if is_file_source(source) and Path(source).expanduser().resolve() == general:
                        raise DataError(f"pretrain.general={p.general}: is also a training source of domain "
                                        f"{domain.name!r}; the general held-out set must never be trained on")
        self.tasks = [Task(name=dom.name, labels=[], train=[], test=[], category="pretrain",
                           source=", ".join(dom.sources)) for dom in self.domains]
        self.general.source = str(p.general) if p.general is not None else "migu/assets/general_samples.jsonl"
        return self.tasks

    @property
    def eval_sets(self) -> list[Task]:
        return self.tasks + [self.general]

    def prepare(self, tokenizer) -> None:
        """Pack every domain's documents (and the general set's) into blocks, within the configured budgets."""
        if self.prepared:
            return
        p = self.cfg.pretrain
        for task, dom in zip(self.tasks, self.domains):
            task.train = pack_documents(tokenizer, dom.train, p.block_size, p.train_blocks_per_domain or None)
            task.test = pack_documents(tokenizer, dom.heldout, p.block_size, p.heldout_blocks_per_domain or None)
            if not task.train or not task.test:
                raise DataError(f"pretrain domain {task.name!r}: no {'training' if not task.train else 'held-out'} "
                                f"block (documents too short?)")
        self.general.test = pack_documents(tokenizer, self.general_docs, p.block_size, p.general_blocks or None)
        if not self.general.test:
            raise DataError(f"{self.general.source}: no general held-out block (documents too short?)")
        self.prepared = True

    def encode(self, tokenizer, examples):
        return encode_blocks(examples)

    def evaluate(self, model, tokenizer, task, batch_size, on_batch=None):
        from migu.perplexity import perplexity

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        result = perplexity(model, encode_blocks(task.test), batch_size, pad, on_batch)
        return result.perplexity, {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                                   "blocks": result.items}

    def summarize(self, rows, r0, mtl):
        from migu.metrics import summarize_perplexity

        metrics = summarize_perplexity(rows, r0, general=True, mtl=mtl)
        p = self.cfg.pretrain
        metrics["general_column"] = GENERAL
        metrics["blocks"] = {t.name: {"train": len(t.train), "heldout": len(t.test)} for t in self.tasks}
        metrics["blocks"][GENERAL] = {"heldout": len(self.general.test)}
        metrics["block_size"] = p.block_size
        return metrics


SCENARIO_CLASSES: dict[str, type[Scenario]] = {cls.name: cls for cls in (FinetuneScenario, PretrainScenario)}


def get_scenario(cfg) -> Scenario:
    """A fresh scenario object for `cfg.scenario` (default `finetune`)."""
    return SCENARIO_CLASSES[getattr(cfg, "scenario", "finetune")](cfg)


def absolute_paths(cfg) -> Any:
    """`cfg` with its file paths made absolute (stream, data_dir, a local model, the pretrain file sources and
    general file; task names stay as they are), so config.yaml resumes from any working directory."""
    def absolute(value, source=False):
        keep = value is None or (source and not is_file_source(value))
        return value if keep else str(Path(value).expanduser().resolve())

    p = cfg.pretrain
    domains = None if p.domains is None else [
        dataclasses.replace(d, train=[absolute(s, True) for s in d.train],
                            heldout=None if d.heldout is None else [absolute(s, True) for s in d.heldout])
        for d in p.domains]
    model = cfg.model
    if Path(model.name).expanduser().exists():
        model = dataclasses.replace(model, name=absolute(model.name))
    data = dataclasses.replace(cfg.data, stream=absolute(cfg.data.stream), data_dir=absolute(cfg.data.data_dir))
    return dataclasses.replace(cfg, data=data, model=model,
                               pretrain=dataclasses.replace(p, domains=domains, general=absolute(p.general)))


# ------------------------------------------------------------------------------------------ text output
def matrix_table(summary: dict, title: str, decimals: int, metric_line: str) -> str:
    """A run's matrix as text: header `title` + task names, rows untrained + after each phase, metrics."""
    def cell(x, width):
        return f"{x:>{width}.{decimals}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"

    cols = summary["tasks"]
    width = max([len(t) for t in cols] + [6 + decimals]) + 1
    label_w = max([len("after " + n) for n in summary["row_names"]] + [len(title), len("untrained")]) + 1
    lines = [title.ljust(label_w) + "".join(t.rjust(width) for t in cols)]
    if summary.get("r0") is not None:
        lines.append("untrained".ljust(label_w) + "".join(cell(x, width) for x in summary["r0"]))
    for name, row in zip(summary["row_names"], summary["matrix"]):
        lines.append(f"after {name}".ljust(label_w) + "".join(cell(x, width) for x in row))
    lines.append(metric_line + f"   ({summary.get('wall_time_s', 0):.0f}s)")
    return "\n".join(lines)


def format_perplexity_matrix(summary: dict) -> str:
    """The perplexity matrix (rows: untrained + one per phase) and its metrics as text."""
    return matrix_table(summary, "perplexity", 2, perplexity_metric_line(summary))


def format_perplexity_comparison(runs: dict) -> str:
    """The perplexity metrics of several runs (e.g. no-migu / migu) side by side."""
    names = list(runs)
    lines = ["metric".ljust(22) + "".join(n.rjust(10) for n in names)]
    for key in ("ppl_avg", "ppl_forgetting", "ppl_forgetting_rel", "ppl_general", "ppl_general_drift",
                "ppl_general_drift_rel", "wall_time_s"):
        cells = []
        for n in names:
            x = runs[n].get(key)
            cells.append(f"{x:>10.4f}" if isinstance(x, float) and key.endswith("_rel")
                         else f"{x:>10.2f}" if isinstance(x, (int, float)) else f"{'-':>10}")
        lines.append(key.ljust(22) + "".join(cells))
    return "\n".join(lines)
