r"""Tests of moegraph.data.datamodule: NodeDataModule, load_node_dataset, check_graph;
the real datasets through PyG's classes, from ``$MOEGRAPH_DATA_DIR`` (skipped when
absent), their splits and metrics, the offline error, mini-batches."""
import urllib.error

import pytest
import torch
from torch_geometric.data import Data

from moegraph.data import (
    DATASETS,
    NodeDataModule,
    check_graph,
    csbm_graph,
    load_node_dataset,
    load_real_dataset,
    row_normalize_features,
    select_split,
)

SMALL = dict(num_nodes=120, num_classes=3, num_features=5, avg_degree=4.0, seed=2)


def test_synthetic_counts():
    dm = NodeDataModule(name="synthetic", dataset_kwargs=SMALL)
    assert dm.data is None  # nothing generated before it is needed
    assert dm.num_features == 5
    assert dm.num_classes == 3
    assert dm.data.num_nodes == 120


def test_dataset_kwargs_reach_the_generator():
    dm = NodeDataModule(dataset_kwargs=SMALL)
    dm.setup("fit")
    expected = csbm_graph(**SMALL)
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(dm.data[key], expected[key]), key


def test_setup_is_idempotent():
    dm = NodeDataModule(dataset_kwargs=SMALL)
    dm.setup("fit")
    data = dm.data
    dm.setup("test")
    assert dm.data is data


def test_dataset_kwargs_are_copied():
    kwargs = dict(SMALL)
    dm = NodeDataModule(dataset_kwargs=kwargs)
    kwargs["num_classes"] = 2
    assert dm.num_classes == 3


@pytest.mark.parametrize("loader", ["train_dataloader", "val_dataloader", "test_dataloader",
                                    "predict_dataloader"])
def test_loaders_yield_the_graph(loader):
    dm = NodeDataModule(dataset_kwargs=SMALL)
    batches = list(getattr(dm, loader)())
    assert len(batches) == 1
    assert isinstance(batches[0], Data)
    assert batches[0] is dm.data


def test_load_node_dataset():
    data = load_node_dataset("synthetic", None, **SMALL)
    assert data.num_nodes == 120 and data.train_mask is not None


@pytest.mark.parametrize("factory", [lambda: NodeDataModule(name="coraa"),
                                     lambda: load_node_dataset("coraa")])
def test_unknown_dataset(factory):
    assert "synthetic" in DATASETS and "cora" in DATASETS
    with pytest.raises(ValueError, match=r"unknown dataset 'coraa'; known datasets: synthetic"):
        factory()


def make_graph(edge_index, y, num_nodes=4):
    y = torch.tensor(y)
    labelled = y >= 0
    return Data(x=torch.randn(num_nodes, 3), edge_index=torch.tensor(edge_index), y=y,
                num_nodes=num_nodes, train_mask=labelled, val_mask=labelled,
                test_mask=torch.zeros(num_nodes, dtype=torch.bool))


@pytest.mark.parametrize("key", ["train_mask", "val_mask", "test_mask"])
def test_check_graph_bad_masks(key):
    data = make_graph([[0], [1]], [0, 1, 0, 1])
    data[key] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"g: '{key}' must be a boolean mask of shape \[4\]"):
        check_graph(data, "g")
    data[key] = torch.tensor([False, False, True, False])
    data.y = torch.tensor([0, 1, -1, 1])
    for other in {"train_mask", "val_mask", "test_mask"} - {key}:
        data[other] = torch.tensor([True, True, False, False])
    with pytest.raises(ValueError, match=rf"g: '{key}' holds unlabelled nodes"):
        check_graph(data, "g")


def test_check_graph_accepts_a_valid_graph():
    check_graph(make_graph([[0, 1, 2], [1, 2, 3]], [0, 1, 0, 1]), "g")
    check_graph(make_graph([[], []], [0, 1, -1, -1]), "g")  # no edges, unlabelled nodes


@pytest.mark.parametrize("edge_index,node", [([[0, 1], [1, 4]], 4), ([[0, 7], [1, 2]], 7),
                                             ([[0, -1], [1, 2]], -1)])
def test_check_graph_edge_out_of_bounds(edge_index, node):
    with pytest.raises(ValueError, match=rf"g: 'edge_index' holds node {node}, outside \[0, 3\]"):
        check_graph(make_graph(edge_index, [0, 1, 0, 1]), "g")


