r"""Helpers shared by the tasks: optimisers, the nodes a step is scored on, and
the states of metrics carried by a checkpoint."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.data import Data
from torchmetrics import Metric, MetricCollection


def split_mask(data: Data, split: str) -> Tensor:
    r"""The nodes of ``data`` a step is scored on: the split's mask of a full
    graph, or the ``batch_size`` seed nodes (first in order) of a
    :class:`~torch_geometric.loader.NeighborLoader` mini-batch."""
    batch_size = getattr(data, "batch_size", None)
    if isinstance(batch_size, int):
        mask = torch.zeros(data.num_nodes, dtype=torch.bool, device=data.y.device)
        mask[:batch_size] = True
        return mask
    return data[f"{split}_mask"]


def multilabel_loss(logits: Tensor, y: Tensor) -> Tensor:
    r"""Binary cross-entropy with logits over the labelled entries of
    multi-label targets ``y [N, T]`` (``0``/``1``; a negative value or ``NaN``:
    unlabelled), averaged over those entries; zero (with a gradient path)
    when none is labelled."""
    labelled = y >= 0
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[labelled], y[labelled].to(logits.dtype))


def multilabel_target(y: Tensor) -> Tensor:
    r"""Multi-label targets as integers for the metrics: ``-1`` where unlabelled."""
    return torch.where(y >= 0, y, torch.full_like(y, -1)).long()


def build_optimizers(optimizer: Callable[..., torch.optim.Optimizer],
                     scheduler: Optional[Callable[..., Any]], params) -> Any:
    r"""``configure_optimizers`` of every task: the partial optimizer on
    ``params``, and the partial scheduler on it (monitoring ``val/loss``)."""
    opt = optimizer(params=params)
    if scheduler is None:
        return opt
    return {"optimizer": opt,
            "lr_scheduler": {"scheduler": scheduler(optimizer=opt), "monitor": "val/loss"}}


def parameter_groups(module: Module,
                     groups: Optional[Sequence[Mapping[str, Any]]] = None) -> Any:
    r"""The parameters of ``module`` for the optimizer, split into groups with
    options of their own (``torch.optim``'s per-group ``lr``, ``weight_decay``,
    ...): each entry of ``groups`` names a submodule by its path
    (``{"params": "net.router", "lr": 0.1}``) and takes every parameter under
    it; the parameters no entry takes form the first group, with the
    optimizer's own options. Without ``groups``: ``module.parameters()``.
    A path that takes no parameter, or a parameter taken twice, is an error."""
    if not groups:
        return module.parameters()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    owner: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for entry in groups:
        entry = dict(entry)
        path = entry.pop("params", None)
        if not isinstance(path, str) or not path:
            raise ValueError(f"each parameter group needs 'params': the path of a submodule "
                             f"(got {path!r})")
        taken = [(n, p) for n, p in named if n == path or n.startswith(path + ".")]
        if not taken:
            raise ValueError(f"parameter group {path!r} takes no parameter of "
                             f"{type(module).__name__}")
        for n, _ in taken:
            if n in owner:
                raise ValueError(f"parameter {n!r} is in two groups ({owner[n]!r}, {path!r})")
            owner[n] = path
        out.append({"params": [p for _, p in taken], **entry})
    rest = [p for n, p in named if n not in owner]
    return ([{"params": rest}] if rest else []) + out


def metric_states(metrics: Module) -> dict[str, dict[str, Any]]:
    r"""The accumulated states of every :class:`~torchmetrics.Metric` in
    ``metrics`` (by module name), for a checkpoint taken in the middle of an
    epoch: resumed, the epoch's metrics then count the batches seen before."""
    states = {}
    for name, metric in metrics.named_modules():
        if isinstance(metric, Metric) and not isinstance(metric, MetricCollection):
            state = {key: ([v.detach().clone() for v in value] if isinstance(value, list)
                           else value.detach().clone())
                     for key, value in metric.metric_state.items()}
            states[name] = {"state": state}
    return states


def load_metric_states(metrics: Module, states: dict[str, dict[str, Any]]) -> None:
    r"""Put back what :func:`metric_states` saved: each metric is reset, then
    given the saved values of its declared states (``add_state``), the
    torchmetrics way of holding them; nothing private is written. (The
    metric's own count of updates starts again from zero: what a metric
    computes depends on its states alone.)"""
    modules = dict(metrics.named_modules())
    for name, saved in states.items():
        metric = modules[name]
        if not isinstance(metric, Metric):
            raise TypeError(f"{name!r} of the checkpoint is not a metric here")
        metric.reset()
        for key, value in saved["state"].items():
            if key not in metric.metric_state:
                raise KeyError(f"metric {name!r} has no state {key!r}")
            setattr(metric, key, value)
