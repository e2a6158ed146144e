r"""A user's own graph (``NodeDataModule.from_data``, ``data=pyg_file``), OGB
datasets through ``ogb``'s own loader and Evaluator on a tiny graph written in
OGB's raw layout, and the validation of the dataset cache."""
import gzip
import json

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from moegraph.data import NodeDataModule
from moegraph.data.datamodule import load_real_dataset, ogb_scores, sync_cache
from moegraph.train import train

N, F, C = 120, 6, 3


def graph(masks=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    x = torch.randn(N, F, generator=g) + y[:, None].float()
    edge_index = torch.randint(0, N, (2, 400), generator=g)
    data = Data(x=x, edge_index=edge_index, y=y)
    if masks:
        data.train_mask = torch.arange(N) < 60
        data.val_mask = (torch.arange(N) >= 60) & (torch.arange(N) < 90)
        data.test_mask = torch.arange(N) >= 90
    return data


def test_from_data_keeps_the_graph_and_its_masks():
    data = graph()
    dm = NodeDataModule.from_data(data, batch_size=16, num_neighbors=[5])
    assert torch.equal(dm.data.x, data.x) and torch.equal(dm.data.edge_index, data.edge_index)
    assert torch.equal(dm.data.test_mask, data.test_mask)
    assert dm.net_kwargs() == {"in_channels": F, "out_channels": C}
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size == 16 and bool(data.train_mask[batch.n_id[:16]].all())


def test_from_data_without_masks_splits_the_labelled_nodes():
    data = graph(masks=False)
    data.y[:20] = -1  # unlabelled
    dm = NodeDataModule.from_data(data, split=3, train_ratio=0.6, val_ratio=0.2)
    masks = torch.stack([dm.data.train_mask, dm.data.val_mask, dm.data.test_mask])
    assert masks.sum(0).tolist() == [0] * 20 + [1] * 100  # disjoint, labelled nodes only
    assert masks.sum(1).tolist() == [60, 20, 20]
    again = NodeDataModule.from_data(data, split=3, train_ratio=0.6, val_ratio=0.2)
    assert torch.equal(again.data.train_mask, dm.data.train_mask)
    other = NodeDataModule.from_data(data, split=4, train_ratio=0.6, val_ratio=0.2)
    assert not torch.equal(other.data.train_mask, dm.data.train_mask)


def test_from_data_bad_graphs():
    with pytest.raises(ValueError, match="the graph has no 'y'"):
        NodeDataModule.from_data(Data(x=torch.randn(4, 2), edge_index=torch.zeros(2, 0).long()))
    data = graph()
    del data.val_mask
    with pytest.raises(ValueError, match="give all of .* or none"):
        NodeDataModule.from_data(data)
    data = graph()
    data.edge_index[0, 0] = N
    with pytest.raises(ValueError, match="'edge_index' holds node 120, outside"):
        NodeDataModule.from_data(data)


def test_pyg_file_round_trip(compose_cfg, tmp_path):
    data = graph()
    torch.save(data, tmp_path / "graph.pt")
    dm = NodeDataModule(name="pyg_file", path=str(tmp_path / "graph.pt"))
    dm.setup()
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(dm.data[key], data[key]), key
    # a dict of tensors (loadable with weights_only=True), without masks
    torch.save({"x": data.x, "edge_index": data.edge_index, "y": data.y}, tmp_path / "d.pt")
    dm = NodeDataModule(name="pyg_file", path=str(tmp_path / "d.pt"))
    dm.setup()
    assert int(dm.data.train_mask.sum()) == N // 2
    # the CLI config trains on it
    metrics = train(compose_cfg("debug=fdr", "data=pyg_file",
                                f"data.path={tmp_path / 'graph.pt'}", "model=gnn"))
    assert 0 <= metrics["test/acc"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["data"]["path"] == str(tmp_path / "graph.pt")


def test_pyg_file_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no graph file at"):
        NodeDataModule(name="pyg_file", path=str(tmp_path / "none.pt")).setup()
    (tmp_path / "bad.pt").write_text("x")
    with pytest.raises(ValueError, match="bad.pt' is not a file written by torch.save"):
        NodeDataModule(name="pyg_file", path=str(tmp_path / "bad.pt")).setup()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="holds a list"):
        NodeDataModule(name="pyg_file", path=str(tmp_path / "list.pt")).setup()
    with pytest.raises(ValueError, match="give 'path'"):
        NodeDataModule(name="pyg_file")


@pytest.mark.parametrize("bad", [[], [0], [-2], [2.5], [True]])
def test_num_neighbors_must_be_given_per_hop(bad):
    with pytest.raises(ValueError, match="'num_neighbors' must be a non-empty list"):
        NodeDataModule(batch_size=16, num_neighbors=bad)


# -- OGB ----------------------------------------------------------------------------------
def write_csv_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(",".join(str(v) for v in np.atleast_1d(row)) + "\n")


def write_tiny_ogbn_arxiv(folder, data):
    r"""``data`` in the raw layout of ogbn-arxiv (the files ogb's reader reads)."""
    raw = folder / "raw"
    write_csv_gz(raw / "edge.csv.gz", data.edge_index.t().tolist())
    write_csv_gz(raw / "node-feat.csv.gz", data.x.tolist())
    write_csv_gz(raw / "node-label.csv.gz", data.y.view(-1, 1).tolist())
    write_csv_gz(raw / "node_year.csv.gz", [[2000]] * data.num_nodes)
    write_csv_gz(raw / "num-node-list.csv.gz", [[data.num_nodes]])
    write_csv_gz(raw / "num-edge-list.csv.gz", [[data.edge_index.size(1)]])
    for key, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        write_csv_gz(folder / "split" / "time" / f"{name}.csv.gz",
                     data[f"{key}_mask"].nonzero().view(-1).tolist())
    (folder / "RELEASE_v1.txt").write_text("tiny test graph\n")


def test_ogbn_arxiv_through_ogb(compose_cfg, tmp_path):
    pytest.importorskip("ogb")
    data = graph()
    write_tiny_ogbn_arxiv(tmp_path / "source" / "ogb" / "ogbn_arxiv", data)
    loaded = load_real_dataset("ogbn_arxiv", str(tmp_path / "source"), str(tmp_path / "cache"))
    assert torch.allclose(loaded.x, data.x, atol=1e-6)
    assert torch.equal(loaded.y, data.y) and torch.equal(loaded.edge_index, data.edge_index)
    for key in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(loaded[key], data[key]), key
    # ogb's Evaluator against accuracy by hand
    logits = torch.randn(N, C, generator=torch.Generator().manual_seed(1))
    scores = ogb_scores(loaded, logits)
    by_hand = (logits.argmax(-1) == data.y)[data.test_mask].float().mean()
    assert scores["test/ogb_acc"] == pytest.approx(float(by_hand))
    # the data config, end to end: ogb's score of the tested model equals the task's
    metrics = train(compose_cfg("data=ogbn_arxiv", f"paths.data_dir={tmp_path / 'source'}",
                                f"paths.cache_dir={tmp_path / 'cache2'}", "model=mlp",
                                "trainer.max_epochs=3", "logger=none",
                                "~callbacks.rich_progress_bar",
                                "+trainer.enable_progress_bar=false"))
    assert metrics["test/ogb_acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["val/ogb_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)


# -- the cache --------------------------------------------------------------------------------
def test_cache_is_refreshed_when_the_source_changes_or_a_copy_is_truncated(tmp_path):
    source, target = tmp_path / "source", tmp_path / "cache"
    (source / "raw").mkdir(parents=True)
    (source / "raw" / "a.bin").write_bytes(b"x" * 100)
    assert sync_cache(source, target, ("raw",))
    (target / "processed").mkdir()
    assert not sync_cache(source, target, ("raw",))  # up to date: kept
    assert (target / "processed").is_dir()
    (target / "raw" / "a.bin").write_bytes(b"x" * 10)  # a truncated copy
    assert sync_cache(source, target, ("raw",))
    assert (target / "raw" / "a.bin").read_bytes() == b"x" * 100
    assert not (target / "processed").exists()  # processed from stale files: dropped
    other = tmp_path / "fixed"  # another (fixed) data folder
    (other / "raw").mkdir(parents=True)
    (other / "raw" / "a.bin").write_bytes(b"y" * 100)
    assert sync_cache(other, target, ("raw",))
    assert (target / "raw" / "a.bin").read_bytes() == b"y" * 100


def test_corrupt_dataset_file_names_the_cache_to_delete(tmp_path):
    pytest.importorskip("ogb")
    folder = tmp_path / "source" / "ogb" / "ogbn_arxiv"
    write_tiny_ogbn_arxiv(folder, graph())
    edge = folder / "raw" / "edge.csv.gz"
    edge.write_bytes(edge.read_bytes()[:20])  # truncated gzip
    with pytest.raises(RuntimeError, match=r"(?s)ogbn_arxiv.*corrupt or truncated.*edge\.csv\.gz"
                                           r".*Delete the cache folder"):
        load_real_dataset("ogbn_arxiv", str(tmp_path / "source"), str(tmp_path / "cache"))
    # the good files again (a fixed data folder): the cache is refreshed and loads
    write_tiny_ogbn_arxiv(folder, graph())
    loaded = load_real_dataset("ogbn_arxiv", str(tmp_path / "source"), str(tmp_path / "cache"))
    assert loaded.num_nodes == N


# -- ogbn-proteins: multi-label ------------------------------------------------------------
T = 112  # ogb's Evaluator of ogbn-proteins takes its 112 tasks


def multilabel_graph(seed=0, num_edges=600, edge_dim=4):
    r"""A tiny ogbn-proteins-like graph: edge features, no node features,
    ``y [N, T]`` in {0, 1}, each label a noisy function of the node's edge
    features (so that an MLP on their mean learns it)."""
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, N, (2, num_edges), generator=g)
    edge_attr = torch.rand(num_edges, edge_dim, generator=g)
    # node features as the loader makes them: mean of the edge features of the
    # undirected graph (ogb adds the inverse edges), at the target node
    both = torch.cat([edge_index, edge_index.flip(0)], 1)
    attr = torch.cat([edge_attr, edge_attr])
    deg = torch.zeros(N).index_add_(0, both[1], torch.ones(both.size(1))).clamp(min=1)
    x = torch.zeros(N, edge_dim).index_add_(0, both[1], attr) / deg[:, None]
    w = torch.randn(edge_dim, T, generator=g)
    score = (x - x.mean(0)) @ w * 20 + torch.randn(N, T, generator=g)
    y = (score > 0).long()
    masks = {"train": torch.arange(N) < 60,
             "val": (torch.arange(N) >= 60) & (torch.arange(N) < 90),
             "test": torch.arange(N) >= 90}
    y[masks["test"], 0] = 0  # a task with one class on the test nodes: ogb leaves it out
    return Data(edge_index=edge_index, edge_attr=edge_attr, y=y, x_expected=x,
                **{f"{k}_mask": m for k, m in masks.items()})


