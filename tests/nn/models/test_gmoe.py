r"""GMoE: a stack of hop-expert graph MoE convolutions (HopMoEConv), as one
model and as residual blocks; mini-batches with full k-hop neighbourhoods."""
import pytest
import torch
from torch_geometric.data import Data

from moegraph.data.loader import KHopLoader
from moegraph.nn import HopMoEConv
from moegraph.nn.models import GMoE, MoEGNN


def random_graph(num_nodes, num_edges, seed):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    x = torch.randn(num_nodes, 6, generator=g)
    return x, edge_index


def test_gmoe_model_and_minibatch():
    x, edge_index = random_graph(60, 200, 2)
    model = GMoE(6, 16, 3, num_layers=2, conv="sage", num_experts=4, k=1).eval()
    out = model(x, edge_index)
    assert out.logits.shape == (60, 3)
    assert len(out.routing) == 2 and set(out.aux_loss) >= {"importance"}
    assert repr(model) == "GMoE(6, 16, 3, num_layers=2, conv=sage, num_experts=4)"
    # A mini-batch with the full 4-hop neighbourhood of its seeds (2 layers of
    # hop-2 experts) gives the seeds their full-graph output.
    data = Data(x=x, edge_index=edge_index, y=torch.zeros(60, dtype=torch.long))
    mask = torch.zeros(60, dtype=torch.bool)
    mask[:10] = True
    batch = next(iter(KHopLoader(data, mask, num_hops=4, batch_size=10)))
    sub = model(batch.x, batch.edge_index).logits[:batch.batch_size]
    torch.testing.assert_close(sub, out.logits[batch.n_id[:batch.batch_size]], atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="num_layers"):
        GMoE(6, 16, 3, num_layers=0)


def test_gmoe_residual_blocks():
    x, edge_index = random_graph(40, 120, 4)
    model = GMoE(6, 16, 3, num_layers=3, num_experts=4, k=1, norm="layer_norm",
                 residual=True).train()
    assert repr(model) == "GMoE(6, 16, 3, num_layers=3, conv=gcn, num_experts=4, residual=True)"
    assert all(isinstance(conv, HopMoEConv) for conv in model.convs) and len(model.convs) == 3
    out = model(x, edge_index)
    assert out.logits.shape == (40, 3) and len(out.routing) == 3
    (out.logits.sum() + sum(out.aux_loss.values())).backward()
    assert all(conv.router.weight.grad is not None for conv in model.convs)
    # the residual body is MoEGNN's: a hop-MoE conv in place of a PyG conv
    body = MoEGNN(6, 16, 3, num_layers=3, conv="hop_moe", ffn="dense", norm="layer_norm",
                  dropout=0.5, input_dropout=0.5,
                  conv_kwargs=dict(num_experts=4, k=1))
    body.load_state_dict(model.body.state_dict())
    model.eval(), body.eval()
    torch.testing.assert_close(body(x, edge_index).logits, model(x, edge_index).logits)
