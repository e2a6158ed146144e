r"""Expert parallelism on CPU: one training step of :class:`moegraph.nn.SparseMoE`
in 1 process against 2 gloo processes.

A step is the forward pass of the layer and the backward pass of a fixed
output gradient, on ``N`` rows in all. Columns:

* **1 proc**: the unsharded layer on all ``N`` rows, one thread.
* **2 proc DP**: 2 processes, ``N / 2`` rows each, every expert on every rank
  (data parallelism without the gradient all-reduce): the step without any
  exchange of rows.
* **2 proc EP**: 2 processes, ``N / 2`` rows each, ``E / 2`` experts each
  (:func:`moegraph.nn.shard_experts`): rows go to their experts and back by
  all-to-all, twice in the forward and twice in the backward pass.
* **a2a only**: the four all-to-alls of the EP step alone, with the same
  volumes (each rank sends half of its ``N k / 2`` assignments to the other).

Each process uses one thread; a step's time is the slower rank's, the median
over ``--repeats`` steps after one warm-up. These are CPU gloo figures on a
small shared machine: they show the cost of the exchange relative to the
compute here and say nothing about NCCL on GPUs, where the all-to-all runs
over NVLink / InfiniBand and the experts' matmuls are much faster.

Run from the repository root::

    python experiments/bench_expert_parallel.py           # writes results/expert_parallel.md
    python experiments/bench_expert_parallel.py --quick   # tiny sizes, writes no file
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _bench import load_line, load_warning, machine_load
from _study import RESULTS as RESULTS_DIR
from _study import command_line

from moegraph.nn import SparseMoE, shard_experts

RESULTS = RESULTS_DIR / "expert_parallel.md"


def make_layer(args, E: int, k: int) -> SparseMoE:
    torch.manual_seed(0)
    return SparseMoE(args.in_channels, args.hidden, num_experts=E, k=k)


def time_steps(step, repeats: int, sync=lambda: None) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def layer_step(layer: SparseMoE, x: torch.Tensor, grad: torch.Tensor):
    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).out.backward(grad)
    return step


def worker(rank: int, args, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=2, timeout=timedelta(seconds=300))
    results = {}
    for E in args.experts:
        for k in args.k:
            torch.manual_seed(1 + rank)
            n = args.rows // 2
            x = torch.randn(n, args.in_channels)
            grad = torch.randn(n, args.in_channels)
            dp = make_layer(args, E, k)
            ep = shard_experts(make_layer(args, E, k))
            send = torch.randn(n * k, args.in_channels)
            splits = [n * k // 2, n * k - n * k // 2]

            def a2a(send=send, splits=splits):
                for _ in range(4):
                    out = torch.empty_like(send)
                    dist.all_to_all_single(out, send, splits, splits)

            row = {}
            for name, step in (("dp", layer_step(dp, x, grad)), ("ep", layer_step(ep, x, grad)),
                               ("a2a", a2a)):
                row[name] = time_steps(step, args.repeats, dist.barrier)
            results[f"{E},{k}"] = row
    Path(f"{tmp}/rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--in-channels", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no file written")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.in_channels, args.hidden, args.experts, args.k = 512, 16, 32, [4], [2]
        args.repeats = 2
    torch.set_num_threads(1)

    load_before = machine_load()
    one = {}
    for E in args.experts:
        for k in args.k:
            torch.manual_seed(1)
            x = torch.randn(args.rows, args.in_channels)
            grad = torch.randn(args.rows, args.in_channels)
            one[f"{E},{k}"] = time_steps(layer_step(make_layer(args, E, k), x, grad),
                                         args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(args, tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(2)]

    def ms(times_per_rank):  # the slower rank per step, median over steps
        return 1e3 * statistics.median(max(ts) for ts in zip(*times_per_rank, strict=True))

    lines = ["| E | k | 1 proc (ms) | 2 proc DP (ms) | 2 proc EP (ms) | a2a only (ms) "
             "| EP / DP | 1 proc / EP |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for key, times in one.items():
        E, k = key.split(",")
        single = 1e3 * statistics.median(times)
        dp, ep, a2a = (ms([r[key][name] for r in ranks]) for name in ("dp", "ep", "a2a"))
        lines.append(f"| {E} | {k} | {single:.1f} | {dp:.1f} | {ep:.1f} | {a2a:.1f} "
                     f"| {ep / dp:.2f} | {single / ep:.2f} |")
    table = "\n".join(lines)
    load_after = machine_load()
    print(table)
    warning = load_warning(load_before, load_after, own_threads=2)
    if warning:
        print(warning)
    if not args.quick:
        command = command_line(__file__, argv)
        RESULTS.write_text(
            "# Expert parallelism on CPU (gloo, 2 processes)\n\n"
            f"`{command}`: one forward + backward step of `SparseMoE` on "
            f"N = {args.rows} rows in all, in = {args.in_channels}, expert hidden = "
            f"{args.hidden}, float32, one thread per process, median of {args.repeats} "
            f"steps (the slower rank's time). torch {torch.__version__}.\n\n"
            f"{table}\n\n"
            f"{load_line(load_before, load_after, own_threads=2)}\n\n"
            "DP: each rank holds every expert (no exchange, no gradient all-reduce); "
            "EP: each rank holds E / 2 experts, rows travel by all-to-all; a2a only: "
            "the four exchanges of an EP step with its volumes, alone.\n\n"
            "Measured on a 2-core CPU shared with other jobs: the two processes "
            "compete for the cores, and gloo moves the rows through local TCP. "
            "These figures say nothing about NCCL on GPUs.\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
