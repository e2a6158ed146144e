r"""The pure-torch mini-batch loaders of ``moegraph.data.loader``: k-hop
neighbourhoods with the seeds first, and a loader state that resumes mid-epoch."""
import torch
from torch_geometric.data import Data

from moegraph.data import NodeDataModule
from moegraph.data.loader import KHopLoader, TorchNeighborLoader


def test_khop_loader_seeds_first_and_full_neighbourhoods():
    # path 0-1-2-3-4 plus an isolated node 5
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])
    data = Data(x=torch.arange(6.0).view(-1, 1), y=torch.arange(6), edge_index=edge_index,
                num_nodes=6)
    mask = torch.tensor([False, False, True, False, False, True])
    batches = list(KHopLoader(data, mask, num_hops=1, batch_size=2))
    assert len(batches) == 1
    b = batches[0]
    assert b.batch_size == 2 and b.n_id[:2].tolist() == [2, 5]
    assert sorted(b.n_id.tolist()) == [1, 2, 3, 5]
    assert torch.equal(b.y, b.n_id) and torch.equal(b.x.view(-1), b.n_id.float())
    # edges relabelled consistently: every edge maps back to an edge of the graph
    original = {tuple(e) for e in edge_index.t().tolist()}
    for s, t in b.edge_index.t().tolist():
        assert (int(b.n_id[s]), int(b.n_id[t])) in original
    # node 2's in-edges (from 1 and 3) are all present
    into_seed = b.n_id[b.edge_index[0][b.edge_index[1] == 0]].tolist()
    assert sorted(into_seed) == [1, 3]


def test_loader_state_skips_the_given_batches():
    dm = NodeDataModule("synthetic", dataset_kwargs=dict(num_nodes=100, seed=1))
    dm.setup()
    loader = TorchNeighborLoader(dm.data, [3], input_nodes=dm.data.train_mask, batch_size=8,
                                 shuffle=True, seed=5)
    loader.sampler.set_epoch(2)
    order = [b.n_id[:b.batch_size] for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["batches"] == 2
    fresh = TorchNeighborLoader(dm.data, [3], input_nodes=dm.data.train_mask, batch_size=8,
                                shuffle=True, seed=5)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)
    rest = [b.n_id[:b.batch_size] for b in fresh]
    assert len(rest) == len(order) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, order[2:], strict=True))
    # the next epoch is whole again; an end-of-epoch state skips nothing
    assert len(list(fresh)) == len(order) == len(fresh)
    fresh.load_state_dict({**state, "batches": len(order)})
    assert len(list(fresh)) == len(order)
