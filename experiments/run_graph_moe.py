r"""The graph-MoE study: MoE inside GNNs against the plain GNN of the same
backbone and equal active FLOPs, on the node-classification datasets, through
the one training entry point (``train(cfg)`` with ``experiment=nc_<dataset>``).

Pairs, each MoE model against its dense twin:

* ``gmoe`` (:class:`~moegraph.nn.models.GMoE`, ``model=gmoe``: every layer a
  :class:`~moegraph.nn.HopMoEConv` with 2 GCN experts, 1 on hop 1 and 1 on
  hop 2 (the squared GCN adjacency), noisy top-1 routing with a
  straight-through gate, experts started alike, balanced within each hop)
  against ``gnn`` (PyG's
  GCN, ``model=gnn``), same
  width and depth (``backbone.*`` of the experiment). At ``k = 1`` a node
  runs one expert conv per layer: the transform FLOPs of the GCN, plus the
  router; hop-2 experts aggregate over more edges.
* ``moe_gnn`` (:class:`~moegraph.nn.models.MoEGNN`, ``model=moe_gnn``: the
  experiment's backbone blocks, GCN layers or residual GCN blocks, each
  followed by a sparse MoE feed-forward part: 8 routed experts of width 64,
  top-1, beside one always-on shared expert of width 64, scaled by a learned
  per-channel gamma started at 0, ReZero) against ``dense_gnn``
  (``model=dense_gnn``: the same blocks with a dense feed-forward part of
  width 128, the MoE's active width, scaled alike).

Runs are cached one JSON per (dataset, model, seed, configuration) under
``--runs``, so the study can be completed in parts; the file name holds a hash
of the run's resolved model config and protocol (:func:`config_hash`), so a
changed default is never read from the runs of the old one. The table is
rebuilt from the cached runs of the current configs::

    python experiments/run_graph_moe.py                     # default protocol
    python experiments/run_graph_moe.py --seeds 10 --datasets cora citeseer
    python experiments/run_graph_moe.py --table-only

Writes ``experiments/results/graph_moe.md`` and
``experiments/results/graph_moe_expert_load.png``.

``--tune N`` runs the tuned study instead, with the same budget for every
model: for each (dataset, model), N Optuna trials of
``hparams_search=<model>`` (``gnn``, ``gmoe``, ``dense_gnn``, ``moe_gnn``) on
seed 0 / split 0, scored on validation and resumable (one SQLite study per
cell in ``--tuning``), then every seed with the best configuration (runs in
``graph_moe_runs_tuned/``, table and chosen configurations in
``graph_moe_tuned.md``)::

    python experiments/run_graph_moe.py --tune 20 --datasets cora amherst41 --seeds 10

A search records the hash of the cell's untuned config; once a default of
the model changes, the search is stale (it searched another model): it is
moved to ``--tuning``'s ``stale/`` folder and the cell searched again.

``--set KEY=VALUE ...`` runs the study with fixed overrides added to every
run (runs in ``graph_moe_runs_set/``, the file name tagged with the
overrides; table ``graph_moe_set_<tag>.md``), as ``run_node_classification.py
--set`` does; a GCN run that study already made with the same config is
copied (``reused_from``), not trained again::

    python experiments/run_graph_moe.py --datasets tolokers --models gnn gmoe --seeds 5 \
        --set trainer.max_epochs=300
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
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
    load_or_tune,
    mean_std,
    params_tag,
    results_header,
    reuse_run,
    run_diagnostics,
    run_pending,
    train_cached,
    tune_cell,
    write_results,
)
from run_node_classification import (  # the same datasets
    DATASETS,
    SPLIT_DATASETS,
    seed_major,
)
from run_node_classification import run_name as nc_run_name

MODELS = ("gnn", "gmoe", "dense_gnn", "moe_gnn")
PAIRS = (("gmoe", "gnn"), ("moe_gnn", "dense_gnn"))
# Seeds per dataset of the default protocol, sized for a 2-core CPU; the cache
# lets a later run add more (``--seeds 10``).
DEFAULT_SEEDS = {"cora": 10, "citeseer": 10, "minesweeper": 3, "tolokers": 1,
                 "amherst41": 3, "reed98": 10}
# GMoE where its 2-hop graph is too large for a 2-core CPU: why, per dataset.
SKIP: dict[tuple[str, str], str] = {}
# Targets renamed without changing the network they build (model=gmoe now goes
# through the factory make_gmoe, which builds the same GMoE or, with
# backbone.residual, the same MoEGNN as GMoE(residual=True) did): hashed under
# the old name so that the cached runs stay valid.
TARGET_ALIASES = {"moegraph.nn.models.make_gmoe": "moegraph.nn.models.GMoE"}


@functools.cache
def config_hash(dataset: str, model: str, fixed: tuple[str, ...] = ()) -> str:
    r"""A short hash of what decides the runs of ``model`` on ``dataset``
    (the seed and split aside): the resolved model config (network and
    optimiser), the backbone sizes, the data and the stopping rule;
    ``fixed``: the overrides of ``--set``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moegraph.nn.models.gnn import baseline_input_dropout, dense_twin_width
    from moegraph.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides_for(dataset, model, 0), *fixed])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    net = model_cfg["net"]
    net["_target_"] = TARGET_ALIASES.get(net["_target_"], net["_target_"])
    if net.get("ffn") == "dense" and net.get("k") is not None:
        # model=dense_gnn gives k (and moe_gnn's shared experts) and lets
        # MoEGNN take the active width k * ffn_hidden_channels + the shared
        # experts' width; hashed as that width given directly
        # (ffn_hidden_channels=128, k=null), the network it builds.
        width = net.get("ffn_hidden_channels") or net["hidden_channels"]
        net["ffn_hidden_channels"] = dense_twin_width(width, net["k"], net.get("moe_kwargs"))
        net["k"] = None
    if "input_dropout" in net and net["input_dropout"] is None:
        # MoEGNN's None, hashed as the value it builds (the runs of the residual
        # layout keep their hash)
        net["input_dropout"] = baseline_input_dropout(net["dropout"],
                                                      bool(net.get("residual")))
        if net["_target_"] == "moegraph.nn.models.GMoE" and net["input_dropout"] == 0.0:
            # GMoE's old default (the key absent): the plain stack's runs keep their hash
            del net["input_dropout"]
    key = {"model": model_cfg,
           "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
           "data": {k: cfg.data.get(k) for k in ("name", "batch_size", "metric")},
           "max_epochs": cfg.trainer.max_epochs,
           "patience": cfg.callbacks.early_stopping.patience}
    # Changes a config does not show (hashes of the older runs unchanged):
    if cfg.data.get("normalize_features"):  # the Planetoid protocol of Kipf & Welling
        key["data"]["normalize_features"] = True
    if not (net.get("route_before_dropout") and net.get("ffn") == "moe"):
        # off, or a dense FFN (no router): the network of the older runs
        net.pop("route_before_dropout", None)
    if not net.get("shared_expert"):
        net.pop("shared_expert", None)  # off: the network of the older runs
    if net.get("balance", "all") == "all":
        net.pop("balance", None)  # the paper's balance: the network of the older runs
    if net.get("ffn_scale", 0.0) is None:
        net.pop("ffn_scale")  # no LayerScale: the network of the older runs
    if net.get("ffn") == "dense":
        net["moe_kwargs"] = {}  # no MoE block to take them: the network of the older runs
    if net["_target_"].endswith("MoEGNN") and not net.get("residual", True):
        key["moegnn_layout"] = "plain_stack"  # FFNs between PyG's plain convolutions
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def run_name(dataset: str, model: str, seed: int, tuned: dict | None = None,
             fixed: dict | None = None) -> str:
    r"""The cache file of a run; the name of a tuned run holds its
    configuration's tag too, that of a run of ``--set`` the tag of its
    overrides."""
    digest = config_hash(dataset, model, tuple(best_overrides(fixed)) if fixed else ())
    tag = f"__t{params_tag(tuned)}" if tuned is not None else ""
    tag += f"__s{params_tag(fixed)}" if fixed else ""
    return f"{dataset}__{model}__seed{seed}__{digest}{tag}.json"


