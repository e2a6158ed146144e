r"""Aggregate the ``metrics.json`` files of finished runs into a markdown table.

Each run of ``moegraph-train`` writes ``metrics.json`` (metrics and resolved
config) into its output folder. This groups runs by ``task_name`` and prints
mean +- std of the chosen metrics over seeds::

    moegraph-train -m experiment=synthetic_moe_gnn,synthetic_gnn seed=0,1,2 \
        hydra.sweep.dir=outputs/sweep
    python experiments/summarize_runs.py outputs/sweep --out experiments/results/synthetic.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load_runs(root: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.rglob("metrics.json")):
        record = json.loads(path.read_text())
        groups[record["config"].get("task_name", "?")].append(record)
    return groups


def mean_std(values: list[float], scale: float) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summarize(groups: dict[str, list[dict]], metrics: list[str]) -> str:
    head = "| run | seeds | " + " | ".join(metrics) + " | fit time (s) |"
    lines = [head, "|---" * (len(metrics) + 3) + "|"]
    for name, runs in sorted(groups.items()):
        cells = []
        for metric in metrics:
            values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
            cells.append(mean_std(values, 100.0 if metric.endswith(("acc", "auc")) else 1.0))
        fit = mean_std([r["metrics"].get("time/fit_seconds", float("nan")) for r in runs], 1.0)
        seeds = ",".join(str(r["config"].get("seed")) for r in runs)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder searched for metrics.json")
    parser.add_argument("--metrics", nargs="+", default=["test/acc", "val/acc"])
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    groups = load_runs(args.root)
    if not groups:
        sys.exit(f"no metrics.json under {args.root}")
    table = summarize(groups, args.metrics)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python experiments/summarize_runs.py " + " ".join(argv or sys.argv[1:])
        args.out.write_text(f"# Runs under {args.root}\n\n- command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
