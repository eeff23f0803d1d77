"""Sending a study's outcome to a Lightning logger (W&B, CSV, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppq_lightning.study.result import StudyResult


def log_result(result: StudyResult, logger: Any | None, report_dir: str | Path) -> None:
    """Send a study's outcome to a Lightning logger: ``result/<metric>`` etc. of its best (or
    only) order as scalars (the key a W&B sweep optimises), and, on a ``WandbLogger``, the study
    table and the plots of ``report_dir`` as ``wandb.Table`` / ``wandb.Image``."""
    if logger is None:
        return
    best = result.best
    scalars = {
        f"result/{result.metric}": best.value,
        "result/measured_C": best.measured_C,
        "result/nominal_C": best.nominal_C,
        "result/evaluations": float(result.budget.evaluations),
        "result/applications": float(result.budget.applications),
    }
    scalars.update({f"result/{k}": float(v) for k, v in result.pair.items()})
    if result.pih_correct is not None:
        scalars["result/pih_correct"] = float(result.pih_correct)
    logger.log_metrics(scalars)
    if hasattr(logger, "log_table"):  # WandbLogger
        rows = [c.row() for c in result.cells()]
        logger.log_table(
            key=f"study/{result.label}/cells",
            columns=list(rows[0]),
            data=[list(r.values()) for r in rows],
        )
    if hasattr(logger, "log_image"):
        images = sorted(Path(report_dir).glob("*.png"))
        if images:
            logger.log_image(key=f"study/{result.label}/plots", images=[str(p) for p in images])
    logger.save()