def run_one(dataset: str, model: str, seed: int, runs: Path, tuned: dict | None = None,
            fixed: dict | None = None) -> dict:
    r"""Train one run of the study and cache its record; ``tuned``: the
    chosen parameters of a search, as overrides; ``fixed``: the overrides of
    ``--set`` (``{key: value}``), kept in the record as ``set``. A GCN run of
    ``--set`` that the node-classification study already made with the same
    config (:func:`reuse_run`) is copied, not trained again."""
    overrides = overrides_for(dataset, model, seed)
    record: dict = {"dataset": dataset, "model": model, "seed": seed}
    if tuned is not None:
        overrides += best_overrides(tuned)
        record["tuned"] = dict(tuned)
    if fixed:
        overrides += best_overrides(fixed)
        record["set"] = dict(fixed)
    path = runs / run_name(dataset, model, seed, tuned, fixed)
    if model == "gnn" and fixed and tuned is None:
        source = RESULTS / "node_classification_runs_set" / nc_run_name(
            dataset, "gnn", "gcn", seed, None, fixed)
        reused = reuse_run(overrides, record, path, [source])
        if reused is not None:
            return reused
    return train_cached(overrides, record, path, (run_diagnostics, backbone_protocol))


def tune_one(dataset: str, model: str, trials: int, folder: Path) -> dict:
    r"""The search of one (dataset, model) cell: ``hparams_search=<model>``
    on seed 0 / split 0, the validation score."""
    return tune_cell(f"{dataset}__{model}", overrides_for(dataset, model, 0), model, folder,
                     trials, {"dataset": dataset, "model": model,
                              "config": config_hash(dataset, model)})


