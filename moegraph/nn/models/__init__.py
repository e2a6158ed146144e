r"""Assembled networks built from moegraph layers."""
from moegraph.nn.models.gnn import CONVS, MoEGNN, make_conv, make_norm
from moegraph.nn.models.rec import BipartiteLightGCN, MultiTaskRecommender

__all__ = ["CONVS", "BipartiteLightGCN", "MoEGNN", "MultiTaskRecommender", "make_conv",
           "make_norm"]
