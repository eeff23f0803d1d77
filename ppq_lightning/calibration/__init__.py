"""Calibration: the sequential layer-wise engine, block discovery, layer statistics, block
scoring (SLEB), calibration data and data-parallel reduction."""

from ppq_lightning.calibration.blocks import find_blocks, without_blocks
from ppq_lightning.calibration.capture import BlockInputs, capture_block_inputs
from ppq_lightning.calibration.data import (
    batch_input,
    calibration_batches,
    check_num_batches,
    default_forward,
)
from ppq_lightning.calibration.engine import (
    CALIBRATE_ON,
    CalibrationReport,
    calibrate_sequentially,
    check_calibrate_on,
    observing,
)
from ppq_lightning.calibration.scoring import candidate_losses, greedy_block_removal
from ppq_lightning.calibration.statistics import LayerStatistics, check_statistics_dtype

__all__ = [
    "CALIBRATE_ON",
    "BlockInputs",
    "CalibrationReport",
    "LayerStatistics",
    "batch_input",
    "calibrate_sequentially",
    "calibration_batches",
    "candidate_losses",
    "capture_block_inputs",
    "check_calibrate_on",
    "check_num_batches",
    "check_statistics_dtype",
    "default_forward",
    "find_blocks",
    "greedy_block_removal",
    "observing",
    "without_blocks",
]