def tuned_table(tuned: dict[str, dict]) -> list[str]:
    r"""The chosen configuration of each searched cell."""
    lines = ["", "Chosen hyper-parameters per cell (Optuna TPE through "
             "`hparams_search=<model>`, the same number of trials for every model, on seed 0 / "
             "split 0, best validation score; the rest is the dataset's protocol):", "",
             "| dataset | model | trials | best val | s / trial | chosen |",
             "|---|---|---|---|---|---|"]
    for s in sorted(tuned.values(), key=lambda s: (DATASETS.index(s["dataset"]),
                                                   MODELS.index(s["model"]))):
        chosen = ", ".join(f"`{k}={v:.3g}`" if isinstance(v, float) else f"`{o}`"
                           for o, (k, v) in zip(best_overrides(s["params"]),
                                                sorted(s["params"].items()), strict=True))
        lines.append(f"| {s['dataset']} | {s['model']} | {s['trials']} | "
                     f"{100 * s['value']:.2f} | {s['seconds']:.0f} | {chosen} |")
    return lines


def overrides_for(dataset: str, model: str, seed: int) -> list[str]:
    r"""The command-line overrides of one run (``moegraph-train`` takes the same)."""
    out = [f"experiment=nc_{dataset}", f"seed={seed}", *QUIET, f"model={model}"]
    if model == "gnn":
        out.append("model/strong=gcn")
    if dataset in SPLIT_DATASETS:
        out.append(f"data.split={seed}")
    return out


def cached_runs(runs: Path, dataset: str, model: str, tuned: dict | None = None,
                fixed: dict | None = None) -> list[Path]:
    r"""The cached run files of one (dataset, model) cell under its current
    config (and ``tuned`` / ``fixed`` choice), every seed, in seed order."""
    prefix, suffix = run_name(dataset, model, 0, tuned, fixed).split("__seed0__")
    found = []
    for path in runs.glob(f"{prefix}__seed*__{suffix}"):
        seed = path.name.removeprefix(f"{prefix}__seed").removesuffix(f"__{suffix}")
        if seed.isdigit():
            found.append((int(seed), path))
    return [path for _, path in sorted(found)]


