r"""Tests of moegraph.nn.models.MoEGNN and its builders make_conv / make_norm."""
import pytest
import torch
from torch.nn import BatchNorm1d, Identity, LayerNorm, Sequential
from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv
from torch_geometric.testing import get_random_edge_index

from moegraph.nn import ModelOutput, SparseMoE, TopPRouter
from moegraph.nn.models import CONVS, MoEGNN, make_conv, make_norm

# The routed convolution has its own tests (tests/nn/test_hop_moe.py, incl. in MoEGNN).
PLAIN_CONVS = [c for c in CONVS if c != "hop_moe"]

N, FEAT, HID, OUT = 30, 6, 16, 3
FFNS = ("moe", "dense", "none")


def make_graph(n=N, num_edges=90, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, FEAT)
    edge_index = get_random_edge_index(n, n, num_edges)
    return x, edge_index


def make_net(conv="gcn", ffn="moe", **kwargs):
    kwargs = {"num_layers": 2, "num_experts": 4, "k": 2, **kwargs}
    if conv == "gat":
        kwargs.setdefault("conv_kwargs", {"heads": 2})
    return MoEGNN(FEAT, HID, OUT, conv=conv, ffn=ffn, **kwargs)


def num_moe_layers(net):
    return sum(isinstance(f, SparseMoE) for f in net.ffns)


@pytest.mark.parametrize("conv", PLAIN_CONVS)
@pytest.mark.parametrize("ffn", FFNS)
def test_output_fields(conv, ffn):
    torch.manual_seed(0)
    net = make_net(conv, ffn)
    x, edge_index = make_graph()
    out = net(x, edge_index)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (N, OUT)
    assert torch.isfinite(out.logits).all()
    assert out.confidence is None
    assert isinstance(out.routing, tuple)
    if ffn == "moe":
        assert len(out.routing) == 2 == num_moe_layers(net)
        for routing in out.routing:
            assert routing.num_rows == N and routing.num_experts == 4
            assert int(routing.load.sum()) == N * 2  # top-2, dropless
        assert set(out.aux_loss) == {"load_balance", "z_loss", "importance"}
    else:
        assert out.routing == () and out.aux_loss == {}
        assert num_moe_layers(net) == 0


@pytest.mark.parametrize("ffn,num_layers,moe_every,moe_layers", [
    ("moe", 4, 2, [1, 3]), ("moe", 4, 1, [0, 1, 2, 3]), ("moe", 3, 2, [1]),
    ("moe", 1, 2, []), ("dense", 4, 1, []), ("none", 4, 1, []),
])
def test_moe_every(ffn, num_layers, moe_every, moe_layers):
    torch.manual_seed(0)
    net = make_net(ffn=ffn, num_layers=num_layers, moe_every=moe_every)
    assert [i for i, f in enumerate(net.ffns) if isinstance(f, SparseMoE)] == moe_layers
    for i, f in enumerate(net.ffns):
        if i not in moe_layers:
            assert isinstance(f, Identity if ffn == "none" else Sequential)
    # Without a feed-forward part there is no residual step to normalise.
    assert all(isinstance(n, Identity) == (ffn == "none") for n in net.ffn_norms)
    out = net(*make_graph())
    assert len(out.routing) == len(moe_layers)


@pytest.mark.parametrize("conv", PLAIN_CONVS)
def test_aux_loss_is_the_sum_over_layers(conv):
    torch.manual_seed(1)
    net = make_net(conv, num_layers=4, moe_every=2).train()
    out = net(*make_graph())
    assert len(out.routing) == 2
    names = set().union(*(r.aux_loss for r in out.routing))
    assert set(out.aux_loss) == names == {"load_balance", "z_loss", "importance"}
    for name in names:
        by_hand = out.routing[0].aux_loss[name] + out.routing[1].aux_loss[name]
        assert torch.allclose(out.aux_loss[name], by_hand), name
        assert float(out.aux_loss[name].detach()) > 0, name  # training: the losses are live
    net.eval()
    out = net(*make_graph())
    assert all(float(v) == 0.0 for v in out.aux_loss.values())


