"""`compare_migu`: the same run without and with MIGU, and what the loop prints.

    run_comparison(cfg, path, train_one=...)   # <path>/no-migu and <path>/migu, comparison.json
    format_matrix(summary), format_comparison(result)   # the text tables `migu run` prints
    Printer(quiet).line(text) / .bar(total, desc)       # progress on stderr (quiet: nothing)

`train_one(cfg, path, resume, r0, preloaded) -> summary` is the loop (migu.train passes it), so this module
does not import the loop and the loop does not import its caller.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from migu import distributed
from migu.config import RunConfig, to_yaml
from migu.masking import masked_phase
from migu.metrics import METRIC_KEYS
from migu.models import load_model_and_tokenizer, set_attention
from migu.provenance import provenance
from migu.rundir import RunDir
from migu.scenarios import (absolute_paths, format_perplexity_comparison, format_perplexity_matrix, get_scenario,
                            matrix_table)

COMPARE_RUNS = ("no-migu", "migu")


class Printer:
    """Progress bars and one line per phase on stderr (quiet: nothing)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def bar(self, total, desc: str):
        return tqdm(total=total, desc=desc, leave=False, disable=self.quiet or None, file=sys.stderr,
                    dynamic_ncols=True)


def run_comparison(cfg: RunConfig, path: Path, train_one: Callable[..., dict], *, resume: bool = False,
                   overwrite: bool = False, quiet: bool = False) -> dict:
    """`compare_migu`: the same run without and with MIGU into `<path>/no-migu` and `<path>/migu`.

    The untrained evaluation is computed once (by the first run) and shared: the base model, data and
    evaluation are identical. So is the first task under `migu.first_task: skip` (the default): the MIGU
    run starts from a copy of the first run at its first phase boundary (`RunDir.fork`), the result of
    training it again. Resuming continues whichever sub-run is unfinished.
    """
    preloaded = None
    if resume:
        parent = RunDir.open(path, lock=True)  # the parent is written too: one comparison at a time
    else:
        RunDir.check_new(path, overwrite)
        # bad data or a bad model fails here, before anything is deleted; the model goes to the first run
        get_scenario(cfg).load_tasks()
        preloaded = load_model_and_tokenizer(cfg.model.name)
        set_attention(preloaded[0], distributed.resolve_attention(  # an unusable kernel fails here too
            cfg.model.attention, distributed.resolve_device(cfg.train.device), cfg.train.precision))
        parent = RunDir.create(path, overwrite=overwrite)
        parent.write_config(to_yaml(absolute_paths(dataclasses.replace(cfg, output_dir=str(path))), provenance()))
    try:
        summaries, r0 = {}, None
        sub_cfgs = {sub: dataclasses.replace(cfg, compare_migu=False, output_dir=str(path / sub),
                                             migu=dataclasses.replace(cfg.migu, enabled=enabled))
                    for sub, enabled in zip(COMPARE_RUNS, (False, True))}

        def share_first_task(index: int, rd: RunDir) -> None:
            if index == 0 and not masked_phase(sub_cfgs[COMPARE_RUNS[1]].migu, 0):  # both runs train it alike
                if rd.fork(path / COMPARE_RUNS[1], to_yaml(absolute_paths(sub_cfgs[COMPARE_RUNS[1]]), provenance()),
                           {"type": "shared", "stage": 0, "from": COMPARE_RUNS[0], "phases": 1}):
                    Printer(quiet).line(f"{COMPARE_RUNS[1]}/ starts from here: MIGU leaves the first task unmasked "
                                        "(migu.first_task: skip)")

        if distributed.is_main_process():  # a fork cut by a kill: the MIGU run then trains its first task too
            shutil.rmtree(RunDir.fork_temporary(path / COMPARE_RUNS[1]), ignore_errors=True)
        for sub, sub_cfg in sub_cfgs.items():
            distributed.barrier()  # every rank reads the sub-run's state before rank 0 writes it
            rd = RunDir(path / sub)
            state = rd.read_state() if RunDir.is_run_dir(rd.path) else None
            if state is not None and state.get("status") == "done" and rd.read_summary() is not None:
                summaries[sub] = rd.read_summary()
            else:
                Printer(quiet).line(f"== {sub}: {path / sub}")
                resume_sub = RunDir.is_run_dir(rd.path)
                summaries[sub] = train_one(sub_cfg, rd.path, resume_sub, r0, None if resume_sub else preloaded,
                                           share_first_task if sub == COMPARE_RUNS[0] else None)
                preloaded = None  # the first run trained it
            r0 = r0 or summaries[sub].get("r0")
        result = {"runs": summaries, "path": str(path)}
        keys = get_scenario(cfg).metric_keys + ("wall_time_s",)
        parent.write_json("comparison.json", {k: {m: v.get(m) for m in keys}
                                              for k, v in summaries.items()})
    finally:
        parent.unlock()
    return result


# ------------------------------------------------------------------------------------------ tables
def _num(x, width=7) -> str:
    return f"{x:>{width}.1f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def format_matrix(summary: dict) -> str:
    """The accuracy matrix (rows: untrained + one per phase) and AA/BWT/FWT/forgetting as text."""
    if summary.get("scenario") == "pretrain":
        return format_perplexity_matrix(summary)
    metrics = "  ".join(f"{k.upper() if k != 'forgetting' else k} {_num(summary.get(k), 0).strip()}"
                        for k in METRIC_KEYS)
    return matrix_table(summary, "accuracy (%)", 1, metrics)


def format_comparison(result: dict) -> str:
    """Both matrices of a compare_migu run and their metrics side by side."""
    runs = result["runs"]
    parts = []
    for sub, summary in runs.items():
        migu = summary.get("migu", {})
        title = f"MIGU (T={migu.get('threshold')}, {migu.get('mode')})" if migu.get("enabled") else "no MIGU"
        parts += [f"== {title} [{sub}]", format_matrix(summary), ""]
    names = list(runs)
    if any(s.get("scenario") == "pretrain" for s in runs.values()):
        return "\n".join(parts + [format_perplexity_comparison(runs)])
    parts.append("metric".ljust(12) + "".join(n.rjust(10) for n in names))
    for key in METRIC_KEYS + ("wall_time_s",):
        parts.append(key.ljust(12) + "".join(_num(runs[n].get(key), 10) for n in names))
    return "\n".join(parts)
