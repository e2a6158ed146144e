r"""Data: in-process generators and LightningDataModules over PyG datasets."""
from moegraph.data.datamodule import DATASETS, NodeDataModule, check_graph, load_node_dataset
from moegraph.data.synthetic import csbm_graph, random_split_masks

__all__ = ["DATASETS", "NodeDataModule", "check_graph", "csbm_graph", "load_node_dataset",
           "random_split_masks"]