def test_aux_loss_names_of_other_routers():
    torch.manual_seed(1)
    x, edge_index = make_graph()
    net = make_net(k=None, moe_kwargs={"router": "topp", "router_kwargs": {"p": 0.6}})
    assert isinstance(net.ffns[0].router, TopPRouter) and net.ffns[0].router.p == 0.6
    out = net(x, edge_index)
    assert set(out.aux_loss) == {"load_balance", "z_loss", "importance", "entropy"}
    net = make_net(k=None, moe_kwargs={"router": "expert_choice"})
    out = net(x, edge_index)
    assert set(out.aux_loss) == {"z_loss"}
    assert torch.allclose(out.aux_loss["z_loss"],
                          sum(r.aux_loss["z_loss"] for r in out.routing))


@pytest.mark.parametrize("conv", PLAIN_CONVS)
@pytest.mark.parametrize("ffn", FFNS)
def test_permutation_equivariance(conv, ffn):
    torch.manual_seed(2)
    net = make_net(conv, ffn, norm="batch_norm" if conv == "sage" else "layer_norm").eval()
    x, edge_index = make_graph(seed=3)
    perm = torch.randperm(N)  # new node i is old node perm[i]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N)
    out = net(x, edge_index)
    out_perm = net(x[perm], inv[edge_index])
    assert torch.allclose(out_perm.logits, out.logits[perm], atol=1e-5)


@pytest.mark.parametrize("router,k", [("topp", None), ("expert_choice", None)])
def test_permutation_equivariance_other_routers(router, k):
    torch.manual_seed(2)
    net = make_net(k=k, moe_kwargs={"router": router}).eval()
    x, edge_index = make_graph(seed=3)
    perm = torch.randperm(N)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N)
    out, out_perm = net(x, edge_index), net(x[perm], inv[edge_index])
    assert torch.allclose(out_perm.logits, out.logits[perm], atol=1e-5)


@pytest.mark.parametrize("conv", PLAIN_CONVS)
@pytest.mark.parametrize("ffn", FFNS)
def test_every_parameter_learns(conv, ffn):
    torch.manual_seed(4)
    net = make_net(conv, ffn, dropout=0.0, input_dropout=0.0).train()
    x, edge_index = make_graph(n=60, num_edges=200, seed=5)
    out = net(x, edge_index)
    loss = (out.logits * torch.randn_like(out.logits)).sum() + sum(out.aux_loss.values())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    for routing in out.routing:
        assert bool((routing.load > 0).all())  # so every expert slice got a gradient


def test_graph_without_edges():
    torch.manual_seed(0)
    x = torch.randn(N, FEAT)
    empty = torch.empty(2, 0, dtype=torch.long)
    for conv in CONVS:
        out = make_net(conv)(x, empty)
        assert out.logits.shape == (N, OUT) and torch.isfinite(out.logits).all(), conv


def test_graph_without_nodes():
    torch.manual_seed(0)
    out = make_net("sage").eval()(torch.empty(0, FEAT), torch.empty(2, 0, dtype=torch.long))
    assert out.logits.shape == (0, OUT)


def test_same_seed_same_model():
    x, edge_index = make_graph()
    torch.manual_seed(7)
    a = make_net("gat", dropout=0.5).eval()
    torch.manual_seed(7)
    b = make_net("gat", dropout=0.5).eval()
    assert torch.equal(a(x, edge_index).logits, b(x, edge_index).logits)


def test_dropout_only_in_training():
    torch.manual_seed(8)
    net = make_net(dropout=0.5, input_dropout=0.5)
    x, edge_index = make_graph()
    net.eval()
    assert torch.equal(net(x, edge_index).logits, net(x, edge_index).logits)
    net.train()
    assert not torch.equal(net(x, edge_index).logits, net(x, edge_index).logits)


def test_reset_parameters():
    torch.manual_seed(9)
    net = make_net("gin")
    x, edge_index = make_graph()
    before = net.eval()(x, edge_index).logits
    net.reset_parameters()
    assert not torch.allclose(net(x, edge_index).logits, before)


def test_ffn_hidden_channels_and_moe_kwargs():
    net = make_net(ffn_hidden_channels=24, moe_every=2, num_layers=2,
                   moe_kwargs={"num_shared_experts": 1})
    dense, moe = net.ffns
    assert dense[0].out_features == 24 and dense[2].in_features == 24
    assert moe.hidden_channels == 24 and moe.num_shared_experts == 1


