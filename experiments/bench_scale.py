r"""Scale benchmark: one training epoch of a MoE-GNN and of Mowst on a synthetic
graph of up to 1,000,000 nodes and 10,000,000 edges, with the pure-torch
neighbour-sampling loader, on this machine's CPU.

    python experiments/bench_scale.py                       # 250k, 500k, 1M nodes
    python experiments/bench_scale.py --sizes 100000 --threads 1

Each (size, model) runs in a fresh subprocess, so that its peak RSS is its
own; the peak is also taken per stage (graph generation, the sampler's CSR,
training: ``/proc/self/status``'s high-water mark, reset between stages). The
load average before and after the epoch is recorded and a loaded run is
flagged in the table. Writes ``experiments/results/scale.md`` and
``scale.png`` (``--out`` for another folder); ``--device cuda`` trains on a GPU
(sampling stays on the CPU) and adds the peak GPU memory.

Setting (stated in the results file): CSBM graph (``moegraph.data.csbm_graph``),
average in-degree 10 (``N * 10`` directed edges, i.e. ``5 N`` undirected
pairs), 32 features, 4 classes; 2% of the nodes are training seeds (20,000
at 1M nodes: an epoch of the MoE-GNN takes about 2 minutes here), 1%
validation; fanout ``[10, 5]``, 1,024 seeds per batch; hidden 64, 2 SAGE
layers. MoE-GNN: each layer followed by a top-2 MoE block of 8 experts.
Mowst: MLP + GraphSAGE, one epoch = one weak turn epoch (MLP + gate trained,
the GNN frozen but run on every batch) then one strong turn epoch (the GNN
trained, MLP + gate frozen), i.e. two passes over the training seeds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _bench import load_warning, machine_load, peak_rss_gib, reset_peak_rss, rss_gib
from _study import RESULTS


def run_one(args) -> dict:
    r"""One (size, model) measurement, in this process."""
    import functools

    import lightning as L
    import torch
    from torch_geometric.nn.models import MLP, GraphSAGE

    from moegraph.data import NodeDataModule
    from moegraph.nn import Mowst
    from moegraph.nn.models import MoEGNN
    from moegraph.tasks import MowstTask, NodeClassificationTask

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    stages = {"start": {"rss_gib": rss_gib()}}
    reset_peak_rss()
    start = time.perf_counter()
    dm = NodeDataModule("synthetic", batch_size=args.batch_size,
                        num_neighbors=args.fanout, dataset_kwargs=dict(
                            num_nodes=args.num_nodes, num_classes=4, num_features=32,
                            avg_degree=args.avg_degree, homophily=0.8, train_ratio=args.train,
                            val_ratio=args.val, seed=0))
    dm.setup()
    data = dm.data
    generate_s = time.perf_counter() - start
    rss_data = rss_gib()
    stages["generate"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_data, "s": generate_s}
    # the sampler's CSR (built once, shared by every loader; fit reuses it)
    reset_peak_rss()
    start = time.perf_counter()
    dm.train_dataloader()
    stages["csr"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_gib(),
                     "s": time.perf_counter() - start}
    reset_peak_rss()
    F, C, H = data.num_features, dm.num_classes, 64
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    if args.model == "moe_gnn":
        net = MoEGNN(F, H, C, num_layers=2, conv="sage", num_experts=8, k=2,
                     ffn_hidden_channels=H, dropout=0.2)
        task = NodeClassificationTask(net, num_classes=C, optimizer=adam,
                                      aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001})
        epochs = 1
    else:
        net = Mowst(MLP([F, H, C], dropout=0.2, norm=None),
                    GraphSAGE(F, H, 2, C, dropout=0.2))
        task = MowstTask(net, num_classes=C, optimizer=adam, turn_patience=1,
                         max_turn_epochs=1, pretrain_weak_epochs=0, pretrain_strong_epochs=0,
                         crossfit_folds=0, max_rounds=10)
        epochs = 2  # the weak turn, then the strong turn

    class Timer(L.Callback):
        def __init__(self):
            self.train_s, self.batches, self.phases = [], 0, []

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()
            self.phases.append(getattr(module, "phase", "train"))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.batches += 1
            self.t_last = time.perf_counter()

        def on_validation_epoch_start(self, trainer, module):
            if not trainer.sanity_checking:
                self.train_s.append(self.t_last - self.t0)

    timer = Timer()
    cuda = args.device == "cuda"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=epochs,
                        precision="bf16-mixed" if cuda else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer])
    load_before = machine_load()
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    fit_s = time.perf_counter() - start
    load_after = machine_load()
    stages["fit"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_gib(), "s": fit_s}
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    seeds = int(data.train_mask.sum())
    epoch_s = sum(timer.train_s)  # Mowst: both turns
    return {"model": args.model, "num_nodes": data.num_nodes,
            "num_edges": int(data.edge_index.size(1)), "train_seeds": seeds,
            "batches": timer.batches, "phases": timer.phases, "epoch_s": epoch_s,
            "turn_s": timer.train_s, "seeds_per_s": seeds * len(timer.train_s) / epoch_s,
            "fit_s": fit_s, "generate_s": generate_s, "rss_data_gib": rss_data,
            "peak_rss_gib": max(v.get("peak_gib", 0.0) for v in stages.values()),
            "stages": stages, "load_before": load_before, "load_after": load_after,
            "device": args.device, "gpu_peak_gib": gpu_peak, "threads": args.threads,
            "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan")))}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model, label in (("moe_gnn", "MoE-GNN (1 pass)"), ("mowst", "Mowst (weak + strong turn)")):
        pts = sorted((r["num_nodes"], r["epoch_s"]) for r in rows if r["model"] == model)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", label=label)
            # the line through the origin and the largest size: linear scaling
            ax.plot([0, xs[-1]], [0, ys[-1]], ":", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xlabel("nodes (10 directed edges per node; 2% training seeds)")
    ax.set_ylabel("time per epoch (s)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("One epoch with neighbour sampling, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _loaded(row: dict) -> str | None:
    if "load_before" not in row:
        return None
    return load_warning(row["load_before"], row["load_after"], row["threads"])


def write_table(rows: list[dict], args, path: Path) -> None:
    device = "CUDA (bf16-mixed; sampling on the CPU)" if args.device == "cuda" else \
        f"CPU, {args.threads} threads, float32"
    lines = [
        "# Scale benchmark: one epoch with neighbour sampling",
        "",
        f"Command: `python experiments/bench_scale.py --sizes {' '.join(map(str, args.sizes))} "
        f"--models {' '.join(args.models)} --threads {args.threads} --train {args.train:g} "
        f"--val {args.val:g} --fanout {' '.join(map(str, args.fanout))} "
        f"--batch-size {args.batch_size} --device {args.device}`"
        + (" (rows of earlier commands kept: `--append`)" if args.append else ""),
        "",
        f"CSBM graph generated in-process (`moegraph.data.csbm_graph`), average in-degree "
        f"{args.avg_degree:g} (directed edges = {args.avg_degree:g} x nodes), 32 features, 4 "
        f"classes; {100 * args.train:g}% of the nodes are training seeds, {100 * args.val:g}% "
        f"validation "
        f"(other rows: see their seeds column); fanout {args.fanout}, {args.batch_size} seeds "
        f"per batch, pure-torch `TorchNeighborLoader` (no pyg-lib / torch-sparse), {device}, "
        f"one process per row. Hidden 64, 2 SAGE layers; MoE-GNN: a top-2 MoE block of 8 "
        f"experts after each layer. One Mowst epoch = one epoch of the weak turn (MLP + gate "
        f"trained, GNN frozen and run) + one of the strong turn (GNN trained): two passes over "
        f"the seeds. Time per epoch = training batches only (sampling, forward, backward, "
        f"step), without validation; seeds/s counts each pass. Peak RSS = the process's "
        f"high-water mark over all stages (graph generation included); load = the 1-minute "
        f"load average before / after training (the machine has "
        f"{rows[0].get('load_before', {}).get('cpus', 0):.0f} CPUs; above the threads used, "
        f"other jobs shared them and the row's times are pessimistic).",
        "",
        "| model | nodes | edges | train seeds | batches | epoch (s) | seeds/s | "
        "RSS after data (GiB) | peak RSS (GiB) | fit incl. val (s) | load before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = sorted(rows, key=lambda r: (r["model"], r["num_nodes"]))
    for r in rows:
        turns = " + ".join(f"{t:.1f}" for t in r["turn_s"]) if len(r["turn_s"]) > 1 else ""
        epoch = f"{r['epoch_s']:.1f}" + (f" ({turns})" if turns else "")
        load = "–"
        if "load_before" in r:
            load = f"{r['load_before']['load1']:.1f} / {r['load_after']['load1']:.1f}"
            load += " (loaded)" if _loaded(r) else " (quiet)"
        lines.append(
            f"| {r['model']} | {r['num_nodes']:,} | {r['num_edges']:,} | {r['train_seeds']:,} | "
            f"{r['batches']} | {epoch} | {r['seeds_per_s']:,.0f} | {r['rss_data_gib']:.2f} | "
            f"{r['peak_rss_gib']:.2f} | {r['fit_s']:.1f} | {load} |")
    warnings = [f"- {r['model']} at {r['num_nodes']:,} nodes: {_loaded(r)}"
                for r in rows if _loaded(r)]
    if warnings:
        lines += ["", "**Loaded runs** (absolute times pessimistic):", "", *warnings]
    staged = [r for r in rows if "stages" in r]
    if staged:
        lines += ["", "Memory per stage (GiB): the peak RSS within the stage (high-water mark "
                  "reset at its start) and the RSS at its end; the Python + torch + PyG "
                  "process starts at the `start` RSS.", "",
                  "| model | nodes | start RSS | generate: peak / after (s) | "
                  "CSR: peak / after (s) | training: peak / after |"
                  + (" GPU peak |" if args.device == "cuda" else ""),
                  "|---|---:|---:|---|---|---|" + ("---:|" if args.device == "cuda" else "")]
        for r in staged:
            st = r["stages"]

            def cell(name, st=st):
                v = st[name]
                s = f" ({v['s']:.0f} s)" if name != "fit" else ""
                return f"{v['peak_gib']:.2f} / {v['rss_gib']:.2f}{s}"

            gpu = f" {r['gpu_peak_gib']:.2f} |" if r.get("gpu_peak_gib") is not None else ""
            lines.append(f"| {r['model']} | {r['num_nodes']:,} | {st['start']['rss_gib']:.2f} | "
                         f"{cell('generate')} | {cell('csr')} | {cell('fit')} |"
                         + (gpu if args.device == "cuda" else ""))
    lines += ["", "Time per epoch relative to the smallest size (linear scaling = the node "
              "ratio; rows of equal training fraction only):", ""]
    for model in ("moe_gnn", "mowst"):
        rs = sorted((r for r in rows if r["model"] == model), key=lambda r: r["num_nodes"])
        if len(rs) > 1:
            base = rs[0]
            ratios = ", ".join(f"{r['num_nodes'] / base['num_nodes']:.0f}x nodes "
                               f"({r['train_seeds'] / base['train_seeds']:.0f}x seeds): "
                               f"{r['epoch_s'] / base['epoch_s']:.2f}x time" for r in rs[1:])
            lines.append(f"- {model}: {ratios}")
    if args.note:
        lines += ["", args.note]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--models", nargs="+", default=["moe_gnn", "mowst"],
                        choices=["moe_gnn", "mowst"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--train", type=float, default=0.02)
    parser.add_argument("--val", type=float, default=0.01)
    parser.add_argument("--fanout", type=int, nargs="+", default=[10, 5])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of <out>/scale.json (other sizes) in the table")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", default="", help="a line appended to the results file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return []

    rows = []
    cache = args.out / "scale.json"
    if args.append and cache.exists():
        new = {(m, n) for m in args.models for n in args.sizes}
        rows = [r for r in json.loads(cache.read_text())
                if (r["model"], r["num_nodes"]) not in new]
    for num_nodes in args.sizes:
        for model in args.models:
            command = [sys.executable, __file__, "--one", "--num-nodes", str(num_nodes),
                       "--model", model, "--threads", str(args.threads),
                       "--avg-degree", str(args.avg_degree), "--train", str(args.train),
                       "--val", str(args.val), "--batch-size", str(args.batch_size),
                       "--device", args.device, "--fanout", *map(str, args.fanout)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{model} at {num_nodes} nodes failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            st = row["stages"]
            print(f"{model:8s} {num_nodes:>9,} nodes: epoch {row['epoch_s']:.1f} s, "
                  f"{row['seeds_per_s']:,.0f} seeds/s, peak RSS {row['peak_rss_gib']:.2f} GiB "
                  f"(generate {st['generate']['peak_gib']:.2f}, CSR {st['csr']['peak_gib']:.2f},"
                  f" training {st['fit']['peak_gib']:.2f})", flush=True)
            if _loaded(row):
                print(_loaded(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    write_table(rows, args, args.out / "scale.md")
    if not args.no_plot:
        plot(rows, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.md'}")
    return rows


if __name__ == "__main__":
    main()
