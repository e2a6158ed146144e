r"""The node-classification study: MLP, GNN, Mowst and Mowst* on every dataset
and backbone, through the one training entry point (``train(cfg)`` with the
``experiment=nc_<dataset>`` configs).

Each finished run is cached as one JSON file per (dataset, model, backbone,
seed) under ``--runs``; a rerun skips them, so the study can be completed in
parts (more seeds, another machine, a GPU). The table is rebuilt from every
cached run at the end::

    python experiments/run_node_classification.py                # default protocol
    python experiments/run_node_classification.py --seeds 10 --datasets cora
    python experiments/run_node_classification.py --table-only   # just rebuild the table
    python experiments/run_node_classification.py --tune 20 --datasets reed98 --seeds 10

``--tune N`` runs the tuned study instead: for each (dataset, model,
backbone) cell, Hydra's Optuna search ``hparams_search=<model>`` (the same
search a user runs; Mowst and Mowst* have their own, with the gate's
parameters) gets ``N`` trials on seed 0 / split 0, scored on its validation
set, kept in one SQLite file per cell under
``node_classification_tuning/`` (a search stopped anywhere goes on where it
was); then every seed runs with the best configuration found. Every model of
a cell gets the same ``N``. Tuned runs are cached apart, named after the
configuration they ran, and the table (``node_classification_tuned.md``)
lists the chosen hyper-parameters beside it.

``--set KEY=VALUE ...`` runs the study with one fixed configuration added to
every cell's protocol instead (for instance the published depth on the
heterophilous sets, which the default protocol's hidden 64 / 2 layers do not
reach)::

    python experiments/run_node_classification.py --datasets minesweeper \
        --models gnn --backbones sage gat --seeds 10 \
        --set backbone.hidden_channels=128 backbone.num_layers=5
    python experiments/run_node_classification.py --datasets tolokers \
        --models gnn --backbones gcn sage --seeds 5 --set trainer.max_epochs=300

Its runs are cached under ``node_classification_runs_set/``, named after the
configuration, and its table goes to ``node_classification_set_<tag>.md``
(``<tag>``: :func:`params_tag` of the overrides), with the overrides in its
first lines.

Writes ``experiments/results/node_classification.md`` and, per dataset,
``experiments/results/confidence_<dataset>.png`` (histogram of the Mowst
confidence on test nodes, split by whether the MLP classifies them rightly).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
from pathlib import Path

from _study import (
    QUIET,
    RESULTS,
    ROOT,
    add_tuned_study_arguments,
    backbone_protocol,
    best_overrides,
    command_line,
    composed,
    histogram_range,
    load_or_tune,
    load_runs,
    mean_std,
    params_tag,
    results_header,
    run_diagnostics,
    run_pending,
    target_cell,
    train_cached,
    tune_cell,
    write_results,
)

DATASETS = ("cora", "citeseer", "minesweeper", "tolokers", "amherst41", "reed98")
BACKBONES = ("gcn", "sage", "gat")
MODELS = ("mlp", "gnn", "mowst", "mowst_star")
# Seeds per dataset of the default protocol, sized for a 2-core CPU (tolokers:
# 1M edges, about 1 s per epoch); the cache lets a later run add more.
DEFAULT_SEEDS = {"cora": 3, "citeseer": 3, "minesweeper": 3, "tolokers": 1,
                 "amherst41": 3, "reed98": 3}
COST_ORDER = ("reed98", "cora", "amherst41", "citeseer", "minesweeper", "tolokers")
SPLIT_DATASETS = ("minesweeper", "tolokers", "amherst41", "reed98")


def seed_major(datasets: list[str], seeds: int | None,
               default_seeds: dict[str, int]) -> list[tuple[int, str]]:
    r"""``(seed, dataset)`` in the order a study runs them: seed 0 of every
    dataset first (cheapest first), then seed 1, ...: a study cut short still
    covers every cell. ``seeds`` (when given) replaces each dataset's default."""
    order = [d for d in COST_ORDER if d in datasets]
    count = {d: seeds or default_seeds[d] for d in order}
    return [(s, d) for s in range(max(count.values(), default=0)) for d in order if s < count[d]]


def cell_name(dataset: str, model: str, backbone: str) -> str:
    return f"{dataset}__{model}__{backbone if model != 'mlp' else 'none'}"


