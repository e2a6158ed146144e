r"""Forward+backward throughput of :class:`moegraph.nn.SparseMoE` against three baselines.

Every method maps ``x [N, F]`` to ``out [N, F]`` and is timed for one training
step of the layer alone: the forward pass, then the backward pass of a fixed
output gradient (``out.backward(grad_out)``), which fills the gradients of the
input and of every parameter. Throughput is reported in rows per second.

Methods (``E`` experts, top-``k`` routing, expert MLPs ``F -> H -> F``):

* **(a)** :class:`~moegraph.nn.SparseMoE` with its default ``backend="auto"``:
  rows are sorted by expert and each expert runs once on its contiguous block.
* **(a')** the same layer with ``backend="grouped_mm"``
  (:func:`torch._grouped_mm`), with the same weights; shows what ``"auto"``
  would gain or lose by picking it.
* **(b)** a naive loop over experts, written here, with the same router and
  the same stacked weights as (a)::

      for e in range(E):
          idx = rows routed to e
          y.index_add_(0, idx, w * expert_e(x.index_select(0, idx)))

  The per-expert weights are views from one ``unbind`` of the stacked
  weights, so the loop is not charged for building a full-size stacked
  gradient per expert, as ``weight1[e]`` indexing would be (measured at
  ``E = 64, k = 2``: 1.6x slower); its remaining overhead is autograd's.
* **(c)** every expert on every row, then masked (the GMoE reference
  implementation): all ``E`` expert outputs are computed for all ``N`` rows,
  multiplied by the dense ``[N, E]`` gate matrix (zero for unchosen experts)
  and summed. This costs ``E / k`` times the FLOPs of (a), and its activations
  (``E * N * H`` floats, several GiB at ``E = 64``) would not fit a modest
  machine, so the experts run in chunks, each chunk's forward *and* backward
  pass before the next chunk starts. Every expert still runs, forward and
  backward, on every row, with no recomputation: chunking only bounds memory,
  and if anything favours (c). Use ``--skip-all-experts`` to leave it out.
* **(d)** a dense FFN with the same active FLOPs as (a), without a router:
  ``Linear(F, k * H) -> GELU -> Linear(k * H, F)``.

(a), (a'), (b) and (c) share one router (in training mode, so it also computes
its auxiliary losses, as in a training step; only ``out`` is back-propagated).
Before timing, the script asserts in float32 that they agree: same output, same
input gradient and same parameter gradients.

Timing on a noisy, shared machine: one warm-up step per method, then
``--repeats`` rounds; each round runs every method once, in an order rotated
from round to round, so that noise hits all methods alike; the median over
rounds is reported. (c) gets ``--all-experts-repeats`` rounds (default 1) and,
on CPU, no warm-up beyond the correctness check, which already ran it once.

On CUDA the timed steps run under ``torch.autocast`` in bfloat16 (the
correctness check stays in float32), with a synchronisation around each
timing.

Run from the repository root::

    python experiments/bench_moe.py            # full grid, writes experiments/results/bench_moe.md
    python experiments/bench_moe.py --quick    # smoke run on tiny sizes, writes no file
    python experiments/bench_moe.py --experts 64 --k 2 --skip-all-experts

The CPU targets at ``E = 64, k = 2`` are ``a/d >= 0.85`` and ``a/b >= 3``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _bench import load_line, machine_load
from _study import RESULTS, command_line
from torch import Tensor
from torch.nn import GELU, Linear, Module, Sequential

from moegraph.nn import SparseMoE

DEFAULT_OUT = RESULTS / "bench_moe.md"
TARGET_CONFIG = (64, 2)  # (E, k) at which the CPU targets apply
TARGET_A_OVER_D = 0.85
TARGET_A_OVER_B = 3.0
ALL_EXPERTS_CHUNK_BYTES = 2 * 2**30  # activation budget of one chunk of method (c)
FULL_SIZES = dict(rows=32768, in_channels=256, hidden=512, experts=[8, 16, 64], k=[1, 2],
                  repeats=5)
QUICK_SIZES = dict(rows=2048, in_channels=32, hidden=64, experts=[4, 8], k=[1, 2], repeats=3)

Step = Callable[[Tensor, Tensor], Tensor]  # (x, grad_out) -> out, gradients filled


@dataclass
class Method:
    r"""One timed method: ``step(x, grad_out)`` runs forward and backward and
    returns the detached output; ``module`` holds the parameters it trains."""

    key: str
    label: str
    step: Step
    module: Module
    repeats: int
    warmup: int
    num_rows: int
    times: list[float] = field(default_factory=list)
    error: str | None = None  # set if the method could not run here

    @property
    def rows_per_s(self) -> float | None:
        r"""Median throughput over the timed rounds."""
        return None if not self.times else self.num_rows / statistics.median(self.times)


# Methods #####################################################################


def _backward(out: Tensor, grad_out: Tensor) -> Tensor:
    out.backward(grad_out.to(out.dtype))
    return out.detach()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""``x @ weight + bias`` with a stacked ``[in, out]`` weight slice."""
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def sparse_moe_step(moe: SparseMoE) -> Step:
    r"""(a) and (a'): the layer itself."""

    def step(x: Tensor, grad_out: Tensor) -> Tensor:
        return _backward(moe(x).out, grad_out)

    return step


