r"""The bipartite LightGCN encoder and the assembled multi-task recommender."""
from functools import partial

import pytest
import torch

from moegraph.nn import HoME, MMoE, MultiTaskOutput
from moegraph.nn.models import BipartiteLightGCN, MultiTaskRecommender

TASKS = {"watch": 1, "like": 1, "rating": 1}


@pytest.fixture
def graph():
    torch.manual_seed(0)
    U, I = 4, 5
    edge_index = torch.tensor([[0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 3, 4]])
    return U, I, torch.randn(U, 3), torch.randn(I, 2), edge_index


def test_lightgcn_matches_dense_reference(graph):
    U, I, ux, ix, edge_index = graph
    enc = BipartiteLightGCN(U, I, 3, 2, 6, num_layers=2).double()
    eu, ei = enc(ux.double(), ix.double(), edge_index)
    # Dense reference: A over U + I nodes, symmetric normalisation, mean of layers.
    A = torch.zeros(U + I, U + I, dtype=torch.double)
    for u, i in edge_index.t().tolist():
        A[u, U + i] = A[U + i, u] = 1.0
    deg = A.sum(1)
    dinv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    A_hat = dinv[:, None] * A * dinv[None, :]
    e0 = enc.embedding.weight.detach() + torch.cat([enc.user_lin(ux.double()),
                                                    enc.item_lin(ix.double())]).detach()
    e1 = A_hat @ e0
    e2 = A_hat @ e1
    ref = (e0 + e1 + e2) / 3
    torch.testing.assert_close(eu.detach(), ref[:U])
    torch.testing.assert_close(ei.detach(), ref[U:])


def test_recommender_forward_and_repr(graph):
    U, I, ux, ix, edge_index = graph
    net = MultiTaskRecommender(U, I, 3, 2, TASKS, head=partial(MMoE, hidden_channels=8),
                               embedding_channels=6)
    assert repr(net) == ("MultiTaskRecommender(BipartiteLightGCN(4, 5, 6, num_layers=2), "
                         "MMoE(18, 8, tasks=['watch', 'like', 'rating'], experts=[4]))")
    user, item = torch.tensor([0, 3, 2]), torch.tensor([4, 0, 2])
    out = net(ux, ix, edge_index, user, item)
    assert isinstance(out, MultiTaskOutput)
    assert {t: o.shape for t, o in out.outputs.items()} == {t: (3,) for t in TASKS}
    # The head sees [e_u, e_i, e_u * e_i] of each pair.
    eu, ei = net.encoder(ux, ix, edge_index)
    z = torch.cat([eu[user], ei[item], eu[user] * ei[item]], -1)
    torch.testing.assert_close(net.head(z).outputs["like"], out.outputs["like"])
    sum(o.sum() for o in out.outputs.values()).backward()
    assert net.encoder.embedding.weight.grad.abs().sum() > 0


def test_recommender_with_home_head(graph):
    U, I, ux, ix, edge_index = graph
    head = partial(HoME, hidden_channels=8, groups={"e": ["watch"], "q": ["like", "rating"]})
    net = MultiTaskRecommender(U, I, 3, 2, TASKS, head=head, embedding_channels=4)
    out = net(ux, ix, edge_index, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert set(out.gates) == {"0/e", "0/q", "0/shared", "1/watch", "1/like", "1/rating"}


def test_recommender_bad_input(graph):
    U, I, ux, ix, edge_index = graph
    net = MultiTaskRecommender(U, I, 3, 2, TASKS, head=partial(MMoE, hidden_channels=8))
    with pytest.raises(ValueError, match="user id out of range: got \\[0, 4\\], there are 4"):
        net(ux, ix, edge_index, torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="item id out of range"):
        net(ux, ix, edge_index, torch.tensor([0, 1]), torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="head's tasks \\['watch'\\] differ"):
        MultiTaskRecommender(U, I, 3, 2, TASKS, head=MMoE(96, 8, ["watch"]))
    with pytest.raises(ValueError, match="expects 10 input channels"):
        MultiTaskRecommender(U, I, 3, 2, TASKS, head=MMoE(10, 8, list(TASKS)))
    with pytest.raises(ValueError, match="expected 4 users and 5 items"):
        net.encoder(ux[:3], ix, edge_index)
