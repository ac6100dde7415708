"""Reports read from run directories only (files, no model): plots, tables, comparisons.

    from migu.report import write_run_plots, load_run, ReportError
    write_run_plots("runs/quickstart-seq-ft-compare-s0/migu")   # plots/*.png of one run

Modules: `rundata` (reading run directories), `tables` (report.md, `migu compare`), `plots` (a run's PNGs
and the magnitude figures), `similarity` (task similarity from magnitudes/*.pt), `paper` (the paper's AA).
Commands that run a model or train live outside: `migu.magnitudes`, `migu.sweep`; the CLI is `migu.cli`.
"""

from migu.report.plots import write_run_plots
from migu.report.rundata import ReportError, Run, find_run_dirs, load_run

__all__ = ["ReportError", "Run", "find_run_dirs", "load_run", "write_run_plots"]
