r"""Node-classification data behind one LightningDataModule interface."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader
from torch_geometric.data import Data

from moegraph.data.synthetic import csbm_graph

DATASETS = ("synthetic",)


def load_node_dataset(name: str, root: Optional[str] = None, **kwargs: Any) -> Data:
    r"""One node-classification graph with ``train_mask``/``val_mask``/``test_mask``.

    Args:
        name (str): dataset name, one of :data:`DATASETS`.
        root (str, optional): folder holding the raw files (real datasets).
        **kwargs: arguments of the generator (``synthetic``).
    """
    if name == "synthetic":
        return csbm_graph(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def check_graph(data: Data, name: str) -> None:
    r"""Raise a clear error for a graph that cannot be trained on."""
    N = data.num_nodes
    if data.x is None or data.x.dim() != 2 or data.x.size(0) != N:
        raise ValueError(f"{name}: 'x' must be [num_nodes, num_features]")
    if data.edge_index.numel() > 0:
        lo, hi = int(data.edge_index.min()), int(data.edge_index.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"{name}: 'edge_index' holds node {lo if lo < 0 else hi}, outside "
                             f"[0, {N - 1}]")
    labels = data.y[data.y >= 0]
    if labels.unique().numel() < 2:
        raise ValueError(f"{name}: node classification needs at least two classes")


class NodeDataModule(L.LightningDataModule):
    r"""Full-batch node classification: each loader yields the one graph, and
    the task reads the split from its masks.

    Args:
        name (str): dataset name (see :func:`load_node_dataset`).
        root (str, optional): data folder of real datasets.
        dataset_kwargs (dict, optional): arguments of the dataset / generator.
    """

    def __init__(self, name: str = "synthetic", root: Optional[str] = None,
                 dataset_kwargs: Optional[dict[str, Any]] = None):
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
        self.name = name
        self.root = root
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.data: Optional[Data] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            data = load_node_dataset(self.name, self.root, **self.dataset_kwargs)
            check_graph(data, self.name)
            self.data = data

    @property
    def num_features(self) -> int:
        self.setup()
        return self.data.num_features

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.data.y.max()) + 1

    def net_kwargs(self) -> dict[str, int]:
        r"""What the network needs to know of the data (given by ``train``)."""
        return {"in_channels": self.num_features, "out_channels": self.num_classes}

    def task_kwargs(self) -> dict[str, int]:
        r"""What the LightningModule needs to know of the data."""
        return {"num_classes": self.num_classes}

    def _loader(self) -> DataLoader:
        self.setup()
        return DataLoader([self.data], batch_size=None, collate_fn=lambda d: d)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


