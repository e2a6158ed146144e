r"""Is there any set of test nodes where the MLP beats the GNN? (Issue 11: the
cross-fitted Mowst gate sends every Cora / CiteSeer test node to the GNN.)

For each (dataset, seed) it trains the study's MLP (``model=mlp``) and GNN
(``model=gnn model/strong=gcn``) through ``train(cfg)`` with the overrides of
``experiments/run_node_classification.py`` (same seeds, so the same scores as
the study's runs), keeps the tested (best-validation) weights' predictions on
the validation and test nodes, and reports:

- the test nodes binned by the MLP's confidence (max softmax probability; the
  bins are quintiles of it on each run's test nodes), both experts' accuracy
  per bin, and how many nodes only the MLP / only the GNN gets right;
- the oracle combination: "MLP where its confidence >= t, GNN elsewhere" with
  the best ``t`` chosen on the test nodes themselves (an upper bound on what a
  confidence gate of this form could gain), and with ``t`` chosen on the
  validation nodes (what an honest gate of this form gets);
- the per-node oracle (right if either expert is): the gain no gate can exceed;
- two rules that read both experts' outputs (more than Mowst's gate, which
  sees the MLP's alone): "MLP where its confidence exceeds the GNN's by at
  least ``t``", and the blend ``argmax(w p_MLP + (1 - w) p_GNN)``, each with
  ``t`` / ``w`` chosen on the validation nodes and, as an upper bound, on the
  test nodes.

Each run is cached as JSON under ``experiments/results/mowst_expert_bins_runs``
(a rerun skips it)::

    PYTHONPATH=. python experiments/mowst_expert_bins.py --datasets cora citeseer --seeds 5

Writes ``experiments/results/mowst_expert_bins.md``.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path
from typing import Any

from _study import RESULTS, command_line, composed, results_header, run_pending, write_results
from run_node_classification import overrides_for

RUNS = RESULTS / "mowst_expert_bins_runs"
BINS = 5


def predictions(dataset: str, model: str, seed: int) -> dict[str, Any]:
    r"""Train one model of the study; its class probabilities and labels on the
    validation and test nodes (of the tested, best-validation weights)."""
    import tempfile

    import torch

    import moegraph.train as mt

    kept: dict[str, Any] = {}
    build = mt.instantiate_run

    def instantiate_run(cfg, trainer=True):
        run = build(cfg, trainer)
        task = run["task"]

        @torch.no_grad()
        def write_diagnostics(datamodule, output_dir):  # called after the test
            task.eval()
            data = datamodule.data.to(task.device)
            prob = task(data).logits.softmax(-1)
            for split in ("val", "test"):
                mask = data[f"{split}_mask"]
                kept[split] = {"prob": prob[mask].tolist(), "y": data.y[mask].tolist()}
            return {}

        task.write_diagnostics = write_diagnostics
        return run

    mt.instantiate_run = instantiate_run
    try:
        with (tempfile.TemporaryDirectory() as tmp,
              composed(overrides_for(dataset, model, "gcn", seed), tmp) as cfg):
            metrics = mt.train(cfg)
    finally:
        mt.instantiate_run = build
    return {"test_acc": metrics["test/acc"], **kept}


def run(dataset: str, seed: int, path: Path) -> dict:
    record = {"dataset": dataset, "seed": seed,
              "mlp": predictions(dataset, "mlp", seed),
              "gnn": predictions(dataset, "gnn", seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def split_arrays(record: dict, split: str) -> tuple[list[float], list[bool], list[bool]]:
    r"""MLP confidence, MLP right, GNN right per node of ``split``."""
    m, g = record["mlp"][split], record["gnn"][split]
    assert m["y"] == g["y"]
    conf = [max(p) for p in m["prob"]]
    def right(r: dict) -> list[bool]:
        return [_argmax(p) == y for p, y in zip(r["prob"], r["y"], strict=True)]

    return conf, right(m), right(g)


def combined(conf: list[float], mlp_ok: list[bool], gnn_ok: list[bool], t: float) -> float:
    r"""Accuracy of "MLP where its confidence >= t, GNN elsewhere"."""
    return statistics.fmean(m if c >= t else g
                            for c, m, g in zip(conf, mlp_ok, gnn_ok, strict=True))


def best_threshold(conf: list[float], mlp_ok: list[bool], gnn_ok: list[bool]) -> float:
    r"""The ``t`` of the best combination (``inf``: the GNN alone; ties go to
    the larger ``t``, fewer nodes to the MLP)."""
    candidates = [float("inf"), *sorted(set(conf), reverse=True)]
    return max(candidates, key=lambda t: (combined(conf, mlp_ok, gnn_ok, t), t))


def margin_switch(record: dict, split: str, t: float) -> float:
    r"""Accuracy of "MLP where its confidence minus the GNN's >= t, GNN
    elsewhere" on ``split``."""
    m, g = record["mlp"][split], record["gnn"][split]
    return statistics.fmean(
        _argmax(pm if max(pm) - max(pg) >= t else pg) == y
        for pm, pg, y in zip(m["prob"], g["prob"], m["y"], strict=True))


