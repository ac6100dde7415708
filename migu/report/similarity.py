"""Magnitude analysis: which units each task uses, and how much the tasks share (the paper's Figure 5).

    mags = load_magnitudes("runs/x/magnitudes")          # {task: {layer: L1-normalised vector}}
    similarity_matrix(mags), overlap_by_layer(mags, 0.7)

The files are written by `migu.magnitudes` (`migu magnitudes RUN_DIR`): its `collect_task_magnitudes` runs forward passes only (under `torch.no_grad()`, model in eval mode) with a
temporary `MIGU` in `observe()` mode, so the vectors are exactly what MIGU ranks during training:
per layer (unit), the mean |output| of each output unit over the non-padding tokens of all batches,
L1-normalised. `magnitudes/<task>.pt` holds that dict ({layer name: float32 1-D tensor}).

From such files:
    similarity   task × task cosine similarity of the vectors, per layer, averaged over the layers
                 (`similarity_matrix`; `layer_types` splits by projection, e.g. q_proj / down_proj)
    overlap      per layer and task pair, the overlap of the kept-unit sets (top ceil((1-T)·d) units, MIGU's
                 rule): `fraction` = |A∩B| / k (chance level k/d = 1-T), or `jaccard` = |A∩B| / |A∪B|
Figures (migu.report.plots.write_magnitude_plots): magnitude_similarity.png (heatmap, values in cells), magnitude_similarity_by_type.png (one small
heatmap per layer type), kept_overlap.png (layers × task pairs heatmap and one line per pair, with chance).
"""


from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from migu.core import keep_count
from migu.report.rundata import ReportError

MAGNITUDES = "magnitudes"


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
def common_layers(mags: dict[str, dict[str, torch.Tensor]], layers: Optional[Sequence[str]] = None) -> list[str]:
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
    common = common_layers(mags, layers)
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
    common = common_layers(mags)
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
    layers = common_layers(mags)
    pairs = list(itertools.combinations(tasks, 2))
    values = [[kept_overlap(mags[a][n], mags[b][n], threshold, metric) for a, b in pairs] for n in layers]
    return layers, pairs, values
