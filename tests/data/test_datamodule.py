r"""Tests of moegraph.data.datamodule: NodeDataModule, load_node_dataset, check_graph."""
import pytest
import torch
from torch_geometric.data import Data

from moegraph.data import DATASETS, NodeDataModule, check_graph, csbm_graph, load_node_dataset

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
