r"""Multi-task recommendation on MovieLens-100K: single-task models,
shared-bottom, MMoE, PLE, HoME and HoME's ablations, 5 seeds each.

Every run goes through the one training entry point, :func:`moegraph.train.train`,
with a config composed from ``conf/`` (``experiment=movielens_*`` plus
overrides, listed in ``ROWS``; the training protocol, the same for every
model, is ``conf/experiment/_movielens.yaml``). One JSON per (row, seed) is
cached in ``experiments/results/movielens_multitask_runs_v3/``; a rerun skips
finished runs. Writes ``experiments/results/movielens_multitask.md`` (mean +-
std over the seeds, the command and the protocol, each run's best epoch
against the cap, the models compared seed by seed with a paired t-test; the
hand-written findings below its mark are kept) and, beside it, the diagnostics
heatmaps ``movielens_multitask_gates.png`` and
``movielens_multitask_collapse.png`` (seed 0 of MMoE, PLE, HoME and HoME
without expert normalisation).

Run from the repository root, with the raw files in
``$MOEGRAPH_DATA_DIR/MovieLens100K/raw``::

    MOEGRAPH_DATA_DIR=../shared/data OMP_NUM_THREADS=1 PYTHONPATH=. \
        python experiments/run_multitask_study.py
    python experiments/run_multitask_study.py --seeds 1 --rows MMoE HoME   # a subset

``--benchmark synthetic`` runs the MMoE paper's synthetic two-task regression
(Ma et al., KDD 2018; :mod:`moegraph.data.mmoe_synthetic`) instead, with the
``experiment=mtl_synthetic_*`` configs over the task correlations
``--correlations`` (default 0.5, 0.9, 1.0), caching one JSON per (model, p,
seed) in ``experiments/results/multitask_synthetic_runs/``, and writes
``experiments/results/multitask_synthetic.md`` and its plot
``multitask_synthetic.png``::

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/run_multitask_study.py \
        --benchmark synthetic --seeds 3
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import statistics
from pathlib import Path

import torch
from _study import (
    QUIET,
    RESULTS,
    command_line,
    composed,
    load_runs,
    mean_std,
    paired_difference,
    run_pending,
    train_cached,
    write_results,
)

# v3: the protocol that trains every model to convergence (conf/experiment/_movielens.yaml);
# v2: batches of 16,384 and at most 10 epochs (every model stopped at the cap), HoME at
# gain 0.1; v1: the runs before HoME's gain-0.1 default.
RUNS = RESULTS / "movielens_multitask_runs_v3"
# HoME in the paper's exact form: expert batch norm starting at gain 1 (model=home_paper).
PAPER = ["model.net.head.expert_norm_gain=1.0"]
HOME_ABLATIONS = {
    "HoME w/o expert norm": ["model.net.head.expert_norm=null"],
    "HoME w/o hierarchy mask": ["model.net.head.hierarchy_mask=false"],
    "HoME w/o feature gate": ["model.net.head.feature_gate=false"],
    "HoME w/o self gate": ["model.net.head.self_gate=false"],
}
ROWS: dict[str, list[str]] = {
    "single-task watch": ["experiment=movielens_shared_bottom", "data.tasks=[watch]"],
    "single-task like": ["experiment=movielens_shared_bottom", "data.tasks=[like]"],
    "single-task rating": ["experiment=movielens_shared_bottom", "data.tasks=[rating]"],
    "shared-bottom": ["experiment=movielens_shared_bottom"],
    "MMoE": ["experiment=movielens_mmoe"],
    "PLE": ["experiment=movielens_ple"],
    "HoME": ["experiment=movielens_home"],
    "HoME (paper form)": ["experiment=movielens_home", *PAPER],
    **{k: ["experiment=movielens_home", *v] for k, v in HOME_ABLATIONS.items()},
    # early-stopped and checkpointed on watch alone (the others on the mean score): does
    # the shared selection epoch explain the gap to the single-task watch model?
    "HoME, checkpoint on watch AUC": ["experiment=movielens_home",
                                      "optimized_metric=val/watch/auc"],
    "MMoE, checkpoint on watch AUC": ["experiment=movielens_mmoe",
                                      "optimized_metric=val/watch/auc"],
}
SYN_RUNS = RESULTS / "multitask_synthetic_runs_v2"  # v1: before the gain-0.1 default
ONEHOT_RUNS = RESULTS / "multitask_onehot_runs"
# The synthetic benchmark written as a Census-like table: each feature a categorical
# column of 5 bins (one-hot: 500 sparse columns), both labels binary at their median.
ONEHOT_OVERRIDES = ["data.frames.num_bins=5", "data.frames.binary=true",
                    "data.tasks={y1: binary, y2: binary}", "data.metric=mean_auc"]
SYN_ROWS: dict[str, list[str]] = {
    "shared-bottom": ["experiment=mtl_synthetic_shared_bottom"],
    "MMoE": ["experiment=mtl_synthetic_mmoe"],
    "PLE": ["experiment=mtl_synthetic_ple"],
    "HoME": ["experiment=mtl_synthetic_home"],
    "HoME (paper form)": ["experiment=mtl_synthetic_home", *PAPER],
    **{k: ["experiment=mtl_synthetic_home", *v] for k, v in HOME_ABLATIONS.items()},
}
COLUMNS = [("watch AUC", "test/watch/auc"), ("watch GAUC", "test/watch/gauc"),
           ("like AUC", "test/like/auc"), ("like GAUC", "test/like/gauc"),
           ("rating RMSE", "test/rating/rmse")]
# The columns compared seed by seed (name, metric, higher is better): the five above and
# the mean score the runs are early-stopped and checkpointed on.
PAIRED = [*((c, k, not k.endswith("rmse")) for c, k in COLUMNS),
          ("mean score", "test/mean_score", True)]
# The ordering of issue 12 (HoME >= PLE >= MMoE >= shared-bottom), one pair a line, and
# HoME against MMoE and shared-bottom.
ORDER_PAIRS = [("HoME", "PLE"), ("PLE", "MMoE"), ("MMoE", "shared-bottom"), ("HoME", "MMoE"),
               ("HoME", "shared-bottom"), ("HoME (paper form)", "MMoE")]
DIAG_MODELS = ["MMoE", "PLE", "HoME", "HoME (paper form)", "HoME w/o expert norm"]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_path(name: str, seed: int, runs: Path = RUNS) -> Path:
    return runs / f"{slug(name)}_seed{seed}.json"


def params_and_diagnostics(cfg, output_dir: Path) -> dict:
    r"""A ``collect``: the network's parameter count and the diagnostics the run wrote."""
    from moegraph.train import instantiate_run

    params = sum(p.numel() for p in instantiate_run(cfg, trainer=False)["net"].parameters())
    diag_file = output_dir / "multitask_diagnostics.json"
    diag = json.loads(diag_file.read_text()) if diag_file.is_file() else None
    return {"params": params, "diagnostics": diag}