def test_dense_twin_has_the_active_width_of_top_k():
    # ffn="dense" with k: one FFN k * ffn_hidden_channels wide (k experts' active width);
    # without k: ffn_hidden_channels wide.
    twin = MoEGNN(FEAT, HID, OUT, num_layers=2, ffn="dense", ffn_hidden_channels=24, k=3)
    assert all(f[0].out_features == 72 and f[2].in_features == 72 for f in twin.ffns)
    plain = MoEGNN(FEAT, HID, OUT, num_layers=2, ffn="dense", ffn_hidden_channels=24)
    assert all(f[0].out_features == 24 for f in plain.ffns)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="'k' must be a positive integer"):
            MoEGNN(FEAT, HID, OUT, ffn="dense", k=bad)


def test_dense_twin_counts_the_shared_experts():
    # A top-1 block with one shared expert of the experts' width is active on
    # 2 x 24 hidden units per node; with shared_hidden_channels=10 on 24 + 2 x 10.
    def widths(**moe_kwargs):
        twin = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn="dense", ffn_hidden_channels=24,
                      k=1, moe_kwargs=moe_kwargs)
        return [(f[0].out_features, f[2].in_features) for f in twin.ffns]

    assert widths(num_shared_experts=1) == [(48, 48)] * 3  # residual: an FFN per layer
    assert widths(num_shared_experts=2, shared_hidden_channels=10) == [(44, 44)] * 3
    # The MoE block it stands in for: routed k x 24 plus the shared experts, per node.
    moe = MoEGNN(FEAT, HID, OUT, num_layers=2, ffn_hidden_channels=24, k=1,
                 moe_kwargs={"num_shared_experts": 1}).ffns[0]
    assert moe.router.k * moe.hidden_channels + moe.shared[0].out_features == 48
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="'num_shared_experts'"):
            widths(num_shared_experts=bad)


def test_conv_kwargs_not_mutated():
    conv_kwargs = {"heads": 4}
    net = MoEGNN(FEAT, HID, OUT, num_layers=2, conv="gat", conv_kwargs=conv_kwargs)
    assert conv_kwargs == {"heads": 4}
    assert all(c.heads == 4 and c.out_channels == HID // 4 for c in net.convs)


@pytest.mark.parametrize("ffn", ["dense", "none"])
def test_residual_layout_against_a_naive_composition(ffn):
    r"""``residual=True``: input projection, ``h + relu(conv(h))``, the
    feed-forward part added back (``h + FFN(h)``), a linear classifier."""
    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn=ffn, norm=None, dropout=0.5,
                 input_dropout=0.5, residual=True).eval()
    h = net.lin_in(x)
    for conv, block in zip(net.convs, net.ffns, strict=True):
        h = h + torch.relu(conv(h, edge_index))
        if ffn == "dense":
            h = h + block(h)
    torch.testing.assert_close(net(x, edge_index).logits, net.lin_out(h))


@pytest.mark.parametrize("ffn", ["dense", "moe", "none"])
def test_plain_stack_is_pyg_gcn_with_ffns_between_convolutions(ffn):
    r"""``residual=False``: PyG's GCN (``conv_1`` reads the features, the last
    convolution gives the class scores, nothing else) with ``h + FFN(h)``
    after every convolution but the last. With ``ffn="none"`` it is
    :class:`torch_geometric.nn.models.GCN` itself, weight for weight."""
    from torch_geometric.nn.models import GCN

    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn=ffn, norm=None, dropout=0.5,
                 input_dropout=0.5, residual=False, num_experts=4, k=2).eval()
    assert net.lin_in is None and net.lin_out is None
    assert [c.in_channels for c in net.convs] == [FEAT, HID, HID]
    assert [c.out_channels for c in net.convs] == [HID, HID, OUT]
    assert len(net.ffns) == 2
    h = x
    for conv, block in zip(net.convs[:-1], net.ffns, strict=True):
        h = torch.relu(conv(h, edge_index))
        if ffn == "dense":
            h = h + block(h)
        elif ffn == "moe":
            h = h + block(h)[0]
    out = net(x, edge_index)
    torch.testing.assert_close(out.logits, net.convs[-1](h, edge_index))
    assert len(out.routing) == (2 if ffn == "moe" else 0)
    if ffn == "none":
        gcn = GCN(FEAT, HID, 3, OUT).eval()
        for mine, theirs in zip(net.convs, gcn.convs, strict=True):
            theirs.load_state_dict(mine.state_dict())
        torch.testing.assert_close(out.logits, gcn(x, edge_index))


