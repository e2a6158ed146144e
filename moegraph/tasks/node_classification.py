r"""Node classification as a LightningModule around any moegraph or PyG network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.data import Data
from torchmetrics import MeanMetric, MetricCollection

from moegraph.checkpoint import from_config, net_from_config
from moegraph.diagnostics import expert_load, format_expert_load, plot_expert_load
from moegraph.nn.output import ModelOutput, as_model_output
from moegraph.nn.routing import AUX_LOSS_NAMES
from moegraph.tasks.common import (  # noqa: F401 (public here before)
    EXPERT_WEIGHT_DECAYS,
    build_optimizers,
    expert_decay_groups,
    load_metric_states,
    metric_states,
    multilabel_loss,
    multilabel_target,
    parameter_groups,
    split_mask,
)
from moegraph.tasks.metrics import METRICS, make_metrics, update_metrics  # noqa: F401


def check_aux_loss_weights(weights: Optional[dict[str, float]]) -> dict[str, float]:
    r"""Validate the weights of the auxiliary losses by name."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(AUX_LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown auxiliary loss(es) {unknown} in 'aux_loss_weights'; known: "
                         f"{list(AUX_LOSS_NAMES)}")
    return {name: float(w) for name, w in weights.items() if w}


def weighted_aux_loss(aux_loss: dict[str, Tensor], weights: dict[str, float],
                      ref: Tensor) -> Tensor:
    r"""``sum_name weights[name] * aux_loss[name]`` over the losses the model returned."""
    total = ref.new_zeros(())
    for name, w in weights.items():
        if name in aux_loss:
            total = total + w * aux_loss[name]
    return total


