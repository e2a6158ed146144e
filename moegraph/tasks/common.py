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


EXPERT_WEIGHT_DECAYS = ("load_share",)
r"""How :func:`make_optimizer` may weigh the weight decay of the routed
experts of hop-expert convolutions and sparse MoE blocks (:obj:`None`: as
every other parameter)."""


def expert_decay_groups(module: Module) -> list[tuple[list[torch.nn.Parameter], float]]:
    r"""The routed expert parameters of every :class:`~moegraph.nn.HopMoEConv`
    (weights, biases, GAT attention vectors) and every
    :class:`~moegraph.nn.SparseMoE` block (its routed experts; not its
    always-on shared experts, which see every row) in ``module``, one group
    per routed layer, each with its experts' share of the rows under
    balanced top-k routing, ``k / num_experts``. Raises a
    :class:`ValueError` when ``module`` holds no such layer, or one whose
    router is not top-k (no fixed ``k``)."""
    from moegraph.nn.conv.hop_moe import HopMoEConv
    from moegraph.nn.moe import SparseMoE

    groups = []
    for layer in module.modules():
        if not isinstance(layer, (HopMoEConv, SparseMoE)):
            continue
        k = getattr(layer.router, "k", None)
        if not isinstance(k, int):
            raise ValueError(f"expert_weight_decay='load_share' needs top-k routers (a fixed k); "
                             f"{type(layer.router).__name__} has none")
        params = list(layer.experts.parameters())
        if isinstance(layer, HopMoEConv):
            params += [p for p in (layer.att_src, layer.att_dst, layer.hop2_weight,
                                   layer.hop2_alpha) if p is not None]
        groups.append((params, k / layer.num_experts))
    if not groups:
        raise ValueError("expert_weight_decay='load_share' applies to networks with routed "
                         "experts (HopMoEConv, SparseMoE); this one has none")
    return groups


def make_optimizer(optimizer: Callable[..., torch.optim.Optimizer], params,
                   expert_weight_decay: Optional[str] = None) -> torch.optim.Optimizer:
    r"""The partial optimizer on ``params`` (parameters, or a module).

    With ``expert_weight_decay="load_share"`` (``params`` then a module),
    the routed experts of each hop-expert convolution and sparse MoE block
    (:func:`expert_decay_groups`) get their own parameter group
    whose weight decay is the optimizer's times ``k / num_experts``, when
    that decay is *coupled* (an L2 penalty added to the gradient:
    ``torch.optim.Adam``, ``SGD``; the optimizer's ``decoupled_weight_decay``
    unset). Why: the task loss is a mean over all the rows, of which an
    expert sees about ``k / E``, so its data gradient is about ``k / E`` of
    a dense layer's while the penalty is not. A coupled penalty and the data
    gradient balance at :math:`|w| \approx |g| / \lambda`, so an expert's
    weights are held to about ``k / E`` of a dense layer's, and under Adam a
    weight whose penalty outweighs its gradient shrinks at up to ``lr`` per
    step. Measured: a top-1 GMoE of 4 experts on CiteSeer's row-normalised
    features with Adam's L2 (seed 4) brings the training cross-entropy from
    1.79 to 1.38 in 120 epochs, where GCN reaches 0.32 and the same GMoE
    with the scaled penalty 0.64 (``experiments/results/
    graph_moe_ablation.md``, "GMoE and the coupled weight decay"). Decoupled
    decay (``AdamW``) shrinks every weight by ``lr * weight_decay`` per step
    whatever its gradient, so the share does not enter and nothing changes.
    Nor does it matter for spectrally normalised experts (MoE-GNN's
    default), whose raw scale the forward divides out: on Cora it let the
    experts' raw spectral norms grow (1.94 against 1.41) and left the test
    accuracy where it was (80.17 against 80.27, 3 seeds; same ablation,
    "Routing under dropout").
    """
    if expert_weight_decay is None:
        return optimizer(params=params.parameters() if isinstance(params, Module) else params)
    if expert_weight_decay not in EXPERT_WEIGHT_DECAYS:
        raise ValueError(f"'expert_weight_decay' must be None or one of {EXPERT_WEIGHT_DECAYS} "
                         f"(got {expert_weight_decay!r})")
    if not isinstance(params, Module):
        raise TypeError("expert_weight_decay='load_share' needs the module, not its parameters")
    groups = expert_decay_groups(params)
    in_groups = {id(p) for ps, _ in groups for p in ps}
    rest = [p for p in params.parameters() if id(p) not in in_groups]
    opt = optimizer(params=[{"params": rest}] + [{"params": ps} for ps, _ in groups])
    if "weight_decay" not in opt.defaults:
        raise ValueError(f"expert_weight_decay='load_share': {type(opt).__name__} has no "
                         f"weight decay to scale")
    if not opt.defaults.get("decoupled_weight_decay", False):
        for group, (_, share) in zip(opt.param_groups[1:], groups, strict=True):
            group["weight_decay"] = group["weight_decay"] * share
    return opt


def build_optimizers(optimizer: Callable[..., torch.optim.Optimizer],
                     scheduler: Optional[Callable[..., Any]], params,
                     expert_weight_decay: Optional[str] = None) -> Any:
    r"""``configure_optimizers`` of every task: the partial optimizer on
    ``params`` (see :func:`make_optimizer`), and the partial scheduler on it
    (monitoring ``val/loss``)."""
    opt = make_optimizer(optimizer, params, expert_weight_decay)
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