def write_tiny_ogbn_proteins(folder, data):
    r"""``data`` in the raw layout of ogbn-proteins (the files ogb's reader reads)."""
    raw = folder / "raw"
    write_csv_gz(raw / "edge.csv.gz", data.edge_index.t().tolist())
    write_csv_gz(raw / "edge-feat.csv.gz", data.edge_attr.tolist())
    write_csv_gz(raw / "node-label.csv.gz", data.y.tolist())
    write_csv_gz(raw / "node_species.csv.gz", [[1]] * N)
    write_csv_gz(raw / "num-node-list.csv.gz", [[N]])
    write_csv_gz(raw / "num-edge-list.csv.gz", [[data.edge_index.size(1)]])
    for key, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        write_csv_gz(folder / "split" / "species" / f"{name}.csv.gz",
                     data[f"{key}_mask"].nonzero().view(-1).tolist())
    (folder / "RELEASE_v1.txt").write_text("tiny test graph\n")


def naive_mean_auroc(scores, y):
    r"""Mean over the tasks with both classes of the ROC-AUC by pairs:
    P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)."""
    aucs = []
    for t in range(y.size(1)):
        pos, neg = scores[y[:, t] == 1, t], scores[y[:, t] == 0, t]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()))
    return sum(aucs) / len(aucs)