def test_input_dropout_none_is_that_of_the_layouts_baseline():
    r"""``input_dropout=None``: none in the plain stack, so that without
    feed-forward parts it is PyG's GCN in training too (same dropout masks
    from the same seed, same outputs); ``dropout`` in the residual layout (as
    ``make_backbone``'s residual model)."""
    from torch_geometric.nn.models import GCN

    assert MoEGNN(FEAT, HID, OUT, dropout=0.3, input_dropout=None,
                  residual=True).input_dropout == 0.3
    assert MoEGNN(FEAT, HID, OUT, dropout=0.3, input_dropout=None,
                  residual=False).input_dropout == 0.0
    assert MoEGNN(FEAT, HID, OUT, dropout=0.3, input_dropout=0.1,
                  residual=False).input_dropout == 0.1
    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn="none", norm=None, dropout=0.5,
                 input_dropout=None, residual=False).train()
    gcn = GCN(FEAT, HID, 3, OUT, dropout=0.5).train()
    for mine, theirs in zip(net.convs, gcn.convs, strict=True):
        theirs.load_state_dict(mine.state_dict())
    torch.manual_seed(7)
    ours = net(x, edge_index).logits
    torch.manual_seed(7)
    theirs = gcn(x, edge_index)
    torch.testing.assert_close(ours, theirs)
    torch.manual_seed(7)  # with the old default (input dropout = dropout) it is not
    net.input_dropout = 0.5
    assert not torch.allclose(net(x, edge_index).logits, theirs)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize("residual", [False, True])
def test_spectral_norm_feed_forward_parts(ffn, residual):
    r"""``spectral_norm=True``: the network computes what the same network with
    plain feed-forward weights computes once each FFN / expert weight matrix is
    divided by its largest singular value (numpy's SVD), convolutions untouched;
    a dense FFN then cannot stretch its input (1-Lipschitz with ReLU)."""
    import copy

    import numpy as np

    from moegraph.nn.experts import SpectralLinear

    def sigma(w):
        return float(np.linalg.svd(w.detach().double().numpy(), compute_uv=False)[..., 0].max())

    torch.manual_seed(12)
    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn=ffn, norm=None, residual=residual,
                 num_experts=4, k=2, spectral_norm=True).eval()
    ref = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn=ffn, norm=None, residual=residual,
                 num_experts=4, k=2).eval()
    ref.load_state_dict(copy.deepcopy(net.state_dict()))
    with torch.no_grad():
        for block in ref.ffns:
            if isinstance(block, SparseMoE):
                for w in (block.experts.weight1, block.experts.weight2):
                    for e in range(w.size(0)):
                        w[e].div_(sigma(w[e]))
            else:
                for lin in (block[0], block[2]):
                    lin.weight.div_(sigma(lin.weight))
    torch.testing.assert_close(net(x, edge_index).logits, ref(x, edge_index).logits)
    if ffn == "dense":
        assert all(isinstance(block[i], SpectralLinear) for block in net.ffns for i in (0, 2))
        with torch.no_grad():
            for lin in (net.ffns[0][0], net.ffns[0][2]):
                lin.weight.mul_(50.0)  # what Adam may do to the scale: no effect
            a, b = torch.randn(100, HID), torch.randn(100, HID)
            ya, yb = net.ffn_branch(0, a)[0], net.ffn_branch(0, b)[0]
        assert bool(((ya - yb).norm(dim=1) <= (a - b).norm(dim=1) + 1e-5).all())
        torch.testing.assert_close(net(x, edge_index).logits, ref(x, edge_index).logits)
    else:
        assert all(block.experts.spectral_norm for block in net.ffns)
    assert "spectral_norm=True" in repr(net)