def run_one(name: str, overrides: list[str], seed: int, cache_dir: str,
            runs: Path = RUNS, path: Path | None = None) -> dict:
    r"""Train one (row, seed) through ``train(cfg)`` and cache its JSON (at
    ``path``, by default the row's file under ``runs``)."""
    return train_cached([*overrides, *QUIET, f"seed={seed}", f"paths.cache_dir={cache_dir}"],
                        {"name": name, "seed": seed, "overrides": overrides},
                        path or run_path(name, seed, runs), (params_and_diagnostics,))


def describe(record: dict) -> str:
    return ", ".join(f"{c}={record['metrics'][k]:.4f}" for c, k in COLUMNS
                     if k in record["metrics"])


def cell(values: list[float], digits: int = 4) -> str:
    r"""Mean ± std of a cell, unscaled."""
    return mean_std(values, scale=1.0, digits=digits, empty="-")


def table(records: dict[str, list[dict]]) -> str:
    r"""Test metrics per row, mean ± std over the seeds, with the epoch of the
    tested (best) checkpoint (1 = the first epoch) and the epochs run."""
    head = ("| model | " + " | ".join(c for c, _ in COLUMNS)
            + " | params | fit time (s) | best epoch | epochs run | seeds |")
    lines = [head, "|---" + "|---:" * (len(COLUMNS) + 5) + "|"]
    for name, recs in records.items():
        cells = [cell([r["metrics"][k] for r in recs if k in r["metrics"]])
                 for _, k in COLUMNS]
        fit = cell([r["metrics"]["time/fit_seconds"] for r in recs], 1)
        best = cell([r["metrics"]["best/epoch"] + 1 for r in recs], 1)
        epochs = cell([r["metrics"]["time/epochs"] for r in recs], 1)
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {recs[0]['params']:,} | {fit} | {best} | {epochs} | {len(recs)} |")
    return "\n".join(lines)