class NodeClassificationTask(L.LightningModule):
    r"""Full-batch node classification.

    The network is a plain :class:`torch.nn.Module` called as
    ``net(x, edge_index)``; it returns logits or a
    :class:`~moegraph.nn.output.ModelOutput`, whose auxiliary losses are
    weighted here and added to the cross-entropy. Logs ``{split}/loss``,
    ``{split}/acc`` (and ``{split}/auroc`` for a binary task with
    ``metric="auroc"``), ``train/aux_loss`` and each ``train/aux/<name>``.
    With ``multilabel`` (``y [N, num_classes]`` in ``{0, 1}``, ``-1`` where
    unlabelled, e.g. ogbn-proteins), the loss is the binary cross-entropy
    with logits over the labelled entries and the metrics are averaged over
    the tasks (``{split}/auroc``: mean ROC-AUC of the tasks).
    Takes a full graph (split by its masks) or a
    :class:`~torch_geometric.loader.NeighborLoader` mini-batch (scored on its
    seed nodes).

    Args:
        net (Module): the network.
        num_classes (int): number of classes (of binary tasks with
            ``multilabel``).
        optimizer (callable): partial optimizer, called with the parameters.
        scheduler (callable, optional): partial LR scheduler.
        aux_loss_weights (dict, optional): weight of each auxiliary loss by
            name (``load_balance``, ``z_loss``, ``importance``, ``entropy``).
        metric (str, optional): ``"acc"`` or ``"auroc"``, the metric the
            dataset is judged by. (default: :obj:`"acc"`)
        multilabel (bool, optional): ``num_classes`` binary tasks per node.
            (default: :obj:`False`)
        param_groups (list, optional): parameter groups with optimizer
            options of their own, each naming a submodule
            (``[{"params": "net.router", "lr": 0.1}]``; see
            :func:`~moegraph.tasks.common.parameter_groups`). (default: :obj:`None`)
        expert_weight_decay (str, optional): ``"load_share"``: under a
            coupled weight decay (an L2 penalty in the gradient, e.g.
            ``torch.optim.Adam``), the routed experts of the network's
            hop-expert convolutions and sparse MoE blocks get the
            optimizer's weight decay times
            ``k / num_experts``, their share of the nodes (see
            :func:`~moegraph.tasks.common.make_optimizer`); :obj:`None`: as
            every parameter; not with ``param_groups``. (default: :obj:`None`)
    """

    def __init__(self, net: Module, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 aux_loss_weights: Optional[dict[str, float]] = None,
                 metric: str = "acc", expert_parallel: bool = False,
                 multilabel: bool = False, expert_weight_decay: Optional[str] = None,
                 param_groups: Optional[list[dict[str, Any]]] = None):
        super().__init__()
        # configs (from a checkpoint's hyper_parameters: see moegraph.checkpoint)
        net = net_from_config(net)
        optimizer, scheduler = from_config(optimizer), from_config(scheduler)
        if num_classes < (1 if multilabel else 2):
            raise ValueError(f"'num_classes' must be at least {1 if multilabel else 2} "
                             f"(got {num_classes})")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.aux_loss_weights = check_aux_loss_weights(aux_loss_weights)
        self.metric = metric
        self.expert_parallel = expert_parallel
        self.multilabel = bool(multilabel)
        if expert_weight_decay is not None:
            if expert_weight_decay not in EXPERT_WEIGHT_DECAYS:
                raise ValueError(f"'expert_weight_decay' must be None or one of "
                                 f"{EXPERT_WEIGHT_DECAYS} (got {expert_weight_decay!r})")
            expert_decay_groups(net)  # raises if the network has no routed experts
        self.expert_weight_decay = expert_weight_decay
        if expert_weight_decay is not None and param_groups:
            raise ValueError("'expert_weight_decay' makes the experts' parameter groups itself: "
                             "give it or 'param_groups', not both")
        self.param_groups = [dict(g) for g in param_groups] if param_groups else None
        parameter_groups(self, self.param_groups)  # a path that names nothing fails here
        metrics = make_metrics(metric, num_classes, self.multilabel)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.eval_losses = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def configure_model(self) -> None:
        r"""With ``expert_parallel``, shard the experts of every sparse MoE
        block of the network across the processes
        (:func:`~moegraph.nn.shard_experts`): Lightning calls this hook once the
        process group exists, before DDP wraps the module and before the
        optimizer is made. A single process is left unchanged."""
        if self.expert_parallel:
            from moegraph.nn.parallel import shard_experts

            shard_experts(self)

    def forward(self, data: Data) -> ModelOutput:
        return as_model_output(self.net(data.x, data.edge_index))

    def _check_labels(self, y: Tensor) -> None:
        if self.multilabel:
            if y.dim() != 2 or y.size(1) != self.num_classes:
                raise ValueError(f"multilabel: labels must be [N, {self.num_classes}] "
                                 f"(got {list(y.shape)})")
            labelled = y[y >= 0]
            if bool(((labelled != 0) & (labelled != 1)).any()):
                raise ValueError("multilabel: labels must be 0 or 1 (negative or NaN: "
                                 "unlabelled)")
            return
        if y.dim() != 1:
            raise ValueError(f"labels are {list(y.shape)}: one class per node needs [N] "
                             f"(multi-label data: multilabel=True)")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}] "
                             f"(got [{int(y.min())}, {int(y.max())}])")

    @property
    def distributed(self) -> bool:
        r"""Whether the task runs in one of several processes (DDP)."""
        return self._trainer is not None and self._trainer.world_size > 1

    def log_loss(self, split: str, loss: Tensor, weight: int) -> None:
        r"""Log ``{split}/loss``: per step in training (the mean over the
        processes under DDP), per epoch in evaluation (weighted by nodes).

        The epoch mean is a torchmetrics ``MeanMetric`` with float states
        summed across processes: Lightning's own synced weighted mean keeps the
        summed batch size an integer and divides it by the world size on gloo,
        rounding it down (an odd total, or a process without nodes, gives a
        wrong mean or infinity)."""
        if split == "train":
            self.log("train/loss", loss, batch_size=max(weight, 1), prog_bar=True,
                     sync_dist=True)
            return
        mean = self.eval_losses[split]
        assert isinstance(mean, MeanMetric)
        mean.update(loss.detach(), weight)
        self.log(f"{split}/loss", mean, prog_bar=split == "val", on_step=False, on_epoch=True)

    def check_split_not_empty(self, data: Data, mask: Tensor, split: str) -> None:
        r"""Raise a clear error when the ``split`` mask of a full graph selects
        no node in a single process (training on it would run the whole
        budget on a zero loss). A mini-batch, or a process of several, may
        hold none."""
        if isinstance(getattr(data, "batch_size", None), int) or self.distributed:
            return
        if not bool(mask.any()):
            raise ValueError(f"the '{split}_mask' of the graph selects no node: "
                             f"{type(self).__name__} has nothing to "
                             f"{'train' if split == 'train' else 'evaluate'} on")

    def _step(self, data: Data, split: str, metrics: MetricCollection) -> Tensor:
        out = self(data)
        mask = split_mask(data, split)
        if split == "train":
            self.check_split_not_empty(data, mask, split)
        logits, y = out.logits[mask], data.y[mask]
        self._check_labels(y)
        batch_size = int(mask.sum())
        if self.multilabel:
            loss = multilabel_loss(logits, y) if batch_size else logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, y) if batch_size else logits.sum() * 0.0
        # Under DDP every process logs the same keys at every step (a batch
        # without nodes of the split included: weight 0), so that the syncs
        # of the logged values and of the metrics' states meet.
        weight = batch_size if self.distributed else max(batch_size, 1)
        self.log_loss(split, loss, weight)
        if batch_size:
            if self.multilabel:
                update_metrics(metrics, logits, multilabel_target(y), multilabel=True)
            else:
                update_metrics(metrics, logits, y)
        if batch_size or self.distributed:  # torchmetrics sync even without an update
            # A metric given only update() has no step value: log it per epoch.
            self.log_dict(metrics, batch_size=weight, prog_bar=split == "val",
                          on_step=False, on_epoch=True)
        if split == "train":
            aux = weighted_aux_loss(out.aux_loss, self.aux_loss_weights, loss)
            self.log("train/aux_loss", aux, batch_size=weight, sync_dist=True)
            for name, value in out.aux_loss.items():
                self.log(f"train/aux/{name}", value, batch_size=weight, sync_dist=True)
            return loss + aux
        return loss

    def training_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._step(data, "train", self.train_metrics)

    def validation_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._step(data, "val", self.val_metrics)

    def test_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._step(data, "test", self.test_metrics)

    def predict_step(self, data: Data, batch_idx: int) -> ModelOutput:
        return self(data)

    @torch.no_grad()
    def write_diagnostics(self, datamodule, output_dir: Path) -> dict[str, float]:
        r"""After training: print the per-expert load of every routed layer on
        the full graph and save it as ``expert_load.png`` and
        ``expert_load.json`` (``[layers, experts]`` shares) in ``output_dir``."""
        self.eval()
        with torch.no_grad():
            out = self(datamodule.data.to(self.device))
        rank_zero = self._trainer is None or self._trainer.is_global_zero
        if out.routing and rank_zero:
            load = expert_load(out.routing)
            print("[moegraph] per-expert load on the full graph (% of assignments):")
            print(format_expert_load(load))
            plot_expert_load(load, Path(output_dir) / "expert_load.png")
            (Path(output_dir) / "expert_load.json").write_text(json.dumps(load.tolist()))
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The training metrics of the epoch so far (a checkpoint may be taken
        # in its middle: see TorchNeighborLoader.state_dict).
        checkpoint["train_metric_states"] = metric_states(self.train_metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "train_metric_states" in checkpoint:
            load_metric_states(self.train_metrics, checkpoint["train_metric_states"])

    def configure_optimizers(self):
        return build_optimizers(self.optimizer_factory, self.scheduler_factory,
                                self if self.expert_weight_decay
                                else parameter_groups(self, self.param_groups),
                                self.expert_weight_decay)
