"""Magnitude analysis: which units each task uses, and how much the tasks share (the paper's Figure 5).

    mags = collect_task_magnitudes(model, batches, {"threshold": 0.7})   # {layer: L1-normalised vector}
    save_task_magnitudes(mags, "runs/x/magnitudes/agnews.pt")
    write_magnitude_plots("runs/x/magnitudes", "runs/x/plots", threshold=0.7)

`collect_task_magnitudes` runs forward passes only (under `torch.no_grad()`, model in eval mode) with a
temporary `MIGU` in `observe()` mode, so the vectors are exactly what MIGU ranks during training:
per layer (unit), the mean |output| of each output unit over the non-padding tokens of all batches,
L1-normalised. `magnitudes/<task>.pt` holds that dict ({layer name: float32 1-D tensor}).

From such files:
    similarity   task × task cosine similarity of the vectors, per layer, averaged over the layers
                 (`similarity_matrix`; `layer_types` splits by projection, e.g. q_proj / down_proj)
    overlap      per layer and task pair, the overlap of the kept-unit sets (top ceil((1-T)·d) units, MIGU's
                 rule): `fraction` = |A∩B| / k (chance level k/d = 1-T), or `jaccard` = |A∩B| / |A∪B|
Figures: magnitude_similarity.png (heatmap, values in cells), magnitude_similarity_by_type.png (one small
heatmap per layer type), kept_overlap.png (layers × task pairs heatmap and one line per pair, with chance).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from migu.core import MIGU, keep_count
from migu.report.plots import heatmap, new_figure, save
from migu.report.rundata import ReportError

MAGNITUDES = "magnitudes"


# ------------------------------------------------------------------------------------------ collect
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
    from tqdm.auto import tqdm

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


def task_file_name(task: str) -> str:
    """`<task>.pt`, with characters unsafe in file names replaced."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", task) + ".pt"


