r"""``experiments/hop2_weights.py``: the split of the squared GCN adjacency
against a dense reference."""
import torch
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_dense_adj, to_undirected


def test_hop2_weights_against_dense_reference(script):
    module = script("hop2_weights")
    g = torch.Generator().manual_seed(0)
    N = 12
    edge_index = to_undirected(torch.randint(0, N, (2, 20), generator=g), num_nodes=N)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    y = torch.randint(0, 2, (N,), generator=g)
    out = module.hop2_weights(edge_index, y, N)

    ei, w = gcn_norm(edge_index, None, N, add_self_loops=True)
    a = to_dense_adj(ei, edge_attr=w, max_num_nodes=N)[0]
    a2 = a @ a
    adj = to_dense_adj(edge_index, max_num_nodes=N)[0] > 0
    eye = torch.eye(N, dtype=torch.bool)
    row = a2.sum(1)
    hop1 = (a2 * adj).sum(1)
    own = a2.diagonal()
    torch.testing.assert_close(out["own_A"], a.diagonal().mean().item())
    torch.testing.assert_close(out["own_A2"], own.mean().item())
    torch.testing.assert_close(out["self_share"], (own / row).mean().item())
    torch.testing.assert_close(out["hop1_share"], (hop1 / row).mean().item())
    torch.testing.assert_close(out["hop2_share"], ((row - own - hop1) / row).mean().item())
    same = (y[:, None] == y[None, :]) & ~eye
    agree2 = (a2 * same).sum(1) / (a2 * ~eye).sum(1)
    torch.testing.assert_close(out["agree_A2"], agree2.nanmean().item())
    agree1 = (a * same).sum(1) / (a * ~eye).sum(1)
    torch.testing.assert_close(out["agree_A"], agree1.nanmean().item())