def convergence(records: dict[str, list[dict]], max_epochs: int) -> str:
    r"""Each run's best epoch / epochs run, against the cap: a run whose best
    epoch is the cap's may still have been improving."""
    lines = ["| model | best epoch / epochs run, per seed | latest best epoch | stopped early |",
             "|---|---|---:|---:|"]
    for name, recs in records.items():
        per_seed = ", ".join(f"{m['best/epoch'] + 1:.0f}/{m['time/epochs']:.0f}"
                             for m in (r["metrics"] for r in recs))
        latest = max(r["metrics"]["best/epoch"] + 1 for r in recs)
        early = sum(r["metrics"]["time/epochs"] < max_epochs for r in recs)
        lines.append(f"| {name} | {per_seed} | {latest:.0f} | {early}/{len(recs)} |")
    return "\n".join(lines)


def paired_table(records: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> str:
    r"""For each pair (a, b): a's gain over b per seed (positive: a better; for
    RMSE, b - a), mean ± std over the seeds both have, the seeds a wins, and
    the paired t-test's verdict (``>``/``<``: better/worse beyond noise,
    ``~``: within noise; :func:`_study.paired_difference`)."""
    lines = ["| a vs b | " + " | ".join(c for c, _, _ in PAIRED) + " |",
             "|---" + "|---" * len(PAIRED) + "|"]
    for a, b in pairs:
        if a not in records or b not in records:
            continue
        cells = []
        for _, key, higher in PAIRED:
            by_seed = [{r["seed"]: r["metrics"][key] for r in records[n] if key in r["metrics"]}
                       for n in (a, b)]
            d = paired_difference(*by_seed, higher_is_better=higher)
            cells.append("-" if d is None else
                         f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['wins']}/{d['n']}) {d['verdict']}")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol() -> dict:
    r"""The training protocol the ``experiment=movielens_*`` configs share, read
    from the composed config (so that the text of the results file follows it)."""
    with composed(["experiment=movielens_mmoe"]) as cfg:
        stop = cfg.callbacks.early_stopping
        return {"batch_size": cfg.data.batch_size, "max_epochs": cfg.trainer.max_epochs,
                "patience": stop.patience, "monitor": stop.monitor, "mode": stop.mode,
                "checkpoint": cfg.callbacks.model_checkpoint.monitor,
                "lr": cfg.model.optimizer.lr}


def diag_table(records: dict[str, list[dict]]) -> str:
    tasks = ["watch", "like", "rating"]
    lines = ["| model | max zero share (%) | scale spread (max/min) | flagged shared experts | "
             + " | ".join(f"own weight {t} (%)" for t in tasks) + " |",
             "|---" + "|---:" * (3 + len(tasks)) + "|"]
    for name, recs in records.items():
        diags = [r["diagnostics"] for r in recs if r.get("diagnostics")]
        if not diags:
            continue
        zero = [100 * max(max(lv["zero_share"]) for lv in d["levels"]) for d in diags]
        spread = [max(lv["scale_spread"] for lv in d["levels"]) for d in diags]
        flagged = [float(sum(x["flagged"] for x in d["degradation"])) for d in diags]
        own = [cell([100 * d["underfitting"][t]["own"] for d in diags
                         if t in d["underfitting"]], 1) for t in tasks]
        lines.append(f"| {name} | {cell(zero, 1)} | {cell(spread, 2)} "
                     f"| {cell(flagged, 1)} | " + " | ".join(own) + " |")
    return "\n".join(lines)