def naive_loop_step(moe: SparseMoE) -> Step:
    r"""(b): one ``index_select`` / expert / ``index_add_`` per expert, with the
    router and the stacked weights of ``moe``."""
    experts = moe.experts
    E = moe.num_experts

    def step(x: Tensor, grad_out: Tensor) -> Tensor:
        routing = moe.router(x)
        # unbind: one view per expert, and a single stack of the slices' grads
        # in backward (indexing weight1[e] would build E full-size gradients).
        w1, w2 = experts.weight1.unbind(0), experts.weight2.unbind(0)
        b1 = [None] * E if experts.bias1 is None else experts.bias1.unbind(0)
        b2 = [None] * E if experts.bias2 is None else experts.bias2.unbind(0)
        y = x.new_zeros(x.size(0), experts.out_channels)
        for e in range(E):
            mask = routing.expert == e
            idx = routing.row[mask]
            if idx.numel() == 0:
                continue
            w = routing.weight[mask].unsqueeze(-1)
            h = experts.act(_linear(x.index_select(0, idx), w1[e], b1[e]))
            y.index_add_(0, idx, w * _linear(h, w2[e], b2[e]))
        return _backward(y, grad_out)

    return step


class _AutogradGELU(GELU):
    r"""GELU outside :class:`~moegraph.nn.MLPExperts`' table of kernels."""


def top1_before(moe: SparseMoE, device: torch.device) -> SparseMoE:
    r"""(a1): a copy of ``moe`` (same weights) that runs top-1 as before its
    own path: a combine weight that carries a gradient (exactly zero, as the
    softmax over one choice had), outputs and input gradients added into
    zeroed buffers, the activation through autograd in every expert block."""
    import copy

    old = copy.deepcopy(moe).to(device)
    router, experts = old.router, old.experts
    route = router.forward

    def forward(x: Tensor):
        routing = route(x)
        chosen = routing.probs.gather(1, routing.expert.view(-1, 1)).view(-1)
        return routing._replace(weight=routing.weight + 0.0 * chosen)

    router.forward = forward
    fused = experts.gather_and_combine
    experts.gather_and_combine = (lambda x, rows, counts, weight=None, unique=False:
                                  fused(x, rows, counts, weight, unique=False))
    experts.act = _AutogradGELU(approximate=experts.act.approximate)
    return old


