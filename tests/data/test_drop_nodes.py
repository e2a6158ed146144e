r"""``DropNodes``: the node-drop augmentation of graph-level training, against a
naive edge-by-edge reference."""
import pytest
import torch
from torch_geometric.data import Data

from moegraph.data import DropNodes


def ring(n: int) -> Data:
    r"""An undirected ring of ``n`` nodes with per-node and per-edge attributes
    (edge ``e`` carries ``e`` so that its attribute identifies it) and one
    graph label."""
    src = torch.arange(n)
    dst = (src + 1) % n
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    x = torch.arange(n).view(-1, 1).repeat(1, 9)  # row i holds i
    edge_attr = torch.arange(edge_index.size(1)).view(-1, 1).repeat(1, 3)
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, y=torch.tensor([[1.0]]))


def test_drop_nodes_matches_a_naive_subgraph():
    data = ring(12)
    torch.manual_seed(3)
    out = DropNodes(0.4)(data)
    torch.manual_seed(3)
    keep = torch.rand(12) >= 0.4  # the draw DropNodes makes
    assert 0 < int(keep.sum()) < 12  # this seed drops some nodes and keeps some
    kept = keep.nonzero().view(-1).tolist()
    new_id = {old: new for new, old in enumerate(kept)}
    assert out.num_nodes == len(kept)
    assert out.x[:, 0].tolist() == kept  # the kept rows, in order
    # Naive reference: every edge whose two ends are kept, renumbered, with its attribute.
    expected = [(new_id[s], new_id[d], e) for e, (s, d) in enumerate(data.edge_index.t().tolist())
                if s in new_id and d in new_id]
    got = [(s, d, a) for (s, d), a in zip(out.edge_index.t().tolist(),
                                          out.edge_attr[:, 0].tolist(), strict=True)]
    assert got == expected
    assert torch.equal(out.y, data.y)  # graph label kept
    assert torch.equal(data.x[:, 0], torch.arange(12))  # the input is untouched


def test_drop_nodes_leaves_small_graphs_and_p0_whole():
    def same(a: Data, b: Data) -> bool:
        return all(torch.equal(a[k], b[k]) for k in ("x", "edge_index", "edge_attr", "y"))

    torch.manual_seed(0)
    small = ring(4)
    assert same(DropNodes(0.9)(small), small)  # under min_nodes = 5
    big = ring(8)
    assert same(DropNodes(0.0)(big), big)
    assert same(DropNodes(0.9, min_nodes=10)(big), big)
    assert DropNodes(0.5)(big).num_nodes < 8  # the same graph is thinned otherwise


def test_drop_nodes_rate():
    torch.manual_seed(0)
    transform = DropNodes(0.2)
    kept = sum(transform(ring(50)).num_nodes for _ in range(200))
    # 10,000 Bernoulli(0.8) draws: mean 8,000, std 40
    assert abs(kept - 8000) < 200


def test_drop_nodes_bad_arguments():
    with pytest.raises(ValueError, match="'p' must lie in"):
        DropNodes(1.0)
    with pytest.raises(ValueError, match="'p' must lie in"):
        DropNodes(-0.1)
    with pytest.raises(ValueError, match="'min_nodes' must be at least 1"):
        DropNodes(0.2, min_nodes=0)
