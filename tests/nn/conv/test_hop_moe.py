r"""HopMoEConv against PyG's own convolutions run on every node."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv

from moegraph.nn import HopMoEConv, two_hop_edge_index
from moegraph.nn.routing import ExpertChoiceRouter, TopKRouter
from moegraph.utils.graph import HopGraph

CONVS = ["gcn", "sage", "gin", "gat"]


def random_graph(num_nodes=30, num_edges=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    x = torch.randn(num_nodes, 6, generator=g)
    return x, edge_index


def expert_as_pyg(layer: HopMoEConv, e: int):
    r"""A PyG convolution holding the weights of expert ``e``."""
    F, O, H = layer.in_channels, layer.out_channels, layer.heads
    ex = layer.experts
    with torch.no_grad():
        if layer.conv == "gcn":
            conv = GCNConv(F, O)
            conv.lin.weight.copy_(ex.weight[e].T)
            conv.bias.copy_(ex.bias[e])
        elif layer.conv == "sage":
            conv = SAGEConv(F, O)
            conv.lin_l.weight.copy_(ex.weight[e][:F].T)
            conv.lin_l.bias.copy_(ex.bias[e])
            conv.lin_r.weight.copy_(ex.weight[e][F:].T)
        elif layer.conv == "gin":
            mlp = torch.nn.Sequential(torch.nn.Linear(F, O), torch.nn.ReLU(),
                                      torch.nn.Linear(O, O))
            conv = GINConv(mlp)  # resets mlp: copy after
            mlp[0].weight.copy_(ex.weight1[e].T)
            mlp[0].bias.copy_(ex.bias1[e])
            mlp[2].weight.copy_(ex.weight2[e].T)
            mlp[2].bias.copy_(ex.bias2[e])
        else:
            conv = GATConv(F, O // H, heads=H)
            conv.lin.weight.copy_(ex.weight[e].T)
            conv.bias.copy_(ex.bias[e])
            conv.att_src.copy_(layer.att_src[e].unsqueeze(0))
            conv.att_dst.copy_(layer.att_dst[e].unsqueeze(0))
    return conv


def naive(layer: HopMoEConv, x, edge_index, routing):
    r"""GMoE's formulation: every expert on the whole graph, then the routed
    outputs picked and weighted."""
    N = x.size(0)
    hop2 = two_hop_edge_index(edge_index, N)
    weight = routing.dense_weight()  # [N, E]
    out = torch.zeros(N, layer.out_channels)
    for e in range(layer.num_experts):
        graph = edge_index if e < layer.num_hop1_experts else hop2
        out = out + weight[:, e:e + 1] * expert_as_pyg(layer, e)(x, graph)
    return out


# The layer against the all-experts reference ##################################

@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("training", [False, True])
def test_matches_all_experts_reference(conv, training):
    torch.manual_seed(0)
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=2, conv=conv, heads=2 if conv == "gat" else 1)
    layer.train(training)
    out, routing = layer(x, edge_index)
    assert out.shape == (30, 8)
    assert routing.row.numel() == 60
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conv", ["gcn", "sage"])
@pytest.mark.parametrize("aggregate_first", [True, False])
def test_both_orders_match_reference(conv, aggregate_first):
    torch.manual_seed(0)
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=2, conv=conv, aggregate_first=aggregate_first)
    out, routing = layer(x, edge_index)
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)
    out.pow(2).sum().backward()
    used = torch.bincount(routing.expert, minlength=4) > 0
    assert torch.all((layer.experts.weight.grad.flatten(1).abs().sum(1) > 0) == used)


def test_order_chosen_by_cost():
    # Wide input on a dense graph: transforming first is cheaper; narrow: aggregating.
    x, edge_index = random_graph(40, 600, 1)
    wide = HopMoEConv(6, 2, num_experts=4, k=1).eval()
    narrow = HopMoEConv(6, 64, num_experts=4, k=1).eval()
    graph = wide.hop_graphs(edge_index, 40)[2]
    rows = torch.arange(40)
    counts = torch.tensor([20, 20])
    assert wide._transform_first(x, graph, rows, rows, counts)
    assert not narrow._transform_first(x, narrow.hop_graphs(edge_index, 40)[2], rows, rows,
                                       counts)


@pytest.mark.parametrize("router,kwargs", [
    ("topp", {"p": 0.6}),
    ("expert_choice", {"capacity_factor": 0.5}),
    ("topk", {"k": 3, "num_null_experts": 2}),
])
def test_other_routers(router, kwargs):
    torch.manual_seed(1)
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=6, num_hop2_experts=2, router=router,
                       router_kwargs=kwargs).eval()
    out, routing = layer(x, edge_index)
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_hop2", [0, 4])
def test_single_hop_expert_sets(num_hop2):
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, num_hop2_experts=num_hop2, k=2).eval()
    out, routing = layer(x, edge_index)
    assert set(layer.hop_graphs(edge_index, 30)) == ({2} if num_hop2 == 4 else {1})
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)


def test_capacity_drops_to_zero_output():
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=1, capacity_factor=0.25,
                       router_kwargs={"k": 1}).eval()
    out, routing = layer(x, edge_index)
    unrouted = routing.experts_per_row() == 0
    assert routing.dropped is not None and unrouted.any()
    assert torch.all(out[unrouted] == 0)
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)


# Sparsity #####################################################################

def test_aggregates_only_into_routed_nodes(monkeypatch):
    r"""Expert choice with a tiny capacity routes few nodes: only their
    in-edges are expanded, and only they are transformed."""
    x, edge_index = random_graph(200, 800, 3)
    layer = HopMoEConv(6, 8, num_experts=4, num_hop2_experts=2, router="expert_choice",
                       router_kwargs={"capacity_factor": 0.05}, conv="gcn",
                       aggregate_first=True).eval()
    graphs = layer.hop_graphs(edge_index, 200)  # built (and cached) before the spying
    seen = []
    original = HopGraph.in_edges

    def spy(self, targets):
        pos, local = original(self, targets)
        seen.append((targets.clone(), pos.numel()))
        return pos, local

    monkeypatch.setattr(HopGraph, "in_edges", spy)
    rows_seen = []
    forward = layer.experts.forward

    def experts_spy(x_sorted, counts, weight=None):
        rows_seen.append(x_sorted.size(0))
        return forward(x_sorted, counts, weight)

    monkeypatch.setattr(layer.experts, "forward", experts_spy)
    out, routing = layer(x, edge_index)
    assert layer.hop_graphs(edge_index, 200) is graphs
    routed = {hop: torch.unique(routing.row[(routing.expert >= 2) == (hop == 2)])
              for hop in (1, 2)}
    assert len(seen) == 2
    for (targets, num_edges), hop in zip(seen, (1, 2), strict=True):
        assert torch.equal(targets, routed[hop])
        assert num_edges == int(graphs[hop].deg[routed[hop]].sum())
        assert num_edges < graphs[hop].src.numel() / 3
    assert sum(rows_seen) == routing.row.numel()  # one transform per assignment, no more
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing), atol=1e-5, rtol=1e-4)


# Equivariance, gradients, caching, determinism ################################

@pytest.mark.parametrize("conv", CONVS)
def test_permutation_equivariance(conv):
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=2, conv=conv).eval()
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(30)
    out, _ = layer(x, edge_index)
    out_perm, _ = layer(x[perm], inv[edge_index])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conv", CONVS)
def test_gradients_reach_router_and_routed_experts(conv):
    torch.manual_seed(0)
    x, edge_index = random_graph()
    x.requires_grad_()
    layer = HopMoEConv(6, 8, num_experts=4, k=2, conv=conv).train()
    out, routing = layer(x, edge_index)
    (out.pow(2).sum() + sum(routing.aux_loss.values())).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        if param.dim() >= 2 and param.size(0) == 4 and not name.startswith("router"):
            used = torch.bincount(routing.expert, minlength=4) > 0
            per_expert = param.grad.flatten(1).abs().sum(1)
            assert torch.all((per_expert > 0) == used), name
        else:
            assert param.grad.abs().sum() > 0, name


def test_inference_tensor_edges():
    # A batch collated under torch.inference_mode (Lightning's evaluation
    # loops) holds inference tensors, which have no version counter.
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=2).eval()
    expected, _ = layer(x, edge_index)
    with torch.inference_mode():
        frozen = edge_index.clone()
        out, _ = layer(x, frozen)
        assert layer.hop_graphs(frozen, 30) is layer.hop_graphs(frozen, 30)  # cached
    torch.testing.assert_close(out, expected)


def test_hop_graph_cache():
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8).eval()
    first = layer.hop_graphs(edge_index, 30)
    assert layer.hop_graphs(edge_index, 30) is first
    assert layer.hop_graphs(edge_index.clone(), 30) is not first  # another tensor
    graphs = layer.hop_graphs(edge_index, 30)
    edge_index[0, 0] = (edge_index[0, 0] + 1) % 30  # in place: rebuilt
    assert layer.hop_graphs(edge_index, 30) is not graphs
    uncached = HopMoEConv(6, 8, cached=False)
    assert uncached.hop_graphs(edge_index, 30) is not uncached.hop_graphs(edge_index, 30)


def test_deterministic_with_seed_and_repr():
    x, edge_index = random_graph()
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        layer = HopMoEConv(6, 8, num_experts=4, k=2).train()
        outs.append(layer(x, edge_index).out)
    assert torch.equal(outs[0], outs[1])
    assert repr(layer) == "HopMoEConv(6, 8, num_experts=4, num_hop2_experts=2, k=2, conv=gcn)"
    assert isinstance(layer.router, TopKRouter) and layer.router.noisy
    assert isinstance(HopMoEConv(6, 8, router="expert_choice").router, ExpertChoiceRouter)


def test_graph_without_edges():
    x = torch.randn(7, 6)
    empty = torch.empty(2, 0, dtype=torch.long)
    for conv in CONVS:
        layer = HopMoEConv(6, 8, num_experts=4, k=2, conv=conv).eval()
        out, routing = layer(x, empty)
        assert out.shape == (7, 8)
        torch.testing.assert_close(out, naive(layer, x, empty, routing), atol=1e-5, rtol=1e-4)


# Bad input ####################################################################

def test_bad_input():
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4)
    with pytest.raises(ValueError, match="outside"):
        layer(x, torch.tensor([[0, 30], [1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        layer(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        layer(x, edge_index[0])
    with pytest.raises(ValueError, match="integers"):
        layer(x, edge_index.float())
    with pytest.raises(ValueError, match="in_channels=6"):
        layer(torch.randn(30, 5), edge_index)
    with pytest.raises(ValueError, match="2-D"):
        layer(torch.randn(30), edge_index)
    with pytest.raises(ValueError, match="'k' must be"):
        HopMoEConv(6, 8, num_experts=4, k=5)
    with pytest.raises(ValueError, match="'conv'"):
        HopMoEConv(6, 8, conv="cheb")
    with pytest.raises(ValueError, match="num_hop2_experts"):
        HopMoEConv(6, 8, num_experts=4, num_hop2_experts=5)
    with pytest.raises(ValueError, match="divisible"):
        HopMoEConv(6, 8, conv="gat", heads=3)
    with pytest.raises(ValueError, match="GAT experts only"):
        HopMoEConv(6, 8, conv="gcn", heads=2)
    with pytest.raises(ValueError, match="capacity_factor"):
        HopMoEConv(6, 8, capacity_factor=0.0)
    with pytest.raises(ValueError, match="GCN and SAGE experts only"):
        HopMoEConv(6, 8, conv="gin", aggregate_first=False)


# Issue 14: bad argument types and inputs; properties (hypothesis) #############

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=2.0), r"'num_experts' must be a positive integer \(got 2.0\)"),
    (dict(num_experts="4"), "'num_experts'"),
    (dict(k=True), r"'k' must be an integer in \[1, 4\]"),
    (dict(capacity_factor=float("inf")), "'capacity_factor' must be a finite positive number"),
    (dict(num_hop2_experts=1.0), r"'num_hop2_experts' must be an integer in \[0, 4\]"),
    (dict(conv="gat", heads=True), "'heads'"),
])
def test_bad_argument_types(kwargs, match):
    kwargs = {"num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        HopMoEConv(6, 8, **kwargs)


@pytest.mark.parametrize("dtype", [torch.long, torch.bool])
def test_integer_or_bool_features_are_rejected(dtype):
    _, edge_index = random_graph()
    with pytest.raises(TypeError, match=f"'x' must be a floating-point tensor.*{dtype}"):
        HopMoEConv(6, 8, num_experts=4)(torch.ones(30, 6, dtype=dtype), edge_index)


@st.composite
def graphs(draw):
    N = draw(st.integers(1, 12))
    M = draw(st.integers(0, 30))
    pairs = draw(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, N - 1)),
                          min_size=M, max_size=M))
    edge_index = (torch.tensor(pairs, dtype=torch.long).t() if pairs
                  else torch.empty(2, 0, dtype=torch.long))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2 ** 16))
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(seed)) * scale
    return x, edge_index


ROUTINGS = {
    "topk": (dict(k=2), "one"),
    "topk_noisy_k1": (dict(k=1, router_kwargs=dict(noisy=True)), "one"),
    "topk_null": (dict(k=2, router_kwargs=dict(num_null_experts=2)), "at_most_one"),
    "topk_capacity": (dict(k=2, capacity_factor=0.5), "at_most_one"),
    "topp": (dict(router="topp", router_kwargs=dict(p=0.6)), "at_most_one"),
    "topp_normalized": (dict(router="topp", router_kwargs=dict(p=0.6, normalize=True)), "one"),
    "expert_choice": (dict(router="expert_choice"), "any"),
}


@settings(max_examples=25, deadline=None, database=None)
@given(graph=graphs(), conv=st.sampled_from(CONVS), name=st.sampled_from(sorted(ROUTINGS)),
       training=st.booleans())
def test_properties(graph, conv, name, training):
    r"""For any small graph: finite outputs and gradients; each node's gate
    weights sum as its router defines (one for renormalised top-k / top-p, at
    most one where null experts, top-p's unnormalised mass or dropped overflow
    remove some, any non-negative sum for expert choice); a node routed to no
    expert gets a zero output."""
    x, edge_index = graph
    kwargs, rule = ROUTINGS[name]
    torch.manual_seed(0)
    layer = HopMoEConv(6, 8, num_experts=4, conv=conv, heads=2 if conv == "gat" else 1,
                       **kwargs).train(training)
    x = x.requires_grad_()
    out, routing = layer(x, edge_index)
    assert out.shape == (x.size(0), 8) and torch.isfinite(out).all()
    (out.square().sum() + sum(routing.aux_loss.values())).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)

    weight = routing.dense_weight()  # [N, E]
    assert (weight >= 0).all()
    total = weight.sum(dim=-1)
    if rule == "one":
        torch.testing.assert_close(total, torch.ones_like(total))
    elif rule == "at_most_one":
        assert (total <= 1 + 1e-6).all()
    unrouted = routing.experts_per_row() == 0
    assert torch.equal(out[unrouted], torch.zeros_like(out[unrouted]))


# The shared expert ############################################################

def _dense_gcn(x, edge_index, weight, bias):
    r"""``D^-1/2 (A + I) D^-1/2 X W + b`` with a dense adjacency (parallel
    edges counted, existing self-loops replaced by one), by hand."""
    N = x.size(0)
    A = torch.zeros(N, N)
    src, dst = edge_index
    keep = src != dst
    A.index_put_((dst[keep], src[keep]), torch.ones(int(keep.sum())), accumulate=True)
    A = A + torch.eye(N)
    d = A.sum(1).pow(-0.5)
    return (d[:, None] * A * d[None, :]) @ x @ weight + bias


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("training", [False, True])
def test_shared_expert_adds_its_conv_on_every_node(conv, training):
    torch.manual_seed(0)
    x, edge_index = random_graph()
    layer = HopMoEConv(6, 8, num_experts=4, k=1, conv=conv, heads=2 if conv == "gat" else 1,
                       shared_expert=True)
    layer.train(training)
    torch.manual_seed(1)
    out, routing = layer(x, edge_index)
    # the routed experts as the all-experts reference, plus the dense conv
    dense = layer.shared_conv(x, edge_index)
    torch.testing.assert_close(out, naive(layer, x, edge_index, routing) + dense,
                               atol=1e-5, rtol=1e-4)
    assert "shared_expert=True" in repr(layer)
    if conv == "gcn":  # the dense expert is GCN's formula
        torch.testing.assert_close(dense, _dense_gcn(x, edge_index, layer.shared_conv.lin.weight.T,
                                                     layer.shared_conv.bias),
                                   atol=1e-5, rtol=1e-4)


def test_shared_expert_sees_every_node_and_keeps_full_decay():
    from moegraph.tasks.common import expert_decay_groups

    torch.manual_seed(0)
    x, edge_index = random_graph()
    x.requires_grad_()
    layer = HopMoEConv(6, 8, num_experts=4, k=1, conv="gcn", shared_expert=True).train()
    out, routing = layer(x, edge_index)
    out.pow(2).sum().backward()
    for name, param in layer.shared_conv.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the shared expert is dense: not among the routed experts' decay group
    (params, share), = expert_decay_groups(layer)
    assert share == 0.25
    shared = {id(p) for p in layer.shared_conv.parameters()}
    assert not shared & {id(p) for p in params}
    # reset_parameters reaches it
    before = layer.shared_conv.lin.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.shared_conv.lin.weight)


# balance="per_hop" #############################################################

def test_per_hop_balance_groups_the_router_by_hop():
    layer = HopMoEConv(6, 8, num_experts=5, num_hop2_experts=2, k=1, balance="per_hop")
    assert layer.router.balance_groups == (3, 2)
    assert "balance='per_hop'" in repr(layer)
    assert HopMoEConv(6, 8, num_experts=4, num_hop2_experts=0,
                      balance="per_hop").router.balance_groups == (4,)
    # the router's own arguments are kept beside the groups
    layer = HopMoEConv(6, 8, num_experts=4, k=1, balance="per_hop",
                       router_kwargs={"noisy": True, "straight_through": True})
    assert layer.router.straight_through and layer.router.balance_groups == (2, 2)
    assert HopMoEConv(6, 8, num_experts=4).router.balance_groups is None
    # same routing and output as balance="all"; only the losses differ
    x, edge_index = random_graph()
    torch.manual_seed(0)
    a = HopMoEConv(6, 8, num_experts=4, k=1, router_kwargs={"noisy": False})
    b = HopMoEConv(6, 8, num_experts=4, k=1, router_kwargs={"noisy": False}, balance="per_hop")
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(x, edge_index), b(x, edge_index)
    torch.testing.assert_close(out_a.out, out_b.out)
    assert torch.equal(out_a.routing.expert, out_b.routing.expert)


def test_per_hop_balance_bad_arguments():
    with pytest.raises(ValueError, match="'balance' must be one of"):
        HopMoEConv(6, 8, num_experts=4, balance="hop")
    with pytest.raises(ValueError, match="needs the 'topk' router given by name"):
        HopMoEConv(6, 8, num_experts=4, balance="per_hop", router=TopKRouter(6, 4))
    with pytest.raises(ValueError, match="needs the 'topk' router given by name"):
        HopMoEConv(6, 8, num_experts=4, balance="per_hop", router="expert_choice")