def load_magnitudes(directory: str | Path, tasks: Optional[Sequence[str]] = None,
                    task_order: Optional[Sequence[str]] = None) -> dict[str, dict[str, torch.Tensor]]:
    """{task: {layer: vector}} from `directory/*.pt`.

    Args:
        tasks: load only these (in this order); a missing one is an error.
        task_order: otherwise, order the files by this list (e.g. the run's task order), others after.

    Raises:
        ReportError: no such directory, a missing task file, or a file that is not a {layer: vector} dict.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory}: no such magnitudes directory (run `migu magnitudes RUN_DIR` first)")
    files = {p.stem: p for p in directory.glob("*.pt")}
    if tasks:
        names = list(tasks)
        for name in names:
            if Path(task_file_name(name)).stem not in files:
                raise ReportError(f"{directory / task_file_name(name)}: missing (no magnitudes for task {name!r})")
        chosen = [(n, files[Path(task_file_name(n)).stem]) for n in names]
    else:
        order = {Path(task_file_name(t)).stem: i for i, t in enumerate(task_order or [])}
        chosen = sorted(files.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    out = {}
    for name, path in chosen:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt file
            raise ReportError(f"{path}: unreadable magnitudes file ({type(err).__name__})") from None
        if not isinstance(data, dict) or not data or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() == 1 for k, v in data.items()):
            raise ReportError(f"{path}: expected a non-empty {{layer name: 1-D tensor}} dict")
        out[name] = {k: v.float() for k, v in data.items()}
    return out


# ------------------------------------------------------------------------------------------ analysis
def _common_layers(mags: dict[str, dict[str, torch.Tensor]], layers: Optional[Sequence[str]] = None) -> list[str]:
    tasks = list(mags)
    if not tasks:
        return []
    common = [name for name in mags[tasks[0]] if all(name in mags[t] for t in tasks[1:])]
    if layers is not None:
        common = [name for name in common if name in set(layers)]
    for name in common:
        sizes = {mags[t][name].numel() for t in tasks}
        if len(sizes) > 1:
            raise ReportError(f"layer {name!r} has different sizes across tasks: {sorted(sizes)}")
    return common


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (float64); 0 when either is all zeros."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def similarity_matrix(mags: dict[str, dict[str, torch.Tensor]], layers: Optional[Sequence[str]] = None,
                      centered: bool = False) -> tuple[list[str], list[list[float]]]:
    """(tasks, S) with S[i][j] = mean over the common layers of cosine(mags[i][layer], mags[j][layer]).

    `centered=True` subtracts each vector's mean first (Pearson correlation): magnitude vectors are all
    positive and share a common profile, so plain cosines sit close to 1; the centred version shows how
    differently two tasks rank the units.
    """
    tasks = list(mags)
    common = _common_layers(mags, layers)
    if not common:
        raise ReportError("no layer is shared by every task's magnitudes")

    def vec(task, name):
        v = mags[task][name].double()
        return v - v.mean() if centered else v

    S = [[0.0] * len(tasks) for _ in tasks]
    for i, j in itertools.combinations_with_replacement(range(len(tasks)), 2):
        value = sum(cosine(vec(tasks[i], n), vec(tasks[j], n)) for n in common) / len(common)
        S[i][j] = S[j][i] = value
    return tasks, S


def similarity_range(matrices: Iterable[Sequence[Sequence[float]]]) -> float:
    """A colour-scale minimum that spreads the observed values (cosines of magnitudes are often > 0.95)."""
    low = min(min(min(row) for row in m) for m in matrices)
    return max(-1.0, low - 0.25 * (1.0 - low)) if low < 1.0 else 0.0


def layer_type(name: str) -> str:
    """The projection a unit belongs to: `model.layers.3.self_attn.q_proj` → `q_proj`; LoRA units keep
    their side: `...q_proj.lora_A.default` → `q_proj.lora_A`."""
    parts = name.split(".")
    for side in ("lora_A", "lora_B"):
        if side in parts:
            i = parts.index(side)
            return f"{parts[i - 1]}.{side}" if i > 0 else side
    return parts[-1]


def layer_index(name: str) -> Optional[int]:
    """The block number in a unit name (`model.layers.3.mlp.up_proj` → 3), or None."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def layer_types(names: Iterable[str]) -> dict[str, list[str]]:
    """{type: [layer names]} in first-seen order."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(layer_type(name), []).append(name)
    return out


def similarity_by_layer_type(mags: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[list[float]]]:
    """{layer type: task × task mean cosine over the layers of that type}."""
    common = _common_layers(mags)
    return {kind: similarity_matrix(mags, names)[1] for kind, names in layer_types(common).items()}


def kept_set(vector: torch.Tensor, threshold: float) -> set[int]:
    """Indices of the units MIGU keeps: the top ceil((1-T)·d) by magnitude, ties to the lower index."""
    k = keep_count(threshold, vector.numel())
    order = torch.sort(vector.detach().float().cpu(), descending=True, stable=True).indices[:k]
    return set(order.tolist())


def kept_overlap(a: torch.Tensor, b: torch.Tensor, threshold: float, metric: str = "fraction") -> float:
    """Overlap of two tasks' kept-unit sets: `fraction` = |A∩B| / k or `jaccard` = |A∩B| / |A∪B|."""
    A, B = kept_set(a, threshold), kept_set(b, threshold)
    if metric == "fraction":
        return len(A & B) / len(A)
    if metric == "jaccard":
        return len(A & B) / len(A | B)
    raise ValueError(f"overlap metric must be 'fraction' or 'jaccard', got {metric!r}")


def chance_overlap(d: int, threshold: float, metric: str = "fraction") -> float:
    """Expected overlap of two random k-subsets of d units (k = keep_count(T, d))."""
    k = keep_count(threshold, d)
    expected = k * k / d  # E|A∩B|
    return expected / k if metric == "fraction" else expected / (2 * k - expected)


def overlap_by_layer(mags: dict[str, dict[str, torch.Tensor]], threshold: float, metric: str = "fraction"
                     ) -> tuple[list[str], list[tuple[str, str]], list[list[float]]]:
    """(layers, task pairs, O) with O[l][p] = kept_overlap of pair p on layer l."""
    tasks = list(mags)
    if len(tasks) < 2:
        raise ReportError("the kept-unit overlap needs the magnitudes of at least two tasks")
    layers = _common_layers(mags)
    pairs = list(itertools.combinations(tasks, 2))
    values = [[kept_overlap(mags[a][n], mags[b][n], threshold, metric) for a, b in pairs] for n in layers]
    return layers, pairs, values


