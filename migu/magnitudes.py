"""`migu magnitudes`: measure each task's per-layer MIGU magnitude vectors with a run's model.

    model, tokenizer, cfg, method, source = load_trained("runs/x")       # migu.checkpoint: as resume loads it
    mags = collect_task_magnitudes(model, batches, {"threshold": 0.7})   # {layer: L1-normalised vector}
    run_magnitudes("runs/x", n=32)    # magnitudes/<task>.pt + plots/magnitude_*.png, kept_overlap.png

`collect_task_magnitudes` runs forward passes only (under `torch.no_grad()`, model in eval mode) with a
temporary `MIGU` in `observe()` mode, so the vectors are exactly what MIGU ranks during training. The
analysis of the saved files (similarity, kept-unit overlap) is `migu.report.similarity`; it needs no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from migu.checkpoint import load_trained
from migu.core import MIGU
from migu.data import collate, encode, length_grouped_batches
from migu.report.plots import write_magnitude_plots
from migu.report.rundata import ReportError
from migu.report.similarity import MAGNITUDES, task_file_name
from migu.scenarios import get_scenario

__all__ = ["collect_task_magnitudes", "save_task_magnitudes", "load_trained", "task_batches", "run_magnitudes"]


def collect_task_magnitudes(model: torch.nn.Module, encoded_batches: Iterable[dict],
                            migu_kwargs: Optional[dict] = None, progress: bool = False,
                            desc: str = "magnitudes") -> dict[str, torch.Tensor]:
    """Per-layer magnitude vectors of `model` on a task's batches (forward only).

    Args:
        model: the model (its train/eval mode is restored afterwards; no hook is left on it).
        encoded_batches: dicts with `input_ids` and `attention_mask` tensors (from `migu.data.collate`);
            other keys (labels) are ignored.
        migu_kwargs: keyword arguments of `MIGU` (`threshold`, `target_modules`); default all block linears.
        progress: show a tqdm bar.

    Returns:
        {layer name: float32 CPU vector}: `MIGU.magnitudes()` after observing every batch.
    """
    kwargs = dict(migu_kwargs or {})
    kwargs.setdefault("sync", False)
    was_training = model.training
    migu = MIGU(model, **kwargs)
    try:
        model.eval()
        batches = list(encoded_batches) if not hasattr(encoded_batches, "__len__") else encoded_batches
        with torch.no_grad(), migu.observe():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                device = next(model.parameters()).device
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
                model(**inputs, use_cache=False) if _accepts_use_cache(model) else model(**inputs)
        return {name: vec.detach().float().cpu() for name, vec in migu.magnitudes().items()}
    finally:
        migu.remove()
        model.train(was_training)


def _accepts_use_cache(model) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def save_task_magnitudes(magnitudes: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write one task's {layer: vector} dict (`magnitudes/<task>.pt`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().float().cpu().contiguous() for k, v in magnitudes.items()}, tmp)
    tmp.replace(path)
    return path


def task_batches(tokenizer, examples, max_length: int, batch_size: int, seed: int = 0, encoder=None) -> list[dict]:
    """Encoded, length-grouped, padded batches of `examples` (as the runner trains on them).

    `encoder(examples) -> items` replaces the answer-only encoding (a pretrain run's blocks).
    """
    items = encoder(examples) if encoder is not None else encode(tokenizer, examples, max_length)
    order = length_grouped_batches([len(x["input_ids"]) for x in items], batch_size, seed)
    return [collate([items[i] for i in ix], tokenizer.pad_token_id) for ix in order]


def run_magnitudes(run_dir: str | Path, tasks: Optional[Sequence[str]] = None, n: int = 64, split: str = "train",
                   batch_size: int = 8, threshold: Optional[float] = None, base: bool = False,
                   metric: str = "fraction", progress: bool = True,
                   log=lambda text: None) -> list[Path]:
    """`migu magnitudes`: measure each task's magnitudes with the run's model, save them, plot them.

    Writes `<run_dir>/magnitudes/<task>.pt` (first `n` examples of the task's `split`, `n=0`: all) and
    the plots of `write_magnitude_plots` into `<run_dir>/plots/`; returns every file written.
    """
    run_dir = Path(run_dir)
    model, tokenizer, cfg, method, source = load_trained(run_dir, base=base)
    scenario = get_scenario(cfg)  # finetune: the task stream; pretrain: the domains, packed into blocks
    all_tasks = scenario.load_tasks()
    scenario.prepare(tokenizer)
    by_name = {t.name: t for t in all_tasks}
    names = list(tasks) if tasks else [t.name for t in all_tasks]
    for name in names:
        if name not in by_name:
            raise ReportError(f"task {name!r} is not in the run's task stream ({', '.join(by_name)})")
    threshold = cfg.migu.threshold if threshold is None else threshold
    targets = cfg.migu.target_modules or method.migu_target_modules()
    log(f"{run_dir}: magnitudes of {len(names)} task(s) with the {source}")
    written = []
    with method.eval_context(model):
        for name in names:
            examples = getattr(by_name[name], split)
            examples = examples[:n] if n else examples
            if not examples:
                raise ReportError(f"task {name!r} has no {split} examples")
            batches = task_batches(tokenizer, examples, cfg.data.max_length, batch_size, cfg.seed,
                                   encoder=lambda ex: scenario.encode(tokenizer, ex))
            mags = collect_task_magnitudes(model, batches, {"threshold": threshold, "target_modules": targets,
                                                            "lora_b": cfg.migu.lora_b},
                                           progress=progress, desc=f"magnitudes {name}")
            written.append(save_task_magnitudes(mags, run_dir / MAGNITUDES / task_file_name(name)))
    written += write_magnitude_plots(run_dir / MAGNITUDES, run_dir / "plots", threshold=threshold, tasks=names,
                                     metric=metric, title=f"{run_dir.name} ({source})")
    return written
