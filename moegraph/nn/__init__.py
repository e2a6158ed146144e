r"""Layers of moegraph: pure PyTorch / PyG modules that know nothing of
Lightning or Hydra."""
from moegraph.nn.conv import HopMoEConv, two_hop_edge_index
from moegraph.nn.experts import Experts, LinearExperts, MLPExperts, ModuleExperts
from moegraph.nn.moe import MoEOutput, SparseMoE
from moegraph.nn.mowst import (
    ConfidenceGate,
    Mowst,
    MowstOutput,
    MowstPrediction,
    dispersions,
    entropy_dispersion,
    mowst_loss,
    mowst_star_loss,
    variance_dispersion,
)
from moegraph.nn.multitask import (
    CGC,
    PLE,
    HoME,
    MMoE,
    MultiGateLevel,
    MultiTaskHead,
    MultiTaskOutput,
    SharedBottom,
)
from moegraph.nn.output import ModelOutput, as_model_output
from moegraph.nn.parallel import ShardedExperts, shard_experts
from moegraph.nn.routing import (
    AUX_LOSS_NAMES,
    ExpertChoiceRouter,
    Router,
    Routing,
    TopKRouter,
    TopPRouter,
    build_router,
    sum_aux_losses,
)

__all__ = [
    "CGC",
    "HoME",
    "MMoE",
    "MultiGateLevel",
    "MultiTaskHead",
    "MultiTaskOutput",
    "PLE",
    "SharedBottom",
    "AUX_LOSS_NAMES",
    "ConfidenceGate",
    "Mowst",
    "MowstOutput",
    "MowstPrediction",
    "dispersions",
    "entropy_dispersion",
    "mowst_loss",
    "mowst_star_loss",
    "variance_dispersion",
    "ExpertChoiceRouter",
    "Experts",
    "HopMoEConv",
    "LinearExperts",
    "MLPExperts",
    "ModuleExperts",
    "ModelOutput",
    "MoEOutput",
    "Router",
    "Routing",
    "ShardedExperts",
    "SparseMoE",
    "TopKRouter",
    "TopPRouter",
    "as_model_output",
    "build_router",
    "shard_experts",
    "sum_aux_losses",
    "two_hop_edge_index",
]
