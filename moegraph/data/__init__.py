r"""Data: in-process generators and LightningDataModules over PyG datasets."""
from moegraph.data.clusters import (
    ClusterDataModule,
    ClusterPatches,
    cluster_dataset,
    cluster_patches,
    cluster_vectors,
)
from moegraph.data.datamodule import (
    DATASETS,
    REAL_DATASETS,
    KHopLoader,
    NodeDataModule,
    check_graph,
    dataset_metric,
    load_node_dataset,
    load_real_dataset,
    row_normalize_features,
    select_split,
)
from moegraph.data.loader import EpochRandomSampler, NeighborSampler, TorchNeighborLoader
from moegraph.data.mmoe_synthetic import mmoe_synthetic, mmoe_synthetic_frame
from moegraph.data.molecules import (
    GRAPH_DATASETS,
    MOLECULE_DATASETS,
    DropNodes,
    GraphDataModule,
    MoleculeCSVDataset,
    load_graph_dataset,
    scaffold_split,
    smiles_to_data,
)
from moegraph.data.movielens import (
    MovieLensDataModule,
    check_ratings,
    load_movielens100k,
    sample_negatives,
    synthetic_ratings,
    temporal_split,
)
from moegraph.data.synthetic import csbm_graph, random_split_masks
from moegraph.data.tabular import TabularMultiTaskDataModule, read_table

__all__ = ["DATASETS", "GRAPH_DATASETS", "MOLECULE_DATASETS", "REAL_DATASETS",
           "DropNodes", "GraphDataModule", "MoleculeCSVDataset", "load_graph_dataset",
           "scaffold_split", "smiles_to_data", "ClusterDataModule", "ClusterPatches",
           "EpochRandomSampler", "KHopLoader", "MovieLensDataModule", "NeighborSampler",
           "NodeDataModule", "TabularMultiTaskDataModule", "TorchNeighborLoader", "check_graph",
           "check_ratings",
           "cluster_dataset", "cluster_patches", "cluster_vectors", "csbm_graph",
           "dataset_metric", "load_movielens100k", "load_node_dataset", "load_real_dataset",
           "mmoe_synthetic", "mmoe_synthetic_frame", "read_table",
           "random_split_masks", "row_normalize_features", "sample_negatives", "select_split",
           "synthetic_ratings",
           "temporal_split"]