def build_table(runs: Path, command: str, tuned: dict[str, dict] | None = None,
                fixed: dict | None = None) -> str:
    r"""The tables of the study from its cached runs: those of the current
    configs, every seed cached (whatever ``--seeds`` the last call gave);
    with ``tuned`` (cell name -> search summary), those of each cell's chosen
    configuration; with ``fixed``, those of the ``--set`` overrides (the load
    plot named after their tag)."""
    def params(dataset: str, model: str) -> dict | None:
        if tuned is None:
            return None
        summary = tuned.get(f"{dataset}__{model}")
        return summary["params"] if summary is not None else {"untuned": True}

    from hydra.errors import ConfigCompositionException

    records, unfit = [], []
    for dataset in DATASETS:
        for model in MODELS:
            try:
                paths = cached_runs(runs, dataset, model, params(dataset, model), fixed)
            except ConfigCompositionException as error:
                # --set model.net.conv=sage names a key of the MoE models only:
                # GCN's config has no such key, so no run of the set to show
                if not fixed:
                    raise
                unfit.append(error)
                continue
            records += [json.loads(p.read_text()) for p in paths]
    if unfit and len(unfit) == len(DATASETS) * len(MODELS):
        raise unfit[0]  # the overrides fit no model: a mistyped key
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault((r["dataset"], r["model"]), []).append(r)

    def scores(dataset, model):
        rs = by_key.get((dataset, model), [])
        return [r["metrics"][f"test/{r['metric']}"] for r in rs], rs

    lines = [
        *results_header("MoE inside GNNs: hop-expert GMoE and MoE feed-forward blocks vs "
                        "their dense twins", command, runs),
        "Test score in percent, mean ± std over `n` seeds (on minesweeper, tolokers, "
        "amherst41 and reed98 seed *s* also picks split *s*); accuracy, ROC-AUC on "
        "minesweeper and tolokers. Equal active FLOPs within each pair: **GMoE** (2 GCN "
        "experts per layer, 1 on hop 1 and 1 on hop 2 aggregating with the squared GCN "
        "adjacency, noisy top-1 with a straight-through gate, experts started alike, "
        "the balance losses within each hop: the router learns each node's hop (since "
        "2026-12-03; before, 4 experts, 2 per hop, balanced over all 4); "
        "the paper's router is `model=gmoe_paper`; in the residual layout of minesweeper "
        "and tolokers GCN's dropout on the input features, since 2026-12-03, none "
        "before) vs the **GCN** of the same width and "
        "depth; **MoE-GNN** (the "
        "experiment's backbone blocks: PyG's GCN stack, no dropout on the input "
        "features, on cora, citeseer, amherst41, reed98 (before 2026-12-03 with input "
        "dropout), residual LayerNorm blocks on minesweeper and tolokers, each "
        "followed by a sparse MoE feed-forward part: 8 routed experts of width 64, top-1, "
        "beside one always-on shared expert of width 64; each feed-forward part scaled by "
        "a learned per-channel γ started at 0 (ReZero, since 2026-12-04; none before)) vs "
        "**dense-FFN GNN** (the same blocks, dense feed-forward of width 128). Δ of GMoE: "
        "GMoE − GCN; Δ of MoE-GNN: MoE − dense. **hop-2 share**: share of GMoE's "
        "assignments on hop-2 experts (test-time routing on the full graph, mean over "
        "layers and seeds); **max/mean load**: the most loaded expert's share over the "
        "uniform share, mean over layers and seeds (1 = balanced). Time: mean wall seconds "
        "per run (fit + test) on a 2-core CPU shared with other jobs, one thread. "
        + ("Untuned: every model runs the experiment's defaults (no search)." if tuned is None
           else "Tuned: each model runs its chosen configuration (below)."),
        *(["", "Every run adds to its dataset's protocol: "
           + ", ".join(f"`{o}`" for o in best_overrides(fixed)) + "."] if fixed else []),
        "",
        "**GMoE target**: GMoE's mean ≥ GCN's mean − 0.5 × GCN's std (issue 15), *met* or "
        "**NOT met**; **MoE-GNN − GCN**: the MoE-GNN's mean minus GCN's, in GCN's stds.",
        "",
        "| dataset | GCN | GMoE | Δ | GMoE target | hop-2 share | MoE-GNN dense-FFN | MoE-GNN "
        "| Δ | MoE-GNN − GCN (stds) | max/mean load GMoE / MoE-GNN | "
        "n GCN / GMoE / dense / MoE | time GCN / GMoE / dense / MoE (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        if not any(k[0] == dataset and k[1] != "gnn" for k in by_key):
            continue  # no MoE model run there yet
        cells, times, n = {}, [], []
        for model in MODELS:
            values, rs = scores(dataset, model)
            cells[model] = values
            n.append(str(len(values)))
            times.append(f"{sum(r['wall_seconds'] for r in rs) / len(rs):.0f}" if rs else "–")

        def delta(a, b, cells=cells):
            if not cells[a] or not cells[b]:
                return "–"
            return f"{100 * (sum(cells[a]) / len(cells[a]) - sum(cells[b]) / len(cells[b])):+.2f}"

        def load_stats(model, dataset=dataset):
            loads = [r["expert_load"] for r in by_key.get((dataset, model), [])
                     if "expert_load" in r]
            if not loads:
                return None, None
            ratios = [max(layer) * len(layer) for load in loads for layer in load]
            hop2 = [sum(layer[len(layer) // 2:]) for load in loads for layer in load]
            return sum(ratios) / len(ratios), sum(hop2) / len(hop2)

        def versus_gcn(model, cells=cells):
            r"""(difference of means, GCN's sample std) of ``model`` against GCN."""
            if len(cells[model]) < 1 or len(cells["gnn"]) < 2:
                return None
            mean = statistics.fmean
            return mean(cells[model]) - mean(cells["gnn"]), statistics.stdev(cells["gnn"])

        gap = versus_gcn("gmoe")
        target = "–" if gap is None else ("met" if gap[0] >= -0.5 * gap[1] else "**NOT met**")
        moe_gap = versus_gcn("moe_gnn")
        moe_txt = "–" if moe_gap is None else f"{moe_gap[0] / moe_gap[1]:+.2f}"
        gmoe_ratio, hop2 = load_stats("gmoe")
        moe_ratio, _ = load_stats("moe_gnn")
        ratio_txt = " / ".join("–" if v is None else f"{v:.2f}" for v in (gmoe_ratio, moe_ratio))
        lines.append(
            f"| {dataset} | {mean_std(cells['gnn'])} | {mean_std(cells['gmoe'])} | "
            f"{delta('gmoe', 'gnn')} | {target} | "
            f"{'–' if hop2 is None else f'{100 * hop2:.0f}%'} | "
            f"{mean_std(cells['dense_gnn'])} | {mean_std(cells['moe_gnn'])} | "
            f"{delta('moe_gnn', 'dense_gnn')} | {moe_txt} | {ratio_txt} | {' / '.join(n)} | "
            f"{' / '.join(times)} |")
    for (dataset, model), why in SKIP.items():
        lines += ["", f"{model} not run on {dataset}: {why}."]
    reused = sorted({r["dataset"] for r in records if "reused_from" in r})
    if reused:
        sources = sorted({str(Path(r["reused_from"]).parent.name)
                          for r in records if "reused_from" in r})
        lines += ["", "GCN runs on " + ", ".join(reused) + " are carried over from "
                  + ", ".join(f"`{s}/`" for s in sources) + " (the field `reused_from` of "
                  "each JSON): the same config of `model=gnn`, composed from the overrides."]
    if tuned is not None:
        lines += tuned_table(tuned)
    lines += ["", *diagnosis_table(by_key)]
    plot = ("graph_moe_tuned_expert_load.png" if tuned is not None else
            f"graph_moe_set_{params_tag(fixed)}_expert_load.png" if fixed else
            "graph_moe_expert_load.png")
    _plot_load(by_key, plot)
    lines += ["", "Expert load (test-time routing on the full graph, experts sorted by load "
              f"within each run, mean over runs): `{plot}`."]
    return "\n".join(lines) + "\n"


def diagnosis_table(by_key: dict) -> list[str]:
    r"""Per dataset, what GMoE's runs look like beside GCN's: how many stalled
    (best validation epoch 0: the first epoch's model is tested), the
    training accuracy of the last epoch, and per layer the hop-2 share, the
    most loaded expert over the uniform share and the experts that take under
    2% of the nodes (nearly dead), mean over seeds."""
    out = ["Diagnosis of GMoE against GCN, per dataset (mean over its runs): **stalled**: "
           "runs whose best validation epoch is the first (the model tested is the "
           "first epoch's; – where the runs predate the record of that epoch); "
           "**train acc**: last epoch, training mode (dropout, router "
           "noise); per layer (1 / 2): **hop-2 share** of the test-time assignments, "
           "**max/mean load**, **dead**: experts under 2% of the nodes, summed over runs.",
           "", "| dataset | stalled GCN / GMoE | train acc GCN / GMoE | hop-2 share per layer "
           "| max/mean load per layer | dead experts per layer (runs) |",
           "|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        gcn, gmoe = by_key.get((dataset, "gnn"), []), by_key.get((dataset, "gmoe"), [])
        if not gmoe:
            continue

        def stalled(rs):
            known = [r for r in rs if "best/epoch" in r["metrics"]]  # not in older runs
            if not known:
                return "–"
            return f"{sum(r['metrics']['best/epoch'] == 0 for r in known)}/{len(known)}"

        def train_acc(rs):
            values = [r["metrics"]["train/acc"] for r in rs if "train/acc" in r["metrics"]]
            return f"{100 * statistics.fmean(values):.1f}" if values else "–"

        loads = [r["expert_load"] for r in gmoe if "expert_load" in r]
        per_layer = list(zip(*loads, strict=True)) if loads else []  # [layer][run]
        hop2 = " / ".join(f"{100 * statistics.fmean(sum(x[len(x) // 2:]) for x in layer):.0f}%"
                          for layer in per_layer)
        ratio = " / ".join(f"{statistics.fmean(max(x) * len(x) for x in layer):.2f}"
                           for layer in per_layer)
        dead = " / ".join(str(sum(v < 0.02 for x in layer for v in x)) for layer in per_layer)
        out.append(f"| {dataset} | {stalled(gcn)} / {stalled(gmoe)} | {train_acc(gcn)} / "
                   f"{train_acc(gmoe)} | {hop2 or '–'} | {ratio or '–'} | "
                   f"{dead or '–'} ({len(loads)}) |")
    return out


def _plot_load(by_key: dict, name: str = "graph_moe_expert_load.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any((d, m) in by_key for m in ("gmoe", "moe_gnn"))]
    if not datasets:
        return
    fig, axes = plt.subplots(2, len(datasets), figsize=(2.6 * len(datasets), 5.0),
                             squeeze=False)
    for row, model in enumerate(("gmoe", "moe_gnn")):
        for col, dataset in enumerate(datasets):
            ax = axes[row][col]
            loads = [r["expert_load"] for r in by_key.get((dataset, model), [])
                     if "expert_load" in r]
            if not loads:
                ax.axis("off")
                continue
            for layer in range(len(loads[0])):
                curves = [sorted(load[layer], reverse=True) for load in loads]
                E = len(curves[0])
                mean = [100 * sum(c[i] for c in curves) / len(curves) for i in range(E)]
                ax.plot(range(1, E + 1), mean, marker="o", label=f"layer {layer}")
            ax.axhline(100 / E, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(1, E + 1))
            ax.set_title(f"{dataset}, {'GMoE' if model == 'gmoe' else 'MoE-GNN'} "
                         f"({len(loads)})", fontsize=8)
            ax.set_xlabel("expert rank", fontsize=7)
            if col == 0:
                ax.set_ylabel("% of assignments", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parse = add_tuned_study_arguments(
        parser, RESULTS / "graph_moe_runs_v2", RESULTS / "graph_moe_tuning",
        RESULTS / "graph_moe_runs_tuned", "(dataset, model)",
        RESULTS / "graph_moe_runs_set", "graph_moe_set_<tag>.md")
    args = parse(argv)
    fixed = args.fixed
    command = command_line(__file__, argv)

    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    cells = [(d, m) for d in args.datasets for m in args.models if (d, m) not in SKIP]
    if fixed and not args.table_only:
        from hydra.errors import ConfigCompositionException
        for dataset, model in cells:
            try:
                config_hash(dataset, model, tuple(best_overrides(fixed)))
            except ConfigCompositionException as error:  # e.g. model.net.conv for model=gnn
                parser.error(f"--set {' '.join(best_overrides(fixed))} does not fit "
                             f"model={model} on {dataset} ({str(error).splitlines()[0]}); "
                             f"leave {model} out of "
                             "--models")
    tuned: dict[str, dict] | None = None
    if args.tune:
        tuned = load_or_tune(
            [(f"{d}__{m}", functools.partial(tune_one, d, m, args.tune, args.tuning))
             for d, m in cells],
            args.tuning, args.tune, search=not args.table_only, dry_run=args.dry_run,
            configs={f"{d}__{m}": config_hash(d, m) for d, m in cells})
    if not args.table_only:
        jobs = []
        for seed, dataset in seed_major(args.datasets, args.seeds, DEFAULT_SEEDS):
            for model in args.models:
                if (dataset, model) in SKIP:
                    continue
                best = None
                if tuned is not None:
                    summary = tuned.get(f"{dataset}__{model}")
                    if summary is None:  # a dry run before its search
                        continue
                    best = summary["params"]
                jobs.append((args.runs / run_name(dataset, model, seed, best, fixed),
                             functools.partial(run_one, dataset, model, seed, args.runs, best,
                                               fixed),
                             f"{dataset} {model} seed {seed}"))
        run_pending(jobs, dry_run=args.dry_run)
        if args.dry_run:
            return
    table = build_table(args.runs, command, tuned=tuned, fixed=fixed)
    out = RESULTS / ("graph_moe_tuned.md" if tuned is not None else
                     f"graph_moe_set_{params_tag(fixed)}.md" if fixed else "graph_moe.md")
    table = write_results(out, table)
    print(table)
    print(f"[study] wrote {out}")


if __name__ == "__main__":
    main()
