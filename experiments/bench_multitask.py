r"""Forward+backward time of the multi-gate layers: MMoE, PLE and HoME.

Each layer maps ``x [N, F]`` to one output per task, with the same total
expert count and the same expert width; one training step of the layer alone
is timed: forward, then ``sum_t out_t.sum()`` backward (filling the gradients
of the input and of every parameter).

Configurations at the default ``--experts 10`` (3 tasks, HoME groups
{t0}, {t1, t2}):

* **MMoE**: 10 shared experts in one level;
* **PLE**: 2 levels of 2 shared + 1 per task = 5 experts each (10 in all);
* **HoME**: level 1: 2 shared + 1 per group = 4, level 2: 1 shared + 1 per
  group + 1 per task = 6 (10 in all); batch-norm + Swish experts,
  hierarchy mask, feature-gates (rank 4) and self-gates all on;
* **HoME w/o <part>**: the same with one part off, to show what each costs;
  with all parts off but the hierarchy mask it is a two-level masked mixture
  of ReLU experts.

Timing on a noisy shared machine: one warm-up step per method, then
``--repeats`` rounds, each running every method once in an order rotated
from round to round; the median CPU time of the process (one thread) is
reported and compared, the wall time beside it. Every input width in
``--in-channels`` is measured in the same run, side by side.

Peak memory of one step: the growth of the process's resident set over one
forward + backward, read from ``/proc/self/status`` (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``), with glibc's malloc told to
give large blocks back to the system (``mallopt``, ``malloc_trim``), so that
one layer's freed memory does not hide the next one's. Linux only; elsewhere
the column reads ``-``.

Run from the repository root (one core)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/bench_multitask.py
    python experiments/bench_multitask.py --quick   # tiny smoke run, writes no file

The target is ``HoME / MMoE <= 1.5`` at every width.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _study import RESULTS, command_line, write_results
from torch.nn import Module

from moegraph.nn import PLE, HoME, MMoE

TASKS = ["t0", "t1", "t2"]
GROUPS = {"g0": ["t0"], "g1": ["t1", "t2"]}


def build(experts: int, F: int, H: int) -> dict[str, Module]:
    if experts != 10:
        raise SystemExit("the expert split of PLE and HoME is written for --experts 10")
    return {
        "MMoE": MMoE(F, H, TASKS, num_experts=10),
        "PLE": PLE(F, H, TASKS, num_levels=2, num_shared_experts=2, num_task_experts=1),
        "HoME": _home(F, H),
        "HoME w/o feature gate": _home(F, H, feature_gate=False),
        "HoME w/o expert norm (ReLU)": _home(F, H, expert_norm=None),
        "HoME w/o self gate": _home(F, H, self_gate=False),
        "HoME, all parts off but the mask": _home(F, H, feature_gate=False, expert_norm=None,
                                                  self_gate=False),
    }


def _home(F: int, H: int, **parts) -> Module:
    # level 1: 2 shared + 2 groups = 4; level 2: 1 shared + 2 groups + 3 tasks = 6
    return HoME(F, H, TASKS, groups=GROUPS, num_shared_experts=[2, 1], num_group_experts=1,
                num_task_experts=1, **parts)


def count(model: Module) -> int:
    return sum(p.numel() for p in model.parameters())


def step(model: Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x)
    sum(o.sum() for o in out.outputs.values()).backward()


class PeakMemory:
    r"""Peak resident-set growth over a block, in bytes (Linux + glibc)."""

    def __init__(self):
        self.ok = Path("/proc/self/clear_refs").exists()
        self.libc = None

    def start(self) -> None:
        r"""From now on large blocks are mmapped (and unmapped when freed):
        called after the timings, since it slows allocation-heavy code."""
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed
        except OSError:
            self.libc = None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, fn) -> float:
        if not self.ok:
            fn()
            return float("nan")
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = self._status("VmRSS")
        fn()
        return float(self._status("VmHWM") - base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--in-channels", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no file written")
    parser.add_argument("--out", default=str(RESULTS / "bench_multitask.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 512, 2
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    peak = PeakMemory()
    timed = {F: time_width(args, F) for F in args.in_channels}  # all timings first
    peak.start()
    tables, verdicts, met = [], [], True
    for F in args.in_channels:
        table, ratio = memory_width(args, F, peak, *timed[F])
        ok = ratio <= 1.5
        met &= ok
        verdict = (f"F = {F}: HoME / MMoE = {ratio:.2f} (target <= 1.5: "
                   f"{'met' if ok else 'NOT met'})")
        print(f"\n### Input width F = {F}\n\n{table}\n\n{verdict}", flush=True)
        tables.append(f"### Input width F = {F}\n\n{table}\n\n{verdict}")
        verdicts.append(verdict)
    load_after = os.getloadavg()
    if args.quick:
        return
    cmd = command_line(__file__, argv)
    load = (f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
            f"after {tuple(round(v, 2) for v in load_after)} on {os.cpu_count()} cores")
    body = "\n\n".join(tables)
    text = (f"# Multi-gate layers: forward+backward time and peak memory\n\n"
            f"Command: `PYTHONPATH=. OMP_NUM_THREADS={args.threads} {cmd}`  \n"
            f"Date: {datetime.date.today()}; torch {torch.__version__}; "
            f"{platform.processor() or platform.machine()}, {args.threads} thread(s), CPU; "
            f"{load}.  \n"
            f"Rows {args.rows:,}, expert width {args.hidden}, {args.experts} experts in all "
            f"(every layer), 3 tasks (tower width 16); time: median of {args.repeats} rotated "
            f"rounds after one warm-up, as CPU time of the process (one thread; robust to "
            f"the other jobs on the machine, which the wall time is not); the ratio is of "
            f"CPU times; peak: resident-set growth during one forward + backward (inputs and "
            f"parameters excluded).\n\n{body}\n\n"
            + "\n".join(f"- {v}" for v in verdicts) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(Path(args.out), text)  # keeps the hand-written findings below the mark
    print(f"wrote {args.out}")


def time_width(args, F: int):
    torch.manual_seed(0)
    models = build(args.experts, F, args.hidden)
    for m in models.values():
        m.train()
    x = torch.randn(args.rows, F, requires_grad=True)
    names = list(models)
    for n in names:
        step(models[n], x)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            step(models[n], x)
            cpu[n].append(time.process_time() - c)
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in cpu.items()}
    wall = {n: statistics.median(v) for n, v in times.items()}
    return models, x, med, wall


def memory_width(args, F: int, peak: PeakMemory, models, x, med, wall) -> tuple[str, float]:
    names = list(models)
    mem = {n: peak.measure(lambda n=n: step(models[n], x)) for n in names}
    rows = ["| layer | experts per level | params | fwd+bwd CPU time (ms) | x MMoE | "
            "wall time (ms) | peak memory (MiB) | x MMoE |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        per_level = "+".join(str(lv.num_experts) for lv in models[n].levels)
        mib = "-" if mem[n] != mem[n] else f"{mem[n] / 2**20:.0f}"
        mrel = "-" if mem[n] != mem[n] else f"{mem[n] / mem['MMoE']:.2f}"
        rows.append(f"| {n} | {per_level} | {count(models[n]):,} | {1000 * med[n]:.1f} | "
                    f"{med[n] / med['MMoE']:.2f} | {1000 * wall[n]:.1f} | {mib} | {mrel} |")
    return "\n".join(rows), med["HoME"] / med["MMoE"]


if __name__ == "__main__":
    main()
