r"""Aggregate the ``metrics.json`` files of finished runs into a markdown table.

Each run of ``moegraph-train`` writes ``metrics.json`` (metrics and resolved
config) into its output folder, and Hydra saves the run's command-line
overrides beside it (``.hydra/overrides.yaml``). Runs are grouped by every
override that differs between them, except those averaged over (``--over``,
default ``seed``); each group's row gives mean ± std of the chosen metrics::

    moegraph-train -m experiment=synthetic_moe_gnn,synthetic_gnn seed=0,1,2 \
        hydra.sweep.dir=outputs/sweep
    python experiments/summarize_runs.py outputs/sweep --out experiments/results/synthetic.md

A run without saved overrides (e.g. a folder copied without ``.hydra/``) is
described by its resolved config instead, flattened to ``key.sub=value``;
where a run writes (``paths.*``) never separates groups.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml
from _study import command_line, mean_std, results_header

# Config keys that say where a run writes, not what it is.
IGNORED_PREFIXES = ("paths.", "hydra.")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    r"""``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists and scalars as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    r"""Hydra's override strings as ``{key: value}``: ``+key=v`` and
    ``++key=v`` count as ``key=v``; a deletion ``~key`` as ``key: "~"``."""
    out: dict[str, str] = {}
    for item in items:
        if item.startswith("~"):
            out[item[1:].split("=", 1)[0]] = "~"
            continue
        key, _, value = item.lstrip("+").partition("=")
        out[key] = value
    return out


def find_runs(root: Path) -> list[tuple[dict[str, str], dict]]:
    r"""``(overrides, record)`` of every ``metrics.json`` under ``root``."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        record = json.loads(path.read_text())
        saved = path.parent / ".hydra" / "overrides.yaml"
        if saved.is_file():
            overrides = parse_overrides(yaml.safe_load(saved.read_text()) or [])
        else:
            overrides = flatten(record.get("config", {}))
        runs.append((overrides, record))
    return runs


def group_runs(runs: Sequence[tuple[dict[str, str], dict]],
               over: Sequence[str] = ("seed",)) -> dict[str, list[dict]]:
    r"""Group the records by the values of every key that differs between
    runs, except the keys in ``over`` (averaged over) and where a run writes;
    a group's name lists those ``key=value`` pairs (``key=default`` where a
    run does not set the key)."""
    keys = sorted({k for overrides, _ in runs for k in overrides})
    differing = [k for k in keys if k not in over and not k.startswith(IGNORED_PREFIXES)
                 and len({overrides.get(k) for overrides, _ in runs}) > 1]
    groups: dict[str, list[dict]] = defaultdict(list)
    for overrides, record in runs:
        name = " ".join(f"{k}={overrides.get(k, 'default')}" for k in differing)
        groups[name or "all runs"].append(record)
    return dict(groups)


def summarize(groups: dict[str, list[dict]], metrics: list[str]) -> str:
    head = "| run | seeds | " + " | ".join(metrics) + " | fit time (s) |"
    lines = [head, "|---" * (len(metrics) + 3) + "|"]
    for name, runs in sorted(groups.items()):
        cells = []
        for metric in metrics:
            values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
            scale = 100.0 if metric.endswith(("acc", "auc")) else 1.0
            cells.append(mean_std(values, scale=scale, empty="n/a"))
        fit = mean_std([r["metrics"].get("time/fit_seconds", float("nan")) for r in runs],
                       scale=1.0, empty="n/a")
        seeds = ",".join(str(r.get("config", {}).get("seed")) for r in runs)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder searched for metrics.json")
    parser.add_argument("--metrics", nargs="+", default=["test/acc", "val/acc"])
    parser.add_argument("--over", nargs="+", default=["seed"],
                        help="overrides averaged over, not grouped by (e.g. seed data.split)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    runs = find_runs(args.root)
    if not runs:
        sys.exit(f"no metrics.json under {args.root}")
    table = summarize(group_runs(runs, args.over), args.metrics)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = results_header(f"Runs under {args.root}", command_line(__file__, argv))
        args.out.write_text("\n".join(header) + f"\n{table}\n")


if __name__ == "__main__":
    main()