def synthetic_mse(rec: dict) -> float:
    r"""Test MSE averaged over the two tasks."""
    m = rec["metrics"]
    return (m["test/y1/rmse"] ** 2 + m["test/y2/rmse"] ** 2) / 2


def onehot_auc(rec: dict) -> float:
    r"""Test AUC averaged over the two binary tasks."""
    m = rec["metrics"]
    return (m["test/y1/auc"] + m["test/y2/auc"]) / 2


def synthetic_study(args, argv: list[str] | None) -> None:
    torch.set_num_threads(1)
    onehot = args.benchmark == "onehot"
    runs = ONEHOT_RUNS if onehot else SYN_RUNS
    rows = args.rows or list(SYN_ROWS)
    unknown = [r for r in rows if r not in SYN_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(SYN_ROWS)}")
    def overrides(name: str, p: float) -> list[str]:
        return [*SYN_ROWS[name], f"data.frames.correlation={p}",
                f"data.frames.num_rows={args.num_rows}", *(ONEHOT_OVERRIDES if onehot else [])]

    def path(name: str, p: float, seed: int) -> Path:
        return runs / f"{slug(name)}_p{p}_seed{seed}.json"

    # seed-major: every model gets seed 0 first
    grid = [(seed, p, name) for seed in range(args.seeds) for p in args.correlations
            for name in rows]
    run_pending([] if args.table_only else [(path(name, p, seed),
                  functools.partial(run_one, name, overrides(name, p), seed, args.cache_dir,
                                    path=path(name, p, seed)),
                  f"{name} p={p} seed {seed}") for seed, p, name in grid],
                tag=args.benchmark, dry_run=args.dry_run,
                describe=lambda r: (f"test mean AUC {onehot_auc(r):.4f}" if onehot else
                                    f"test MSE {synthetic_mse(r):.4f}")
                + f", {r['metrics']['time/epochs']:.0f} epochs")
    if args.dry_run:
        return
    records: dict[str, dict[float, list[dict]]] = {}
    for seed, p, name in grid:
        if path(name, p, seed).is_file():  # all of them, unless --table-only
            rec = json.loads(path(name, p, seed).read_text())
            records.setdefault(name, {}).setdefault(p, []).append(rec)
    (write_onehot if onehot else write_synthetic)(args, records, argv)


