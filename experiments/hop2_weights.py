r"""Where a hop-2 GCN expert of GMoE (``hop2="square"``) puts its weight: the
rows of the squared GCN adjacency :math:`\hat{A}^2` split into the node
itself, its 1-hop neighbours and the nodes at distance exactly two, against
the node's own weight in :math:`\hat{A}` (a hop-1 expert), and the label
agreement of the weighted neighbourhoods (the node left out)::

    python experiments/hop2_weights.py --datasets cora reed98 amherst41

Prints one line per dataset (means over nodes; nodes without neighbours are
left out of the agreement). Sparse products only: seconds per dataset.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hop2_weights(edge_index, y, num_nodes: int) -> dict[str, float]:
    r"""Mean over nodes of the shares of a row of :math:`\hat{A}^2` on the
    node, its 1-hop neighbours and its 2-hop-only nodes; the node's weight in
    :math:`\hat{A}` and :math:`\hat{A}^2`; and the weighted same-label share
    of the neighbourhood (node excluded) in each."""
    import torch
    from torch_geometric.nn.conv.gcn_conv import gcn_norm
    from torch_geometric.utils import to_undirected

    N = num_nodes
    ei, w = gcn_norm(to_undirected(edge_index, num_nodes=N), None, N, add_self_loops=True)
    a = torch.sparse_coo_tensor(ei, w, (N, N)).coalesce()
    a2 = torch.sparse.mm(a, a).coalesce()
    idx, val = a2.indices(), a2.values()
    diag, diag2 = ei[0] == ei[1], idx[0] == idx[1]
    own1 = torch.zeros(N).index_add_(0, ei[0][diag], w[diag])
    own2 = torch.zeros(N).index_add_(0, idx[0][diag2], val[diag2])
    row2 = torch.zeros(N).index_add_(0, idx[0], val)
    # entries of A^2 on 1-hop pairs: look the pair up among A's edges
    key1 = ei[0] * N + ei[1]
    key2 = idx[0] * N + idx[1]
    on1 = torch.isin(key2, key1[~diag]) & ~diag2
    hop1 = torch.zeros(N).index_add_(0, idx[0][on1], val[on1])
    same = (y[idx[0]] == y[idx[1]]).float() * (~diag2).float()
    same1 = (y[ei[0]] == y[ei[1]]).float() * (~diag).float()
    rest1 = torch.zeros(N).index_add_(0, ei[0], w * (~diag).float())
    agree1 = torch.zeros(N).index_add_(0, ei[0], w * same1) / rest1
    agree2 = torch.zeros(N).index_add_(0, idx[0], val * same) / (row2 - own2)
    return {"own_A": own1.mean().item(), "own_A2": own2.mean().item(),
            "self_share": (own2 / row2).mean().item(),
            "hop1_share": (hop1 / row2).mean().item(),
            "hop2_share": ((row2 - own2 - hop1) / row2).mean().item(),
            "agree_A": agree1.nanmean().item(), "agree_A2": agree2.nanmean().item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+",
                        default=["cora", "citeseer", "reed98", "amherst41", "minesweeper"])
    args = parser.parse_args(argv)
    from moegraph.data.datamodule import load_real_dataset

    root = os.environ.get("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    print("| dataset | own weight Â / Â² | Â² row: self / 1-hop / 2-hop only | "
          "same-label share Â / Â² (self excluded) |")
    print("|---|---|---|---|")
    for name in args.datasets:
        data = load_real_dataset(name, root, str(ROOT / ".cache"))
        r = hop2_weights(data.edge_index, data.y, data.num_nodes)
        print(f"| {name} | {r['own_A']:.3f} / {r['own_A2']:.3f} | {r['self_share']:.2f} / "
              f"{r['hop1_share']:.2f} / {r['hop2_share']:.2f} | {r['agree_A']:.2f} / "
              f"{r['agree_A2']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
