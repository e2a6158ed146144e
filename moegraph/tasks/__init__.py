r"""LightningModules: each wraps a plain network from :mod:`moegraph.nn` and owns
losses, metrics and logging."""
from moegraph.tasks.mowst import MowstMetrics, MowstTask
from moegraph.tasks.node_classification import NodeClassificationTask

__all__ = ["MowstMetrics", "MowstTask", "NodeClassificationTask"]
