r"""Data: in-process generators and LightningDataModules over PyG datasets."""
from moegraph.data.datamodule import (
    DATASETS,
    REAL_DATASETS,
    NodeDataModule,
    check_graph,
    dataset_metric,
    load_node_dataset,
    load_real_dataset,
    select_split,
)
from moegraph.data.synthetic import csbm_graph, random_split_masks

__all__ = ["DATASETS", "REAL_DATASETS", "NodeDataModule", "check_graph", "csbm_graph",
           "dataset_metric", "load_node_dataset", "load_real_dataset", "random_split_masks",
           "select_split"]