def test_ogbn_proteins_multilabel_through_ogb(compose_cfg, tmp_path):
    pytest.importorskip("ogb")
    data = multilabel_graph()
    write_tiny_ogbn_proteins(tmp_path / "source" / "ogb" / "ogbn_proteins", data)
    dm = NodeDataModule(name="ogbn_proteins", root=str(tmp_path / "source"),
                        cache_dir=str(tmp_path / "cache"))
    dm.setup()
    loaded = dm.data
    assert torch.equal(loaded.y, data.y) and loaded.y.shape == (N, T)
    assert torch.allclose(loaded.x, data.x_expected, atol=1e-5)
    for key in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(loaded[key], data[key]), key
    assert dm.multilabel and dm.num_classes == T
    assert dm.task_kwargs() == {"num_classes": T, "metric": "auroc", "multilabel": True}
    assert dm.net_kwargs() == {"in_channels": 4, "out_channels": T}
    # ogb's Evaluator (rocauc over the 112 tasks) against the ROC-AUC by pairs
    logits = torch.randn(N, T, generator=torch.Generator().manual_seed(1))
    scores = ogb_scores(loaded, logits)
    assert scores["test/ogb_rocauc"] == pytest.approx(
        naive_mean_auroc(logits[data.test_mask], data.y[data.test_mask]), abs=1e-9)
    # end to end: the loss falls, the task's mean ROC-AUC is ogb's on the tested model
    metrics = train(compose_cfg("data=ogbn_proteins", f"paths.data_dir={tmp_path / 'source'}",
                                f"paths.cache_dir={tmp_path / 'cache2'}", "model=mlp",
                                "trainer.max_epochs=30", "logger=csv",
                                "~callbacks.rich_progress_bar",
                                "+trainer.enable_progress_bar=false"))
    import pandas as pd

    log = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    losses = log["train/loss"].dropna().to_numpy()
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.95 * losses[:5].mean()  # measured: 0.61 after 0.69
    assert metrics["test/ogb_rocauc"] == pytest.approx(metrics["test/auroc"], abs=1e-5)
    assert metrics["val/ogb_rocauc"] == pytest.approx(metrics["val/auroc"], abs=1e-5)
    assert metrics["test/auroc"] > 0.75  # learnt from the edge features (measured 0.92)


