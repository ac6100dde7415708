"""The one continual-learning loop, shared by every method.

    run(cfg)                     # one run into cfg.output_dir (or its default)
    run(cfg, resume=True)        # continue after the last finished task of an existing run directory

Per phase (one task for sequential methods): reseed from (seed, phase) → `method.before_task` → steps
(forward, answer-token loss + `method.extra_loss`, backward, `MIGU.mask_gradients`, clip, AdamW step,
`MIGU.reset`, `method.after_step`) → `method.after_task` → evaluate every task → one row of the accuracy
matrix → checkpoint (atomic) → state.json. The loop never branches on a method's name.

Each step: this rank's micro-batches from the `StepRunner` (one process: the plan as it is), the loss of
`migu.steps.step_loss`, MIGU (a no-op `NoMIGU` in a phase without it, migu/masking.py), clip, step. The
plan, seeds and loss are migu/steps.py's; what a checkpoint holds of the model is migu/checkpoint.py's.

Resume is exact: a checkpoint holds the trained parameters, the method's state and the rows so far;
every phase reseeds torch/random/numpy from (seed, phase) and builds a fresh optimizer, so a resumed
run repeats the uninterrupted one bit for bit (on the same machine and thread count). Step checkpoints
inside a phase (`train.save_every_steps` / `save_every_minutes`, or a SIGTERM/SIGINT) also hold the
optimizer, RNG states and the position in the phase's plan (migu/preemption.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from migu import checkpoint, distributed, fsdp, preemption
from migu.compare import Printer, run_comparison
from migu.config import ConfigError, RunConfig, to_yaml
from migu.data import collate
from migu.masking import counting, phase_migu
from migu.metrics import evaluated_columns
from migu.methods import Context, get_method
from migu.models import load_model_and_tokenizer, set_attention
from migu.provenance import provenance
from migu.rundir import RunDir, RunDirError
from migu.scenarios import absolute_paths, get_scenario
from migu.steps import (adamw, answer_tokens, check_task_epochs, labelled, phase_epochs, phase_lr, phase_seed,
                        plan_steps, seed_everything, step_loss)

__all__ = ["run", "step_loss", "resolve_precision"]


def resolve_precision(cfg: RunConfig) -> RunConfig:
    """`cfg` with `train.precision: auto` replaced by what this machine runs (bf16 or fp32), so config.yaml,
    summary.json and a resume all see the precision that produced the numbers."""
    if cfg.train.precision != "auto":
        return cfg
    device = distributed.resolve_device(cfg.train.device)
    precision = distributed.resolve_precision("auto", device)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


# ------------------------------------------------------------------------------------------ one run
def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, output_dir: Optional[str] = None,
        quiet: bool = False, r0: Optional[list[float]] = None) -> dict:
    """Train and evaluate one configuration; returns the summary (also written to summary.json).

    With `cfg.compare_migu` it runs both MIGU settings (see `run_comparison`) and returns
    `{"runs": {"no-migu": summary, "migu": summary}}`.

    Args:
        resume: continue the run directory `output_dir` after its last finished phase.
        overwrite: replace an existing run directory (only one that holds a migu run).
        output_dir: overrides `cfg.output_dir` (default: `cfg.default_output_dir()`).
        quiet: no progress bars or status lines.
        r0: the untrained model's accuracies when already known (shared by compare_migu).
    Raises:
        ConfigError, DataError, ModelError, RunDirError: bad input, before anything is overwritten.
        DistributedError: launched by torchrun and a peer process died or timed out.

    Launched by torchrun / accelerate launch (WORLD_SIZE > 1) it trains data-parallel (docs/distributed.md).
    """
    cfg.validate()
    cfg = resolve_precision(cfg)
    path = Path(output_dir or cfg.output_dir or cfg.default_output_dir())
    with distributed.session(cfg.train.dist_timeout_s, cfg.train.device, run_dir=str(path),
                             precision=cfg.train.precision, engine=cfg.train.engine):
        if cfg.compare_migu:
            def train_one(sub_cfg, sub_path, sub_resume, r0, preloaded, after_phase=None):
                return _Run(sub_cfg, sub_path, sub_resume, False, quiet, r0, preloaded=preloaded,
                            after_phase=after_phase).execute()

            return run_comparison(cfg, path, train_one, resume=resume, overwrite=overwrite, quiet=quiet)
        rd = None
        if resume:
            rd = RunDir.open(path, lock=True)  # fail early, before loading data and model (also: another writer)
            state, summary = rd.read_state(), rd.read_summary()
            if state and state.get("status") == "done" and summary is not None:
                rd.unlock()
                return summary  # finished: nothing to resume
        else:
            RunDir.check_new(path, overwrite)  # "already exists", "in use", before loading anything
        return _Run(cfg, path, resume, overwrite, quiet, r0, rundir=rd).execute()


class _Run:
    def __init__(self, cfg: RunConfig, path: Path, resume: bool, overwrite: bool, quiet: bool, r0,
                 preloaded: Optional[tuple] = None, rundir: Optional[RunDir] = None,
                 after_phase: Optional[Callable[[int, RunDir], None]] = None):
        self.cfg, self.path, self.resume, self.overwrite, self.r0 = cfg, path, resume, overwrite, r0
        self.after_phase = after_phase  # (phase index, run directory) once the phase's checkpoint is saved
        self.rd = rundir  # resume: already opened and locked by the caller
        self.preloaded = preloaded  # (model, tokenizer) already loaded by the caller, used instead of loading
        self.out = Printer(quiet or not distributed.is_main_process())  # rank 0 prints, every rank trains

    # --------------------------------------------------------------------------------- setup
    def _setup(self):
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        method_cls = get_method(cfg.method.name)
        self.method = method_cls(cfg.method_options)
        self.scenario = get_scenario(cfg)  # what is trained and how it is measured (accuracy / perplexity)
        self.tasks = self.scenario.load_tasks()  # bad data fails here, before the run directory is touched
        self.task_names = self.scenario.columns  # the matrix columns (pretrain: the domains + general)
        self.phases = self.method.phases(self.tasks)
        check_task_epochs(cfg.train, self.tasks)
        self.lr = cfg.train.lr if cfg.train.lr is not None else self.method.default_lr
        self.device = distributed.resolve_device(cfg.train.device)
        problem = distributed.precision_problem(cfg.train.precision, self.device)
        if problem:
            raise ConfigError(problem)
        if self.preloaded is not None:
            model, self.tokenizer = self.preloaded
            self.preloaded = None
        else:
            model, self.tokenizer = load_model_and_tokenizer(cfg.model.name)
        kernel = set_attention(model, distributed.resolve_attention(cfg.model.attention, self.device, cfg.train.precision))
        if kernel:  # recorded as it runs, like the precision
            self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=kernel))
        seed_everything(cfg.seed)  # after loading: the method's setup (e.g. LoRA init) starts from the seed
        self.scenario.set_model(model)  # an encoder-decoder model: seq2seq encoding (migu.data.seq2seq)
        self.scenario.prepare(self.tokenizer)  # pretrain: pack the domains into blocks
        self.base_ids = {id(p) for p in model.parameters()}
        self.model = self.method.setup(model)
        distributed.prepare_model(self.model, self.device, cfg.train.gradient_checkpointing)
        if cfg.train.engine == "fsdp" and distributed.world_size() > 1:  # once: parameters become DTensor shards
            fsdp.shard_model(self.model, cfg.train.precision)
        self.model.train()
        if self.resume:
            self.rd = (self.rd or RunDir.open(self.path)).lock()  # the one writer until the run ends
            self.rd.clean_temporaries()
        else:
            self.rd = RunDir.create(self.path, overwrite=self.overwrite)
            self.cfg = cfg = absolute_paths(dataclasses.replace(cfg, output_dir=str(self.path)))
            self.rd.write_config(to_yaml(cfg, provenance()))
        self.stage = -1
        self.ctx = Context(model=self.model, tokenizer=self.tokenizer, tasks=self.tasks, encode=self._encode,
                           seed=cfg.seed, log=self._log)

    def _log(self, record: dict) -> None:
        """metrics.jsonl record of the current phase (`stage`), so resume can drop a lost phase's records."""
        self.rd.log({"stage": self.stage, **record})

    def _encode(self, examples):
        return self.scenario.encode(self.tokenizer, examples)

    def _restore(self) -> tuple[int, Optional[list], list, float]:
        """(finished phases, r0, rows, elapsed seconds) from the checkpoint and state.json."""
        state = self.rd.read_state() or {}
        if state and state.get("tasks") not in (None, self.task_names):
            raise RunDirError(f"{self.path}: its tasks {state['tasks']} differ from the config's {self.task_names}")
        finished, rows, elapsed = 0, [], float(state.get("elapsed_s", 0.0))
        r0 = state.get("r0")
        ckpt = self.rd.load_latest(training=True) if self.resume else None  # verified; damaged → the previous
        done = 0  # optimizer steps of phase `finished` already in a step checkpoint
        if ckpt is not None:
            meta = ckpt.meta
            for note in ckpt.damaged:
                self.out.line(f"{note}: resuming from {ckpt.where} instead")
            checkpoint.restore(self.model, self.method, ckpt)  # method state, then the parameters
            finished, rows, r0 = meta["finished_tasks"], meta["rows"], meta.get("r0", r0)
            elapsed = float(meta.get("elapsed_s", elapsed))
            if meta.get("step"):
                self.step_ckpt, done = ckpt, meta["step"]["step"]  # inside phase `finished`: see _train_phase
        elif self.resume and state.get("finished_tasks"):
            self.out.line(f"{self.path}: no checkpoint (train.checkpoint false?); restarting from the first task")

        def kept(r):  # drop records of work the kill lost: steps and phases not checkpointed, an unsaved r0
            stage = r.get("stage", 0)
            if stage == finished and r.get("type") == "train":
                return r.get("step", 0) <= done
            return stage < finished and (stage >= 0 or r0 is not None)

        self.rd.keep_metrics(kept)
        return finished, r0, rows, elapsed

    # --------------------------------------------------------------------------------- the run
    def execute(self) -> dict:
        threads = torch.get_num_threads()
        try:
            with preemption.StopSignals(self.out.quiet) as self.signals:
                return self._phases()
        finally:
            torch.set_num_threads(threads)  # a library call must not change the caller's setting
            if self.rd is not None:
                self.rd.unlock()

    def _phases(self) -> dict:
        self.step_ckpt = None
        self._setup()
        started = time.time()
        finished, r0, rows, elapsed = self._restore() if self.resume else (0, None, [], 0.0)
        self.schedule = preemption.StepSchedule(self.cfg.train.save_every_steps, self.cfg.train.save_every_minutes,
                                                self.signals)
        row_names = [name for name, _ in self.phases]
        if r0 is None and self.r0 is not None:
            r0 = list(self.r0)
            for name, acc in zip(self.task_names, r0):
                self.rd.log({"type": "eval", "stage": -1, "after_task": "untrained", "task": name, self.scenario.metric: acc,
                             "shared": True})
        if r0 is None and self.cfg.eval.untrained:
            r0 = self._evaluate(-1, "untrained")
        self._save_state(finished, r0, rows, elapsed + time.time() - started, "running")
        self.progress = (r0, rows, elapsed, started)  # what a step checkpoint records besides the training state
        try:
            for index in range(finished, len(self.phases)):
                name, phase_tasks = self.phases[index]
                self._train_phase(index, name, phase_tasks)
                rows.append(self._evaluate(index, name))
                total = elapsed + time.time() - started
                if self.cfg.train.checkpoint:
                    checkpoint.save(self.rd, self.model, self.base_ids, self.method, {
                        "finished_tasks": index + 1, "rows": rows, "r0": r0, "row_names": row_names[:index + 1],
                        "elapsed_s": total}, self.cfg.train)
                self._save_state(index + 1, r0, rows, total, "running")
                if self.after_phase is not None and self.cfg.train.checkpoint:
                    self.after_phase(index, self.rd)
                signum = self.schedule.stop_requested()  # a signal during evaluation: stop at this boundary
                if signum is not None and index + 1 < len(self.phases):
                    raise preemption.Interrupted(signum, f"after task {index + 1}/{len(self.phases)} ({name})",
                                                 self.cfg.train.checkpoint)
        except preemption.Interrupted:
            self._save_state(len(rows), r0, rows, elapsed + time.time() - started, "interrupted")
            raise
        total = elapsed + time.time() - started
        summary = self._summary(r0, rows, total)
        self.rd.write_summary(summary)
        self._save_state(len(self.phases), r0, rows, total, "done")
        return summary

    def _save_state(self, finished, r0, rows, elapsed, status) -> None:
        row_names = [name for name, _ in self.phases][:len(rows)]
        self.rd.write_state({"tasks": self.task_names, "finished_tasks": finished, "r0": r0, "rows": rows,
                             "row_names": row_names, "phases": [name for name, _ in self.phases],
                             "status": status, "elapsed_s": round(elapsed, 3)})
        self.rd.write_matrix(self.task_names, r0, rows, row_names, filename=self.scenario.matrix_file)

    def _train_phase(self, index: int, name: str, phase_tasks: list) -> None:
        cfg, method, model = self.cfg, self.method, self.model
        self.stage = index
        seed = phase_seed(cfg.seed, index)
        seed_everything(seed)
        method.before_task(index, phase_tasks, self.ctx)
        params = method.trainable_parameters(model)
        optimizer = adamw(params, phase_lr(cfg.train, self.lr, index), cfg.train.weight_decay)
        migu = phase_migu(cfg.migu, model, method, index)  # NoMIGU: no MIGU, or phase 0 with first_task skip
        before_forward = counting(migu, cfg.migu)  # a placeholder does not count; tokens: answer
        items = self._encode([ex for task in phase_tasks for ex in task.train])
        items = method.train_items(index, phase_tasks, items, self.ctx)  # e.g. replay appends stored items
        plans = [plan_steps(items, cfg.train, seed, epoch) for epoch in range(phase_epochs(cfg.train, phase_tasks))]
        n_steps = sum(len(p) for p in plans)
        pad = self.tokenizer.pad_token_id
        model.train()
        step, losses, t0 = 0, [], time.time()
        bar = self.out.bar(n_steps, f"train {index + 1}/{len(self.phases)} {name}")
        runner = distributed.StepRunner(model, self.device, cfg.train.precision, cfg.train.engine)  # DDP / FSDP
        done, losses, rng = self._resume_in_phase(optimizer, runner)  # reliability: a step checkpoint's position
        try:
            for epoch, plan in enumerate(plans):
                for micro in plan:
                    step += 1
                    # every rank mixes the whole planned step, then runs its share of the rows
                    mixed = [method.mix_batch([items[i] for i in ix], step) for ix in micro]
                    if step <= done:  # reliability: trained before the step checkpoint; mix_batch replayed for its RNG
                        if step == done:
                            preemption.restore_my_rng(rng)
                        bar.update(1)
                        continue
                    total = sum(answer_tokens(item) for mb in mixed for item in mb)
                    shards, padding = runner.shard(mixed, cfg.train.batch_size)  # last `padding`: placeholders
                    batches = [runner.to_device(collate(mb, pad)) for mb in shards]
                    loss, extra = step_loss(model, batches, method, method.needs_hidden_states, total=total,
                                            runner=runner, padding=padding, before_forward=before_forward)
                    migu.enabled = True  # after a placeholder: every rank joins mask_gradients' all-reduce
                    loss, extra = distributed.sum_over_ranks(loss, extra)
                    record = {"type": "train", "stage": index, "task": name, "epoch": epoch, "step": step,
                              "loss": loss, "tokens": sum(labelled(item) for mb in mixed for item in mb)}
                    if extra:
                        record["extra_loss"] = extra
                    masks = migu.mask_gradients()
                    if masks:  # fraction of gradient rows kept over all targeted layers (one host sync)
                        kept = int(torch.stack([m.sum() for m in masks.values()]).sum())
                        record["migu_kept"] = kept / sum(m.numel() for m in masks.values())
                    if cfg.train.max_grad_norm:
                        runner.unscale(optimizer)  # fp16: clip the true gradients
                        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    runner.step(optimizer)
                    optimizer.zero_grad(set_to_none=True)
                    migu.reset()
                    method.after_step(step)
                    self.rd.log(record)
                    losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    self._after_step(index, name, epoch, step, n_steps, losses, optimizer, runner)  # reliability
        finally:
            bar.close()
            runner.close()
            migu.remove()
        method.after_task(index, phase_tasks, self.ctx)
        mean = sum(losses) / max(1, len(losses))
        self.out.line(f"trained {name} ({index + 1}/{len(self.phases)}): {step} steps, mean loss {mean:.4f}, "
                      f"{time.time() - t0:.0f}s")

    # --------------------------------------------------------------------------------- reliability
    def _resume_in_phase(self, optimizer, runner) -> tuple[int, list, Optional[list]]:
        """(steps done, their losses, RNG states) from a step checkpoint of this phase, else (0, [], None).

        Restores the method state and parameters again (before_task ran on the mid-phase weights, e.g. EWC's
        anchor), the optimizer and the fp16 loss scaler; the RNG states are restored at the last skipped step.
        """
        ckpt, self.step_ckpt = self.step_ckpt, None
        if ckpt is None:
            return 0, [], None
        checkpoint.restore(self.model, self.method, ckpt, self.cfg.train.engine, optimizer, runner.scaler)
        position = ckpt.meta["step"]
        self.out.line(f"resuming task {position['phase'] + 1}/{len(self.phases)} after step {position['step']}")
        return position["step"], list(position["losses"]), ckpt.training["rng"]

    def _after_step(self, index, name, epoch, step, n_steps, losses, optimizer, runner) -> None:
        """A step checkpoint when one is due (train.save_every_*, a stop signal); stop on a signal."""
        save, signum = self.schedule.after_step(step)
        if not save:
            return
        if self.cfg.train.checkpoint:
            r0, rows, elapsed, started = self.progress
            checkpoint.save(self.rd, self.model, self.base_ids, self.method, {
                "finished_tasks": index, "rows": rows, "r0": r0, "row_names": [n for n, _ in self.phases][:index],
                "elapsed_s": elapsed + time.time() - started,
                "step": {"phase": index, "epoch": epoch, "step": step, "losses": losses}},
                self.cfg.train, optimizer, runner.scaler)
            self.schedule.saved()
        if signum is not None:
            raise preemption.Interrupted(signum, f"after step {step}/{n_steps} of task {index + 1}/{len(self.phases)} "
                                                 f"({name})", self.cfg.train.checkpoint)

    def _evaluate(self, stage: int, after: str) -> list[Optional[float]]:
        columns = evaluated_columns(self.cfg.eval.matrix, stage, len(self.scenario.eval_sets), len(self.phases))
        eval_sets = [t for j, t in enumerate(self.scenario.eval_sets) if j in columns]
        total = sum(len(distributed.shard_rows(t.test)) for t in eval_sets)  # this rank's share
        bar = self.out.bar(total, f"eval after {after}")
        t0 = time.time()
        row = []

        def evaluate(task, **kwargs):
            return self.scenario.evaluate(self.model, self.tokenizer, task, self.cfg.eval.batch_size, **kwargs)

        try:
            # FSDP: the whole model on every rank while the ranks evaluate different examples
            with self.method.eval_context(self.model), distributed.autocast(self.device, self.cfg.train.precision), \
                    fsdp.full_parameters(self.model):
                for j, task in enumerate(self.scenario.eval_sets):
                    if j not in columns:
                        row.append(None)  # not evaluated (eval.matrix: diagonal)
                        continue
                    # several processes: each evaluates a strided share, the records are combined on every rank
                    value, record = distributed.evaluate_sharded(evaluate, task, on_batch=bar.update)
                    row.append(value)
                    self.rd.log({"type": "eval", "stage": stage, "after_task": after, "task": task.name, **record})
        finally:
            bar.close()
        self.model.train()
        cells = "  ".join(f"{n} {a:.1f}" for n, a in zip(self.task_names, row) if a is not None)
        self.out.line(f"eval after {after}: {cells}  ({time.time() - t0:.0f}s)")
        return row

    def _summary(self, r0, rows, wall) -> dict:
        mtl = len(self.phases) == 1 and len(self.tasks) > 1
        metrics = self.scenario.summarize(rows, r0, mtl)  # finetune: aa, bwt, fwt, forgetting, diagonal
        prov = provenance()
        return {
            **metrics, "scenario": self.scenario.name,
            "tasks": self.task_names, "row_names": [name for name, _ in self.phases], "matrix": rows, "r0": r0,
            "method": self.cfg.method.name,
            "method_options": dataclasses.asdict(self.cfg.method_options), "lr": self.lr,
            "migu": dataclasses.asdict(self.cfg.migu), "seed": self.cfg.seed, "model": self.cfg.model.name,
            "precision": self.cfg.train.precision, "attention": self.cfg.model.attention,
            "wall_time_s": round(wall, 1), "git_commit": prov["git_commit"], "code": prov["code"], "machine": prov["machine"],
            "versions": prov["versions"],
        }


