"""Order prediction for schedules of three and four stages, against exhaustive search.

Each schedule is a list of ``method:value`` stages (``magnitude:0.3`` prunes 30 %,
``rtn:4`` quantizes to 4 bits, ``depgraph:0.2`` removes 20 % of the channels,
``sharing:0.6`` shares a basis keeping 60 % of the weights; methods as in
``scripts/order_grid.py``). Every permutation is evaluated once (``OrderStudy``,
``search="exhaustive"``, one cell folder for all schedules); then each predictor ranks every
order (``search="predict"``, ``top_k=2``: its two orders come from the same cells, nothing is
evaluated twice). Reported per schedule and predictor: whether its top order is the exhaustive
best (ties count for any order they contain) and whether the best is in its top two, over all
schedules and over those whose best order beats the runner-up by more than the noise floor.
A predictor that does not apply to a schedule (``prune_first`` without pruning, the two
interference scores on a stage that needs training) is reported as n/a.

    python scripts/order_prediction_multistage.py --config configs/experiments/fashion_mnist.yaml \\
        --output docs/results/order_prediction_multistage
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from ppq_lightning.callbacks import CompressionCallback, RTNQuantization
from ppq_lightning.callbacks.registry import build_stage as registry_stage
from ppq_lightning.callbacks.registry import parse_spec
from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    recalibration,
    write_results_readme,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.prediction import PREDICTORS
from ppq_lightning.reports import markdown_table, write_json, write_table
from ppq_lightning.study.engine import OrderStudy

DEFAULT_SCHEDULES = [
    ["magnitude:0.3", "rtn:3", "magnitude:0.6"],  # P1 > Q > P2 split
    ["wanda:0.3", "rtn:3", "wanda:0.6"],
    ["rtn:8", "rtn:4", "rtn:3"],  # Q8 > Q4 > Q3 progression
    ["magnitude:0.5", "rtn:3", "depgraph:0.2"],  # unstructured + structured + Q
    ["magnitude:0.3", "rtn:4", "magnitude:0.6", "rtn:3"],  # four stages, 24 orders
]


def build_stage(spec: str, n: int, b_orig: int, taken: Counter) -> CompressionCallback:
    """One stage from a registry spec with an intensity, ``method:value[,argument=value...]``
    (``ppq_lightning.callbacks.registry``); names are ``P30``, ``Q4``, ``S60`` (the method's
    letter and its intensity; ``P30b`` when a name repeats). Basis sharing shares pairs of
    layers unless the spec says ``group_size``.

    Raises:
        PPQConfigError: on a spec without an intensity, or one the registry refuses.
    """
    found, number, arguments = parse_spec(spec, argument="schedule stage")
    if number is None:
        raise PPQConfigError(f"schedule stage {spec!r}: expected method:value, e.g. 'rtn:4'")
    scaled = number if found.letter == "Q" else number * 100
    name = f"{found.letter}{round(scaled)}"
    taken[name] += 1
    name += "" if taken[name] == 1 else "bcdefgh"[taken[name] - 2]
    extra = {"group_size": 2} if found.name == "sharing" and "group_size" not in arguments else {}
    return registry_stage(
        spec,
        argument="schedule stage",
        num_calibration_batches=n,
        name=name,
        log_layers=False,
        b_orig=b_orig,
        **extra,
    )


def judge(orders: dict[str, float], ranking: list[str], noise: float) -> dict[str, Any]:
    """Top-1 / top-2 against the measured orders (higher M is better; ties are exact)."""
    best = max(orders.values())
    winners = {o for o, m in orders.items() if m == best}
    runner_up = max((m for o, m in orders.items() if o not in winners), default=best)
    return {
        "best": "=".join(sorted(winners)),
        "margin": best - runner_up,
        "decided": best - runner_up > noise,
        "top1": ranking[0] in winners,
        "top2": bool(winners & set(ranking[:2])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--schedules", type=list[list[str]], default=DEFAULT_SCHEDULES)
    parser.add_argument("--predictors", type=list[str], default=list(PREDICTORS))
    parser.add_argument("--curve_bits", type=list[int], default=[8, 6, 4, 3, 2])
    parser.add_argument("--bn_recalibration", type=bool, default=False)
    parser.add_argument(
        "--noise",
        type=float,
        default=0.003,
        help="noise floor on M (accuracy points; for perplexity pass a value in ppl units)",
    )
    args = instantiate(parser, argv)
    start = time.perf_counter()
    out = Path(args.output)
    n = args.num_calibration_batches
    b_orig = getattr(args.model, "b_orig", 16)
    curve = RTNQuantization.curve(args.curve_bits, b_orig=b_orig)
    tail = [recalibration(n, b_orig=b_orig)] if args.bn_recalibration else []
    rows = []
    for schedule in args.schedules:
        taken: Counter = Counter()
        stages = [build_stage(s, n, b_orig, taken) for s in schedule]
        label = "_".join(spec.replace(":", "") for spec in schedule)  # methods differ by name
        common = dict(curve=curve, output_dir=out, label=label, tail=tail)
        exhaustive = OrderStudy(args.model, args.data, stages, **common).run()
        measured = {o: c.M for o, c in exhaustive.orders.items()}
        row: dict[str, Any] = {"schedule": label, "orders": len(measured)}
        cells = list(exhaustive.cells())  # what exhaustive search costs, cached or not
        row["exhaustive_evaluations"] = len(cells)
        row["exhaustive_seconds"] = round(sum(c.seconds for c in cells), 1)
        outcome = judge(measured, list(measured), args.noise)
        row.update(best=outcome["best"], margin=outcome["margin"], decided=outcome["decided"])
        for name in args.predictors:
            study = OrderStudy(
                args.model, args.data, stages, search="predict", predictor=name, top_k=2, **common
            )
            try:
                prediction = study.run().prediction
            except PPQConfigError as error:  # the predictor does not apply to these stages
                print(f"{label}: {name} does not apply: {error}", flush=True)
                row[f"{name} top1"] = row[f"{name} top2"] = None
                continue
            ranking = [o["order"] for o in prediction["orders"]]
            verdict = judge(measured, ranking, args.noise)
            row[f"{name} top1"], row[f"{name} top2"] = verdict["top1"], verdict["top2"]
            row[f"{name} predicted"] = ranking[0]
            cost = prediction["cost"]  # evaluations to rank (singles, curve), not the top-2's
            row[f"{name} evaluations"] = cost["evaluations"] + cost["single_evaluations"]
            row[f"{name} seconds"] = round(cost.get("seconds", 0.0), 1)
        rows.append(row)
        print(row, flush=True)
        write_table(rows, out, "predictions", formats=("csv",))
    table = accuracy(rows, args.predictors)
    write_table(table, out, "accuracy", formats=("csv", "md"))
    summary = {
        "schedules": [r["schedule"] for r in rows],
        "noise": args.noise,
        "seconds": time.perf_counter() - start,
        **provenance(command_line(argv, "scripts/order_prediction_multistage.py")),
    }
    write_json(out / "summary.json", summary)
    write_results_readme(
        out,
        "Order prediction for 3-4 stage schedules",
        summary["command"],
        markdown_table(rows),
        markdown_table(table, list(table[0])),
    )
    return summary


def accuracy(rows: list[dict], predictors: list[str]) -> list[dict]:
    """Per predictor: top-1 and best-in-top-2 counts, over all schedules and the decided ones."""
    table = []
    for name in predictors:
        judged = [r for r in rows if r.get(f"{name} top1") is not None]
        strong = [r for r in judged if r["decided"]]
        entry = {"predictor": name}
        for label, group in (("all", judged), ("decided", strong)):
            for k in ("top1", "top2"):
                hits = sum(r[f"{name} {k}"] for r in group)
                entry[f"{k} ({label})"] = f"{hits}/{len(group)}" if group else "n/a"
        table.append(entry)
    return table


if __name__ == "__main__":
    main()
