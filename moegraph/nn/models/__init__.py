r"""Assembled networks built from moegraph layers."""
from moegraph.nn.models.backbone import BACKBONES, make_backbone
from moegraph.nn.models.gmoe import GMoE, make_gmoe
from moegraph.nn.models.gnn import CONVS, MoEGNN, NodeLinear, make_conv, make_norm
from moegraph.nn.models.graph_level import (
    BondGCNConv,
    BondGINConv,
    FeatureEncoder,
    GraphLevelGNN,
)
from moegraph.nn.models.patch_moe import PatchExperts, PatchMoE
from moegraph.nn.models.rec import (
    BipartiteLightGCN,
    MultiTaskRecommender,
    TabularMultiTaskNet,
    multitask_net,
)

__all__ = ["BACKBONES", "CONVS", "BipartiteLightGCN", "BondGCNConv", "BondGINConv",
           "FeatureEncoder", "GMoE", "GraphLevelGNN", "MoEGNN", "MultiTaskRecommender",
           "TabularMultiTaskNet", "multitask_net",
           "NodeLinear", "PatchExperts", "PatchMoE", "make_backbone", "make_conv", "make_gmoe",
           "make_norm"]
