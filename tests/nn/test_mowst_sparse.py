r"""Sparse inference of Mowst (:meth:`moegraph.nn.Mowst.strong_forward_at`):
the strong expert at the routed nodes equals its full-graph output, on the
trimmed hop-ordered path (PyG's BasicGNN) and on the k-hop fallback."""
import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, GraphSAGE
from torch_geometric.utils import erdos_renyi_graph

from moegraph.nn import mowst as mowst_module
from moegraph.nn.models import MoEGNN
from moegraph.nn.mowst import Mowst, receptive_hops
from moegraph.utils.graph import (
    gcn_degree_inv_sqrt,
    gcn_normalized_edges,
    hop_ordered_subgraph,
    trimmable_convs,
)

FEAT, CLASSES = 6, 3


@pytest.fixture(autouse=True)
def always_trim(monkeypatch):
    r"""On these small graphs two hops reach most edges: test the trimmed path
    whatever its share (the switch to the whole graph has its own test)."""
    monkeypatch.setattr(mowst_module, "DENSE_EDGE_SHARE", float("inf"))


def graph(num_nodes=40, num_edges=90, num_isolated=5, seed=0):
    r"""A random directed graph whose last ``num_isolated`` nodes have no edges."""
    torch.manual_seed(seed)
    x = torch.randn(num_nodes, FEAT)
    edge_index = torch.randint(0, num_nodes - num_isolated, (2, num_edges))
    return x, edge_index


def check(strong, x, edge_index, index, num_hops=None):
    model = Mowst(MLP([FEAT, 8, CLASSES]), strong, num_hops=num_hops).eval()
    full = model.strong_forward(x, edge_index)
    out, num_sub = model.strong_forward_at(x, edge_index, index)
    assert out.shape == (index.numel(), CLASSES)
    assert torch.allclose(out, full[index], atol=1e-5)
    assert num_sub <= x.size(0)
    return model, num_sub


class UserGNN(nn.Module):
    r"""A strong expert outside PyG's BasicGNN."""

    def __init__(self):
        super().__init__()
        self.conv1 = GCNConv(FEAT, 8)
        self.conv2 = GCNConv(8, CLASSES)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


@pytest.mark.parametrize("cls", [GCN, GraphSAGE, GAT, GIN])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_basic_gnn_is_trimmed_and_exact(cls, num_layers):
    x, edge_index = graph()
    torch.manual_seed(1)
    strong = cls(FEAT, 8, num_layers, CLASSES)
    assert trimmable_convs(strong) is not None
    assert receptive_hops(strong) == num_layers  # no extra hop for GCN
    index = torch.tensor([3, 0, 17, 38, 21])  # 38 is isolated
    model, _ = check(strong, x, edge_index, index)
    assert model.num_hops == num_layers


@pytest.mark.parametrize("kwargs", [dict(improved=True), dict(add_self_loops=False),
                                    dict(cached=True), dict(normalize=False)])
def test_gcn_flags(kwargs):
    x, edge_index = graph(seed=2)
    torch.manual_seed(3)
    strong = GCN(FEAT, 8, 2, CLASSES, **kwargs)
    index = torch.arange(0, 40, 3)
    check(strong, x, edge_index, index)
    check(strong, x, edge_index, index)  # the cache (if any) again
    assert all(c.normalize == kwargs.get("normalize", True) for c in strong.convs)


@pytest.mark.parametrize("strong", [
    lambda: MoEGNN(FEAT, 8, CLASSES, num_layers=2, conv="gcn"),
    lambda: UserGNN(),
    lambda: GCN(FEAT, 8, 2, CLASSES, jk="cat"),
])
def test_fallback_is_exact(strong):
    x, edge_index = graph(seed=4)
    torch.manual_seed(5)
    strong = strong()
    assert trimmable_convs(strong) is None
    assert receptive_hops(strong) == 3  # GCN normalisation: one hop more
    check(strong.eval(), x, edge_index, torch.tensor([1, 5, 9, 36, 39]))


def test_num_hops_given_falls_back():
    x, edge_index = graph(seed=6)
    torch.manual_seed(7)
    model, num_sub = check(GCN(FEAT, 8, 2, CLASSES), x, edge_index, torch.tensor([2, 4]),
                           num_hops=3)
    assert model.num_hops == 3


