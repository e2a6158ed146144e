r"""Tests of moegraph.nn.mowst against hand-computed values and the paper's
formulas (sparse inference: tests/nn/test_mowst_sparse.py)."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn.models import GCN, MLP

from moegraph.nn import (
    ConfidenceGate,
    Mowst,
    dispersions,
    entropy_dispersion,
    mowst_loss,
    mowst_star_loss,
    variance_dispersion,
)
from moegraph.nn.models import MoEGNN, make_backbone
from moegraph.nn.mowst import mixture_log_probs, receptive_hops

N, FEAT, C = 12, 5, 3


def graph(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEAT, generator=g)
    edge_index = torch.randint(0, n, (2, 3 * n), generator=g)
    return x, edge_index


def make_mowst(**kwargs):
    torch.manual_seed(0)
    return Mowst(MLP([FEAT, 8, C], dropout=0.0), GCN(FEAT, 8, 2, C), **kwargs)


# -- dispersions ----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [variance_dispersion, entropy_dispersion])
@pytest.mark.parametrize("classes", [2, 3, 7])
def test_dispersion_uniform_is_zero_and_one_hot_is_one(fn, classes):
    uniform = torch.full((1, classes), 1.0 / classes)
    one_hot = F.one_hot(torch.tensor([1]), classes).float()
    assert fn(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(one_hot).item() == pytest.approx(1.0, abs=1e-6)


def test_dispersions_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    # Var(p) = mean((p - 1/3)^2); Var(one-hot) = mean((e1 - 1/3)^2) = 2/9
    var_p = ((p - 1 / 3) ** 2).mean()
    assert variance_dispersion(p).item() == pytest.approx((var_p / (2 / 9)).item(), rel=1e-6)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert entropy_dispersion(p).item() == pytest.approx(1 - h / math.log(3), rel=1e-6)


def test_dispersions_in_unit_interval_and_from_logits():
    logits = torch.randn(100, 6) * 5
    d = dispersions(logits)
    assert d.shape == (100, 2) and d.min() >= 0 and d.max() <= 1
    probs = logits.softmax(-1)
    assert torch.allclose(d[:, 0], variance_dispersion(probs))
    assert torch.allclose(d[:, 1], entropy_dispersion(probs))
    # Computed from logits: a second softmax (the reference code's defect)
    # would give a different value.
    assert not torch.allclose(dispersions(probs), d)


def test_dispersion_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        variance_dispersion(torch.ones(3, 1))
    with pytest.raises(ValueError, match="two classes"):
        entropy_dispersion(torch.ones(3, 1))


# -- gate -------------------------------------------------------------------------------
def test_gate_mlp_output_and_repr():
    gate = ConfidenceGate("mlp", hidden_channels=16)
    out = gate(torch.rand(10, 2))
    assert out.shape == (10,)
    c = torch.sigmoid(out)
    assert c.min() >= 0 and c.max() <= 1
    assert repr(gate) == "ConfidenceGate(gate_type=mlp, hidden_channels=16, in_channels=0)"


def test_gate_with_features():
    gate = ConfidenceGate("mlp", in_channels=FEAT)
    assert gate(torch.rand(4, 2), torch.randn(4, FEAT)).shape == (4,)
    with pytest.raises(ValueError, match="node features of size 5"):
        gate(torch.rand(4, 2))


@pytest.mark.parametrize("kind,col", [("variance", 0), ("entropy", 1)])
def test_fixed_gate_is_a_power_of_the_dispersion(kind, col):
    disp = torch.rand(20, 2) * 0.98 + 0.01
    gate = ConfidenceGate(kind, power=2.0)
    assert list(gate.parameters()) == []
    assert torch.allclose(torch.sigmoid(gate(disp)), disp[:, col] ** 2, atol=1e-5)
    assert repr(gate) == f"ConfidenceGate(gate_type={kind}, power=2.0)"


@pytest.mark.parametrize("kwargs,match", [
    ({"gate_type": "softmax"}, "'gate_type' must be one of"),
    ({"power": 0.0}, "'power' must be positive"),
    ({"num_layers": 0}, "'num_layers' must be positive"),
])
def test_gate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfidenceGate(**kwargs)


# -- losses -----------------------------------------------------------------------------
def test_mowst_loss_by_hand():
    weak = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    strong = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    c = torch.tensor([0.8, 0.3])
    y = torch.tensor([0, 1])
    ce = lambda logits, t: -logits.log_softmax(-1)[torch.arange(2), t]  # noqa: E731
    expected = (c * ce(weak, y) + (1 - c) * ce(strong, y)).mean()
    assert mowst_loss(weak, strong, c, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mowst_star_loss_by_hand():
    weak = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    strong = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    gate_logit = torch.tensor([1.0, -0.5])
    c = torch.sigmoid(gate_logit)
    y = torch.tensor([0, 1])
    mix = c[:, None] * weak.softmax(-1) + (1 - c[:, None]) * strong.softmax(-1)
    expected = -mix[torch.arange(2), y].log().mean()
    got = mowst_star_loss(weak, strong, gate_logit, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(mixture_log_probs(weak, strong, gate_logit).exp(), mix, atol=1e-6)


def test_mixture_is_stable_for_extreme_gates():
    weak, strong = torch.randn(4, 3) * 30, torch.randn(4, 3) * 30
    out = mixture_log_probs(weak, strong, torch.tensor([-200.0, 200.0, 0.0, 50.0]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)


# -- the module -----------------------------------------------------------------------------
def test_forward_shapes_confidence_and_repr():
    x, edge_index = graph()
    model = make_mowst()
    out = model(x, edge_index)
    assert out.logits.shape == (N, C) and out.confidence.shape == (N,)
    assert out.confidence.min() >= 0 and out.confidence.max() <= 1
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(N), atol=1e-5)
    assert repr(model) == "Mowst(weak=MLP, strong=GCN, variant=mowst, gate_type=mlp)"


def test_experts_match_the_parts():
    x, edge_index = graph()
    model = make_mowst().eval()
    out = model.forward_experts(x, edge_index)
    assert torch.allclose(out.weak_logits, model.weak(x))
    assert torch.allclose(out.strong_logits, model.strong(x, edge_index))
    assert torch.allclose(out.confidence,
                          torch.sigmoid(model.gate(dispersions(model.weak(x)))))


@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
def test_loss_dispatch(variant):
    x, edge_index = graph()
    model = make_mowst(variant=variant)
    out = model.forward_experts(x, edge_index)
    y = torch.randint(0, C, (N,))
    expected = (mowst_loss(out.weak_logits, out.strong_logits, out.confidence, y)
                if variant == "mowst" else
                mowst_star_loss(out.weak_logits, out.strong_logits, out.gate_logit, y))
    assert torch.allclose(model.loss(out, y), expected)


def test_gradients_reach_every_part():
    x, edge_index = graph()
    model = make_mowst()
    out = model.forward_experts(x, edge_index)
    model.loss(out, torch.randint(0, C, (N,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_factories_get_the_channels():
    weak = functools.partial(make_backbone, "mlp", hidden_channels=8)
    strong = functools.partial(make_backbone, "sage", hidden_channels=8)
    model = Mowst(weak, strong, in_channels=FEAT, out_channels=C)
    x, edge_index = graph()
    assert model(x, edge_index).logits.shape == (N, C)
    assert model.out_channels == C


def test_weak_expert_with_a_graph_argument_gets_it():
    # MoEGNN(conv="none") takes edge_index (and ignores it); PyG's MLP takes `batch`
    # second and must not be given the edges.
    weak = MoEGNN(FEAT, 8, C, conv="none", ffn="none")
    model = Mowst(weak, GCN(FEAT, 8, 2, C))
    x, edge_index = graph()
    assert torch.allclose(model.weak_forward(x, edge_index), weak(x).logits)


def test_predict_threshold_picks_the_expert():
    x, edge_index = graph()
    model = make_mowst().eval()
    out = model.forward_experts(x, edge_index)
    tau = float(out.confidence.median())
    pred = model.predict(x, edge_index, threshold=tau, sparse=False)
    confident = out.confidence >= tau
    assert torch.equal(pred.strong_mask, ~confident)
    expected = torch.where(confident[:, None], out.weak_logits.softmax(-1),
                           out.strong_logits.softmax(-1))
    assert torch.allclose(pred.probs, expected, atol=1e-6)


def test_receptive_hops():
    assert receptive_hops(MLP([4, 8, 2])) == 0
    assert receptive_hops(make_backbone("sage", 4, 2, num_layers=3)) == 3
    assert receptive_hops(make_backbone("gat", 4, 2, num_layers=2)) == 2


def test_isolated_nodes():
    x, _ = graph()
    edge_index = torch.tensor([[0, 1], [1, 0]])  # nodes 2.. are isolated
    out = make_mowst()(x, edge_index)
    assert torch.isfinite(out.logits).all()


# -- bad input --------------------------------------------------------------------------------
def test_class_count_mismatch_of_the_experts():
    with pytest.raises(ValueError, match="weak expert predicts 3 classes and the strong expert 4"):
        Mowst(MLP([FEAT, 8, 3]), GCN(FEAT, 8, 2, 4))
    with pytest.raises(ValueError,
                       match="strong expert predicts 4 classes, but 'out_channels' is 3"):
        Mowst(MLP([FEAT, 8, 3]), GCN(FEAT, 8, 2, 4), out_channels=3)


def test_class_count_mismatch_found_in_forward():
    class Weak(torch.nn.Module):  # no out_channels attribute
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(FEAT, 2)

        def forward(self, x):
            return self.lin(x)

    model = Mowst(Weak(), GCN(FEAT, 8, 2, 3))
    x, edge_index = graph()
    with pytest.raises(ValueError, match="must predict the same classes"):
        model(x, edge_index)


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "mowst2"}, "'variant' must be one of"),
    ({"threshold": 1.5}, "'threshold' must be a number in"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mowst(**kwargs)


def test_factory_without_channels():
    with pytest.raises(ValueError, match="'in_channels' and 'out_channels' are needed"):
        Mowst(functools.partial(make_backbone, "mlp"), GCN(FEAT, 8, 2, C))
    with pytest.raises(TypeError, match="must be a Module or a factory"):
        Mowst(3, GCN(FEAT, 8, 2, C))


class IndexAddGNN(torch.nn.Module):
    r"""A strong expert that aggregates with its own ``index_add_`` (no PyG
    message-passing layer): its receptive field cannot be read off it."""

    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(FEAT, 8)
        self.lin2 = torch.nn.Linear(8, C)

    def forward(self, x, edge_index):
        def agg(h):
            return h + torch.zeros_like(h).index_add_(0, edge_index[1], h[edge_index[0]])
        return self.lin2(agg(self.lin1(x).relu()))


def test_receptive_hops_unknown_without_message_passing():
    assert receptive_hops(IndexAddGNN()) is None


def test_predict_with_an_untrimmable_strong_expert_falls_back_to_full_inference():
    x, edge_index = graph()
    torch.manual_seed(0)
    model = Mowst(MLP([FEAT, 8, C]), IndexAddGNN()).eval()
    full = model.predict(x, edge_index, threshold=1.0, sparse=False)  # every node: strong
    with pytest.warns(UserWarning, match="receptive field is unknown"):
        sparse = model.predict(x, edge_index, threshold=1.0, sparse=True)
    assert torch.equal(sparse.probs, full.probs)
    ref = model.strong_forward(x, edge_index).softmax(-1)  # the strong expert on the graph
    assert torch.allclose(sparse.probs, ref, atol=1e-6)
    with pytest.raises(ValueError, match="give 'num_hops'"):
        model.strong_forward_at(x, edge_index, torch.tensor([0, 1]))
    # With num_hops given (2 aggregations), sparse inference is exact without a warning.
    exact = Mowst(MLP([FEAT, 8, C]), IndexAddGNN(), num_hops=2).eval()
    exact.load_state_dict(model.state_dict())
    out, _ = exact.strong_forward_at(x, edge_index, torch.tensor([0, 3, 7]))
    assert torch.allclose(out, exact.strong_forward(x, edge_index)[[0, 3, 7]], atol=1e-5)


@pytest.mark.parametrize("threshold", [2.0, -1.0, float("nan"), "0.5", True])
def test_bad_threshold(threshold):
    x, edge_index = graph()
    model = make_mowst().eval()
    with pytest.raises(ValueError, match="'threshold' must be a number in \\[0, 1\\]"):
        model.predict(x, edge_index, threshold=threshold)
    with pytest.raises(ValueError, match="'threshold' must be a number in \\[0, 1\\]"):
        make_mowst(threshold=threshold)


@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
def test_ignored_labels_are_left_out_of_the_mean(variant):
    x, edge_index = graph()
    model = make_mowst(variant=variant)
    out = model.forward_experts(x, edge_index)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(N) % 2 == 0
    y_ignored = torch.where(keep, y, torch.full_like(y, -100))
    # The mean over the labelled nodes alone (not halved by the ignored ones).
    ref = model.loss(type(out)(*(t[keep] for t in out)), y[keep])
    got = model.loss(out, y_ignored)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="every node of 'target' is ignored"):
        model.loss(out, torch.full_like(y, -100))


@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
@pytest.mark.parametrize("bad", [C, -1, -7])
def test_labels_out_of_range(variant, bad):
    x, edge_index = graph()
    model = make_mowst(variant=variant)
    out = model.forward_experts(x, edge_index)
    y = torch.zeros(N, dtype=torch.long)
    y[3] = bad
    with pytest.raises(ValueError, match=rf"'target' must lie in \[0, {C - 1}\]"):
        model.loss(out, y)


def test_nan_features_and_bad_edges_raise():
    x, edge_index = graph()
    model = make_mowst()
    x_nan = x.clone()
    x_nan[2, 1] = float("nan")
    for call in (lambda: model(x_nan, edge_index),
                 lambda: model.predict(x_nan, edge_index)):
        with pytest.raises(ValueError, match="'x' holds NaN or infinite features"):
            call()
    bad = edge_index.clone()
    bad[1, 0] = N
    for call in (lambda: model(x, bad), lambda: model.predict(x, bad)):
        with pytest.raises(ValueError, match="'edge_index' holds node"):
            call()
