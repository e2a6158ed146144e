r"""Real datasets through PyG's classes, from ``$MOEGRAPH_DATA_DIR`` (skipped
when absent), their splits and metrics; the offline error; mini-batches."""
import urllib.error

import pytest
import torch
from torch_geometric.data import Data

from moegraph.data import NodeDataModule, load_real_dataset, select_split
from moegraph.data.datamodule import KHopLoader

# name, folder, nodes, features, classes, metric, train/val/test sizes of split 0
CASES = [
    ("cora", "Planetoid/Cora", 2708, 1433, 7, "acc", (140, 500, 1000)),
    ("citeseer", "Planetoid/CiteSeer", 3327, 3703, 6, "acc", (120, 500, 1000)),
    ("minesweeper", "HeterophilousGraphDataset/minesweeper", 10000, 7, 2, "auroc",
     (5000, 2500, 2500)),
    ("tolokers", "HeterophilousGraphDataset/tolokers", 11758, 10, 2, "auroc",
     (5879, 2939, 2940)),
    ("amherst41", "LINKX/amherst41", 2235, 1193, 2, "acc", None),
    ("reed98", "LINKX/reed98", 962, 745, 2, "acc", None),
]


@pytest.mark.parametrize("name,folder,nodes,feats,classes,metric,sizes", CASES,
                         ids=[c[0] for c in CASES])
def test_real_dataset(real_data, tmp_path, name, folder, nodes, feats, classes, metric, sizes):
    root = real_data(folder).parent
    dm = NodeDataModule(name, root=str(root), cache_dir=str(tmp_path / "cache"))
    dm.setup()
    data = dm.data
    assert data.num_nodes == nodes and dm.num_features == feats and dm.num_classes == classes
    assert dm.metric == metric and dm.task_kwargs() == {"num_classes": classes, "metric": metric}
    assert data.is_undirected()
    masks = [data.train_mask, data.val_mask, data.test_mask]
    assert all(m.dtype == torch.bool and m.shape == (nodes,) for m in masks)
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()
    assert not (masks[0] & masks[2]).any()
    labelled = data.y >= 0
    got = tuple(int(m.sum()) for m in masks)
    if sizes is not None:
        assert got == sizes
    else:  # random 50/25/25 of the labelled nodes
        n = int(labelled.sum())
        assert sum(got) == n and abs(got[0] - n / 2) <= 1 and abs(got[1] - n / 4) <= 1
    assert (data.y[masks[0] | masks[1] | masks[2]] >= 0).all()
    # Processed files go to the cache, never beside the shared raw files.
    assert (tmp_path / "cache" / folder / "processed").is_dir()


def test_splits_differ_and_repeat(real_data, tmp_path):
    root = real_data("HeterophilousGraphDataset/minesweeper").parent
    raw = load_real_dataset("minesweeper", str(root), str(tmp_path / "c"))
    assert raw.train_mask.shape == (10000, 10)
    a, b = select_split(raw, "minesweeper", 0), select_split(raw, "minesweeper", 3)
    assert torch.equal(a.train_mask, raw.train_mask[:, 0])
    assert torch.equal(b.train_mask, raw.train_mask[:, 3])
    assert not torch.equal(a.train_mask, b.train_mask)
    with pytest.raises(ValueError, match=r"'split' must lie in \[0, 9\]"):
        select_split(raw, "minesweeper", 10)


def test_random_split_is_seeded(real_data, tmp_path):
    root = real_data("LINKX/reed98").parent
    raw = load_real_dataset("reed98", str(root), str(tmp_path / "c"))
    a, b = select_split(raw, "reed98", 1), select_split(raw, "reed98", 1)
    c = select_split(raw, "reed98", 2)
    assert torch.equal(a.train_mask, b.train_mask) and not torch.equal(a.train_mask, c.train_mask)


def test_public_split_has_one(real_data, tmp_path):
    root = real_data("Planetoid/Cora").parent
    raw = load_real_dataset("cora", str(root), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="one public split"):
        select_split(raw, "cora", 1)


def test_offline_and_missing_gives_a_clear_error(tmp_path, monkeypatch):
    import torch_geometric.datasets.planetoid as planetoid

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(planetoid.fs, "cp", offline)
    dm = NodeDataModule("cora", root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"raw files are not at .*Planetoid/Cora/raw.*"
                                                r"MOEGRAPH_DATA_DIR"):
        dm.setup()


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'coraa'; known datasets: "
                                         "synthetic, pyg_file, cora"):
        NodeDataModule("coraa")


def test_bad_metric_and_batch_size():
    with pytest.raises(ValueError, match="'metric' must be one of"):
        NodeDataModule("synthetic", metric="f1")
    with pytest.raises(ValueError, match="'batch_size' must be positive"):
        NodeDataModule("synthetic", batch_size=0)
    dm = NodeDataModule("synthetic", metric="auroc", dataset_kwargs={"num_nodes": 50})
    with pytest.raises(ValueError, match="'auroc' needs a binary task"):
        dm.task_kwargs()


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


def test_datamodule_mini_batch_loaders():
    dm = NodeDataModule("synthetic", batch_size=25, num_neighbors=[3, 3],
                        dataset_kwargs={"num_nodes": 100})
    dm.setup()
    batches = list(dm.val_dataloader())
    seeds = torch.cat([b.n_id[:b.batch_size] for b in batches])
    assert torch.equal(seeds.sort().values, dm.data.val_mask.nonzero().view(-1))