def test_spectral_norm_and_bias_given_once():
    with pytest.raises(ValueError, match="give 'spectral_norm' to MoEGNN, not 'spectral_norm' "
                                         "in 'moe_kwargs'"):
        MoEGNN(FEAT, HID, OUT, moe_kwargs={"spectral_norm": True})
    with pytest.raises(ValueError, match="give 'ffn_bias' to MoEGNN, not 'bias' in 'moe_kwargs'"):
        MoEGNN(FEAT, HID, OUT, moe_kwargs={"bias": False})


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_bias_free_spectral_ffn_cannot_grow_its_input(ffn):
    r"""``ffn_bias=False`` with ``spectral_norm=True`` (the default of
    ``model=moe_gnn`` / ``dense_gnn``): no bias in any FFN or expert, and
    ``||FFN(h)|| <= ||h||`` per node (a ReLU map of two spectrally normalised
    matrices; for the MoE block a convex mix of such experts, the top-k gate
    renormalised), however large the stored weights grow."""
    torch.manual_seed(14)
    net = MoEGNN(FEAT, HID, OUT, ffn=ffn, norm=None, residual=False, num_experts=4, k=2,
                 spectral_norm=True, ffn_bias=False)
    names = [n for n, _ in net.ffns.named_parameters()]
    assert names and not any("bias" in n for n in names)
    with torch.no_grad():
        for p in net.ffns.parameters():  # expert, FFN and router weights
            p.mul_(30.0)
    h = 10.0 * torch.randn(200, HID)
    y, _ = net.ffn_branch(0, h)
    assert bool((y.norm(dim=1) <= h.norm(dim=1) * (1 + 1e-5)).all())
    # with biases the bound does not hold: an all-zero input gets the bias path
    biased = MoEGNN(FEAT, HID, OUT, ffn=ffn, norm=None, residual=False, num_experts=4, k=2,
                    spectral_norm=True, ffn_bias=True)
    assert float(biased.ffn_branch(0, torch.zeros(5, HID))[0].abs().sum()) > 0
    assert float(net.ffn_branch(0, torch.zeros(5, HID))[0].abs().sum()) == 0


def test_ffn_branch_is_what_a_block_adds():
    # eval, no norm: the plain stack's conv_2 reads h + ffn_branch(h)
    torch.manual_seed(13)
    x, edge_index = make_graph()
    for ffn in ("dense", "moe"):
        net = MoEGNN(FEAT, HID, OUT, ffn=ffn, norm=None, residual=False, num_experts=4,
                     k=2).eval()
        h = torch.relu(net.convs[0](x, edge_index))
        y, routing = net.ffn_branch(0, h)
        assert (routing is None) == (ffn == "dense")
        torch.testing.assert_close(net(x, edge_index).logits, net.convs[1](h + y, edge_index))