def write_onehot(args, records: dict[str, dict[float, list[dict]]],
                 argv: list[str] | None) -> None:
    ps = list(args.correlations)
    lines = ["| model | params | " + " | ".join(
        f"test mean AUC, p = {p} | y1 AUC | y2 AUC | epochs run" for p in ps) + " |",
        "|---|---:" + "|---:|---:|---:|---:" * len(ps) + "|"]
    for name, by_p in records.items():
        cells = []
        for p in ps:
            rs = by_p.get(p, [])
            cells += [cell([onehot_auc(r) for r in rs]),
                      cell([r["metrics"]["test/y1/auc"] for r in rs]),
                      cell([r["metrics"]["test/y2/auc"] for r in rs]),
                      cell([r["metrics"]["time/epochs"] for r in rs], 1)]
        params = next(iter(by_p.values()))[0]["params"]
        lines.append(f"| {name} | {params:,} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for by_p in records.values() for rs in by_p.values() for r in rs})
    cmd = command_line(__file__, argv)
    out = Path(args.out or RESULTS / "multitask_onehot.md")
    text = f"""# A Census-like one-hot table: the synthetic benchmark with binned features

Command: `PYTHONPATH=. OMP_NUM_THREADS=1 {cmd}`
Date: {datetime.date.today()}; torch {torch.__version__}; CPU, 1 thread, on a 2-core machine
shared with other jobs.

**Protocol.** Data: the MMoE paper's synthetic rows (`moegraph.data.mmoe_synthetic_frame`,
d = 100, m = 10, noise variance 0.01) written as a table as a user's tabular data would be:
each feature a categorical column of its bin among 5 equiprobable bins of N(0, 1),
one-hot encoded by `TabularMultiTaskDataModule` (500 sparse columns, categories fitted on
the training rows), both labels made binary at their median (two balanced binary tasks);
{args.num_rows:,} rows per seed, split at random 80 / 10 / 10. Models and training as in
`multitask_synthetic.md` (`conf/experiment/mtl_synthetic_*.yaml`; Adam lr 0.01, batches of
256, at most 20 epochs, early stopping with patience 5 and checkpoint on the validation mean
AUC; the best checkpoint is tested). Test AUC, mean ± std over seeds {seeds}.

{chr(10).join(lines)}
"""
    out.write_text(text)
    print(text)


def write_synthetic(args, records: dict[str, dict[float, list[dict]]],
                    argv: list[str] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = list(args.correlations)
    head = ("| model | params | " + " | ".join(f"test MSE, p = {p}" for p in ps)
            + " | n (seeds per p) |")
    lines = [head, "|---|---:" + "|---:" * len(ps) + "|---|"]
    for name, by_p in records.items():
        cells = [cell([synthetic_mse(r) for r in by_p.get(p, [])]) for p in ps]
        params = next(iter(by_p.values()))[0]["params"]
        n = " / ".join(str(len(by_p.get(p, []))) for p in ps)
        lines.append(f"| {name} | {params:,} | " + " | ".join(cells) + f" | {n} |")
    gaps, verdicts = [], []
    base = records.get("shared-bottom", {})
    for name in [n for n in records if n != "shared-bottom"]:
        cells, means = [], {}
        for p in ps:
            pairs = {r["seed"]: synthetic_mse(r) for r in base.get(p, [])}
            diff = [pairs[r["seed"]] - synthetic_mse(r) for r in records[name].get(p, [])
                    if r["seed"] in pairs]
            cells.append(cell(diff))
            if diff:
                means[p] = statistics.mean(diff)
        gaps.append(f"| {name} | " + " | ".join(cells) + " |")
        order = sorted(means)  # ascending p: the gain should fall along it
        steps = zip(order[:-1], order[1:], strict=True)
        grows = len(order) > 1 and all(means[a] > means[b] for a, b in steps)
        trend = ("measured at one p only" if len(order) < 2 else
                 "grows as p falls" if grows else "does NOT grow monotonically as p falls")
        verdicts.append(f"- {name}: mean gain over shared-bottom {trend} "
                        f"({', '.join(f'p = {p}: {means[p]:+.4f}' for p in order)}).")
    gap_head = ("| model | " + " | ".join(f"shared-bottom MSE - model MSE, p = {p}" for p in ps)
                + " |")
    gap_table = "\n".join([gap_head, "|---" + "|---:" * len(ps) + "|", *gaps])
    out = Path(args.out or RESULTS / "multitask_synthetic.md")
    png = out.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, by_p in records.items():
        if name.startswith("HoME w/o"):
            continue
        xs = [p for p in ps if by_p.get(p)]
        means = [statistics.mean(synthetic_mse(r) for r in by_p[p]) for p in xs]
        stds = [statistics.stdev([synthetic_mse(r) for r in by_p[p]]) if len(by_p[p]) > 1
                else 0.0 for p in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("task correlation p (cosine of w1, w2)")
    ax.set_ylabel("test MSE (mean of the two tasks)")
    ax.set_xticks(ps)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    cmd = command_line(__file__, argv)
    seeds = sorted({r["seed"] for by_p in records.values() for rs in by_p.values() for r in rs})
    text = f"""# The MMoE paper's synthetic benchmark

Command: `PYTHONPATH=. OMP_NUM_THREADS=1 {cmd}`
Date: {datetime.date.today()}; torch {torch.__version__}; CPU, 1 thread, on a 2-core machine
shared with other jobs.

**Protocol.** Data (Ma et al., KDD 2018, section 3; `moegraph.data.mmoe_synthetic`): d = 100,
c = 1, m = 10 sinusoids (alpha, beta ~ N(0, 1), drawn per seed), noise variance 0.01;
{args.num_rows:,} rows per seed, split at random 80 / 10 / 10; features standardised with the
training statistics; two regression tasks whose weight vectors have cosine p. Models
(`conf/experiment/mtl_synthetic_*.yaml`): towers of width 8; shared-bottom one layer of 128;
MMoE 8 experts of width 16; PLE 2 levels of 4 shared + 2 per task; HoME each task its own
group, 4 shared + 2 per group (+ 1 per task at level 2), batch norm starting at gain 0.1 +
Swish (HoME (paper form): gain 1; see `home_diagnosis.md`), feature-gate rank 4, self-gate;
"w/o expert norm": ReLU experts. Adam lr 0.01, batches of 256, at most 20 epochs, early
stopping (patience 5) and checkpoint on the validation mean R^2 of the two tasks; the best
checkpoint is tested. Test MSE averaged over the two tasks, mean ± std over the seeds cached
among {seeds} (n per row).
The runs of shared-bottom, MMoE, PLE, HoME (paper form) and HoME w/o expert norm are those of
the study before HoME's gain-0.1 default (`multitask_synthetic_runs/`, same configurations),
copied into `multitask_synthetic_runs_v2/`; HoME's other ablations ran at p = 0.5 only.

{chr(10).join(lines)}

**MMoE's finding** (the lower the correlation, the larger MMoE's gain over shared-bottom):
the gain per model, paired by seed (positive: better than shared-bottom):

{gap_table}

{chr(10).join(verdicts)}

![test MSE against p]({png.name})
"""
    out.write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", choices=["movielens", "synthetic", "onehot"],
                        default="movielens")
    parser.add_argument("--correlations", type=float, nargs="+", default=None,
                        help="synthetic: 0.5 0.9 1.0 by default; onehot: 0.5")
    parser.add_argument("--num-rows", type=int, default=None,
                        help="synthetic: 8000 by default; onehot: 20000")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the cached runs, run nothing")
    parser.add_argument("--rows", nargs="*", default=None)
    parser.add_argument("--cache-dir", default=".cache",
                        help="where the raw files are copied before PyG processes them")
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs to do (not cached yet), train nothing")
    args = parser.parse_args(argv)
    if args.benchmark in ("synthetic", "onehot"):
        onehot = args.benchmark == "onehot"
        args.correlations = args.correlations or ([0.5] if onehot else [0.5, 0.9, 1.0])
        args.num_rows = args.num_rows or (20000 if onehot else 8000)
        synthetic_study(args, argv)
        return
    args.rows = args.rows or list(ROWS)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
    args.out = args.out or str(RESULTS / "movielens_multitask.md")
    if not os.environ.get("MOEGRAPH_DATA_DIR"):
        raise SystemExit("set MOEGRAPH_DATA_DIR to the folder holding MovieLens100K/raw "
                         "(e.g. ../shared/data)")
    torch.set_num_threads(1)
    run_pending([(run_path(name, seed, args.runs),
                  functools.partial(run_one, name, ROWS[name], seed, args.cache_dir, args.runs),
                  f"{name} seed {seed}")
                 # seed-major: every row gets seed 0 first
                 for seed in range(args.seeds) for name in args.rows
                 if not args.table_only],
                describe=describe, dry_run=args.dry_run)
    if args.dry_run:
        return
    cached = {(r["name"], r["seed"]): r for r in load_runs(args.runs)}
    # every cached seed below --seeds (with --table-only a row may have fewer)
    records = {name: [cached[name, seed] for seed in range(args.seeds) if (name, seed) in cached]
               for name in args.rows}
    records = {name: recs for name, recs in records.items() if recs}

    from moegraph.diagnostics import plot_multitask_diagnostics

    out = Path(args.out)
    diags = {n: records[n][0]["diagnostics"] for n in DIAG_MODELS
             if n in records and records[n][0].get("diagnostics")}
    gates_png = out.with_name(out.stem + "_gates.png")
    collapse_png = out.with_name(out.stem + "_collapse.png")
    if diags:
        plot_multitask_diagnostics(diags, gates_png, "gates")
        plot_multitask_diagnostics(diags, collapse_png, "collapse")
    cmd = command_line(__file__, argv)
    proto = protocol()
    steps = -(-161_616 // proto["batch_size"])
    ablations = [("HoME", n) for n in records if n.startswith("HoME ")]
    text = f"""# Multi-task recommendation on MovieLens-100K

Command: `MOEGRAPH_DATA_DIR=../shared/data OMP_NUM_THREADS=1 PYTHONPATH=. {cmd}`
Date: {datetime.date.today()}; torch {torch.__version__}; CPU, 1 thread, on a 2-core machine
shared with other jobs (times are indicative). Runs cached in `{args.runs.name}/`.

**Protocol.** Data: MovieLens-100K (943 users, 1,682 movies, 100,000 ratings). Split per user
by time: the last 10% of each user's ratings are test, the 10% before validation, the rest
training (80,808 / 9,596 / 9,596); the message-passing graph holds the training ratings only.
One sampled unobserved movie per rating (same user) gives the `watch` negatives (training
negatives redrawn each epoch): 161,616 training rows. Tasks: `watch` (observed vs sampled,
binary, all rows), `like` (rating >= 4, binary, observed rows), `rating` (regression,
observed rows); masked out where unlabelled. Encoder: LightGCN (2 layers, 16-dim id
embeddings plus a linear map of the side features), pair representation
`[e_u, e_i, e_u * e_i]` (48). Heads: experts of width 16, towers of width 8; MMoE 6 experts;
PLE 2 levels of 3 shared + 1 per task; HoME groups {{watch}}, {{like, rating}}, level 1:
2 shared + 1 per group, level 2: 2 shared + 1 per group + 1 per task, batch norm starting at
gain 0.1 + Swish (HoME (paper form): gain 1, the paper's BatchNorm; see `home_diagnosis.md`),
feature-gate rank 4, self-gate ("w/o expert norm": ReLU experts); shared-bottom one 16-wide
layer; single-task = shared-bottom trained on one task. Training, the same for every model
(`conf/experiment/_movielens.yaml`): Adam lr {proto["lr"]}, batches of
{proto["batch_size"]:,} rows ({steps} steps per epoch), at most {proto["max_epochs"]} epochs,
early stopping (patience {proto["patience"]}) and checkpoint on `{proto["monitor"]}` (mode
{proto["mode"]}: the mean over the tasks of watch AUC, like AUC and rating R^2); the best
checkpoint is tested. GAUC = AUC per user averaged over users with both classes. Test
metrics, mean ± std over the seeds 0, 1, ... (their number in the last column; the seed
also draws the negatives). Best epoch: the tested checkpoint's (1 = the first).

{table(records)}

## Convergence: best epoch against the cap of {proto["max_epochs"]} epochs

A run stopped early when its validation mean score had not improved for
{proto["patience"]} epochs before the cap.

{convergence(records, proto["max_epochs"])}

## The ordering, paired by seed

Gain of a over b on the test rows of the same seed (positive: a better; for RMSE b - a),
mean ± std over the seeds, (seeds where a is better / seeds), and the verdict of a
two-sided paired t-test at 5%: `>` a better beyond noise, `<` a worse beyond noise,
`~` within noise.

{paired_table(records, ORDER_PAIRS)}
""" + (f"""
## HoME's parts, paired by seed: full HoME vs HoME without one part

Positive: full HoME better (the part helps); verdicts as above.

{paired_table(records, ablations)}
""" if ablations else "") + f"""
## Diagnostics of HoME's three anomalies (test rows, mean ± std over seeds)

Collapse: share of expert activations with |a| <= 1e-3 (max over experts) and the spread of
expert output scales (max / min mean |a| within a level). Degradation: shared experts used by
at most one task/group gate (a gate uses an expert when its mean weight is at least half of
uniform over the experts it sees). Underfitting: mean gate weight a task puts on its own
(task and group) experts in the last level (0 for MMoE, which has shared experts only).

{diag_table(records)}

Heatmaps (seed 0): [`{gates_png.name}`]({gates_png.name}) (mean gate weight per expert),
[`{collapse_png.name}`]({collapse_png.name}) (zero share and relative scale per expert).
"""
    text = write_results(out, text)
    print(text)


if __name__ == "__main__":
    main()
