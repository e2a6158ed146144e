r"""Assembled networks built from moegraph layers."""
from moegraph.nn.models.gnn import CONVS, MoEGNN, make_conv, make_norm

__all__ = ["CONVS", "MoEGNN", "make_conv", "make_norm"]
