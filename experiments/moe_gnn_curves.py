r"""Per-epoch validation and test curves of MoE-GNN's plain stack and its
baselines, without early stopping: how steady is the function the selected
epoch comes from? (issue 15, section 1; ``graph_moe_ablation.md``, section 12).

Each variant of :data:`experiments.ablate_moe_gnn_layout.VARIANTS` is trained
by the lean loop's step (:func:`experiments.ablate_graph_moe.lean_step`, the
protocol of ``experiment=nc_<dataset>``) for ``trainer.max_epochs`` epochs,
scoring train / validation / test accuracy and cross-entropy in eval mode
after every step. Each run is cached as JSON under
``graph_moe_ablation_runs/moe_gnn_curves/`` (scores rounded to 5 digits)::

    python experiments/moe_gnn_curves.py --dataset citeseer --seeds 10 --variants gcn \
        "dense, no input dropout" "moe, shared expert, top-1, no input dropout"

The printed table, per variant, mean ± std over seeds:

- **test at best val (epoch)**: the study's rule: the first epoch of highest
  validation accuracy, early stopping with the experiment's patience;
- **test at lowest val loss**: the same rule on the validation cross-entropy;
- **best test**: the highest test accuracy of any epoch (an oracle bound);
- **last test**: at the last epoch;
- **val jitter**: the standard deviation of the epoch-to-epoch change of the
  validation accuracy over epochs 20-150, in points (how much the eval-mode
  function moves from one step to the next).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.ablate_graph_moe import (  # noqa: E402
    lean_setup,
    lean_step,
    overrides_for,
    run_key,
)
from experiments.ablate_moe_gnn_layout import VARIANTS, variant_overrides  # noqa: E402

RUNS = ROOT / "experiments" / "results" / "graph_moe_ablation_runs" / "moe_gnn_curves"
SPLITS = ("train", "val", "test")


def curves(dataset: str, variant: str, seed: int) -> dict:
    r"""Train one run for the experiment's ``max_epochs`` and return its
    per-epoch eval-mode accuracy and cross-entropy on each split."""
    import torch
    import torch.nn.functional as F

    from moegraph.nn.output import as_model_output

    cfg, task, data, opt = lean_setup(overrides_for(dataset, variant_overrides(variant), seed))
    net = task.net
    out: dict[str, list[float]] = {f"{s}_{m}": [] for s in SPLITS for m in ("acc", "loss")}
    for _ in range(cfg.trainer.max_epochs):
        lean_step(net, task, data, opt)
        net.eval()
        with torch.no_grad():
            logits = as_model_output(net(data.x, data.edge_index)).logits
        for split in SPLITS:
            mask = data[f"{split}_mask"]
            acc = (logits[mask].argmax(-1) == data.y[mask]).float().mean()
            out[f"{split}_acc"].append(round(float(acc), 5))
            out[f"{split}_loss"].append(round(float(F.cross_entropy(logits[mask], data.y[mask])),
                                              5))
    return {"dataset": dataset, "variant": variant, "seed": seed,
            "overrides": variant_overrides(variant),
            "patience": int(cfg.callbacks.early_stopping.patience), **out}


def cached(dataset: str, variant: str, seed: int, table_only: bool) -> dict | None:
    path = RUNS / run_key(dataset, variant, variant_overrides(variant), seed)
    if path.exists():
        return json.loads(path.read_text())
    if table_only:
        return None
    record = curves(dataset, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    print(f"{dataset} | {variant} | seed {seed}: done", flush=True)
    return record


def select(scores: list[float], patience: int, larger: bool = True) -> int:
    r"""The epoch early stopping keeps: the first best of ``scores``, the run
    stopped after ``patience`` epochs without a strictly better one."""
    best, best_epoch, since = None, 0, 0
    for epoch, s in enumerate(scores):
        s = s if larger else -s
        if best is None or s > best:
            best, best_epoch, since = s, epoch, 0
        else:
            since += 1
            if since >= patience:
                break
    return best_epoch


def summary(record: dict) -> dict[str, float]:
    val, test, patience = record["val_acc"], record["test_acc"], record["patience"]
    at_acc = select(val, patience)
    at_loss = select(record["val_loss"], patience, larger=False)
    steps = [100 * (val[e + 1] - val[e]) for e in range(20, min(150, len(val) - 1))]
    return {"test_at_val_acc": 100 * test[at_acc], "epoch": at_acc,
            "test_at_val_loss": 100 * test[at_loss], "best_test": 100 * max(test),
            "last_test": 100 * test[-1], "jitter": statistics.pstdev(steps)}


def mean_std(xs: list[float], digits: int) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {std:.{digits}f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="citeseer")
    parser.add_argument("--variants", nargs="+", required=True, choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    keys = ("test_at_val_acc", "epoch", "test_at_val_loss", "best_test", "last_test", "jitter")
    rows = [f"| variant ({args.dataset}) | n | test at best val | best epoch | "
            "test at lowest val loss | best test (oracle) | last test | val jitter (points) |",
            "|---|---|---|---|---|---|---|---|"]
    for variant in args.variants:
        records = [r for seed in range(args.seeds)
                   if (r := cached(args.dataset, variant, seed, args.table_only)) is not None]
        if not records:
            continue
        summaries = [summary(r) for r in records]
        cols = {k: [s[k] for s in summaries] for k in keys}
        cell = {k: mean_std(xs, 0 if k == "epoch" else 2) for k, xs in cols.items()}
        rows.append(f"| {variant} | {len(records)} | " + " | ".join(cell[k] for k in keys) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