# ------------------------------------------------------------------------------------------ plots
def plot_similarity(tasks: Sequence[str], S: Sequence[Sequence[float]], title: str = "", n_layers: int = 0,
                    centered: Optional[Sequence[Sequence[float]]] = None):
    """Task × task cosine-similarity heatmap (values in the cells); with `centered`, a second panel of the
    centred (Pearson) similarities. The colour scale starts just below the smallest value."""
    n = len(tasks)
    panels = [("cosine similarity", S)] + ([("centred cosine (Pearson r)", centered)] if centered is not None else [])
    fig = new_figure(len(panels) * max(4.6, 0.9 * n + 2.8) + 0.4, max(4.0, 0.8 * n + 2.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, M) in zip(axes, panels):
        heatmap(ax, M, tasks, tasks, vmin=similarity_range([M]), vmax=1.0, cmap="magma", digits=3,
                cbar_label=label, fig=fig)
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        ax.set_title(label, fontsize=10)
    layers = f" (mean over {n_layers} layers)" if n_layers else ""
    fig.suptitle((f"{title}\n" if title else "") + f"How similar are the tasks' magnitude vectors?{layers}",
                 fontsize=10)
    return fig


def plot_similarity_by_type(tasks: Sequence[str], by_type: dict[str, list[list[float]]], title: str = ""):
    """One small task × task heatmap per layer type (shared colour scale)."""
    kinds = list(by_type)
    cols = min(4, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    n = len(tasks)
    fig = new_figure(cols * max(2.6, 0.55 * n + 1.6) + 1.0, rows * max(2.4, 0.5 * n + 1.5) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmin = similarity_range(by_type.values())
    image = None
    for ax, kind in zip(axes.flat, kinds):
        image = heatmap(ax, by_type[kind], tasks, tasks, vmin=vmin, vmax=1.0, cmap="magma", digits=2,
                        annotate=n <= 6)
        ax.set_title(kind, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle((f"{title} — " if title else "") + "magnitude cosine similarity by layer type", fontsize=10)
    return fig


def plot_overlap(layers: Sequence[str], pairs: Sequence[tuple[str, str]], values: Sequence[Sequence[float]],
                 threshold: float, metric: str = "fraction", title: str = "",
                 sizes: Optional[Sequence[int]] = None):
    """Kept-unit overlap: a layers × task-pairs heatmap (top) and one line per pair over layers (bottom).

    `sizes` (units per layer) adds the chance level of two random kept sets as a dashed line.
    """
    import numpy as np

    data = np.array(values, dtype=float).T  # pairs × layers
    pair_names = [f"{a} ∩ {b}" for a, b in pairs]
    n_layers = len(layers)
    fig = new_figure(max(8.0, min(18.0, 0.09 * n_layers + 5.0)), 3.0 + 0.35 * len(pairs) + 3.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[max(1.0, 0.35 * len(pairs) + 0.8), 3.0])
    image = top.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    top.set_yticks(range(len(pairs)), labels=pair_names, fontsize=8)
    ticks = _layer_ticks(layers)
    top.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks], fontsize=7, rotation=90)
    top.set_title("overlap of kept-unit sets per layer (columns: layers in model order)", fontsize=9)
    fig.colorbar(image, ax=top, label="|A∩B|/k" if metric == "fraction" else "Jaccard", shrink=0.9)
    blocks = [layer_index(n) for n in layers]
    by_block = n_layers > 40 and None not in blocks  # many units: one point per block (mean over its units)
    if by_block:
        xs = sorted(set(blocks))
        groups = [[i for i, b in enumerate(blocks) if b == x] for x in xs]
    else:
        xs = list(range(n_layers))
        groups = [[i] for i in xs]
    for p, name in enumerate(pair_names):
        bottom.plot(xs, [float(data[p, g].mean()) for g in groups], linewidth=1.2,
                    marker="." if len(xs) <= 60 else None, label=name)
    if sizes is not None:
        chance = [float(np.mean([chance_overlap(int(sizes[i]), threshold, metric) for i in g])) for g in groups]
        bottom.plot(xs, chance, color="black", linestyle="--", linewidth=1.0, label="chance (random sets)")
    if by_block:
        step = max(1, math.ceil(len(xs) / 40))
        bottom.set_xticks(xs[::step], labels=[str(x) for x in xs[::step]], fontsize=7)
        bottom.set_xlabel("block (mean over the block's ranked layers)")
        bottom.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    else:
        bottom.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks], fontsize=7, rotation=90)
        bottom.set_xlabel("layer (unit ranked by MIGU)")
        bottom.set_xlim(-0.5, n_layers - 0.5)
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("|A∩B| / k" if metric == "fraction" else "Jaccard |A∩B|/|A∪B|")
    bottom.grid(alpha=0.3)
    fig.legend(*bottom.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(pairs) + 1),
               fontsize=8, frameon=False)
    fig.suptitle((f"{title}\n" if title else "") + f"kept units per task (top {100 * (1 - threshold):.0f}% by "
                 f"magnitude, T={threshold:g}): how much do two tasks share?", fontsize=10)
    return fig


