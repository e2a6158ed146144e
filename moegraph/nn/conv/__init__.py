r"""Graph Mixture-of-Experts convolutions."""
from moegraph.nn.conv.hop_moe import (
    HOP_EXPERT_CONVS,
    HopGraph,
    HopMoEConv,
    check_edge_index,
    two_hop_edge_index,
)

__all__ = ["HOP_EXPERT_CONVS", "HopGraph", "HopMoEConv", "check_edge_index",
           "two_hop_edge_index"]
