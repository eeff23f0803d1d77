"""How often does each order predictor pick the exhaustive best order, and at what cost?

For every committed order grid (``docs/results/*/summary.json`` written by
``scripts/order_grid.py``), the grid's own command is parsed again to rebuild its model, data
and stages; the exhaustive result of every pair is read from its ``report.json`` (nothing is
re-evaluated). Predictors:

- ``pih`` (weaker single stage first), ``pih_cer`` (smaller C* first), ``prune_first``: rules,
  read from the report (they need the single-stage cells and the curve the exhaustive study
  measured anyway);
- ``interference`` and ``calibration_kl`` (``ppq_lightning.order.interference``): run here,
  once per pair, on the grid's model: the layer output error of each order on the dense
  calibration inputs / the KL of its outputs from the dense model's on the calibration batches;
  neither evaluates an order on the evaluation data.

A pair counts as *decided* when ``|A|`` exceeds the noise floor (docs/results/README.md):
``--noise_ppl`` of the better order's perplexity (default 1 %), ``--noise_acc`` accuracy
points for classifiers (default 0.003: 6 of 2000 images). Ties are right for any order they
contain. Output: ``predictions.csv``, ``accuracy.md``, ``summary.json``, ``README.md``,
``accuracy.png`` in ``--output``.

    python scripts/order_prediction.py --output docs/results/order_prediction
    python scripts/order_prediction.py --grids '[docs/results/order_grid_block_removal_rtn]' \
        --predictors '[pih, pih_cer, prune_first, calibration_kl]' --score_batches 4 \
        --output docs/results/order_prediction_smollm2_sleb     # SLEB: ~1 h on 2 CPU cores
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from order_grid import grid_parser, grid_points

from ppq_lightning.cli.experiments import (
    command_line,
    instantiate,
    provenance,
    recalibration,
    write_results_readme,
)
from ppq_lightning.order.interference import interference_rankings, reference_score
from ppq_lightning.order.prediction import PREDICTORS
from ppq_lightning.reports import markdown_table, write_json, write_table
from ppq_lightning.study.plots import save_figure

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def committed_grids() -> list[Path]:
    """The result folders written by ``scripts/order_grid.py``, quickest first."""
    grids = []
    for summary in RESULTS.glob("*/summary.json"):
        data = json.loads(summary.read_text())
        if "order_grid.py" in data.get("command", ""):
            grids.append((data.get("seconds", 0.0), summary.parent))
    return [grid for _, grid in sorted(grids)]  # the quickest grids first


def rule_predictions(row: dict[str, Any], names: list[str]) -> dict[str, str]:
    """What the rules predict for one pair, from its exhaustive report row."""
    p, q = names
    predictions = {"pih": row["pih_order"], "prune_first": f"{p}>{q}"}
    cer = {n: row.get(f"C*[{n}]") for n in names}
    if all(isinstance(v, (int, float)) for v in cer.values()):
        predictions["pih_cer"] = ">".join(sorted(names, key=lambda n: cer[n]))
    return predictions


def decided(row: dict[str, Any], metric: str, noise_ppl: float, noise_acc: float) -> bool:
    """Whether the pair's order advantage is above the noise floor."""
    values = [v for k, v in row.items() if k.startswith("order[")]
    if metric == "ppl":
        return abs(row["A"]) > noise_ppl * min(values)
    return abs(row["A"]) > noise_acc


