r"""Mowst sparse inference against full-graph GNN inference.

On a synthetic graph of ``--num-nodes`` nodes, times (i) the strong GNN on the
whole graph and (ii) Mowst's sparse inference (:meth:`moegraph.nn.Mowst.predict`:
the MLP and the gate on every node, the GNN only on the computation subgraph of
the nodes below the threshold, :meth:`~moegraph.nn.Mowst.strong_forward_at`)
as a function of the confident fraction ``c``,
and checks that the GNN's predictions on the routed nodes are identical.

The unconfident nodes are the ``1 - c`` share with the lowest score. Which
nodes they are matters (the subgraph grows with their neighbourhoods): ``--select gate`` uses the
confidence of the (untrained) gate, ``--select random`` a random choice, the
worst case for locality. Target of the issue: at ``c >= 0.5``, Mowst time
``<= (1 - 0.5 c)`` x the full GNN time.

    python experiments/bench_mowst_inference.py                 # 200k nodes, GCN and SAGE
    python experiments/bench_mowst_inference.py --quick         # 20k nodes
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _study
import torch
from torch_geometric.nn import GCNConv
from torch_geometric.utils import k_hop_subgraph

from moegraph.data import csbm_graph
from moegraph.nn import Mowst
from moegraph.nn.models import make_backbone


def timed(fn, repeats: int) -> tuple[float, object]:
    r"""Median seconds of ``repeats`` calls after a warm-up, and the output."""
    times, out = _study.timed(fn, repeats)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=200_000)
    parser.add_argument("--avg-degree", type=float, default=6.0)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["gcn", "sage"])
    parser.add_argument("--fractions", nargs="+", type=float,
                        default=[0.0, 0.5, 0.7, 0.9, 0.95, 0.99])
    parser.add_argument("--select", choices=["gate", "random"], default="random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20k nodes, 1 repeat")
    parser.add_argument("--out", type=Path, default=_study.RESULTS / "bench_mowst_inference.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_nodes, args.repeats = 20_000, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = csbm_graph(num_nodes=args.num_nodes, num_classes=4, num_features=args.features,
                      avg_degree=args.avg_degree, seed=0)
    x, edge_index = data.x, data.edge_index
    N, M = data.num_nodes, edge_index.size(1)
    print(f"graph: {N:,} nodes, {M:,} directed edges, {args.features} features; "
          f"{args.threads} threads; selection: {args.select}", flush=True)
    lines = [
        "# Mowst sparse inference vs full-graph GNN inference",
        "",
        f"Made by `{_study.command_line(__file__, argv)}`.",
        f"Graph: CSBM, {N:,} nodes, {M:,} directed edges, {args.features} features; "
        f"{args.layers}-layer backbones, hidden {args.hidden}; float32 on CPU, "
        f"{args.threads} thread(s); median of {args.repeats} runs. Unconfident nodes chosen: "
        f"{args.select}. `hops` = computation-subgraph hops; PyG's "
        "models run on it trimmed layer by layer (layer l of k only at the nodes within "
        "k - l hops; GCN with its edge weights normalised on the whole graph), `subgraph "
        "nodes` = its share of the graph.",
        "",
        "`MLP + gate` = the part of the Mowst time spent on the weak expert and the gate "
        "(every node); `untrimmed` = Mowst time / full GNN time when the GNN runs untrimmed on "
        "`k_hop_subgraph` (GCN: one hop more), the path before layer-by-layer trimming.",
        "",
        "| backbone | c (confident) | hops | subgraph nodes | full GNN (ms) | Mowst sparse (ms) "
        "| MLP + gate (ms) | ratio | untrimmed | target 1 - 0.5c | met | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backbone in args.backbones:
        weak = make_backbone("mlp", args.features, 4, args.hidden, args.layers, dropout=0.0)
        strong = make_backbone(backbone, args.features, 4, args.hidden, args.layers,
                               dropout=0.0)
        model = Mowst(weak, strong, variant="mowst").eval()
        with torch.no_grad():
            full_time, full_logits = timed(
                lambda model=model: model.strong_forward(x, edge_index), args.repeats)
            confidence = torch.sigmoid(model.gate_forward(model.weak_forward(x), x))
            weak_time, _ = timed(lambda model=model: model.gate_forward(
                model.weak_forward(x), x), args.repeats)
        # the hops of the untrimmed path: one more for a normalising GCN
        untrimmed_hops = model.num_hops + int(any(
            isinstance(m, GCNConv) and m.normalize for m in model.strong.modules()))
        score = confidence if args.select == "gate" else torch.rand(N)
        for c in args.fractions:
            # the unconfident share (1 - c): the nodes with the lowest scores
            index = score.argsort()[:int(round((1 - c) * N))].sort().values

            def sparse(index=index, model=model):
                weak_logits = model.weak_forward(x)
                model.gate_forward(weak_logits, x)  # the confidence of every node
                if index.numel() == 0:
                    return weak_logits[:0], 0
                return model.strong_forward_at(x, edge_index, index)

            def untrimmed(index=index, model=model, hops=untrimmed_hops):
                model.gate_forward(model.weak_forward(x), x)
                subset, sub_edge_index, mapping, _ = k_hop_subgraph(
                    index, hops, edge_index, relabel_nodes=True, num_nodes=N)
                return model.strong_forward(x[subset], sub_edge_index)[mapping]

            with torch.no_grad():
                sparse_time, (logits, num_sub) = timed(sparse, args.repeats)
                untrimmed_time = (timed(untrimmed, args.repeats)[0] if index.numel()
                                  else sparse_time)
            identical = torch.allclose(logits, full_logits[index], atol=1e-5)
            ratio = sparse_time / full_time
            target = 1 - 0.5 * c
            met = "yes" if ratio <= target else ("no" if c >= 0.5 else "–")
            row = (f"| {backbone} | {c:.2f} | {model.num_hops} | "
                   f"{num_sub / N:.1%} | {1e3 * full_time:.0f} | "
                   f"{1e3 * sparse_time:.0f} | {1e3 * weak_time:.0f} | {ratio:.2f} | "
                   f"{untrimmed_time / full_time:.2f} | {target:.2f} | {met} | "
                   f"{'yes' if identical else 'NO'} |")
            print(row, flush=True)
            lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
