r"""Data: in-process generators and LightningDataModules over PyG datasets."""
from moegraph.data.datamodule import DATASETS, NodeDataModule, check_graph, load_node_dataset
from moegraph.data.movielens import (
    MovieLensDataModule,
    check_ratings,
    load_movielens100k,
    sample_negatives,
    synthetic_ratings,
    temporal_split,
)
from moegraph.data.synthetic import csbm_graph, random_split_masks

__all__ = ["DATASETS", "MovieLensDataModule", "NodeDataModule", "check_graph", "check_ratings",
           "csbm_graph", "load_movielens100k", "load_node_dataset", "random_split_masks",
           "sample_negatives", "synthetic_ratings", "temporal_split"]
