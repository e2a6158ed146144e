r"""LightningModules: each wraps a plain network from :mod:`moegraph.nn` and owns
losses, metrics and logging."""
from moegraph.tasks.graph_classification import GraphClassificationTask, masked_bce_with_logits
from moegraph.tasks.metrics import GroupAUROC, MowstMetrics, grouped_auc
from moegraph.tasks.mowst import MowstTask
from moegraph.tasks.multitask import MultiTaskLearning
from moegraph.tasks.node_classification import NodeClassificationTask

__all__ = ["GraphClassificationTask", "GroupAUROC", "MowstMetrics", "MowstTask",
           "MultiTaskLearning", "NodeClassificationTask", "grouped_auc", "masked_bce_with_logits"]
