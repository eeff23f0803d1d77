"""Compression methods as Lightning callbacks. List order in ``Trainer(callbacks=...)`` is
compression order."""

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.basis_sharing import BasisSharing
from ppq_lightning.callbacks.batchnorm import BatchNormRecalibration, FoldBatchNorm
from ppq_lightning.callbacks.block_removal import BlockRemoval
from ppq_lightning.callbacks.calibrated import CalibratedCompression
from ppq_lightning.callbacks.channel_pruning import ChannelPruning
from ppq_lightning.callbacks.dead_zone import DeadZoneQuantization
from ppq_lightning.callbacks.depgraph_pruning import DepGraphPruning
from ppq_lightning.callbacks.gptq import GPTQ
from ppq_lightning.callbacks.joint_search import JointStructuralMixedPrecision
from ppq_lightning.callbacks.lora import LoRAFineTune
from ppq_lightning.callbacks.magnitude_pruning import MagnitudePruning
from ppq_lightning.callbacks.qat import QuantizationAwareTraining
from ppq_lightning.callbacks.rtn_quantization import RTNQuantization
from ppq_lightning.callbacks.schedule import CompressionSchedule
from ppq_lightning.callbacks.sparsegpt import SparseGPT
from ppq_lightning.callbacks.sqs import SQS
from ppq_lightning.callbacks.stage import StageResult
from ppq_lightning.callbacks.wanda import Wanda

__all__ = [
    "GPTQ",
    "SQS",
    "BasisSharing",
    "BatchNormRecalibration",
    "BlockRemoval",
    "CalibratedCompression",
    "ChannelPruning",
    "CompressionCallback",
    "CompressionSchedule",
    "DeadZoneQuantization",
    "DepGraphPruning",
    "FoldBatchNorm",
    "JointStructuralMixedPrecision",
    "LoRAFineTune",
    "MagnitudePruning",
    "QuantizationAwareTraining",
    "RTNQuantization",
    "SparseGPT",
    "StageResult",
    "Wanda",
]