def _layer_ticks(layers: Sequence[str]) -> list[tuple[int, str]]:
    """At most ~40 x ticks: every layer when few, else the first unit of each block."""
    if len(layers) <= 40:
        return [(i, _short(n)) for i, n in enumerate(layers)]
    ticks, seen = [], set()
    for i, name in enumerate(layers):
        block = layer_index(name)
        if block not in seen:
            seen.add(block)
            ticks.append((i, f"block {block}" if block is not None else _short(name)))
    step = max(1, math.ceil(len(ticks) / 40))
    return ticks[::step]


def _short(name: str) -> str:
    block = layer_index(name)
    kind = layer_type(name)
    return f"{block}.{kind}" if block is not None else kind


def write_magnitude_plots(directory: str | Path, out_dir: str | Path, threshold: float = 0.7,
                          tasks: Optional[Sequence[str]] = None, task_order: Optional[Sequence[str]] = None,
                          metric: str = "fraction", title: str = "") -> list[Path]:
    """Similarity and overlap plots from `directory/*.pt` into `out_dir`; returns the PNG paths.

    Needs two or more tasks (one task: nothing to compare, returns []).
    """
    mags = load_magnitudes(directory, tasks, task_order)
    if len(mags) < 2:
        return []
    out_dir = Path(out_dir)
    names, S = similarity_matrix(mags)
    _, C = similarity_matrix(mags, centered=True)
    n_layers = len(_common_layers(mags))
    written = [save(plot_similarity(names, S, title, n_layers, C), out_dir / "magnitude_similarity.png")]
    by_type = similarity_by_layer_type(mags)
    if len(by_type) > 1:
        written.append(save(plot_similarity_by_type(names, by_type, title),
                            out_dir / "magnitude_similarity_by_type.png"))
    layers, pairs, values = overlap_by_layer(mags, threshold, metric)
    sizes = [mags[names[0]][n].numel() for n in layers]
    written.append(save(plot_overlap(layers, pairs, values, threshold, metric, title, sizes),
                        out_dir / "kept_overlap.png"))
    return written


# ------------------------------------------------------------------------------------------ a run
def load_run_model(run_dir: str | Path, base: bool = False):
    """(model, tokenizer, cfg, method, source) of a run: its last checkpoint, or the base model.

    The checkpoint (checkpoints/last: the state after the last finished task) is loaded the way the
    runner resumes: base model → `method.setup` → method state → saved parameters. Without a
    checkpoint, or with `base=True`, the base model named in config.yaml is returned (no method setup).
    """
    from migu.config import load_config
    from migu.methods import get_method
    from migu.models import load_model_and_tokenizer
    from migu.rundir import RunDir

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{run_dir / 'config.yaml'}: missing (needed to know the run's model and tasks)")
    cfg = load_config(run_dir / "config.yaml")
    method = get_method(cfg.method.name)(cfg.method_options)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name)
    checkpoint = None if base else RunDir(run_dir).load_checkpoint()
    source = f"base model {cfg.model.name}"
    if checkpoint is not None:
        tensors, method_state, meta = checkpoint
        model = method.setup(model)
        method.load_state_dict(method_state)
        params = dict(model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise ReportError(f"{run_dir / 'checkpoints' / 'last'}: parameter {missing[0]!r} is not in the model")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        source = f"checkpoint after {meta.get('finished_tasks', '?')} finished phase(s)"
    model.eval()
    return model, tokenizer, cfg, method, source


def task_batches(tokenizer, examples, max_length: int, batch_size: int, seed: int = 0, encoder=None) -> list[dict]:
    """Encoded, length-grouped, padded batches of `examples` (as the runner trains on them).

    `encoder(examples) -> items` replaces the answer-only encoding (a pretrain run's blocks).
    """
    from migu.data import collate, encode, length_grouped_batches

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
    from migu.scenarios import get_scenario

    run_dir = Path(run_dir)
    model, tokenizer, cfg, method, source = load_run_model(run_dir, base=base)
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
