"""Order studies: the study engine and its cell cache, results, reports and plots, logging, and
the local runner of W&B sweep files."""

from ppq_lightning.study.cells import Cell, CellCache
from ppq_lightning.study.engine import SEARCH_MODES, OrderStudy
from ppq_lightning.study.logger import log_result
from ppq_lightning.study.plots import plot_report
from ppq_lightning.study.report import write_report
from ppq_lightning.study.result import Budget, StudyResult
from ppq_lightning.study.sweep import agent_command, grid_points, load_sweep, run_sweep

__all__ = [
    "SEARCH_MODES",
    "Budget",
    "Cell",
    "CellCache",
    "OrderStudy",
    "StudyResult",
    "agent_command",
    "grid_points",
    "load_sweep",
    "log_result",
    "plot_report",
    "run_sweep",
    "write_report",
]