def all_experts_step(moe: SparseMoE, chunk: int) -> Step:
    r"""(c): every expert on every row, times the dense gate matrix, summed.

    Runs ``chunk`` experts at a time, each chunk's forward and backward pass
    before the next, so that only one chunk's activations are alive; the
    gradient of the gate matrix is gathered over chunks and sent through the
    router once at the end. Same FLOPs as one unchunked autograd pass.
    """
    experts = moe.experts
    E = moe.num_experts

    def chunk_forward(x: Tensor, gates: Tensor, start: int, end: int) -> Tensor:
        x = x.expand(end - start, -1, -1)  # [C, N, F]
        w1, w2 = experts.weight1[start:end], experts.weight2[start:end]
        if experts.bias1 is None:
            h = torch.bmm(x, w1)
        else:
            h = torch.baddbmm(experts.bias1[start:end].unsqueeze(1), x, w1)
        h = experts.act(h)  # [C, N, H]
        if experts.bias2 is None:
            y = torch.bmm(h, w2)
        else:
            y = torch.baddbmm(experts.bias2[start:end].unsqueeze(1), h, w2)  # [C, N, O]
        return (gates.t().unsqueeze(-1) * y).sum(dim=0)  # [N, O]

    def step(x: Tensor, grad_out: Tensor) -> Tensor:
        routing = moe.router(x)
        gates = routing.dense_weight()  # [N, E], zero where a row is not routed
        gates_leaf = gates.detach().requires_grad_()
        out = None
        for start in range(0, E, chunk):
            end = min(start + chunk, E)
            out_chunk = _backward(chunk_forward(x, gates_leaf[:, start:end], start, end),
                                  grad_out)
            out = out_chunk if out is None else out + out_chunk
        if gates.requires_grad:  # not for top-1, whose weights are the constant one
            gates.backward(gates_leaf.grad)
        return out

    return step


def dense_step(ffn: Module) -> Step:
    r"""(d): a dense FFN with the active FLOPs of top-k routing."""

    def step(x: Tensor, grad_out: Tensor) -> Tensor:
        return _backward(ffn(x), grad_out)

    return step