def blend(record: dict, split: str, w: float) -> float:
    r"""Accuracy of ``argmax(w p_MLP + (1 - w) p_GNN)`` on ``split``."""
    m, g = record["mlp"][split], record["gnn"][split]
    return statistics.fmean(
        _argmax([w * a + (1 - w) * b for a, b in zip(pm, pg, strict=True)]) == y
        for pm, pg, y in zip(m["prob"], g["prob"], m["y"], strict=True))


def _thresholds(record: dict, split: str) -> list[float]:
    r"""The candidate ``t`` of :func:`margin_switch` on ``split``: every
    node's margin, and ``inf`` (the GNN alone)."""
    m, g = record["mlp"][split], record["gnn"][split]
    return [float("inf"), *{max(pm) - max(pg)
                            for pm, pg in zip(m["prob"], g["prob"], strict=True)}]


def _argmax(p: list[float]) -> int:
    return max(range(len(p)), key=p.__getitem__)


BLEND_WEIGHTS = [i / 20 for i in range(21)]


def both_expert_rules(record: dict) -> dict[str, float]:
    r"""Test accuracy of the two rules that read both experts, with ``t`` /
    ``w`` chosen on the validation nodes and on the test nodes (ties go to the
    GNN: the larger ``t``, the smaller ``w``)."""
    t_val = max(_thresholds(record, "val"), key=lambda t: (margin_switch(record, "val", t), t))
    w_val = max(BLEND_WEIGHTS, key=lambda w: (blend(record, "val", w), -w))
    return {
        "switch_val": margin_switch(record, "test", t_val),
        "switch_test": max(margin_switch(record, "test", t)
                           for t in _thresholds(record, "test")),
        "blend_val": blend(record, "test", w_val), "blend_w": w_val,
        "blend_test": max(blend(record, "test", w) for w in BLEND_WEIGHTS),
    }


def _rule_column(rules: list[dict[str, float]], gnn: list[float], key: str) -> str:
    r"""``mean ± std (gain over the GNN of the same run)`` of one rule."""
    gain = [x[key] - b for x, b in zip(rules, gnn, strict=True)]
    return f"{pct([x[key] for x in rules])} ({pct(gain)})"


