r"""Graph-level networks: OGB's bond convolutions against naive loops, pooling,
batching and bad input."""
import pytest
import torch
from torch_geometric.data import Batch, Data

from moegraph.nn.models.graph_level import (
    BondGCNConv,
    BondGINConv,
    FeatureEncoder,
    GraphLevelGNN,
    atom_feature_dims,
    bond_feature_dims,
)


def random_molecule(num_atoms: int, generator: torch.Generator) -> Data:
    r"""A random connected 'molecule': a chain plus a ring bond, OGB-valid
    integer features."""
    x = torch.stack([torch.randint(0, d, (num_atoms,), generator=generator)
                     for d in atom_feature_dims()], 1)
    bonds = [(i, i + 1) for i in range(num_atoms - 1)] + [(0, num_atoms - 1)]
    src = [a for a, b in bonds] + [b for a, b in bonds]
    dst = [b for a, b in bonds] + [a for a, b in bonds]
    attr = torch.stack([torch.randint(0, d, (len(bonds),), generator=generator)
                        for d in bond_feature_dims()], 1)
    return Data(x=x, edge_index=torch.tensor([src, dst]), edge_attr=torch.cat([attr, attr]),
                y=torch.rand(1, 1, generator=generator).round())


def batch_of(sizes=(5, 7, 4), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_data_list([random_molecule(n, g) for n in sizes])


def test_feature_encoder_sums_embeddings():
    enc = FeatureEncoder([3, 4], 5)
    x = torch.tensor([[0, 3], [2, 1]])
    expected = torch.stack([enc.embeddings[0].weight[i] + enc.embeddings[1].weight[j]
                            for i, j in x.tolist()])
    assert torch.allclose(enc(x), expected)
    assert repr(enc) == "FeatureEncoder(2, 5)"
    with pytest.raises(ValueError, match=r"integer features \[N, 2\]"):
        enc(torch.zeros(2, 3, dtype=torch.long))


def test_bond_gcn_conv_matches_naive_loop():
    torch.manual_seed(0)
    data = batch_of()
    C = 8
    conv = BondGCNConv(C)
    h = torch.randn(data.num_nodes, C)
    out = conv(h, data.edge_index, data.edge_attr)
    xw = conv.lin(h)
    e = conv.bond_encoder(data.edge_attr)
    deg = torch.zeros(data.num_nodes)
    for s in data.edge_index[0].tolist():
        deg[s] += 1
    deg += 1
    ref = torch.relu(xw + conv.root_emb.weight) / deg.view(-1, 1)
    for m, (j, i) in enumerate(data.edge_index.t().tolist()):
        ref[i] = ref[i] + torch.relu(xw[j] + e[m]) / (deg[i] * deg[j]).sqrt()
    assert torch.allclose(out, ref, atol=1e-5)
    assert repr(conv) == "BondGCNConv(8)"


def test_bond_gin_conv_matches_naive_loop():
    torch.manual_seed(0)
    data = batch_of()
    C = 8
    conv = BondGINConv(C).eval()
    with torch.no_grad():
        conv.eps.fill_(0.3)
    h = torch.randn(data.num_nodes, C)
    e = conv.bond_encoder(data.edge_attr)
    agg = 1.3 * h.clone()
    for m, (j, i) in enumerate(data.edge_index.t().tolist()):
        agg[i] = agg[i] + torch.relu(h[j] + e[m])
    assert torch.allclose(conv(h, data.edge_index, data.edge_attr), conv.mlp(agg), atol=1e-5)


MODELS = [
    dict(conv="gcn"), dict(conv="gin"), dict(conv="gcn", edge_mode="node"),
    dict(conv="gin", edge_mode="none"), dict(conv="gcn", pool="sum"),
    dict(conv="gcn", pool="attention"), dict(conv="gin", pool="max", residual=True),
    dict(conv="gcn", num_experts=4, k=1), dict(conv="gin", num_experts=4, k=2),
    dict(conv="gin", num_experts=4, k=1, balance="per_hop"),
]


@pytest.mark.parametrize("kwargs", MODELS, ids=lambda k: "-".join(map(str, k.values())))
def test_shapes_gradients_and_batching(kwargs):
    torch.manual_seed(0)
    net = GraphLevelGNN(16, 2, num_layers=3, dropout=0.0, **kwargs)
    if "balance" in kwargs:  # hop-1 and hop-2 experts balanced each among themselves
        assert all(conv.router.balance_groups == (2, 2) for conv in net.convs)
    data = batch_of()
    out = net(data.x, data.edge_index, data.edge_attr, data.batch)
    assert out.logits.shape == (3, 2)
    assert len(out.routing) == (3 if "num_experts" in kwargs else 0)
    loss = out.logits.square().sum() + sum(v for v in out.aux_loss.values())
    loss.backward()
    unused = {"message": ("bond_encoders",), "node": (), "none": ("bond_encoder",)}
    for name, p in net.named_parameters():
        if "router" in name or "noise" in name:
            continue  # routers get gradients through the combine weights only when k > 1
        if any(u in name for u in unused[net.edge_mode]):
            continue
        assert p.grad is not None, name
    # Each graph's prediction depends on its own atoms only (batching, incl. hop-2
    # experts): altering graph 2 leaves graphs 0 and 1 unchanged.
    net.eval()
    other = batch_of(seed=1)
    mixed = Batch.from_data_list([data.get_example(0), data.get_example(1),
                                  other.get_example(2)])
    a = net(data.x, data.edge_index, data.edge_attr, data.batch).logits
    b = net(mixed.x, mixed.edge_index, mixed.edge_attr, mixed.batch).logits
    assert torch.allclose(a[:2], b[:2], atol=1e-5)


@pytest.mark.parametrize("num_experts", [None, 4])
def test_permutation_invariance(num_experts):
    torch.manual_seed(0)
    net = GraphLevelGNN(16, 1, num_layers=2, num_experts=num_experts).eval()
    data = batch_of((6,))
    perm = torch.randperm(data.num_nodes)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    out = net(data.x, data.edge_index, data.edge_attr).logits
    out_perm = net(data.x[perm], inv[data.edge_index], data.edge_attr).logits
    assert torch.allclose(out, out_perm, atol=1e-5)


def test_float_features_and_repr():
    net = GraphLevelGNN(16, 3, num_layers=2, in_channels=5, edge_mode="none")
    x = torch.randn(4, 5)
    ei = torch.tensor([[0, 1, 2], [1, 2, 3]])
    assert net(x, ei, batch=torch.tensor([0, 0, 1, 1])).logits.shape == (2, 3)
    assert repr(net) == ("GraphLevelGNN(16, 3, num_layers=2, conv=gcn, pool=mean, "
                         "edge_mode=none)")
    moe = GraphLevelGNN(16, 1, num_layers=2, num_experts=4)
    assert repr(moe) == ("GraphLevelGNN(16, 1, num_layers=2, conv=gcn, num_experts=4, "
                         "pool=mean, edge_mode=node)")


def test_bad_arguments():
    with pytest.raises(ValueError, match="'conv' must be one of"):
        GraphLevelGNN(8, 1, conv="gat")
    with pytest.raises(ValueError, match="'pool' must be one of"):
        GraphLevelGNN(8, 1, pool="median")
    with pytest.raises(ValueError, match="'edge_mode' must be one of"):
        GraphLevelGNN(8, 1, edge_mode="edges")
    with pytest.raises(ValueError, match="needs dense layers"):
        GraphLevelGNN(8, 1, num_experts=4, edge_mode="message")
    with pytest.raises(ValueError, match="'hidden_channels' must be a positive integer"):
        GraphLevelGNN(0, 1)
    with pytest.raises(ValueError, match="'balance' must be one of"):
        GraphLevelGNN(8, 1, num_experts=4, balance="hops")
    net = GraphLevelGNN(8, 1, num_layers=1)
    data = batch_of()
    with pytest.raises(ValueError, match="needs 'edge_attr'"):
        net(data.x, data.edge_index)