def all_experts_chunk_size(num_rows: int, hidden: int, out_channels: int,
                           num_experts: int, requested: int) -> int:
    r"""Experts per chunk of (c): ``requested`` if positive, else as many as
    fit :data:`ALL_EXPERTS_CHUNK_BYTES`, counting per expert the float32
    pre-activation, activation and output with their gradients."""
    if requested > 0:
        return min(requested, num_experts)
    per_expert = 2 * num_rows * (2 * hidden + 2 * out_channels) * 4
    return max(1, min(num_experts, ALL_EXPERTS_CHUNK_BYTES // per_expert))


# Measurement #################################################################


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zero_grads(methods: list[Method], x: Tensor):
    x.grad = None
    for method in methods:
        method.module.zero_grad(set_to_none=True)


def run_once(method: Method, methods: list[Method], x: Tensor, grad_out: Tensor,
             device: torch.device) -> tuple[float, Tensor]:
    zero_grads(methods, x)
    sync(device)
    start = time.perf_counter()
    out = method.step(x, grad_out)
    sync(device)
    return time.perf_counter() - start, out


def check_correctness(methods: list[Method], x: Tensor, grad_out: Tensor,
                      device: torch.device, rtol: float = 1e-4, atol: float = 1e-5) -> str:
    r"""Assert, in float32, that all methods but the dense FFN give the same
    output, input gradient and parameter gradients as the first one."""
    reference = None
    worst = 0.0
    for method in methods:
        if method.key == "d":  # another function altogether
            continue
        try:
            _, out = run_once(method, methods, x, grad_out, device)
        except Exception as error:  # grouped_mm may not run on every device
            if method.key != "a'":
                raise
            method.error = f"{type(error).__name__}: {error}".splitlines()[0]
            continue
        result = {"out": out, "x.grad": x.grad.clone()}
        # a parameter that no gradient reaches (the router of top-1: its weight is
        # the constant one, only aux losses train it) compares as zero
        result.update({name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                       for name, p in method.module.named_parameters()})
        if reference is None:
            reference = result
            continue
        for name, value in result.items():
            ref = reference[name]
            scale = ref.abs().max().item()
            if not torch.allclose(value, ref, rtol=rtol, atol=atol * max(scale, 1.0)):
                diff = (value - ref).abs().max().item()
                raise AssertionError(f"({method.key}) {method.label} disagrees with "
                                     f"({methods[0].key}) on {name}: max abs diff {diff:.3g} "
                                     f"(max abs value {scale:.3g})")
            worst = max(worst, (value - ref).abs().max().item() / max(scale, 1e-12))
    zero_grads(methods, x)
    return f"max relative diff {worst:.1e}"


def time_methods(methods: list[Method], x: Tensor, grad_out: Tensor, device: torch.device,
                 autocast: contextlib.AbstractContextManager):
    r"""Warm up, then round-robin rounds; each method keeps its list of times."""
    methods = [m for m in methods if m.error is None]
    with autocast:
        for method in methods:
            for _ in range(method.warmup):
                run_once(method, methods, x, grad_out, device)
        rounds = max(m.repeats for m in methods)
        for r in range(rounds):
            shift = r % len(methods)
            for method in methods[shift:] + methods[:shift]:
                if len(method.times) < method.repeats:
                    seconds, _ = run_once(method, methods, x, grad_out, device)
                    method.times.append(seconds)
            print(f"    round {r + 1}/{rounds}: " + ", ".join(
                f"{m.key} {m.times[-1]:.3f}s" for m in methods if len(m.times) == r + 1),
                flush=True)
    zero_grads(methods, x)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float | None:
    r"""Peak allocated CUDA memory, or the peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


# Reporting ###################################################################


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}"


def speed_ratio(res: dict, num: str, den: str) -> float | None:
    r"""Speed of method ``num`` over method ``den``: the median over rounds of
    ``time[den] / time[num]`` within the same round (both ran side by side, so
    a burst of load that slows one round slows both), or the ratio of the
    median rates where the rounds do not pair up."""
    times = res.get("times", {})
    t_num, t_den = times.get(num), times.get(den)
    if t_num and t_den and len(t_num) == len(t_den):
        return statistics.median(d / n for n, d in zip(t_num, t_den, strict=True))
    rate = res["rows_per_s"]
    if rate.get(num) is None or rate.get(den) is None:
        return None
    return rate[num] / rate[den]


def _fmt_speed_ratio(res: dict, num: str, den: str) -> str:
    ratio = speed_ratio(res, num, den)
    return "-" if ratio is None else f"{ratio:.2f}"


def format_table(results: list[dict]) -> str:
    copies = any("a0" in res["rows_per_s"] for res in results)
    top1 = any("a1" in res["rows_per_s"] for res in results)
    header = ["E", "k", "(a) SparseMoE auto", "(a') grouped_mm", "(b) naive loop",
              "(c) all experts", "(d) dense FFN", "a/d", "a/b", "peak mem (GiB)"]
    if top1:
        header[2:2] = ["(a1) top-1 of before"]
        header[-1:-1] = ["a1/d"]
    if copies:
        header[2:2] = ["(a0) with copies"]
        header[-1:-1] = ["a0/d"]
    rows = []
    for res in results:
        rate = res["rows_per_s"]
        peak = res["peak_gib"]
        keys = (("a0",) if copies else ()) + (("a1",) if top1 else ()) + ("a", "a'", "b", "c",
                                                                          "d")
        rows.append([str(res["E"]), str(res["k"])]
                    + [_fmt_rate(rate.get(key)) for key in keys]
                    + [_fmt_speed_ratio(res, "a", "d"), _fmt_speed_ratio(res, "a", "b")]
                    + ([_fmt_speed_ratio(res, "a1", "d")] if top1 else [])
                    + ([_fmt_speed_ratio(res, "a0", "d")] if copies else [])
                    + ["-" if peak is None else f"{peak:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def target_report(results: list[dict], device: torch.device) -> list[str]:
    lines = []
    E = TARGET_CONFIG[0]
    top1 = next((r for r in results if (r["E"], r["k"]) == (E, 1)), None)
    ratio = None if top1 is None else speed_ratio(top1, "a", "d")
    if ratio is not None:
        verdict = "met" if ratio >= TARGET_A_OVER_D else "NOT met"
        lines += [f"Target at E={E}, k=1: a/d = {ratio:.2f} (target >= {TARGET_A_OVER_D:g}): "
                  f"{verdict}", ""]
    res = next((r for r in results if (r["E"], r["k"]) == TARGET_CONFIG), None)
    E, k = TARGET_CONFIG
    if res is None:
        return lines + [f"Targets (E={E}, k={k}): not measured in this run."]
    rate = res["rows_per_s"]
    lines += [f"Targets at E={E}, k={k}"
              + ("" if device.type == "cpu" else " (stated for CPU; this run is on "
                 f"{device.type})") + ":"]
    for name, num, den, target in (("a/d", "a", "d", TARGET_A_OVER_D),
                                   ("a/b", "a", "b", TARGET_A_OVER_B)):
        ratio = speed_ratio(res, num, den)
        if ratio is None:
            lines.append(f"- {name}: not measured")
            continue
        verdict = "met" if ratio >= target else "NOT met"
        lines.append(f"- {name} = {ratio:.2f} (target >= {target:g}): {verdict}")
    if rate.get("b") and rate.get("d"):
        # a/b = a/d * d/b: the naive loop's speed relative to the dense FFN bounds a/b.
        d_over_b = rate["d"] / rate["b"]
        lines.append(f"- (the naive loop runs at {1 / d_over_b:.0%} of the dense FFN's speed, "
                     f"so a/b >= {TARGET_A_OVER_B:g} needs a/d >= "
                     f"{TARGET_A_OVER_B / d_over_b:.2f})")
    return lines


# Main ########################################################################


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forward+backward throughput of SparseMoE against a naive expert loop, "
                    "all-experts-then-mask (GMoE) and a dense FFN of equal active FLOPs.")
    parser.add_argument("--rows", type=int, help="rows N (default: 32768)")
    parser.add_argument("--in-channels", type=int, help="input size F (default: 256)")
    parser.add_argument("--hidden", type=int,
                        help="hidden size H of each expert (default: 512)")
    parser.add_argument("--experts", type=int, nargs="+",
                        help="numbers of experts E (default: 8 16 64)")
    parser.add_argument("--k", type=int, nargs="+", help="experts per row (default: 1 2)")
    parser.add_argument("--repeats", type=int,
                        help="timed rounds per method, median reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per method")
    parser.add_argument("--all-experts-repeats", type=int, default=1,
                        help="timed rounds of method (c) (default: 1)")
    parser.add_argument("--all-experts-chunk", type=int, default=0,
                        help="experts per chunk of method (c); 0 picks it from a 2 GiB "
                             "activation budget")
    parser.add_argument("--skip-all-experts", action="store_true",
                        help="leave out method (c), every expert on every row")
    parser.add_argument("--compare-copies", action="store_true",
                        help="add method (a0): SparseMoE as before the fused dispatch, with "
                             "sorted copies of the rows, outputs and gradients")
    parser.add_argument("--compare-top1-before", action="store_true",
                        help="add method (a1) at k = 1: SparseMoE as before its top-1 path "
                             "(weight with a gradient, outputs added into zeroed buffers, "
                             "the activation through autograd per block)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="time only these methods (keys: a a' a0 b c d)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="timed precision; 'auto': bfloat16 autocast on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default: experiments/results/bench_moe.md; "
                             "none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run on tiny sizes; writes a report only if --out is given")
    args = parser.parse_args(argv)
    for name, value in (QUICK_SIZES if args.quick else FULL_SIZES).items():
        if getattr(args, name) is None:  # what is given on the command line wins
            setattr(args, name, value)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def build_methods(args: argparse.Namespace, E: int, k: int,
                  device: torch.device) -> list[Method]:
    torch.manual_seed(args.seed)
    moe = SparseMoE(args.in_channels, args.hidden, num_experts=E, k=k).to(device)
    moe_gmm = SparseMoE(args.in_channels, args.hidden, num_experts=E, k=k,
                        backend="grouped_mm").to(device)
    moe_gmm.load_state_dict(moe.state_dict())
    ffn = Sequential(Linear(args.in_channels, k * args.hidden), GELU(),
                     Linear(k * args.hidden, args.in_channels)).to(device)
    for module in (moe, moe_gmm, ffn):
        module.train()

    chunk = all_experts_chunk_size(args.rows, args.hidden, args.in_channels, E,
                                   args.all_experts_chunk)
    R, W, N = args.repeats, args.warmup, args.rows
    methods = [
        Method("a", "SparseMoE (auto)", sparse_moe_step(moe), moe, R, W, N),
        Method("a'", "SparseMoE (grouped_mm)", sparse_moe_step(moe_gmm), moe_gmm, R, W, N),
        Method("b", "naive loop", naive_loop_step(moe), moe, R, W, N),
    ]
    if args.compare_copies:
        moe_copies = SparseMoE(args.in_channels, args.hidden, num_experts=E, k=k).to(device)
        moe_copies.load_state_dict(moe.state_dict())
        moe_copies.train()
        # Without the fused path, permute_and_compute gathers x[rows] into a
        # sorted copy, runs the experts on it and index_adds the outputs back.
        moe_copies.experts.gather_and_combine = lambda *args, **kwargs: None
        methods.append(Method("a0", "SparseMoE with sorted copies (before)",
                              sparse_moe_step(moe_copies), moe_copies, R, W, N))
    if args.compare_top1_before and k == 1:
        old = top1_before(moe, device)
        methods.append(Method("a1", "SparseMoE, the top-1 path of before",
                              sparse_moe_step(old), old, R, W, N))
    if not args.skip_all_experts:
        # On CPU the float32 correctness check already ran (c) once at full size.
        methods.append(Method("c", f"all experts (chunks of {chunk})",
                              all_experts_step(moe, chunk), moe,
                              args.all_experts_repeats, W if device.type == "cuda" else 0, N))
    methods.append(Method("d", f"dense FFN ({args.in_channels}->{k * args.hidden}->"
                               f"{args.in_channels})", dense_step(ffn), ffn, R, W, N))
    if args.only:
        methods = [m for m in methods if m.key in args.only]
    return methods


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "bfloat16":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()

    command = command_line(__file__, argv, drop=())
    threads = torch.get_num_threads()
    env = (f"device: {device_name(device)} ({device.type}), torch {torch.__version__}, "
           f"{threads} threads, timed in {dtype}")
    print(f"{command}\n{env}\nN={args.rows}, F={args.in_channels}, H={args.hidden}, "
          f"repeats={args.repeats} (median), warm-up={args.warmup}", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.rows, args.in_channels, generator=generator).to(device)
    x.requires_grad_()
    grad_out = torch.randn(args.rows, args.in_channels, generator=generator).to(device)

    results, notes = [], []
    load_before = machine_load()
    print(f"load average before: {load_before['load1']:.2f}", flush=True)
    start_all = time.perf_counter()
    def report(final: bool):
        # Printed and written after every configuration too, so that a long
        # run that is stopped keeps what it measured (marked partial).
        elapsed = time.perf_counter() - start_all
        load_after = machine_load()
        load_text = load_line(load_before, load_after, threads)
        per_config = "; ".join(f"E={r['E']}, k={r['k']}: {r['load'][0]:.2f} / {r['load'][1]:.2f}"
                               for r in results)

        table = format_table(results)
        targets = target_report(results, device)
        print()
        print(table)
        print()
        print("\n".join(targets))
        print(f"\ntotal time {elapsed:.0f}s")
        print(load_text)

        if args.out is not None:
            date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
            peak = "peak RSS of the process" if device.type == "cpu" else "peak CUDA memory"
            chunk = all_experts_chunk_size(args.rows, args.hidden, args.in_channels,
                                           max(args.experts), args.all_experts_chunk)
            lines = [
                "# SparseMoE forward+backward throughput",
                "",
                f"- command: `{command}`",
                f"- device: {device_name(device)} ({device.type}); timed in {dtype}",
                f"- torch {torch.__version__}, {threads} threads",
                f"- date: {date}; total time {elapsed:.0f}s"
                + ("" if final else " (PARTIAL: written while the run was still going)"),
                f"- N = {args.rows} rows, in = {args.in_channels}, expert hidden = {args.hidden}; "
                f"median of {args.repeats} round-robin rounds after {args.warmup} warm-up"
                + ("" if args.skip_all_experts else f" (c: {args.all_experts_repeats} round)"),
                "",
                "Rows per second (higher is better), forward + backward:",
                "",
                table,
                "",
                "(a) SparseMoE, backend 'auto'; (a') SparseMoE, backend 'grouped_mm'; "
                "(b) naive loop over experts with index_select / index_add_; "
                "(c) every expert on every row, masked by the dense gate matrix (GMoE), "
                f"forward and backward in chunks of at most {chunk} experts; "
                f"(d) dense FFN Linear(in, k*hidden) -> GELU -> Linear(k*hidden, in). "
                f"Peak mem: {peak} for that row. a/d, a/b: medians over rounds of the ratio of "
                "the two methods' times in the same round."
                + (" (a1) SparseMoE at k = 1 as before its top-1 path: a combine weight "
                   "with a (zero) gradient, outputs and input gradients added into zeroed "
                   "buffers, GELU through autograd per block; same weights, same rounds."
                   if args.compare_top1_before else "")
                + (" (a0) SparseMoE with the dispatch of before (sorted copies [A, F] of the "
                   "rows and [A, O] of the outputs, index_add_ combine), same weights, same "
                   "run." if args.compare_copies else ""),
                "",
                *targets,
                "",
                load_text,
                f"Per configuration, before / after: {per_config}.",
                *([""] + [f"Note: {n}" for n in notes] if notes else []),
                "",
            ]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines))
            print(f"wrote {args.out}")

    for E in args.experts:
        for k in args.k:
            if k > E:
                continue
            print(f"E={E}, k={k}", flush=True)
            reset_peak_memory(device)
            config_load = machine_load()["load1"]
            methods = build_methods(args, E, k, device)
            start = time.perf_counter()
            check = check_correctness(methods, x, grad_out, device)
            print(f"    outputs and gradients of a, a', b, c agree ({check}, float32) "
                  f"[{time.perf_counter() - start:.1f}s]", flush=True)
            for method in methods:
                if method.error is not None:
                    note = f"E={E}, k={k}: ({method.key}) {method.label} failed: {method.error}"
                    print(f"    {note}", flush=True)
                    notes.append(note)
            time_methods(methods, x, grad_out, device, autocast)
            results.append({
                "E": E, "k": k,
                "rows_per_s": {m.key: m.rows_per_s for m in methods if m.rows_per_s},
                "times": {m.key: list(m.times) for m in methods if m.times},
                "peak_gib": peak_memory_gib(device),
                "load": (config_load, machine_load()["load1"]),
            })
            del methods
            report(final=False)
    report(final=True)


if __name__ == "__main__":
    main()