def test_ogbn_proteins_refused_by_mowst(compose_cfg, tmp_path):
    from hydra.errors import InstantiationException

    pytest.importorskip("ogb")
    write_tiny_ogbn_proteins(tmp_path / "source" / "ogb" / "ogbn_proteins", multilabel_graph())
    # hydra wraps the task's ValueError
    with pytest.raises(InstantiationException, match="MowstTask takes one class per node"):
        train(compose_cfg("data=ogbn_proteins", f"paths.data_dir={tmp_path / 'source'}",
                          f"paths.cache_dir={tmp_path / 'cache'}", "model=mowst",
                          "logger=none"))


def test_from_data_multilabel_splits_the_nodes_with_a_label():
    data = graph(masks=False)
    data.y = torch.stack([data.y == 0, data.y == 1], 1).long()  # [N, 2] tasks
    data.y[:20] = -1  # unlabelled nodes
    data.y[20:30, 0] = -1  # one task unlabelled: the node still counts
    dm = NodeDataModule.from_data(data, train_ratio=0.6, val_ratio=0.2)
    masks = torch.stack([dm.data.train_mask, dm.data.val_mask, dm.data.test_mask])
    assert masks.sum(0).tolist() == [0] * 20 + [1] * 100
    assert dm.multilabel and dm.num_classes == 2
    assert dm.task_kwargs() == {"num_classes": 2, "metric": "acc", "multilabel": True}
    data.train_mask, data.val_mask, data.test_mask = (torch.arange(N) < 60,) * 3
    with pytest.raises(ValueError, match="'train_mask' holds unlabelled nodes"):
        NodeDataModule.from_data(data)
