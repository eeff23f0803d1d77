"""Order science: the order grammar, the order metrics (G, A, C*), order prediction, the stage
protocol studies are written against, and measuring M of a module."""

from ppq_lightning.order.evaluation import evaluate_module, evaluation_dataloader
from ppq_lightning.order.grammar import all_orders, arrange, format_order, parse_order
from ppq_lightning.order.metrics import (
    compression_equivalence_ratio,
    metric_from_perplexity,
    metric_value,
    order_advantage,
    performance_gap,
)
from ppq_lightning.order.prediction import pih_order
from ppq_lightning.order.stage import Stage

__all__ = [
    "Stage",
    "all_orders",
    "arrange",
    "compression_equivalence_ratio",
    "evaluate_module",
    "evaluation_dataloader",
    "format_order",
    "metric_from_perplexity",
    "metric_value",
    "order_advantage",
    "parse_order",
    "performance_gap",
    "pih_order",
]
