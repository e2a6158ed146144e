r"""Chen et al. (2022) on their cluster-structured synthetic task: one patch-wise
expert against a top-1 mixture of 8, with cubic and with linear experts,
through the one training entry point (``train(cfg)`` with the
``experiment=cluster_single`` / ``experiment=cluster_moe`` configs)::

    python experiments/run_cluster_moe.py               # 5 seeds, 4 models
    python experiments/run_cluster_moe.py --seeds 3 --models moe_cubic single_cubic
    python experiments/run_cluster_moe.py --table-only  # rebuild table and figure

Each finished run is cached as one JSON file under ``--runs`` (a rerun skips
it); seed *s* draws both the data (a new set of vectors and samples) and the
initialisation. Writes ``experiments/results/cluster_moe.md`` (mean ± std test
accuracy beside the paper's) and ``experiments/results/cluster_moe_routing.png``
(share of each cluster's test samples routed to each expert, seed 0).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from _study import (
    QUIET,
    RESULTS,
    add_study_arguments,
    command_line,
    load_runs,
    mean_std,
    results_header,
    run_diagnostics,
    run_pending,
    train_cached,
    write_results,
)

# name: (experiment, expert activation, label, the paper's test accuracy (%), Table 1)
MODELS = {
    "single_linear": ("cluster_single", "linear", "single expert, linear", 68.7),
    "single_cubic": ("cluster_single", "cubic", "single expert, cubic", 79.5),
    "moe_linear": ("cluster_moe", "linear", "MoE (8 experts, top-1), linear", 93.0),
    "moe_cubic": ("cluster_moe", "cubic", "MoE (8 experts, top-1), cubic", 99.5),
}


def run_name(model: str, seed: int) -> str:
    return f"{model}__seed{seed}.json"


def overrides_for(model: str, seed: int) -> list[str]:
    r"""The command-line overrides of one run (``moegraph-train`` takes the same)."""
    experiment, act, _, _ = MODELS[model]
    # The 5-seed table was made with raw inputs (before PatchMoE's input_norm).
    return [f"experiment={experiment}", f"model.net.act={act}", f"seed={seed}", *QUIET,
            "model.net.input_norm=false"]


# The input-scale / router study (``--robustness``): 8 cubic experts on a smaller
# draw of the task, at input scales 0.1, 1, 10 with and without input_norm, and
# router settings at scale 1.
ROBUST_DATA = ["data.num_train=2000", "data.num_val=500", "data.num_test=2000"]
ROBUST_EPOCHS = "trainer.max_epochs=60"  # unless a setting gives its own
# Chen et al.'s procedure (conf/model/patch_moe_paper.yaml) at their input scale: its
# steps have a fixed small length, so it gets 200 epochs, and the patience to pass its
# exploration stage; "Adam, 200 epochs" is the default model with the same budget.
PAPER = ["model=patch_moe_paper", "data.scale=10", "trainer.max_epochs=200",
         "callbacks.early_stopping.patience=200"]
ROBUST = {
    **{f"scale{s}_{norm}": (f"input scale {s}, {'input_norm' if norm == 'norm' else 'raw'}",
                            [f"data.scale={s}", f"model.net.input_norm={norm == 'norm'}"])
       for s in (0.1, 1, 10) for norm in ("norm", "raw")},
    "noise_off": ("input scale 1, input_norm, router without noise",
                  ["model.net.noisy=false"]),
    "balance": ("input scale 1, input_norm, load-balance loss 0.01",
                ["+model.aux_loss_weights.load_balance=0.01"]),
    "adam_200": ("input scale 1, input_norm, Adam, 200 epochs (patience 200)",
                 ["trainer.max_epochs=200", "callbacks.early_stopping.patience=200"]),
    "paper": ("the paper's procedure (`model=patch_moe_paper`), input scale 10, 200 epochs",
              PAPER),
    "paper_gaussian": ("the paper's procedure, learned Gaussian noise instead of uniform",
                       [*PAPER, "model.net.noise=gaussian"]),
    "paper_router_init": ("the paper's procedure, router's default init instead of zeros",
                          [*PAPER, "model.net.router_init=default"]),
    "paper_router_lr": ("the paper's procedure, router lr 0.001 (the experts') instead of 0.1",
                        [*PAPER, "model.param_groups.0.lr=0.001"]),
    "paper_scale1": ("the paper's procedure at input scale 1", [*PAPER, "data.scale=1"]),
}
PAPER_ROWS = ("paper", "adam_200", "paper_gaussian", "paper_router_init", "paper_router_lr",
              "paper_scale1")


def run_robust(name: str, seed: int, runs: Path) -> dict:
    own = ROBUST[name][1]
    # a key given twice keeps its last value (data.scale of paper_scale1)
    own = [o for i, o in enumerate(own)
           if not any(p.split("=")[0] == o.split("=")[0] for p in own[i + 1:])]
    epochs = [] if any(o.startswith("trainer.max_epochs=") for o in own) else [ROBUST_EPOCHS]
    overrides = ["experiment=cluster_moe", f"seed={seed}", *QUIET, *ROBUST_DATA, *epochs, *own]
    return train_cached(overrides, {"variant": name, "seed": seed},
                        runs / f"{name}__seed{seed}.json",
                        (run_diagnostics, protocol, routing_by_cluster))


def build_robust_table(runs: Path, command: str) -> str:
    records = load_runs(runs)
    if not records:
        return ""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    lines = ["", "## Input scale and router settings", "",
             f"Made by `{command}` (cached runs in "
             "`experiments/results/cluster_moe_runs/robust/`): 8 cubic experts, top-1, "
             "2,000 / 500 / 2,000 samples, 60 epochs (a short run, as the test "
             "`tests/nn/models/test_patch_moe_scale.py`) unless the row says otherwise, "
             "otherwise the protocol above. "
             "*input_norm* (the default of "
             "`conf/model/patch_moe.yaml`) divides the inputs by their RMS patch norm, "
             "measured on the first batch; *raw* feeds them as they are.", "",
             "| setting | test acc (%) | top-expert share per cluster (%) | experts owning "
             "a cluster | epochs | n |", "|---|---|---|---|---|---|"]
    for name, (label, _) in ROBUST.items():
        rs = by.get(name, [])
        if not rs:
            continue
        test = [r["metrics"]["test/acc"] for r in rs]
        top, owners = specialisation_cells(rs)
        epochs = sum(r["metrics"]["time/epochs"] for r in rs) / len(rs)
        lines.append(f"| {label} | {mean_std(test)} | {top} | {owners} | {epochs:.0f} | "
                     f"{len(rs)} |")
    lines += [
        "",
        "What the paper's analysis predicts for the router (Chen et al. 2022, Section 4 and "
        "Theorem 4.2, as we read it): training goes in two stages. While the router is "
        "still near its zero initialisation, its exploration noise (uniform U(0, 1) added "
        "to the gate logits in their code) spreads every cluster over all experts and each "
        "expert becomes 'professional' on some cluster (its weights align with that "
        "cluster's signal direction); then the router learns the cluster-centre directions "
        "and sends each cluster to the experts professional on it. With 8 experts and 4 "
        "clusters this means each cluster goes to its own *set* of experts (one or more), "
        "no expert serving two clusters; their notebook shows the extreme case, 4 experts "
        "taking all samples, one cluster each. Their settings for it: router initialised "
        "at zero and trained by SGD (lr 0.1), experts by per-expert normalised gradient "
        "descent (lr 0.001) from a 1000x-shrunk initialisation, inputs 10x the generator's: "
        "`model=patch_moe_paper` (`moegraph.optim.NormalizedGD`, a parameter group for "
        "`net.router`, `TopKRouter(noise='uniform')`, `PatchMoE(router_init='zeros')`, "
        "init std 1e-4, raw inputs). The default `model=patch_moe` trains router and "
        "experts with one Adam (lr 0.01) and learned Gaussian noise. The `the paper's "
        "procedure, ...` rows change one part of it each.",
    ]
    return "\n".join(lines) + "\n"


def protocol(cfg, output_dir: Path | None = None) -> dict:
    r"""A ``collect``: the protocol fields of a run."""
    return {"protocol": {"num_experts": cfg.model.net.num_experts,
            "hidden_channels": cfg.model.net.hidden_channels, "noisy": cfg.model.net.noisy,
            "optimizer": cfg.model.optimizer._target_.split(".")[-1],
            "lr": cfg.model.optimizer.lr, "max_epochs": cfg.trainer.max_epochs,
            "patience": cfg.callbacks.early_stopping.patience,
            "num_train": cfg.data.num_train, "num_val": cfg.data.num_val,
            "num_test": cfg.data.num_test}}


def routing_by_cluster(cfg, output_dir: Path) -> dict:
    r"""The share of each cluster's test samples routed to each expert, with
    the best checkpoint of the run."""
    import torch

    from moegraph.diagnostics import routing_by_group
    from moegraph.train import instantiate_run

    ckpts = sorted(Path(output_dir, "checkpoints").glob("*.ckpt"))
    if cfg.model.net.num_experts == 1 or not ckpts:
        return {}
    run = instantiate_run(cfg, trainer=False)
    task, data = run["task"], run["datamodule"].data
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    task.load_state_dict(state)
    task.eval()
    with torch.no_grad():
        out = task(data)
    share = routing_by_group(out.routing[0], data.cluster, cfg.data.num_clusters,
                             rows=data.test_mask)
    return {"routing_by_cluster": share.tolist()}


def run_one(model: str, seed: int, runs: Path) -> dict:
    r"""Train one model through ``train(cfg)``, measure its routing by cluster
    on the test samples with the best checkpoint, and cache the record."""
    return train_cached(overrides_for(model, seed), {"model": model, "seed": seed},
                        runs / run_name(model, seed),
                        (run_diagnostics, protocol, routing_by_cluster))


def specialisation(share: list[list[float]]) -> tuple[float, int]:
    r"""Mean share of a cluster's samples that its most used expert takes, and
    the number of distinct experts that are some cluster's most used one."""
    top = [max(row) for row in share]
    owners = {row.index(max(row)) for row in share}
    return sum(top) / len(top), len(owners)