@pytest.mark.parametrize("cls", [GCN, GraphSAGE])
def test_empty_and_all_nodes(cls):
    x, edge_index = graph(seed=8)
    torch.manual_seed(9)
    strong = cls(FEAT, 8, 2, CLASSES)
    _, num_sub = check(strong, x, edge_index, torch.empty(0, dtype=torch.long))
    assert num_sub == 0
    _, num_sub = check(strong, x, edge_index, torch.arange(x.size(0)))
    assert num_sub == x.size(0)


def test_duplicates_and_erdos_renyi():
    torch.manual_seed(10)
    x = torch.randn(50, FEAT)
    edge_index = erdos_renyi_graph(50, 0.05, directed=True)
    check(GCN(FEAT, 8, 3, CLASSES), x, edge_index, torch.tensor([7, 7, 3, 49, 3]))


def test_predict_sparse_equals_dense():
    x, edge_index = graph(seed=11)
    torch.manual_seed(12)
    model = Mowst(MLP([FEAT, 8, CLASSES]), GCN(FEAT, 8, 2, CLASSES)).eval()
    sparse = model.predict(x, edge_index, threshold=0.6, sparse=True)
    dense = model.predict(x, edge_index, threshold=0.6, sparse=False)
    assert torch.equal(sparse.strong_mask, dense.strong_mask)
    assert torch.allclose(sparse.probs, dense.probs, atol=1e-5)


def naive_hops(index, num_hops, edge_index, num_nodes):
    r"""Hop distance to ``index`` against the edge direction, by plain BFS."""
    hop = {int(i): 0 for i in index}
    frontier = set(hop)
    for h in range(1, num_hops + 1):
        nxt = set()
        for s, t in edge_index.t().tolist():
            if t in frontier and s not in hop:
                hop[s] = h
                nxt.add(s)
        frontier = nxt
    return hop


@pytest.mark.parametrize("num_hops", [0, 1, 2, 3])
def test_hop_ordered_subgraph_against_naive_bfs(num_hops):
    x, edge_index = graph(num_nodes=30, num_edges=50, num_isolated=3, seed=13)
    index = torch.tensor([4, 0, 28, 4])
    sub = hop_ordered_subgraph(index, num_hops, edge_index, x.size(0))
    hop = naive_hops(index, num_hops, edge_index, x.size(0))
    assert sorted(sub.subset.tolist()) == sorted(hop)
    hops = [hop[int(v)] for v in sub.subset]
    assert hops == sorted(hops)  # nodes sorted by hop
    assert sub.num_nodes_per_hop == [hops.count(h) for h in range(num_hops + 1)]
    assert torch.equal(sub.subset[sub.mapping], index)
    # the edges: exactly those into nodes within num_hops - 1 hops, grouped by that hop
    expected = sorted(e for e, t in enumerate(edge_index[1].tolist())
                      if hop.get(t, num_hops) < num_hops)
    assert sorted(sub.edge_id.tolist()) == expected
    assert torch.equal(sub.subset[sub.edge_index], edge_index[:, sub.edge_id])
    target_hops = [hop[int(t)] for t in edge_index[1, sub.edge_id]]
    assert target_hops == sorted(target_hops)
    assert sub.num_edges_per_hop == [target_hops.count(h) for h in range(num_hops)]