def run_grid(
    grid: Path, predictors: list[str], noise_ppl: float, noise_acc: float, score_batches: int | None
) -> list[dict]:
    summary = json.loads((grid / "summary.json").read_text())
    argv = shlex.split(summary["command"])[2:]  # drop "python scripts/order_grid.py"
    args = instantiate(grid_parser(), argv)
    args.data.setup("validate")
    calibration = list(args.data.calibration_dataloader())[: args.num_calibration_batches]
    report = {r["study"]: r for r in json.loads((grid / "report.json").read_text())["studies"]}
    scorers, dense_seconds = {}, {}
    for name in ("interference", "calibration_kl"):
        if name in predictors:  # one dense pass per grid, shared by its pairs
            start = time.perf_counter()
            scorers[name] = reference_score(args.model, calibration[:score_batches], name)
            dense_seconds[name] = time.perf_counter() - start
    rows = []
    for label, stages in grid_points(args):
        row = report[label]
        names = [s.name for s in stages]
        best = row["best_order"].split("=")
        predicted = rule_predictions(row, names)
        costs = {}
        if scorers:
            tail = [recalibration(args.num_calibration_batches)] if args.bn_recalibration else []
            rankings = interference_rankings(args.model, stages, calibration, scorers, tail=tail)
            for name, ranking in rankings.items():
                predicted[name] = None if ranking is None else ">".join(ranking.top)
                if ranking is not None:
                    costs[f"{name}_seconds"] = ranking.cost["seconds"] + dense_seconds[name]
                    costs[f"{name}_applications"] = ranking.cost["applications"]
        out = {
            "grid": grid.name,
            "pair": label,
            "best": row["best_order"],
            "A": row["A"],
            "decided": decided(row, summary.get("metric") or "ppl", noise_ppl, noise_acc),
        }
        for name in predictors:
            order = predicted.get(name)
            out[name] = None if order is None else order in best
        out.update(costs)
        rows.append(out)
        print(out, flush=True)
    return rows


def accuracy(rows: list[dict], predictors: list[str]) -> list[dict]:
    """Top-1 accuracy of each predictor per grid (and over every grid: ``all``), over all
    pairs and over the decided ones."""
    table = []
    groups = {
        grid: [r for r in rows if r["grid"] == grid]
        for grid in dict.fromkeys(r["grid"] for r in rows)
    }
    for grid, mine in [*groups.items(), ("all", rows)]:
        entry: dict[str, Any] = {"grid": grid, "pairs": len(mine)}
        entry["decided"] = sum(r["decided"] for r in mine)
        for name in predictors:
            judged = [r for r in mine if r[name] is not None]
            strong = [r for r in judged if r["decided"]]
            entry[name] = f"{sum(r[name] for r in judged)}/{len(judged)}" if judged else "n/a"
            entry[f"{name} (decided)"] = (
                f"{sum(r[name] for r in strong)}/{len(strong)}" if strong else "n/a"
            )
        table.append(entry)
    return table


def plot(table: list[dict], predictors: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot()
    width = 0.8 / len(predictors)
    for i, name in enumerate(predictors):
        values = []
        for entry in table:
            cell = entry[f"{name} (decided)"]
            right, total = (int(x) for x in cell.split("/")) if cell != "n/a" else (0, 0)
            values.append(right / total if total else float("nan"))
        axes.bar([j + i * width for j in range(len(table))], values, width, label=name)
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(table))])
    axes.set_xticklabels([e["grid"] for e in table], rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("top-1 right, decided pairs")
    axes.set_ylim(0, 1.05)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="order_prediction.py", description=__doc__)
    parser.add_argument("--output", type=str, required=True)
    parser.add_argument("--grids", type=list[str] | None, default=None, help="default: all")
    parser.add_argument(  # pairwise_kl is calibration_kl on a pair: not run twice
        "--predictors", type=list[str], default=[p for p in PREDICTORS if p != "pairwise_kl"]
    )
    parser.add_argument("--noise_ppl", type=float, default=0.01)
    parser.add_argument("--noise_acc", type=float, default=0.003)
    parser.add_argument(
        "--score_batches",
        type=int | None,
        default=None,
        help="calibration batches the two interference scores read (default: all the grid's; "
        "the stages always calibrate on the grid's own)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    grids = [Path(g) for g in args.grids] if args.grids else committed_grids()
    out = Path(args.output)
    rows: list[dict] = []
    for grid in grids:  # the tables are rewritten after every grid: a long run reports as it goes
        rows += run_grid(grid, args.predictors, args.noise_ppl, args.noise_acc, args.score_batches)
        table = accuracy(rows, args.predictors)
        write_table(rows, out, "predictions", formats=("csv",))
        write_table(table, out, "accuracy", formats=("csv", "md"))
    plot(table, args.predictors, out / "accuracy.png")
    summary = {
        "grids": [g.name for g in grids],
        "noise_ppl": args.noise_ppl,
        "noise_acc": args.noise_acc,
        "seconds": time.perf_counter() - start,
        **provenance(command_line(argv, "scripts/order_prediction.py")),
    }
    write_json(out / "summary.json", summary)
    write_results_readme(
        out,
        "Order prediction against exhaustive search",
        summary["command"],
        markdown_table(table, list(table[0])),
    )
    return summary


if __name__ == "__main__":
    main()