def pct(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def report(datasets: list[str], seeds: int, command: str) -> str:
    lines = results_header("Where could the MLP beat the GNN? (GCN)",
                           command, RUNS)
    lines += [
        "The study's MLP and GCN (`model=mlp`, `model=gnn`, Planetoid protocol: row-normalised "
        "features, Adam with L2 5e-4), trained apart, same seeds as "
        "`experiments/run_node_classification.py`. Accuracy in %, mean ± std over the runs. "
        f"Bins: {BINS} quantile bins of the MLP's confidence (max softmax probability) on "
        "each run's test nodes, 1 = least confident. `only MLP` / `only GNN`: test nodes "
        "per run that one expert gets right and the other wrong.", ""]
    for d in datasets:
        recs = [json.loads(p.read_text()) for s in range(seeds)
                if (p := RUNS / f"{d}__seed{s}.json").exists()]
        if not recs:
            continue
        lines += [f"## {d} ({len(recs)} seeds)", "",
                  "| confidence bin | conf. range | MLP acc | GNN acc | MLP - GNN | only MLP | "
                  "only GNN |", "|---|---|---|---|---|---|---|"]
        per_bin: list[dict[str, list[float]]] = [
            {k: [] for k in ("lo", "hi", "mlp", "gnn", "gap", "om", "og")} for _ in range(BINS)]
        summary: dict[str, list[float]] = {k: [] for k in (
            "mlp", "gnn", "oracle_t", "oracle_t_share", "val_t", "val_t_share", "either",
            "only_mlp", "only_gnn")}
        for r in recs:
            conf, mo, go = split_arrays(r, "test")
            order = sorted(range(len(conf)), key=conf.__getitem__)
            for b in range(BINS):
                idx = order[b * len(order) // BINS:(b + 1) * len(order) // BINS]
                acc_m = statistics.fmean(mo[i] for i in idx)
                acc_g = statistics.fmean(go[i] for i in idx)
                for k, v in (("lo", conf[idx[0]]), ("hi", conf[idx[-1]]), ("mlp", acc_m),
                             ("gnn", acc_g), ("gap", acc_m - acc_g),
                             ("om", sum(mo[i] and not go[i] for i in idx)),
                             ("og", sum(go[i] and not mo[i] for i in idx))):
                    per_bin[b][k].append(v)
            t_test = best_threshold(conf, mo, go)
            vconf, vmo, vgo = split_arrays(r, "val")
            t_val = best_threshold(vconf, vmo, vgo)
            summary["mlp"].append(statistics.fmean(mo))
            summary["gnn"].append(statistics.fmean(go))
            summary["oracle_t"].append(combined(conf, mo, go, t_test))
            summary["oracle_t_share"].append(statistics.fmean(c >= t_test for c in conf))
            summary["val_t"].append(combined(conf, mo, go, t_val))
            summary["val_t_share"].append(statistics.fmean(c >= t_val for c in conf))
            summary["either"].append(statistics.fmean(m or g for m, g in zip(mo, go, strict=True)))
            summary["only_mlp"].append(sum(m and not g for m, g in zip(mo, go, strict=True)))
            summary["only_gnn"].append(sum(g and not m for m, g in zip(mo, go, strict=True)))
        for b, v in enumerate(per_bin):
            lines.append(
                f"| {b + 1} | {statistics.fmean(v['lo']):.2f}-{statistics.fmean(v['hi']):.2f} | "
                f"{pct(v['mlp'])} | {pct(v['gnn'])} | {pct(v['gap'])} | "
                f"{statistics.fmean(v['om']):.1f} | {statistics.fmean(v['og']):.1f} |")
        s = summary
        lines += [
            "", "| MLP | GNN | MLP if conf >= t, t best on test | share to MLP | "
            "t chosen on val | share to MLP | either right (per-node oracle) | only MLP | "
            "only GNN |", "|---|---|---|---|---|---|---|---|---|",
            f"| {pct(s['mlp'])} | {pct(s['gnn'])} | {pct(s['oracle_t'])} | "
            f"{pct(s['oracle_t_share'])} | {pct(s['val_t'])} | {pct(s['val_t_share'])} | "
            f"{pct(s['either'])} | {statistics.fmean(s['only_mlp']):.1f} | "
            f"{statistics.fmean(s['only_gnn']):.1f} |", ""]
        rules = [both_expert_rules(r) for r in recs]
        gnn = [statistics.fmean(split_arrays(r, "test")[2]) for r in recs]
        col = functools.partial(_rule_column, rules, gnn)
        lines += [
            "Rules that read both experts (test accuracy, in brackets the gain over the GNN "
            "of the same run):", "",
            "| GNN | MLP if conf − GNN conf >= t, t on val | same, t best on test | "
            "blend, w on val | w on val | blend, w best on test |",
            "|---|---|---|---|---|---|",
            f"| {pct(gnn)} | {col('switch_val')} | {col('switch_test')} | {col('blend_val')} | "
            f"{statistics.fmean(x['blend_w'] for x in rules):.2f} | {col('blend_test')} |", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["cora", "citeseer"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if not args.table_only:
        run_pending([(RUNS / f"{d}__seed{s}.json",
                      lambda d=d, s=s: run(d, s, RUNS / f"{d}__seed{s}.json"),
                      f"{d} seed {s}")
                     for s in range(args.seeds) for d in args.datasets],
                    tag="expert_bins", describe=lambda r: (
                        f"mlp {r['mlp']['test_acc']:.4f} gnn {r['gnn']['test_acc']:.4f}"))
    text = report(args.datasets, args.seeds, command_line(__file__, argv))
    write_results(RESULTS / "mowst_expert_bins.md", text)
    print(text)


if __name__ == "__main__":
    main()
