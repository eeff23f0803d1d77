"""Predicting the best order of compression stages.

The Progressive Intensity Hypothesis (PIH, Kim et al.): the best order applies the weaker
perturbation first.
"""

from __future__ import annotations


def pih_order(single_stage_metric: dict[str, float]) -> list[str]:
    """The order the Progressive Intensity Hypothesis predicts: weaker perturbation first.

    Args:
        single_stage_metric: ``M`` of the model after each stage applied alone, by stage name.

    Returns:
        Stage names sorted from the weakest perturbation (highest ``M``) to the strongest;
        ties keep the given order.
    """
    return sorted(single_stage_metric, key=lambda name: -single_stage_metric[name])