def run_name(dataset: str, model: str, backbone: str, seed: int,
             tuned: dict | None = None, fixed: dict | None = None) -> str:
    r"""The cache file of a run; a tuned run's name holds its configuration's
    :func:`params_tag`, a run of ``--set`` that of the fixed overrides."""
    tag = f"__t{params_tag(tuned)}" if tuned is not None else ""
    tag += f"__s{params_tag(fixed)}" if fixed else ""
    return f"{cell_name(dataset, model, backbone)}{tag}__seed{seed}.json"


@functools.cache
def baseline_pretraining(dataset: str, fixed: tuple[str, ...] = ()) -> tuple[str, ...]:
    r"""Mowst's pre-training budget, patience and minimum gain set to those
    of the dataset's ``model=gnn`` runs (its ``trainer.max_epochs`` and
    ``EarlyStopping``): so Mowst's GNN is that run's GNN, bit for bit (see
    :class:`moegraph.tasks.MowstTask`), also where an experiment departs
    from ``conf/model/mowst.yaml``'s 300 epochs and patience 50 (tolokers).
    ``fixed``: the overrides of ``--set``, which may change them."""
    with composed([f"experiment=nc_{dataset}", "model=gnn", *fixed]) as cfg:
        epochs, stopping = cfg.trainer.max_epochs, cfg.callbacks.early_stopping
        patience, min_delta = stopping.patience, stopping.get("min_delta", 0.0)
    return (f"model.pretrain_weak_epochs={epochs}", f"model.pretrain_strong_epochs={epochs}",
            f"model.pretrain_patience={patience}", f"model.pretrain_min_delta={min_delta}")


def overrides_for(dataset: str, model: str, backbone: str, seed: int,
                  fixed: tuple[str, ...] = ()) -> list[str]:
    r"""The command-line overrides of one run (``moegraph-train`` takes the same);
    ``fixed``: those of ``--set``, last (so they win over the protocol's)."""
    out = [f"experiment=nc_{dataset}", f"seed={seed}", *QUIET]
    if dataset in SPLIT_DATASETS:
        out.append(f"data.split={seed}")
    if model == "mlp":
        out.append("model=mlp")
    else:
        out += [f"model={'gnn' if model == 'gnn' else 'mowst'}", f"model/strong={backbone}"]
        if model == "mowst_star":  # joint training: the baselines' patience
            out += ["model.net.variant=mowst_star", "model.turn_patience=50"]
        if model.startswith("mowst"):
            out += baseline_pretraining(dataset, fixed)
    out += fixed
    if model.startswith("mowst"):
        out.append("trainer.max_epochs=2000")  # the schedule decides when to stop
    return out


def run_one(dataset: str, model: str, backbone: str, seed: int, runs: Path,
            tuned: dict | None = None, fixed: dict | None = None) -> dict:
    r"""Train one configuration of this study and cache its record; ``tuned``:
    the best parameters of the cell's search, added to the overrides;
    ``fixed``: the overrides of ``--set`` (``{key: value}``), kept in the
    record as ``set``."""
    overrides = overrides_for(dataset, model, backbone, seed,
                              tuple(best_overrides(fixed)) if fixed else ())
    record = {"dataset": dataset, "model": model, "backbone": backbone, "seed": seed}
    if tuned is not None:
        overrides += best_overrides(tuned)
        record["tuned"] = dict(tuned)
    if fixed:
        record["set"] = dict(fixed)
    path = runs / run_name(dataset, model, backbone, seed, tuned, fixed)
    return train_cached(overrides, record, path,
                        collect=(run_diagnostics, backbone_protocol))


def tune_one(dataset: str, model: str, backbone: str, trials: int, folder: Path) -> dict:
    r"""The search of one cell (seed 0, split 0, validation score), resumed
    from ``folder/<cell>.db``; its summary is also written to
    ``folder/<cell>.json``."""
    return tune_cell(cell_name(dataset, model, backbone),
                     overrides_for(dataset, model, backbone, 0), model, folder, trials,
                     {"dataset": dataset, "model": model, "backbone": backbone})


