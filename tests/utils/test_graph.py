r"""Graph utilities against dense references and hand-made examples."""
import pytest
import torch

from moegraph.nn import two_hop_edge_index
from moegraph.nn.conv import HopGraph as ReexportedHopGraph
from moegraph.nn.conv import check_edge_index as reexported_check
from moegraph.utils.graph import HopGraph, check_edge_index


def random_graph(num_nodes=30, num_edges=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    x = torch.randn(num_nodes, 6, generator=g)
    return x, edge_index


def dense_two_hop(edge_index, N):
    A = torch.zeros(N, N)
    A[edge_index[1], edge_index[0]] = 1  # A[target, source]
    return ((A @ A) > 0) & (A == 0) & ~torch.eye(N, dtype=torch.bool)



# Two-hop graph ################################################################

@pytest.mark.parametrize("seed", range(4))
def test_two_hop_matches_dense_square(seed):
    x, edge_index = random_graph(25, 60, seed)
    edge_index = torch.cat([edge_index, torch.tensor([[3, 3, 4], [3, 5, 5]])], dim=1)  # loop, dup
    hop2 = two_hop_edge_index(edge_index, 25)
    got = torch.zeros(25, 25, dtype=torch.bool)
    got[hop2[1], hop2[0]] = True
    assert torch.equal(got, dense_two_hop(edge_index, 25))
    assert hop2.size(1) == int(got.sum())  # each pair once
    # sorted by target, then source
    key = hop2[1] * 25 + hop2[0]
    assert torch.equal(key, key.sort().values)


def test_two_hop_chunks_and_hand_example():
    # path 0 -> 1 -> 2 -> 3 plus the shortcut 0 -> 2
    edge_index = torch.tensor([[0, 1, 2, 0], [1, 2, 3, 2]])
    hop2 = two_hop_edge_index(edge_index, 4)
    # 0->2 is one hop already; 1->3 and 0->3 are two hops
    assert sorted(map(tuple, hop2.t().tolist())) == [(0, 3), (1, 3)]
    x, edge_index = random_graph(40, 150, 7)
    full = two_hop_edge_index(edge_index, 40)
    assert torch.equal(two_hop_edge_index(edge_index, 40, max_paths_per_chunk=3), full)
    assert two_hop_edge_index(torch.empty(2, 0, dtype=torch.long), 5).shape == (2, 0)


def test_hop_graph_in_edges():
    edge_index = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 1, 1, 3]])
    graph = HopGraph.build(edge_index, 4)
    pos, local = graph.in_edges(torch.tensor([1, 3, 1]))
    got = sorted(zip(local.tolist(), graph.src[pos].tolist(), strict=True))
    assert got == [(0, 0), (0, 2), (0, 3), (1, 0), (2, 0), (2, 2), (2, 3)]


# Edge-index checks ############################################################

def test_reexports():
    assert ReexportedHopGraph is HopGraph and reexported_check is check_edge_index


def test_check_edge_index():
    check_edge_index(torch.tensor([[0, 1], [1, 2]]), 3)
    check_edge_index(torch.tensor([[0, 1], [1, 2]], dtype=torch.int), 3)
    check_edge_index(torch.tensor([[], []]), 3)  # empty: any dtype
    with pytest.raises(ValueError, match=r"holds node 3, outside \[0, 2\] for 3 nodes"):
        check_edge_index(torch.tensor([[0, 1], [1, 3]]), 3)
    with pytest.raises(ValueError, match=r"holds node -1, outside"):
        check_edge_index(torch.tensor([[0, -1], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"must have shape \[2, num_edges\]"):
        check_edge_index(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="must hold integers"):
        check_edge_index(torch.tensor([[0.0], [1.0]]), 3)
    with pytest.raises(TypeError, match="must be a tensor"):
        check_edge_index([[0], [1]], 3)
