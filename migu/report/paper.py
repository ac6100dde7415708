"""The paper's published AA (migu/assets/paper_results.csv) beside a run's, for `migu compare`.

A run matches a row by model (the name's last path component, e.g. `t5-large` for
`google-t5/t5-large` or `/models/t5-large`), benchmark, method and MIGU on/off; its order's row when
the paper published one, else the benchmark's average over orders (the `order` column says which).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

PAPER_CSV = Path(__file__).resolve().parent.parent / "assets" / "paper_results.csv"


def paper_rows(path: Path = PAPER_CSV) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def paper_aa(model: str, benchmark: str, order, method: str, migu: bool,
             rows: Optional[list[dict]] = None) -> Optional[tuple[float, str]]:
    """(the paper's AA, "order N" or "avg") for a run's setting, or None when the paper has no such number."""
    short = Path(str(model)).name.lower()
    matches = [r for r in (rows if rows is not None else paper_rows())
               if r["model"] == short and r["benchmark"] == benchmark and r["method"] == method
               and (r["migu"] == "true") == bool(migu)]
    for wanted in (str(order), "avg"):
        for r in matches:
            if r["order"] == wanted:
                return float(r["aa"]), ("avg" if wanted == "avg" else f"order {wanted}")
    return None


def paper_lines(runs) -> list[str]:
    """One line per run that the paper has a number for: `name  AA x  paper y (scope)`."""
    lines = []
    for run in runs:
        data = run.config.get("data") or {}
        if data.get("stream") or data.get("tasks"):
            continue  # not a published benchmark order
        model = (run.config.get("model") or {}).get("name", "")
        hit = paper_aa(model, data.get("benchmark", "standard"), data.get("order", 1), run.method,
                       run.migu_enabled)
        if hit is not None:
            aa = run.summary.get("aa")
            ours = f"{aa:.1f}" if isinstance(aa, (int, float)) else "-"
            lines.append(f"{run.name} ({run.label}): AA {ours}   paper {hit[0]:.1f} ({hit[1]})")
    return lines