def build_table(runs: Path, command: str, tuned: dict[str, dict] | None = None,
                fixed: dict | None = None) -> str:
    r"""The markdown table of every cached run, and the confidence PNGs;
    ``tuned`` (cell name -> search summary): the tuned study, of the runs made
    with each cell's current best configuration, with a table of them and
    no PNGs; ``fixed``: the study of ``--set``, of the runs made with those
    overrides only, no PNGs."""
    by_key: dict[tuple, list[dict]] = {}
    for r in load_runs(runs):
        if r.get("set") != (fixed or None):
            continue
        if tuned is not None:
            best = tuned.get(cell_name(r["dataset"], r["model"], r["backbone"]))
            if best is None or r.get("tuned") != best["params"]:
                continue
        by_key.setdefault((r["dataset"], r["model"], r["backbone"]), []).append(r)

    def scores(dataset, model, backbone, key=None):
        rs = by_key.get((dataset, model, backbone if model != "mlp" else "none"), [])
        if not rs:
            rs = by_key.get((dataset, model, backbone), [])
        name = f"test/{rs[0]['metric']}{key or ''}" if rs else ""
        return [r["metrics"][name] for r in rs if name in r["metrics"]], rs

    lines = [
        *results_header("Node classification: MLP, GNN, Mowst, Mowst*", command, runs),
        "Test score in percent, mean ± std over the seeds given (`n`, per model; on minesweeper, "
        "tolokers, amherst41 and reed98 seed *s* also picks split *s*). Accuracy, except "
        "ROC-AUC on minesweeper and tolokers. **Mowst** is the expected score of the "
        "paper's sampled inference; **Mowst τ** the deterministic prediction (weak expert "
        "where C ≥ 0.5), which sparse inference computes; **GNN share** the share of "
        "test nodes with C < 0.5 (decided by the GNN). Time: mean wall seconds per run "
        "(fit + test) on a 2-core CPU, one thread.",
        *(["", "Every run adds to its dataset's protocol: "
           + ", ".join(f"`{o}`" for o in best_overrides(fixed)) + "."] if fixed else []),
        "",
        "| dataset | backbone | MLP | GNN | Mowst | Mowst τ | Mowst* | GNN share (Mowst) "
        "| n MLP / GNN / Mowst / Mowst* | time MLP / GNN / Mowst / Mowst* (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    protocols = {}
    for dataset in DATASETS:
        for backbone in BACKBONES:
            if not any(k[0] == dataset and k[2] == backbone for k in by_key):
                continue
            mlp, mlp_runs = scores(dataset, "mlp", backbone)
            gnn, gnn_runs = scores(dataset, "gnn", backbone)
            _, mowst_runs = scores(dataset, "mowst", backbone)
            # The expected score: test/<metric>_expected since the headline
            # test/<metric> became the deterministic score (older runs: test/<metric>).
            mowst = [r["metrics"].get(f"test/{r['metric']}_expected",
                                      r["metrics"].get(f"test/{r['metric']}"))
                     for r in mowst_runs]
            tau, _ = scores(dataset, "mowst", backbone, "_tau")
            star, star_runs = scores(dataset, "mowst_star", backbone)
            share = [1 - r["metrics"].get("test/confident", float("nan")) for r in mowst_runs]
            n = " / ".join(str(len(v)) for v in (mlp, gnn, mowst, star))
            times = " / ".join(
                f"{sum(r['wall_seconds'] for r in rs) / len(rs):.0f}" if rs else "–"
                for rs in (mlp_runs, gnn_runs, mowst_runs, star_runs))
            share_txt = f"{100 * sum(share) / len(share):.0f}%" if share else "–"
            lines.append(f"| {dataset} | {backbone} | {mean_std(mlp)} | {mean_std(gnn)} | "
                         f"{mean_std(mowst)} | {mean_std(tau)} | {mean_std(star)} | "
                         f"{share_txt} | {n} | {times} |")
            for r in gnn_runs[:1] or mowst_runs[:1]:
                protocols[dataset] = {**r["protocol"], "patience": patience_text(r)}
    lines += gate_table(by_key)
    if tuned is not None:
        lines += tuned_table(tuned)
        return "\n".join(lines) + "\n"
    lines += ["", "Protocol actually used per dataset (all models share it; Mowst runs "
              "pre-train the MLP and the GNN as the baselines, early-stopped with the "
              "baselines' patience, the GNN bit for bit the `model=gnn` run of the same "
              "seed; K=2 cross-fitted copies of both give out-of-fold logits; then the "
              "gate alone trains, at most 100 epochs with patience 20 (Mowst*: 50, its "
              "mixture loss) and min gain 0.001, kept only if it beats the GNN's "
              "validation score, else rolled back to Mowst = its GNN):", "",
              "| dataset | hidden | layers | residual + LayerNorm | max epochs (baselines) | "
              "early-stopping patience | lr |", "|---|---|---|---|---|---|---|"]
    for dataset, p in protocols.items():
        lines.append(f"| {dataset} | {p['hidden_channels']} | {p['num_layers']} | "
                     f"{'yes' if p['residual'] else 'no'} | {p['max_epochs']} | "
                     f"{p['patience']} | {p['lr']} |")
    if not fixed:
        _plot_confidence(by_key)
    return "\n".join(lines) + "\n"


def patience_text(record: dict) -> str:
    r"""The early-stopping patience of a cached run, as the protocol table
    prints it (``none``: no early stopping; ``–``: not known): the
    protocol's, or, for a record from before the protocol held it, that of
    the config its overrides compose."""
    protocol = record.get("protocol", {})
    if "patience" not in protocol:
        if "overrides" not in record:
            return "–"
        with composed(record["overrides"]) as cfg:
            protocol = backbone_protocol(cfg)["protocol"]
    patience = protocol["patience"]
    return "none" if patience is None else str(patience)


def gate_table(by_key: dict) -> list[str]:
    r"""Mowst / Mowst* against their GNN per cell (issue 11's rule on the seeds
    both have) and what the gate did on the test nodes."""
    head = ["", "Mowst against its GNN, per cell with Mowst runs: `Mowst τ` / `Mowst*` = "
             "gap of the deterministic score to the `model=gnn` runs of the same seeds, in "
             "points, and issue 11's verdict (`gain`: above by more than one GNN std; `ok`: "
             "not below by more than half a GNN std; `BELOW`); `− own GNN` = the score "
             "minus that of the run's own strong expert (0 when every test node goes to "
             "the GNN); `weak share` = test nodes kept by the weak expert (C ≥ 0.5); "
             "`C 5–95%` = range of the confidence on test nodes (bins of 0.05); means "
             "over the runs.", "",
             "| dataset | backbone | Mowst τ vs GNN | Mowst* vs GNN | − own GNN (Mowst τ / "
             "Mowst*) | weak share % (Mowst / Mowst*) | C 5–95% (Mowst / Mowst*) | n |",
             "|---|---|---|---|---|---|---|---|"]
    lines: list[str] = []
    for dataset in DATASETS:
        for backbone in BACKBONES:
            gnn = {r["seed"]: r["metrics"][f"test/{r['metric']}"]
                   for r in by_key.get((dataset, "gnn", backbone), [])}
            cells, own, share, spread, n = [], [], [], [], []
            for model in ("mowst", "mowst_star"):
                rs = [r for r in by_key.get((dataset, model, backbone), [])
                      if f"test/{r['metric']}_strong" in r["metrics"]]
                both = [r for r in rs if r["seed"] in gnn]
                cells.append(target_cell([gnn[r["seed"]] for r in both],
                                         [r["metrics"][f"test/{r['metric']}"] for r in both])
                             if rs else "–")
                own.append(mean_std([r["metrics"][f"test/{r['metric']}"]
                                     - r["metrics"][f"test/{r['metric']}_strong"] for r in rs],
                                    digits=1))
                share.append(mean_std([r["metrics"].get("test/confident", float("nan"))
                                       for r in rs], digits=0))
                ranges = [histogram_range([a + b for a, b in zip(
                    r["confidence_hist"]["right"], r["confidence_hist"]["wrong"], strict=True)])
                    for r in rs if "confidence_hist" in r]
                spread.append(f"{statistics.fmean(a for a, _ in ranges):.2f}–"
                              f"{statistics.fmean(b for _, b in ranges):.2f}" if ranges else "–")
                n.append(str(len(rs)))
            if n == ["0", "0"]:
                continue
            lines.append(f"| {dataset} | {backbone} | {cells[0]} | {cells[1]} | "
                         f"{' / '.join(own)} | {' / '.join(share)} | {' / '.join(spread)} | "
                         f"{' / '.join(n)} |")
    return head + lines if lines else []  # no Mowst runs: no table


def tuned_table(tuned: dict[str, dict]) -> list[str]:
    r"""The chosen configuration of each tuned cell and its search."""
    lines = ["", "Chosen hyper-parameters per cell (Optuna TPE through `hparams_search=<model>`, "
             "trials on seed 0 / split 0, best validation score; the other settings are the "
             "dataset's protocol):", "",
             "| dataset | model | backbone | trials | best val | s / trial | chosen |",
             "|---|---|---|---|---|---|---|"]
    order = {d: i for i, d in enumerate(DATASETS)}
    for s in sorted(tuned.values(), key=lambda s: (order.get(s["dataset"], 99),
                                                   s["backbone"], MODELS.index(s["model"]))):
        chosen = ", ".join(f"`{k}={v:.3g}`" if isinstance(v, float) else f"`{o}`"
                           for o, (k, v) in zip(best_overrides(s["params"]),
                                                sorted(s["params"].items()), strict=True))
        lines.append(f"| {s['dataset']} | {s['model']} | {s['backbone']} | {s['trials']} | "
                     f"{100 * s['value']:.2f} | {s['seconds']:.0f} | {chosen} |")
    return lines


def _plot_confidence(by_key: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for dataset in DATASETS:
        panels = [(b, by_key[(dataset, "mowst", b)]) for b in BACKBONES
                  if (dataset, "mowst", b) in by_key
                  and any("confidence_hist" in r for r in by_key[(dataset, "mowst", b)])]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2),
                                 squeeze=False)
        for ax, (backbone, rs) in zip(axes[0], panels, strict=True):
            hists = [r["confidence_hist"] for r in rs if "confidence_hist" in r]
            bins = len(hists[0]["right"])
            right = [sum(h["right"][i] for h in hists) for i in range(bins)]
            wrong = [sum(h["wrong"][i] for h in hists) for i in range(bins)]
            centers = [(i + 0.5) / bins for i in range(bins)]
            ax.bar(centers, right, width=0.9 / bins, alpha=0.6, label="MLP right")
            ax.bar(centers, wrong, width=0.9 / bins, alpha=0.6, label="MLP wrong")
            ax.set_title(f"{dataset}, Mowst-{backbone.upper()} ({len(hists)} runs)",
                         fontsize=9)
            ax.set_xlabel("confidence C (test nodes)")
            ax.set_xlim(0, 1)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("nodes")
        fig.tight_layout()
        fig.savefig(RESULTS / f"confidence_{dataset}.png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--backbones", nargs="+", default=["gcn", "sage"], choices=BACKBONES)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parse = add_tuned_study_arguments(
        parser, RESULTS / "node_classification_runs", RESULTS / "node_classification_tuning",
        RESULTS / "node_classification_runs_tuned", "cell",
        RESULTS / "node_classification_runs_set", "node_classification_set_<tag>.md")
    args = parse(argv)
    fixed = args.fixed
    command = command_line(__file__, argv)

    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    cells = [(d, m, b) for d in COST_ORDER if d in args.datasets for m in args.models
             for b in (["none"] if m == "mlp" else args.backbones)]
    tuned: dict[str, dict] | None = None
    if args.tune:
        tuned = load_or_tune(
            [(cell_name(d, m, b), functools.partial(tune_one, d, m, b, args.tune, args.tuning))
             for d, m, b in cells],
            args.tuning, args.tune, search=not args.table_only, dry_run=args.dry_run)

    if not args.table_only:
        jobs = []
        for seed, dataset in seed_major(args.datasets, args.seeds, DEFAULT_SEEDS):
            for d, model, backbone in cells:
                if d != dataset:
                    continue
                best = None
                if tuned is not None:
                    summary = tuned.get(cell_name(d, model, backbone))
                    if summary is None:  # a dry run before its search
                        continue
                    best = summary["params"]
                jobs.append((args.runs / run_name(d, model, backbone, seed, best, fixed),
                             functools.partial(run_one, d, model, backbone, seed, args.runs,
                                               best, fixed),
                             f"{d} {model} {backbone} seed {seed}"))
        run_pending(jobs, dry_run=args.dry_run)
        if args.dry_run:
            return
    table = build_table(args.runs, command, tuned, fixed)
    out = RESULTS / ("node_classification_tuned.md" if tuned is not None
                     else f"node_classification_set_{params_tag(fixed)}.md" if fixed
                     else "node_classification.md")
    write_results(out, table)
    print(table)
    print(f"[study] wrote {out}")


if __name__ == "__main__":
    main()