def specialisation_cells(rs: list[dict]) -> tuple[str, str]:
    r"""The table cells of :func:`specialisation` over some runs: the mean
    top-expert share (%) and the experts owning a cluster per seed."""
    spec = [specialisation(r["routing_by_cluster"]) for r in rs if "routing_by_cluster" in r]
    top = f"{100 * sum(s[0] for s in spec) / len(spec):.1f}" if spec else "–"
    owners = "/".join(str(s[1]) for s in spec) if spec else "–"
    return top, owners


def build_table(runs: Path, command: str) -> str:
    by_model: dict[str, list[dict]] = {}
    for r in load_runs(runs):
        by_model.setdefault(r["model"], []).append(r)
    lines = [
        *results_header("Chen et al. (2022): one expert vs a mixture on cluster-structured "
                        "data", command, runs),
        "Data (`conf/data/clusters.yaml`): K = 4 clusters, P = 4 patches, d = 50, "
        "α ~ U(0.5, 2), β ~ U(1, 2), γ ~ U(0.5, 3), Gaussian patch N(0, I/d); 16,000 "
        "training, 4,000 validation (for the checkpoint and early stopping) and 16,000 "
        "test samples, redrawn (vectors too) for each seed. Model "
        "(`conf/model/patch_moe.yaml`): J = 16 neurons per expert, fixed second layer, "
        "summed over patches; 8 experts, linear router on the sum of the patches, top-1 "
        "with learned Gaussian exploration noise in training, output scaled by the "
        "router probability; the single expert is the same model with one expert and no "
        "router. Full-batch Adam (lr 0.01), cross-entropy on two logits (-F/2, F/2) = "
        "the logistic loss, no auxiliary loss, at most 200 epochs, early stopping "
        "(patience 50) and the best checkpoint by validation accuracy.",
        "",
        "| model | test acc (%) | paper (%) | train acc (%) | top-expert share per "
        "cluster (%) | experts owning a cluster | epochs | fit time (s) | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, (_, _, label, paper) in MODELS.items():
        rs = by_model.get(model, [])
        if not rs:
            continue
        test = [r["metrics"]["test/acc"] for r in rs]
        train = [r["metrics"]["train/acc"] for r in rs if "train/acc" in r["metrics"]]
        top, owners = specialisation_cells(rs)
        epochs = sum(r["metrics"]["time/epochs"] for r in rs) / len(rs)
        fit = sum(r["metrics"]["time/fit_seconds"] for r in rs) / len(rs)
        lines.append(f"| {label} | {mean_std(test)} | {paper:.1f} | {mean_std(train)} | "
                     f"{top} | {owners} | {epochs:.0f} | {fit:.0f} | {len(rs)} |")
    lines += [
        "",
        "Train accuracy is the last epoch's (training mode: noisy routing). "
        "*Top-expert share*: for each cluster, the share of its test samples that go to "
        "the expert it uses most, averaged over clusters and seeds (100 = each cluster "
        "has one expert). *Experts owning a cluster*: per seed, how many distinct "
        "experts are some cluster's most used one (4 = every cluster has its own).",
        "",
        "![routing](cluster_moe_routing.png)",
    ]
    _plot_routing(by_model)
    return "\n".join(lines) + "\n"


def _plot_routing(by_model: dict) -> None:
    import torch

    from moegraph.diagnostics import plot_routing_by_group

    for model in ("moe_cubic",):
        rs = [r for r in by_model.get(model, []) if "routing_by_cluster" in r]
        if not rs:
            continue
        r = min(rs, key=lambda r: r["seed"])
        share = torch.tensor(r["routing_by_cluster"])
        title = (f"{MODELS[model][2]}, seed {r['seed']}: test samples of each cluster "
                 f"by expert (test acc {100 * r['metrics']['test/acc']:.2f}%)")
        plot_routing_by_group(share, RESULTS / "cluster_moe_routing.png", "cluster", title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, default=5)
    add_study_arguments(parser, RESULTS / "cluster_moe_runs")
    parser.add_argument("--robustness", nargs="*", default=None, choices=list(ROBUST),
                        help="run the input-scale / router study (these settings; all if "
                             "none given) instead of the main table")
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)

    import torch
    torch.set_num_threads(args.threads)

    robust_runs = args.runs / "robust"
    if args.robustness is not None and not args.table_only:
        robust_runs.mkdir(parents=True, exist_ok=True)
        run_pending([(robust_runs / f"{v}__seed{s}.json",
                      functools.partial(run_robust, v, s, robust_runs), f"{v} seed {s}")
                     for s in range(args.seeds) for v in (args.robustness or list(ROBUST))],
                    tag="cluster", dry_run=args.dry_run)
    elif not args.table_only:
        run_pending([(args.runs / run_name(m, s), functools.partial(run_one, m, s, args.runs),
                      f"{m} seed {s}")
                     for s in range(args.seeds) for m in args.models], tag="cluster",
                    dry_run=args.dry_run)
    if args.dry_run:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    main_command = ("python experiments/run_cluster_moe.py" if args.robustness is not None
                    else command)
    robust_command = (command if args.robustness is not None else (
        "python experiments/run_cluster_moe.py --robustness scale0.1_norm scale0.1_raw "
        "scale1_norm scale1_raw scale10_norm scale10_raw noise_off balance --seeds 2` and "
        f"`python experiments/run_cluster_moe.py --robustness {' '.join(PAPER_ROWS)} "
        "--seeds 3"))
    table = build_table(args.runs, main_command)
    table += build_robust_table(robust_runs, robust_command)
    table = write_results(RESULTS / "cluster_moe.md", table)
    print(table)


if __name__ == "__main__":
    main()