@pytest.mark.parametrize("y", [[2, 2, 2, 2], [1, -1, 1, -1], [-1, -1, -1, -1]])
def test_check_graph_single_class(y):
    with pytest.raises(ValueError, match="g: node classification needs at least two classes"):
        check_graph(make_graph([[0], [1]], y), "g")


def test_check_graph_bad_features():
    data = make_graph([[0], [1]], [0, 1, 0, 1])
    data.x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"g: 'x' must be \[num_nodes, num_features\]"):
        check_graph(data, "g")
    data.x = torch.randn(4)
    with pytest.raises(ValueError, match=r"g: 'x' must be \[num_nodes, num_features\]"):
        check_graph(data, "g")


def test_setup_checks_the_graph(monkeypatch):
    bad = make_graph([[0], [9]], [0, 1, 0, 1])
    monkeypatch.setattr("moegraph.data.datamodule.csbm_graph", lambda **kwargs: bad)
    dm = NodeDataModule()
    with pytest.raises(ValueError, match="synthetic: 'edge_index' holds node 9"):
        dm.setup("fit")
    assert dm.data is None


# Real datasets ###############################################################

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


def test_datamodule_mini_batch_loaders():
    dm = NodeDataModule("synthetic", batch_size=25, num_neighbors=[3, 3],
                        dataset_kwargs={"num_nodes": 100})
    dm.setup()
    batches = list(dm.val_dataloader())
    seeds = torch.cat([b.n_id[:b.batch_size] for b in batches])
    assert torch.equal(seeds.sort().values, dm.data.val_mask.nonzero().view(-1))


def test_parallel_loads_share_the_cache_one_at_a_time(tmp_path, monkeypatch):
    # Two runs loading one dataset into one cache (a sweep, two study processes):
    # one at a time refreshes the cache and lets PyG process it; a second reader
    # used to meet a half-written processed/ file (EOFError).
    import threading
    import time

    from moegraph.data import datamodule

    inside, most = [0], [0]
    guard = threading.Lock()

    def slow_factory(root):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with guard:
            inside[0] -= 1
        return [Data(x=torch.zeros(1, 1))]

    spec = datamodule.REAL_DATASETS["cora"]._replace(factory=slow_factory)
    monkeypatch.setitem(datamodule.REAL_DATASETS, "cora", spec)
    threads = [threading.Thread(target=datamodule.load_real_dataset,
                                args=("cora", None, str(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert (tmp_path / spec.folder / spec.subfolder / ".moegraph.lock").exists()


def test_normalize_features_divides_rows_by_their_sum():
    graph = csbm_graph(**SMALL)
    graph.x = torch.tensor([[1.0, 3.0, 0.0, 0.0, 0.0]]).repeat(120, 1)
    graph.x[1] = 0.0  # a featureless node stays at zero (no division by zero)
    graph.x[2] = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0])
    plain = NodeDataModule.from_data(graph.clone())
    dm = NodeDataModule.from_data(graph.clone(), normalize_features=True)
    x = dm.data.x
    assert torch.allclose(x[0], torch.tensor([0.25, 0.75, 0.0, 0.0, 0.0]))
    assert torch.equal(x[1], torch.zeros(5))
    assert torch.allclose(x[2], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    assert torch.equal(plain.data.x[0], graph.x[0])  # off by default
    assert torch.equal(dm.data.edge_index, plain.data.edge_index)


def test_normalize_features_leaves_the_input_graph_alone_and_rejects_negatives():
    graph = csbm_graph(**SMALL)  # Gaussian features: some negative
    with pytest.raises(ValueError, match="non-negative features.*normalize_features=false"):
        NodeDataModule(dataset_kwargs=SMALL, normalize_features=True).setup()
    x = graph.x.abs()
    graph.x = x.clone()
    row_normalize_features(graph, "g")
    assert torch.equal(graph.x, x)


def test_planetoid_features_normalised_through_the_config(real_data, tmp_path):
    root = real_data("Planetoid/Cora").parent
    dm = NodeDataModule(name="cora", root=str(root), cache_dir=str(tmp_path / "c"),
                        normalize_features=True)
    raw = load_real_dataset("cora", str(root), str(tmp_path / "c"))
    sums = dm._graph().x.sum(1)
    has = raw.x.sum(1) > 0
    assert torch.allclose(sums[has], torch.ones(int(has.sum())))
    expected = raw.x[has] / raw.x[has].sum(1, keepdim=True)
    assert torch.allclose(dm._graph().x[has], expected)
