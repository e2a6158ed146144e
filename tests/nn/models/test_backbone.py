r"""Tests of moegraph.nn.models.make_backbone and MoEGNN(conv="none")."""
import pytest
import torch
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, GraphSAGE

from moegraph.nn.models import MoEGNN, NodeLinear, make_backbone

PYG = {"mlp": MLP, "gcn": GCN, "sage": GraphSAGE, "gat": GAT, "gin": GIN}


@pytest.mark.parametrize("name", list(PYG))
def test_plain_backbones_are_pygs_models(name):
    model = make_backbone(name, 5, 3, hidden_channels=8, num_layers=3, dropout=0.1)
    assert type(model) is PYG[name]
    x, edge_index = torch.randn(10, 5), torch.randint(0, 10, (2, 30))
    out = model(x) if name == "mlp" else model(x, edge_index)
    assert out.shape == (10, 3)


@pytest.mark.parametrize("name", list(PYG))
def test_residual_backbones_are_moegnn(name):
    model = make_backbone(name, 5, 3, hidden_channels=8, num_layers=2, residual=True,
                          norm="layer_norm")
    assert isinstance(model, MoEGNN) and model.conv_name == ("none" if name == "mlp" else name)
    assert model.ffn == "dense" and model.num_layers == 2
    x, edge_index = torch.randn(10, 5), torch.randint(0, 10, (2, 30))
    assert model(x, edge_index).logits.shape == (10, 3)


def test_mlp_backbone_ignores_the_graph():
    torch.manual_seed(0)
    model = make_backbone("mlp", 5, 3, residual=True, dropout=0.0).eval()
    x = torch.randn(10, 5)
    a = model(x, torch.randint(0, 10, (2, 30))).logits
    b = model(x, torch.randint(0, 10, (2, 30))).logits
    assert torch.equal(a, b) and torch.equal(a, model(x).logits)
    assert any(isinstance(m, NodeLinear) for m in model.modules())


def test_moegnn_needs_edges_unless_conv_none():
    model = MoEGNN(5, 8, 3, conv="gcn", ffn="none")
    with pytest.raises(ValueError, match="'edge_index' is required by conv='gcn'"):
        model(torch.randn(4, 5))


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "gcnn"}, "'name' must be one of"),
    ({"name": "gcn", "num_layers": 0}, "'num_layers' must be positive"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_backbone(in_channels=5, out_channels=3, **kwargs)
