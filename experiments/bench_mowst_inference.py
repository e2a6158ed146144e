r"""Mowst sparse inference against full-graph GNN inference.

On a synthetic graph of ``--num-nodes`` nodes, times (i) the strong GNN on the
whole graph and (ii) Mowst's sparse inference (:meth:`moegraph.nn.Mowst.predict`:
the MLP and the gate on every node, the GNN only on the computation subgraph of
the nodes below the threshold, :meth:`~moegraph.nn.Mowst.strong_forward_at`)
as a function of the confident fraction ``c``,
and checks that the GNN's outputs on the routed nodes are identical, bit for
bit, to those of the full graph.

The unconfident nodes are the ``1 - c`` share with the lowest score. Which
nodes they are matters (the subgraph grows with their neighbourhoods): ``--select gate`` uses the
confidence of the (untrained) gate, ``--select random`` a random choice, the
worst case for locality. ``--checkpoint`` instead loads Mowst models trained by
``moegraph-train`` (with their own data): the first row of each is
:meth:`~moegraph.nn.Mowst.predict` itself (the nodes below the trained gate's
threshold), the next ones the ``1 - c`` least confident nodes of the trained
gate (real locality). Targets of the issue: at ``c >= 0.5``, Mowst time
``<= (1 - 0.5 c)`` x the full GNN time; GCN at ``c = 0.9`` (random):
``<= 0.80``.

Timing on a shared machine: for each row, the full GNN, sparse inference and
the untrimmed path run once each per round, in an order rotated from round to
round, after one warm-up round; the ratio is the median over rounds of the
paired ratio (sparse / full of the same round), and the load average is
recorded before and after.

    python experiments/bench_mowst_inference.py                 # 200k nodes, GCN and SAGE
    python experiments/bench_mowst_inference.py --quick         # 20k nodes
    python experiments/bench_mowst_inference.py --checkpoint RUN/checkpoints/last.ckpt
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _study
import torch
from _bench import is_loaded, load_line, machine_load
from torch import Tensor
from torch_geometric.nn import GCNConv
from torch_geometric.utils import k_hop_subgraph

from moegraph.data import csbm_graph
from moegraph.nn import Mowst
from moegraph.nn.models import make_backbone

HEADER = ("| model | c (confident) | hops | subgraph nodes | full GNN (ms) | Mowst sparse (ms) "
          "| MLP + gate (ms) | ratio | untrimmed | target 1 - 0.5c | met | identical |")


def rotated(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    r"""Seconds of each step in each of ``repeats`` rounds (one warm-up round
    first); every step runs once per round, the order rotated by one each round."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[n]()
            if r > 0:
                times[n].append(time.perf_counter() - start)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    r"""The median over rounds of ``num / den`` of the same round."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def untrimmed_hops(model: Mowst) -> int:
    r"""Hops of the untrimmed path: one more for a normalising GCN."""
    assert model.num_hops is not None
    return model.num_hops + int(any(isinstance(m, GCNConv) and m.normalize
                                    for m in model.strong.modules()))


def strong_at_before(model: Mowst, x: Tensor, edge_index: Tensor, index: Tensor) -> Tensor:
    r"""The strong expert at ``index`` as sparse inference computed it before
    (for ``--compare-before``): GCN's normalisation of the whole graph
    (``gcn_norm``: the self-looped edges and all their weights), then the
    hop-ordered subgraph of the looped graph, its weights gathered by edge id."""
    from moegraph.utils.graph import gcn_normalized_edges, hop_ordered_subgraph, trimmable_convs

    convs = trimmable_convs(model.strong)
    assert convs is not None and model.num_hops is not None
    gcn = [c for c in convs if isinstance(c, GCNConv) and c.normalize]
    N, edge_weight = x.size(0), None
    if gcn:
        edge_index, edge_weight = gcn_normalized_edges(gcn, edge_index, N, x.dtype)
    sub = hop_ordered_subgraph(index, model.num_hops, edge_index, N)
    kwargs = dict(num_sampled_nodes_per_hop=sub.num_nodes_per_hop,
                  num_sampled_edges_per_hop=sub.num_edges_per_hop)
    if edge_weight is not None:
        kwargs["edge_weight"] = edge_weight[sub.edge_id]
    try:
        for conv in gcn:
            conv.normalize = False
        out = model.strong(x[sub.subset], sub.edge_index, **kwargs)
    finally:
        for conv in gcn:
            conv.normalize = True
    return out[sub.mapping]


def bench_row(name: str, model: Mowst, x: Tensor, edge_index: Tensor, index: Tensor,
              c: float, weak_ms: float, repeats: int, untrimmed: bool,
              predict: bool = False, before: bool = False) -> str:
    r"""One table row: the full GNN, sparse inference at the nodes ``index``
    (the weak expert and gate on every node, then the strong expert's
    :meth:`~moegraph.nn.Mowst.strong_forward_at`; with ``predict``, the call
    :meth:`~moegraph.nn.Mowst.predict` itself) and, with ``untrimmed``, the
    strong expert untrimmed on :func:`k_hop_subgraph`, timed side by side."""
    N = x.size(0)

    def full():
        return model.strong_forward(x, edge_index)

    def sparse():
        if predict:
            return model.predict(x, edge_index, sparse=True)
        weak_logits = model.weak_forward(x, edge_index)
        model.gate_forward(weak_logits, x)  # the confidence of every node
        if index.numel() == 0:
            return weak_logits[:0], 0
        return model.strong_forward_at(x, edge_index, index)

    def plain():
        model.gate_forward(model.weak_forward(x, edge_index), x)
        subset, sub_edge_index, mapping, _ = k_hop_subgraph(
            index, untrimmed_hops(model), edge_index, relabel_nodes=True, num_nodes=N)
        return model.strong_forward(x[subset], sub_edge_index)[mapping]

    def sparse_before():
        model.gate_forward(model.weak_forward(x, edge_index), x)
        return strong_at_before(model, x, edge_index, index)

    steps: dict[str, Callable[[], object]] = {"full": full, "sparse": sparse}
    if untrimmed and index.numel():
        steps["untrimmed"] = plain
    if before and index.numel():
        steps["before"] = sparse_before
    with torch.no_grad():
        times = rotated(steps, repeats)
        full_logits = full()
        if predict:
            pred, reference = sparse(), model.predict(x, edge_index, sparse=False)
            assert isinstance(pred, tuple) and isinstance(reference, tuple)
            identical = (torch.equal(pred.probs, reference.probs)
                         and torch.equal(pred.strong_mask, reference.strong_mask))
            diff = (pred.probs - reference.probs).abs().max().item()
            num_sub = pred.num_subgraph_nodes
        else:
            logits, num_sub = sparse()  # type: ignore[misc]
            identical = torch.equal(logits, full_logits[index])
            diff = (logits - full_logits[index]).abs().max().item() if index.numel() else 0.0
    full_ms = 1e3 * statistics.median(times["full"])
    sparse_ms = 1e3 * statistics.median(times["sparse"])
    ratio = paired_ratio(times["sparse"], times["full"])
    plain_ratio = (f"{paired_ratio(times['untrimmed'], times['full']):.2f}"
                   if "untrimmed" in times else "–")
    if before:
        plain_ratio += (f" | {paired_ratio(times['before'], times['full']):.2f}"
                        if "before" in times else " | –")
    target = 1 - 0.5 * c
    met = "yes" if ratio <= target else ("no" if c >= 0.5 else "–")
    same = "yes (bitwise)" if identical else f"NO (max diff {diff:.1e})"
    return (f"| {name} | {c:.2f} | {model.num_hops} | {num_sub / N:.1%} | {full_ms:.0f} | "
            f"{sparse_ms:.0f} | {weak_ms:.0f} | {ratio:.2f} | {plain_ratio} | {target:.2f} | "
            f"{met} | {same} |")


def weak_and_gate_ms(model: Mowst, x: Tensor, edge_index: Tensor, repeats: int) -> float:
    with torch.no_grad():
        times, _ = _study.timed(
            lambda: model.gate_forward(model.weak_forward(x, edge_index), x), repeats)
    return 1e3 * statistics.median(times)


def lowest(score: Tensor, c: float) -> Tensor:
    r"""The ``1 - c`` share of the nodes with the lowest ``score``, sorted."""
    return score.argsort()[:int(round((1 - c) * score.numel()))].sort().values


def synthetic_rows(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    data = csbm_graph(num_nodes=args.num_nodes, num_classes=4, num_features=args.features,
                      avg_degree=args.avg_degree, seed=0)
    x, edge_index = data.x, data.edge_index
    N, M = data.num_nodes, edge_index.size(1)
    print(f"graph: {N:,} nodes, {M:,} directed edges, {args.features} features; "
          f"{args.threads} threads; selection: {args.select}", flush=True)
    text = [f"Graph: CSBM, {N:,} nodes, {M:,} directed edges, {args.features} features; "
            f"{args.layers}-layer PyG backbones (untrained), hidden {args.hidden}; unconfident "
            f"nodes chosen: {args.select}."]
    rows = []
    for backbone in args.backbones:
        torch.manual_seed(0)
        weak = make_backbone("mlp", args.features, 4, args.hidden, args.layers, dropout=0.0)
        strong = make_backbone(backbone, args.features, 4, args.hidden, args.layers,
                               dropout=0.0)
        model = Mowst(weak, strong, variant="mowst").eval()
        weak_ms = weak_and_gate_ms(model, x, edge_index, args.repeats)
        with torch.no_grad():
            confidence = torch.sigmoid(model.gate_forward(model.weak_forward(x), x))
        score = confidence if args.select == "gate" else torch.rand(N)
        for c in args.fractions:
            row = bench_row(backbone, model, x, edge_index, lowest(score, c), c, weak_ms,
                            args.repeats, not args.no_untrimmed,
                            before=args.compare_before)
            print(row, flush=True)
            rows.append(row)
    return text, rows


def checkpoint_rows(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    import hydra
    from omegaconf import OmegaConf

    from moegraph.checkpoint import CHECKPOINT_KEY, load_checkpoint
    from moegraph.eval import load_task

    text, rows = [], []
    for path in args.checkpoint:
        checkpoint = load_checkpoint(str(path))
        config = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config") or {}
        datamodule = hydra.utils.instantiate(OmegaConf.create(config["data"]),
                                             _convert_="partial")
        datamodule.setup("test")
        data = datamodule.data
        model = load_task(str(path), checkpoint).net.eval()
        if not isinstance(model, Mowst):
            raise ValueError(f"{path}: the network is {type(model).__name__}, not Mowst")
        x, edge_index = data.x.float(), data.edge_index
        name = f"{config['data'].get('name', '?')} ({type(model.strong).__name__})"
        N, M = x.size(0), edge_index.size(1)
        print(f"{name}: {N:,} nodes, {M:,} directed edges", flush=True)
        text.append(f"{name}: `{path}`, {N:,} nodes, {M:,} directed edges, "
                    f"{x.size(1)} features, threshold {model.threshold}.")
        weak_ms = weak_and_gate_ms(model, x, edge_index, args.repeats)
        with torch.no_grad():
            confidence = torch.sigmoid(model.gate_forward(model.weak_forward(x, edge_index), x))
        index = (confidence < model.threshold).nonzero().view(-1)
        c = 1 - index.numel() / N
        row = bench_row(f"{name}, predict", model, x, edge_index, index, c, weak_ms,
                        args.repeats, not args.no_untrimmed, predict=True)
        print(row, flush=True)
        rows.append(row)
        for c in args.fractions:
            row = bench_row(f"{name}, gate", model, x, edge_index, lowest(confidence, c), c,
                            weak_ms, args.repeats, not args.no_untrimmed)
            print(row, flush=True)
            rows.append(row)
    return text, rows


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
    parser.add_argument("--checkpoint", nargs="+", type=Path, default=None,
                        help="trained Mowst checkpoints (moegraph-train) instead of the "
                             "synthetic graph")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-untrimmed", action="store_true",
                        help="leave out the untrimmed k_hop_subgraph path")
    parser.add_argument("--compare-before", action="store_true",
                        help="add the sparse path of before (whole-graph gcn_norm), same rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20k nodes, 1 repeat")
    parser.add_argument("--out", type=Path, default=_study.RESULTS / "bench_mowst_inference.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_nodes, args.repeats = 20_000, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    before = machine_load()
    text, rows = checkpoint_rows(args) if args.checkpoint else synthetic_rows(args)
    after = machine_load()
    lines = [
        "# Mowst sparse inference vs full-graph GNN inference",
        "",
        f"Made by `{_study.command_line(__file__, argv)}`.",
        *text,
        f"Float32 on CPU, {args.threads} thread(s); {args.repeats} rounds after a warm-up, "
        "each running the full GNN, sparse inference and the untrimmed path once, in an order "
        "rotated from round to round: times are medians, `ratio` (Mowst sparse / full GNN) and "
        "`untrimmed` are medians of the ratios within a round. `hops` = "
        "computation-subgraph hops; PyG's models run on it trimmed layer by layer (layer l of "
        "k only at the nodes within k - l hops; GCN with the weights of its whole-graph "
        "normalisation), `subgraph nodes` = its share of the graph.",
        "",
        "`MLP + gate` = the part of the Mowst time spent on the weak expert and the gate "
        "(every node); `untrimmed` = Mowst time / full GNN time when the GNN runs untrimmed on "
        "`k_hop_subgraph` (GCN: one hop more), the path before layer-by-layer trimming; "
        "`identical`: the strong expert's logits at the routed nodes (for `predict` rows: "
        "the probabilities of `Mowst.predict`) equal those of full inference bit for bit."
        + (" `before` = the sparse path of before (GCN normalised on the whole graph with "
           "`gcn_norm`, the subgraph cut from the looped graph) / full GNN, same rounds."
           if args.compare_before else ""),
        "",
        HEADER.replace("| untrimmed |", "| untrimmed | before |") if args.compare_before
        else HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.compare_before
                                                               else ""),
        *rows,
        "",
        load_line(before, after, args.threads),
    ]
    if is_loaded(before, after, args.threads):
        print(f"WARNING: loaded machine (load average {before['load1']:.2f} / "
              f"{after['load1']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
