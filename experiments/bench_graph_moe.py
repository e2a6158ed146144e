r"""Forward+backward time of :class:`moegraph.nn.HopMoEConv` against the
all-experts-everywhere formulation (GMoE's reference code) and a single conv.

On a CSBM graph of ``--num-nodes`` nodes (``x [N, F]``, ``F -> F``), one
training step of the layer alone is timed: the forward pass, then the
backward pass of a fixed output gradient, which fills the gradients of the
input and of every parameter. Methods, for ``E`` GCN experts (half hop-1,
half hop-2) and top-``k`` routing:

* **ours**: :class:`~moegraph.nn.HopMoEConv`: each hop's aggregation only into
  the nodes routed to an expert of that hop, each node transformed only by
  its ``k`` experts.
* **all experts**: the formulation of GMoE's released code: every expert is a
  PyG ``GCNConv`` run on the whole graph (hop-1 experts on ``edge_index``,
  hop-2 experts on the 2-hop graph), and the outputs are summed with the
  dense ``[N, E]`` gate matrix (zero where not routed). Its graphs are
  normalised once and held as sparse CSR matrices, so that each conv
  propagates by one sparse-dense product, as ours does; both methods get
  the 2-hop graph built in advance, so neither is charged for graph
  preprocessing (its build time is reported).
* **single conv**: one ``GCNConv`` on the normalised hop-1 adjacency (the
  plain GNN layer).

Both MoE methods share one router (noisy top-k, in training mode) and one
set of weights; before timing the script checks that they agree (output,
input gradient and parameter gradients). Timing: one warm-up step each, then
``--repeats`` rounds, each running every method once in a rotated order so
that noise on a shared machine hits all alike; the median is reported.

Target of the issue: at ``E = 16, k = 2``, ours ``<= 0.35x`` the all-experts
time.

    python experiments/bench_graph_moe.py          # 100k nodes; writes results/bench_graph_moe.md
    python experiments/bench_graph_moe.py --quick  # 5k nodes; writes nothing (unless --out)
    python experiments/bench_graph_moe.py --device cuda --out results/gpu/bench_graph_moe.md
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _bench import load_line, load_warning, machine_load
from _study import RESULTS, command_line
from torch import Tensor
from torch_geometric.nn import GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_torch_csr_tensor

from moegraph.data import csbm_graph
from moegraph.nn import HopMoEConv, two_hop_edge_index


def normalized_adj_t(edge_index: Tensor, num_nodes: int) -> Tensor:
    r"""GCN's normalised adjacency with self-loops as a sparse CSR ``[N, N]``
    matrix with targets as rows, so that propagation is one sparse-dense
    product (as in ``HopMoEConv``) rather than a materialised message tensor."""
    edge_index, edge_weight = gcn_norm(edge_index, None, num_nodes)
    return to_torch_csr_tensor(edge_index.flip(0), edge_weight, size=(num_nodes, num_nodes))


class AllExperts(torch.nn.Module):
    r"""GMoE's formulation with the weights of ``layer``: every expert, a
    GCN convolution, on every node; the outputs summed with the dense gate
    matrix. Each expert runs what ``GCNConv(cached=True).forward`` runs:
    ``x @ W_e``, then propagation over its normalised hop graph (normalised
    once, as the cache would), then the bias."""

    def __init__(self, layer: HopMoEConv, edge_index: Tensor, hop2: Tensor):
        super().__init__()
        N = int(edge_index.max()) + 1
        self.layer = layer
        self.conv = GCNConv(layer.in_channels, layer.out_channels)  # its propagate only
        hop_graphs = {1: normalized_adj_t(edge_index, N), 2: normalized_adj_t(hop2, N)}
        self.graphs = [hop_graphs[1] if e < layer.num_hop1_experts else hop_graphs[2]
                       for e in range(layer.num_experts)]

    def forward(self, x: Tensor) -> Tensor:
        routing = self.layer.router(x)
        gate = routing.dense_weight()  # [N, E]
        weight, bias = self.layer.experts.weight, self.layer.experts.bias  # shared
        out = 0
        for e, adj_t in enumerate(self.graphs):
            h = self.conv.propagate(adj_t, x=x @ weight[e], edge_weight=None) + bias[e]
            out = out + gate[:, e:e + 1] * h  # [N, O]
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=100_000)
    parser.add_argument("--avg-degree", type=float, default=6.0)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (float32 on both)")
    parser.add_argument("--quick", action="store_true",
                        help="5k nodes, 1 repeat; no file unless --out is given")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default: experiments/results/bench_graph_moe.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_nodes, args.repeats = 5_000, 1
    elif args.out is None:
        args.out = RESULTS / "bench_graph_moe.md"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    F = args.channels
    data = csbm_graph(num_nodes=args.num_nodes, num_classes=4, num_features=F,
                      avg_degree=args.avg_degree, seed=0)
    x, edge_index, N = data.x.to(device), data.edge_index.to(device), data.num_nodes
    start = time.perf_counter()
    hop2 = two_hop_edge_index(edge_index, N)
    hop2_time = time.perf_counter() - start
    print(f"graph: {N:,} nodes, {edge_index.size(1):,} edges, {hop2.size(1):,} 2-hop pairs "
          f"(built in {hop2_time:.2f} s); F = {F}; {args.threads} thread(s)", flush=True)

    single = GCNConv(F, F, normalize=False).to(device)
    adj1 = normalized_adj_t(edge_index, N)
    rows = []
    load_before = None
    for E in args.experts:
        for k in args.k:
            ours = HopMoEConv(F, F, num_experts=E, k=k).to(device).train()
            ours.hop_graphs(edge_index, N)  # build the cache outside the timing
            # share the 2-hop graph already built: same pairs, the layer's own format
            reference = AllExperts(ours, edge_index, hop2).train()
            grad_out = torch.randn(N, F, generator=torch.Generator().manual_seed(1)).to(device)

            def run(method: str, ours=ours, reference=reference,
                    grad_out=grad_out) -> tuple[Tensor, Tensor]:
                xr = x.clone().requires_grad_()
                torch.manual_seed(2)  # the same router noise for both MoE methods
                if method == "ours":
                    out = ours(xr, edge_index).out
                elif method == "all":
                    out = reference(xr)
                else:
                    out = single(xr, adj1)
                out.backward(grad_out)
                return out.detach(), xr.grad

            for module in (ours, reference, single):
                module.zero_grad()
            out_a, gx_a = run("ours")
            # a parameter no gradient reaches (the top-1 router's weight: its
            # combine weight is the constant one) compares as zero
            grads_a = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                       for p in ours.parameters()]
            ours.zero_grad()
            out_b, gx_b = run("all")
            grads_b = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                       for p in ours.parameters()]
            agree = (torch.allclose(out_a, out_b, atol=1e-4, rtol=1e-3)
                     and torch.allclose(gx_a, gx_b, atol=1e-4, rtol=1e-3)
                     and all(torch.allclose(a, b, atol=1e-3, rtol=1e-3)
                             for a, b in zip(grads_a, grads_b, strict=True)))
            methods = ["ours", "all", "single"]
            times: dict[str, list[float]] = {m: [] for m in methods}
            if cuda:  # one more warm-up each (kernels, allocator)
                for m in methods:
                    run(m)
            if load_before is None:
                load_before = machine_load()
            for r in range(args.repeats):
                for m in methods[r % 3:] + methods[:r % 3]:
                    sync()
                    start = time.perf_counter()
                    run(m)
                    sync()
                    times[m].append(time.perf_counter() - start)
            t = {m: statistics.median(v) for m, v in times.items()}
            ratio = t["ours"] / t["all"]
            target = "yes" if ratio <= 0.35 else "no"
            rows.append(f"| {E} | {k} | {1e3 * t['ours']:.0f} | {1e3 * t['all']:.0f} | "
                        f"{1e3 * t['single']:.0f} | {ratio:.2f} | "
                        f"{t['ours'] / t['single']:.2f} | "
                        f"{target if (E, k) == (16, 2) else '–'} | "
                        f"{'yes' if agree else 'NO'} |")
            print(rows[-1], flush=True)

    load_after = machine_load()
    warning = load_warning(load_before, load_after, 1 if cuda else args.threads)
    if warning:
        print(warning)
    where = (f"float32 on {torch.cuda.get_device_name(device)}" if cuda else
             f"float32 on CPU, {args.threads} thread(s)")
    lines = [
        "# Hop-expert graph MoE layer vs all experts everywhere vs a single conv",
        "",
        f"Made by `{command_line(__file__, argv)}`.",
        f"Graph: CSBM, {N:,} nodes, {edge_index.size(1):,} directed edges, "
        f"{hop2.size(1):,} 2-hop pairs (built once in {hop2_time:.2f} s, outside the timings); "
        f"GCN experts {F} -> {F}, half hop-1 and half hop-2; noisy top-k router; {where}; "
        f"one forward + backward step, median of {args.repeats} rounds (rotated order).",
        "",
        load_line(load_before, load_after, 1 if cuda else args.threads),
        "",
        "| E | k | ours (ms) | all experts (ms) | single conv (ms) | ours / all | "
        "ours / single | target <= 0.35 met | outputs and grads agree |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