def test_normalize_restored_when_the_forward_raises():
    x, edge_index = graph(seed=14)
    torch.manual_seed(15)
    strong = GCN(FEAT, 8, 2, CLASSES)
    model = Mowst(MLP([FEAT, 8, CLASSES]), strong).eval()
    seen = []

    def boom(module, args):
        seen.append(module.normalize)
        raise RuntimeError("boom")

    handle = strong.convs[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.strong_forward_at(x, edge_index, torch.tensor([0, 1]))
    handle.remove()
    assert seen == [False]  # it ran with the normalised weights
    assert all(conv.normalize for conv in strong.convs)


@pytest.mark.parametrize("norm,trimmed", [("batch_norm", True), ("layer_norm", False)])
def test_norms(norm, trimmed):
    r"""Node-wise norms are trimmed; PyG's graph-wise layer norm is not (it
    mixes all nodes, and no subgraph is exact for it)."""
    x, edge_index = graph(seed=16)
    torch.manual_seed(17)
    strong = GCN(FEAT, 8, 2, CLASSES, norm=norm)
    assert (trimmable_convs(strong) is not None) == trimmed
    assert receptive_hops(strong) == (2 if trimmed else 3)
    if trimmed:
        check(strong, x, edge_index, torch.tensor([0, 6, 11]))


def test_gcn_normalized_edges_equal_pyg_and_need_shared_flags():
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    x, edge_index = graph(seed=8)
    convs = [GCNConv(FEAT, 8, improved=True), GCNConv(8, 3, improved=True)]
    got_index, got_weight = gcn_normalized_edges(convs, edge_index, x.size(0), x.dtype)
    ref_index, ref_weight = gcn_norm(edge_index, None, x.size(0), improved=True)
    assert torch.equal(got_index, ref_index) and torch.allclose(got_weight, ref_weight)
    with pytest.raises(ValueError, match="must share improved"):
        gcn_normalized_edges([GCNConv(FEAT, 8), GCNConv(8, 3, improved=True)], edge_index,
                             x.size(0), x.dtype)


def test_cached_gcn_normalisation_is_kept_by_mowst_not_written_into_pyg():
    x, edge_index = graph(seed=9)
    torch.manual_seed(0)
    model = Mowst(MLP([FEAT, 8, CLASSES]), GCN(FEAT, 8, 2, CLASSES, cached=True)).eval()
    index = torch.tensor([1, 4, 9])
    first, _ = model.strong_forward_at(x, edge_index, index)
    assert model._gcn_cache is not None
    assert all(c._cached_edge_index is None for c in model.strong.convs)  # PyG's untouched
    again, _ = model.strong_forward_at(x, edge_index, index)
    assert torch.equal(first, again)
    assert torch.allclose(first, model.strong_forward(x, edge_index)[index], atol=1e-5)


def graph_with_loops_and_duplicates(seed=18):
    x, edge_index = graph(seed=seed)
    extra = torch.tensor([[3, 3, 7, 7, 12, 0], [3, 3, 9, 9, 12, 5]])  # loops (one twice), dups
    return x, torch.cat([edge_index, extra], dim=1)


@pytest.mark.parametrize("add_self_loops", [True, False])
@pytest.mark.parametrize("improved", [True, False])
def test_gcn_degree_inv_sqrt_gives_gcn_norm_weights_bit_for_bit(add_self_loops, improved):
    x, edge_index = graph_with_loops_and_duplicates()
    convs = [GCNConv(FEAT, 8, improved=improved, add_self_loops=add_self_loops)]
    ref_index, ref_weight = gcn_normalized_edges(convs, edge_index, x.size(0), x.dtype)
    dinv = gcn_degree_inv_sqrt(convs, edge_index, x.size(0), x.dtype)
    assert dinv.shape == (x.size(0),)
    assert torch.equal(dinv[ref_index[0]] * dinv[ref_index[1]], ref_weight)
    assert dinv[-1] == (1.0 if add_self_loops else 0.0)  # isolated: its own loop, or nothing


def test_gcn_degree_inv_sqrt_needs_shared_flags():
    edge_index = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="must share add_self_loops and flow"):
        gcn_degree_inv_sqrt([GCNConv(FEAT, 8), GCNConv(8, 3, add_self_loops=False)],
                            edge_index, 2, torch.float)


