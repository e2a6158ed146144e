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
from round to round; the median is reported.

Run from the repository root (one core)::

    OMP_NUM_THREADS=1 taskset -c 1 python experiments/bench_multitask.py
    python experiments/bench_multitask.py --quick   # tiny smoke run, writes no file

The target is ``HoME / MMoE <= 1.5``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
from pathlib import Path

import torch
from _study import RESULTS, command_line, time_rotated
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--in-channels", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no file written")
    parser.add_argument("--out", default=str(RESULTS / "bench_multitask.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 512, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build(args.experts, args.in_channels, args.hidden)
    for m in models.values():
        m.train()
    x = torch.randn(args.rows, args.in_channels, requires_grad=True)
    for m in models.values():
        step(m, x)  # warm-up
    names = list(models)
    med = time_rotated({n: functools.partial(step, models[n], x) for n in names}, args.repeats)
    rows = ["| layer | experts per level | params | fwd+bwd (ms) | rows/s | x MMoE |",
            "|---|---|---:|---:|---:|---:|"]
    for n in names:
        per_level = "+".join(str(lv.num_experts) for lv in models[n].levels)
        rows.append(f"| {n} | {per_level} | {count(models[n]):,} | {1000 * med[n]:.1f} | "
                    f"{args.rows / med[n]:,.0f} | {med[n] / med['MMoE']:.2f} |")
    ratio = med["HoME"] / med["MMoE"]
    verdict = f"HoME / MMoE = {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'})"
    table = "\n".join(rows)
    print(table)
    print(verdict)
    if args.quick:
        return
    cmd = command_line(__file__, argv)
    text = (f"# Multi-gate layers: forward+backward time\n\n"
            f"Command: `OMP_NUM_THREADS={args.threads} {cmd}`  \n"
            f"Date: {datetime.date.today()}; torch {torch.__version__}; "
            f"{platform.processor() or platform.machine()}, {args.threads} thread(s), CPU.  \n"
            f"Rows {args.rows:,}, input {args.in_channels}, expert width {args.hidden}, "
            f"{args.experts} experts in all, 3 tasks (tower width 16); median of "
            f"{args.repeats} rotated rounds after one warm-up.\n\n{table}\n\n{verdict}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