def test_route_before_dropout_plain_stack_by_hand():
    r"""``route_before_dropout``, training, plain stack: the router reads
    ``relu(conv_1(x))`` before the dropout, the experts the dropped-out
    ``h``. Reference composed by hand with the same dropout draws (same
    seed, same order of calls), the experts' mixture computed naively from
    the routing of the clean ``h``."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=2, ffn="moe", norm=None, dropout=0.5,
                 input_dropout=0.2, residual=False, num_experts=4, k=2,
                 route_before_dropout=True).train()
    torch.manual_seed(7)
    out = net(x, edge_index)
    moe = net.ffns[0]
    torch.manual_seed(7)
    xd = F.dropout(x, 0.2, True)
    a = torch.relu(net.convs[0](xd, edge_index))
    h = F.dropout(a, 0.5, True)
    probs = torch.softmax(a @ moe.router.weight.t(), dim=-1)  # [N, E]
    top_p, top_e = probs.topk(2, dim=-1)
    gate = top_p / top_p.sum(dim=-1, keepdim=True)
    ex = moe.experts
    y = torch.zeros(x.size(0), HID)
    for n in range(x.size(0)):
        for j in range(2):
            e = int(top_e[n, j])
            y[n] += gate[n, j] * (torch.relu(h[n] @ ex.weight1[e] + ex.bias1[e])
                                  @ ex.weight2[e] + ex.bias2[e])
    ref = net.convs[1](h + F.dropout(y, 0.5, True), edge_index)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)
    assert out.routing[0].expert.view(-1, 2).tolist() == top_e.tolist()


@pytest.mark.parametrize("residual,norm", [(False, None), (True, "layer_norm")])
def test_route_before_dropout_routes_in_training_as_in_evaluation(residual, norm):
    r"""Without input dropout, one block: the router's input in training is
    the evaluation one, so the top-k choices agree on every node (and the
    test-time model is unchanged); without the option dropout moves some."""
    torch.manual_seed(5)
    x, edge_index = make_graph(n=200, num_edges=600)
    kwargs = dict(num_layers=2 if not residual else 1, ffn="moe", norm=norm, dropout=0.5,
                  input_dropout=0.0, residual=residual, num_experts=4, k=2)
    net = MoEGNN(FEAT, HID, OUT, route_before_dropout=True, **kwargs)
    off = MoEGNN(FEAT, HID, OUT, route_before_dropout=False, **kwargs)
    off.load_state_dict(net.state_dict())
    net.eval()
    off.eval()
    ev = net(x, edge_index)
    torch.testing.assert_close(ev.logits, off(x, edge_index).logits)  # eval: the same model
    eval_choice = ev.routing[0].expert.view(-1, 2)
    net.train()
    off.train()
    torch.manual_seed(0)
    assert net(x, edge_index).routing[0].expert.view(-1, 2).tolist() == eval_choice.tolist()
    torch.manual_seed(0)
    moved = (off(x, edge_index).routing[0].expert.view(-1, 2) != eval_choice).any(-1)
    assert int(moved.sum()) > 0


def test_route_before_dropout_no_op_without_dropout_or_router():
    x, edge_index = make_graph()
    for ffn, dropout in (("moe", 0.0), ("dense", 0.5)):
        torch.manual_seed(0)
        a = MoEGNN(FEAT, HID, OUT, ffn=ffn, dropout=dropout, residual=False, num_experts=4,
                   k=2, route_before_dropout=True).train()
        b = MoEGNN(FEAT, HID, OUT, ffn=ffn, dropout=dropout, residual=False, num_experts=4,
                   k=2).train()
        b.load_state_dict(a.state_dict())
        torch.manual_seed(1)
        ya = a(x, edge_index).logits
        torch.manual_seed(1)
        torch.testing.assert_close(ya, b(x, edge_index).logits)


def test_route_before_dropout_bad_type():
    with pytest.raises(TypeError, match="'route_before_dropout' must be a bool"):
        MoEGNN(FEAT, HID, OUT, route_before_dropout="yes")


def test_plain_stack_one_layer_and_gat_head():
    x, edge_index = make_graph()
    # one layer: a single convolution to the classes, nowhere for an FFN
    assert MoEGNN(FEAT, HID, OUT, num_layers=1, ffn="none",
                  residual=False)(x, edge_index).logits.shape == (x.size(0), OUT)
    with pytest.raises(ValueError, match="needs num_layers >= 2"):
        MoEGNN(FEAT, HID, OUT, num_layers=1, ffn="moe", residual=False)
    # GAT: heads in the hidden convolutions, one head in the class scores
    net = MoEGNN(FEAT, HID, OUT, num_layers=2, conv="gat", conv_kwargs={"heads": 4},
                 residual=False)
    assert [c.heads for c in net.convs] == [4, 1]
    assert net(x, edge_index).logits.shape == (x.size(0), OUT)


def test_repr():
    assert repr(make_net("gcn", num_layers=4, moe_every=2)) == \
        "MoEGNN(6, 16, 3, num_layers=4, conv=gcn, moe_layers=2)"
    assert repr(make_net("sage", "dense")) == \
        "MoEGNN(6, 16, 3, num_layers=2, conv=sage, moe_layers=0)"
    assert repr(make_net("gcn", residual=False)) == \
        "MoEGNN(6, 16, 3, num_layers=2, conv=gcn, moe_layers=1, residual=False)"


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv="gcnn"), r"'conv' must be one of \('gcn', 'sage', 'gat', 'gin', 'hop_moe', 'none'\) "
                        r"\(got 'gcnn'\)"),
    (dict(norm="group_norm"), r"'norm' must be one of .* \(got 'group_norm'\)"),
    (dict(ffn="sparse"), r"'ffn' must be 'moe', 'dense' or 'none' \(got 'sparse'\)"),
    (dict(num_layers=0), r"'num_layers' must be positive \(got 0\)"),
    (dict(moe_every=0), r"'moe_every' must be positive \(got 0\)"),
    (dict(conv="gat", conv_kwargs={"heads": 3}),
     r"GAT: out_channels=16 is not divisible by heads=3"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEGNN(FEAT, HID, OUT, **kwargs)


# Builders #####################################################################


@pytest.mark.parametrize("name,cls", [("gcn", GCNConv), ("sage", SAGEConv), ("gat", GATConv),
                                      ("gin", GINConv)])
def test_make_conv(name, cls):
    torch.manual_seed(0)
    conv = make_conv(name, 5, 8)
    assert isinstance(conv, cls)
    x, edge_index = torch.randn(10, 5), get_random_edge_index(10, 10, 20)
    assert conv(x, edge_index).shape == (10, 8)


def test_make_conv_kwargs():
    assert make_conv("gcn", 5, 8, add_self_loops=False).add_self_loops is False
    assert make_conv("sage", 5, 8, aggr="max").aggr == "max"
    gat = make_conv("gat", 5, 8, heads=4)
    assert gat.heads == 4 and gat.out_channels == 2
    assert make_conv("gat", 5, 8, heads=4)(torch.randn(3, 5),
                                           torch.tensor([[0], [1]])).shape == (3, 8)
    gin = make_conv("gin", 5, 8, train_eps=True)
    assert isinstance(gin.eps, torch.nn.Parameter)
    assert gin.nn[0].in_features == 5 and gin.nn[2].out_features == 8
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        make_conv("gat", 5, 8, heads=3)
    with pytest.raises(ValueError, match=r"'conv' must be one of .* \(got 'gcn2'\)"):
        make_conv("gcn2", 5, 8)


def test_make_norm():
    assert isinstance(make_norm(None, 8), Identity)
    assert isinstance(make_norm("none", 8), Identity)
    ln = make_norm("layer_norm", 8)
    assert isinstance(ln, LayerNorm) and ln.normalized_shape == (8,)
    bn = make_norm("batch_norm", 8)
    assert isinstance(bn, BatchNorm1d) and bn.num_features == 8
    with pytest.raises(ValueError, match=r"'norm' must be one of .* \(got 'LayerNorm'\)"):
        make_norm("LayerNorm", 8)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_ffn_scale_zero_starts_as_the_convolutions_alone(ffn):
    r"""``ffn_scale=0.0`` (ReZero): at initialisation the plain stack is PyG's
    GCN of the same convolution weights, whatever the feed-forward parts hold;
    training moves the scales and, through them, the feed-forward weights."""
    from torch_geometric.nn.models import GCN

    x, edge_index = make_graph()
    torch.manual_seed(0)
    net = MoEGNN(FEAT, HID, OUT, num_layers=3, ffn=ffn, norm=None, dropout=0.5,
                 input_dropout=0.5, residual=False, num_experts=4, k=2, ffn_scale=0.0)
    gcn = GCN(FEAT, HID, 3, OUT, dropout=0.5).eval()
    for ours, theirs in zip(net.convs, gcn.convs, strict=True):
        theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(net.eval()(x, edge_index).logits, gcn(x, edge_index))
    assert all(torch.equal(g, torch.zeros(HID)) for g in net.ffn_scales)

    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    y = torch.randint(0, OUT, (N,))
    for _ in range(2):  # step 1 moves the scales, step 2 the feed-forward weights too
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x, edge_index).logits, y).backward()
        opt.step()
    assert all(g.abs().sum() > 0 for g in net.ffn_scales)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in net.ffns.parameters() if p.requires_grad)


def test_ffn_scale_multiplies_each_channel_of_the_branch():
    # h + gamma * FFN(h), gamma a learned vector per block, against the branch by hand
    x, edge_index = make_graph()
    net = MoEGNN(FEAT, HID, OUT, num_layers=2, ffn="dense", norm=None,
                 residual=True, ffn_scale=0.5).eval()
    assert len(net.ffn_scales) == 2 and all(torch.equal(g, torch.full((HID,), 0.5))
                                            for g in net.ffn_scales)
    with torch.no_grad():
        for g in net.ffn_scales:
            g.copy_(torch.randn(HID))
    h = net.lin_in(x)
    for conv, block, gamma in zip(net.convs, net.ffns, net.ffn_scales, strict=True):
        h = h + torch.relu(conv(h, edge_index))
        h = h + gamma * block(h)
    torch.testing.assert_close(net(x, edge_index).logits, net.lin_out(h))
    net.reset_parameters()
    assert all(torch.equal(g, torch.full((HID,), 0.5)) for g in net.ffn_scales)
    # no feed-forward parts, nothing to scale
    assert MoEGNN(FEAT, HID, OUT, ffn="none", ffn_scale=0.0).ffn_scales is None
    assert MoEGNN(FEAT, HID, OUT).ffn_scales is None


@pytest.mark.parametrize("bad", [True, "0", float("nan"), float("inf")])
def test_ffn_scale_bad_values(bad):
    with pytest.raises(ValueError, match="'ffn_scale' must be a finite number"):
        MoEGNN(FEAT, HID, OUT, ffn_scale=bad)