@pytest.mark.parametrize("num_hops", [1, 2, 3])
def test_hop_ordered_subgraph_with_self_loops_lays_edges_out_as_gcn_norm(num_hops):
    from torch_geometric.utils import add_remaining_self_loops

    x, edge_index = graph_with_loops_and_duplicates(seed=19)
    N = x.size(0)
    index = torch.tensor([5, 3, 38])
    sub = hop_ordered_subgraph(index, num_hops, edge_index, N, add_self_loops=True)
    plain = hop_ordered_subgraph(index, num_hops, edge_index, N)
    assert torch.equal(sub.subset, plain.subset) and torch.equal(sub.mapping, plain.mapping)
    hop = naive_hops(index, num_hops, edge_index, N)
    # reference: the edges of the whole looped graph into nodes within num_hops - 1
    # hops, grouped by that hop, each group in the looped graph's order
    looped, _ = add_remaining_self_loops(edge_index, num_nodes=N)
    expected = []
    for h in range(num_hops):
        expected += [(s, t) for s, t in looped.t().tolist() if hop.get(t, num_hops) == h]
    got = sub.subset[sub.edge_index].t().tolist()
    assert got == [list(e) for e in expected]
    assert sub.num_edges_per_hop == [sum(hop.get(t, num_hops) == h for _, t in expected)
                                     for h in range(num_hops)]
    loops = sub.edge_id == -1
    assert torch.equal(sub.edge_index[0, loops], sub.edge_index[1, loops])
    assert torch.equal(edge_index[:, sub.edge_id[~loops]], sub.subset[sub.edge_index[:, ~loops]])


@pytest.mark.parametrize("strong", [
    lambda: GCN(FEAT, FEAT, 2, FEAT),
    lambda: GCN(FEAT, FEAT, 3, FEAT, improved=True),
    lambda: GCN(FEAT, FEAT, 2, FEAT, add_self_loops=False),
    lambda: GCN(FEAT, FEAT, 2, FEAT, cached=True),
    lambda: GraphSAGE(FEAT, FEAT, 2, FEAT),
    lambda: GIN(FEAT, FEAT, 2, FEAT),
])
def test_sparse_inference_sums_messages_as_the_full_graph(strong):
    r"""Every routed node sums its messages in the order of the full graph, with
    the same GCN weights, so the logits are equal bit for bit, not only close.

    The dense layers get identity weights: a BLAS may round a row of ``x @ W``
    differently for another number of rows (seen with MKL on 19 rows against
    40, by one unit in the last place), which would hide what is tested here;
    with identity weights every product is exact and only the sums' order
    counts."""
    x, edge_index = graph_with_loops_and_duplicates(seed=20)
    torch.manual_seed(21)
    model = Mowst(MLP([FEAT, 8, FEAT]), strong()).eval()  # resets the strong expert
    with torch.no_grad():
        for module in model.strong.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Module) and isinstance(weight, torch.Tensor) \
                    and weight.dim() == 2:
                weight.copy_(torch.eye(*weight.shape))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.uniform_(-1, 1)
    full = model.strong_forward(x, edge_index)
    for index in (torch.tensor([3, 12, 0, 38]), torch.arange(0, 40, 2)):
        out, _ = model.strong_forward_at(x, edge_index, index)
        assert torch.equal(out, full[index])
    sparse = model.predict(x, edge_index, threshold=0.6, sparse=True)
    dense = model.predict(x, edge_index, threshold=0.6, sparse=False)
    assert torch.equal(sparse.probs, dense.probs)


@pytest.mark.parametrize("share,whole", [(0.9, True), (float("inf"), False)])
def test_a_subgraph_with_most_edges_runs_on_the_whole_graph(monkeypatch, share, whole):
    monkeypatch.setattr(mowst_module, "DENSE_EDGE_SHARE", share)
    x, edge_index = graph(seed=22)
    torch.manual_seed(23)
    model = Mowst(MLP([FEAT, 8, CLASSES]), GCN(FEAT, 8, 2, CLASSES)).eval()
    calls = []
    handle = model.strong.register_forward_pre_hook(lambda m, args: calls.append(args[0].size(0)))
    index = torch.arange(0, 35)  # every node with edges: the subgraph holds every edge
    out, num_sub = model.strong_forward_at(x, edge_index, index)
    handle.remove()
    assert torch.allclose(out, model.strong_forward(x, edge_index)[index], atol=1e-6)
    assert calls == [x.size(0)] if whole else calls == [35]
    assert num_sub == (x.size(0) if whole else 35)
    out, num_sub = model.strong_forward_at(x, edge_index, torch.tensor([36]))  # isolated
    assert num_sub == 1  # a small subgraph is trimmed at any share
