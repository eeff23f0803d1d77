"""The calibration arguments of the methods that read activation statistics."""

from __future__ import annotations

from dataclasses import dataclass

from ppq_lightning.calibration.data import check_num_batches
from ppq_lightning.calibration.engine import check_calibrate_on
from ppq_lightning.calibration.statistics import check_statistics_dtype
from ppq_lightning.modules.config import StageConfig


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(StageConfig):
    """What a calibrated method's statistics depend on (part of its identity).

    Args:
        num_calibration_batches: batches taken from the calibration dataloader.
        calibrate_on: ``"compressed"`` (statistics of the model as compressed so far) or
            ``"original"`` (of the dense model).
        statistics_dtype: ``"float32"`` or ``"float64"``, the precision statistics are summed in.

    Raises:
        PPQConfigError: naming the argument, on a count below 1 or an unknown choice.
    """

    num_calibration_batches: int = 128
    calibrate_on: str = "compressed"
    statistics_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_batches(self.num_calibration_batches)
        check_calibrate_on(self.calibrate_on)
        check_statistics_dtype(self.statistics_dtype)
