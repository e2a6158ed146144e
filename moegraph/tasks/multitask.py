r"""Multi-task learning as a LightningModule around a multi-task network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, ModuleDict
from torchmetrics import Accuracy, MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAUROC

from moegraph.checkpoint import from_config, net_from_config
from moegraph.diagnostics import (
    format_multitask_diagnostics,
    multitask_diagnostics,
    multitask_summary,
    plot_multitask_diagnostics,
)
from moegraph.nn.multitask import MultiTaskOutput
from moegraph.tasks.common import build_optimizers
from moegraph.tasks.metrics import GroupAUROC, grouped_auc  # noqa: F401 (public here before)

TASK_TYPES = ("binary", "multiclass", "regression")


def check_tasks(tasks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    r"""``{name: {"type": ..., "num_classes": ...}}`` from ``{name: type}`` or
    ``{name: {"type": ..., "num_classes": ...}}``."""
    if not tasks:
        raise ValueError("'tasks' must name at least one task")
    out = {}
    for name, spec in dict(tasks).items():
        spec = {"type": spec} if isinstance(spec, str) else dict(spec)
        if spec.get("type") not in TASK_TYPES:
            raise ValueError(f"task {name!r}: type must be one of {TASK_TYPES} (got "
                             f"{spec.get('type')!r})")
        if spec["type"] == "multiclass" and int(spec.get("num_classes", 0)) < 2:
            raise ValueError(f"task {name!r}: a multiclass task needs num_classes >= 2")
        out[name] = spec
    return out


class MultiTaskLearning(L.LightningModule):
    r"""Multi-task training of a network that returns one prediction per task
    (:class:`~moegraph.nn.MultiTaskOutput`), with a label mask per task.

    The loss is :math:`\sum_t w_t \mathcal{L}_t` over the rows labelled for
    task :math:`t` (binary cross-entropy, cross-entropy or MSE); a task with no
    labelled row in a batch contributes zero. With
    ``uncertainty_weighting=True`` (`Kendall et al., 2018
    <https://arxiv.org/abs/1705.07115>`_) it is :math:`\sum_t w_t
    (e^{-s_t}\mathcal{L}_t + s_t)` with a learnt log-variance :math:`s_t`.

    Logs ``{split}/loss`` (the weighted sum, without the uncertainty terms),
    ``{split}/<task>/loss`` and per task ``auc`` and ``gauc`` (binary: AUC per
    user, averaged over users with both classes), ``acc`` (multiclass) or
    ``rmse`` (regression), and, on the first validation batch of each
    epoch, the diagnostics of :func:`~moegraph.diagnostics.multitask_summary`
    as ``val/diag/...`` (expert collapse, degradation, underfitting).

    Args:
        net (Module): called as ``net(user_x, item_x, edge_index, user, item)``
            (the batch's entries).
        tasks (dict): task name -> ``"binary"``, ``"regression"`` or
            ``{"type": "multiclass", "num_classes": C}`` (given by the data).
        optimizer (callable): partial optimizer, called with the parameters.
        scheduler (callable, optional): partial LR scheduler.
        task_weights (dict, optional): loss weight per task (default 1 each).
        uncertainty_weighting (bool, optional): learn the task weights.
            (default: :obj:`False`)
        group_key (str, optional): batch entry that groups rows for GAUC.
            (default: :obj:`"user"`)
    """

    def __init__(self, net: Module, tasks: dict[str, Any],
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 task_weights: Optional[dict[str, float]] = None,
                 uncertainty_weighting: bool = False, group_key: str = "user"):
        super().__init__()
        # configs (from a checkpoint's hyper_parameters: see moegraph.checkpoint)
        net = net_from_config(net)
        optimizer, scheduler = from_config(optimizer), from_config(scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.tasks = check_tasks(tasks)
        net_tasks = getattr(net, "tasks", None)
        if net_tasks is not None and list(net_tasks) != list(self.tasks):
            raise ValueError(f"task mismatch: the network predicts {list(net_tasks)} "
                             f"({len(net_tasks)} tasks) but the data labels "
                             f"{list(self.tasks)} ({len(self.tasks)} tasks)")
        weights = {t: 1.0 for t in self.tasks}
        unknown = sorted(set(task_weights or {}) - set(self.tasks))
        if unknown:
            raise ValueError(f"'task_weights' names {unknown}, not in the task list "
                             f"{list(self.tasks)}")
        weights.update({t: float(w) for t, w in (task_weights or {}).items()})
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"task weights must be non-negative (got {weights})")
        self.task_weights = weights
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.group_key = group_key
        self.log_vars = (torch.nn.Parameter(torch.zeros(len(self.tasks)))
                         if uncertainty_weighting else None)
        metrics = {}
        for split in ("train", "val", "test"):
            for t, spec in self.tasks.items():
                if spec["type"] == "binary":
                    m = {"auc": BinaryAUROC(), "gauc": GroupAUROC()}
                elif spec["type"] == "multiclass":
                    m = {"acc": Accuracy(task="multiclass", num_classes=spec["num_classes"])}
                else:
                    m = {"rmse": MeanSquaredError(squared=False)}
                metrics[f"{split}_{t}"] = MetricCollection(m, prefix=f"{split}/{t}/")
        self.metrics = ModuleDict(metrics)

    def forward(self, batch: dict[str, Any]) -> MultiTaskOutput:
        return self.net(batch["user_x"], batch["item_x"], batch["edge_index"], batch["user"],
                        batch["item"])

    def _check_batch(self, batch: dict[str, Any]) -> None:
        if set(batch["y"]) != set(self.tasks) or set(batch["mask"]) != set(self.tasks):
            raise ValueError(f"task mismatch: the batch labels {sorted(batch['y'])} "
                             f"({len(batch['y'])} tasks) but the model has "
                             f"{sorted(self.tasks)} ({len(self.tasks)} tasks)")

    def task_loss(self, task: str, pred: Tensor, target: Tensor) -> Tensor:
        kind = self.tasks[task]["type"]
        if kind == "binary":
            return F.binary_cross_entropy_with_logits(pred, target.float())
        if kind == "multiclass":
            return F.cross_entropy(pred, target.long())
        return F.mse_loss(pred, target.float())

    def _step(self, batch: dict[str, Any], split: str) -> tuple[Tensor, MultiTaskOutput]:
        self._check_batch(batch)
        out = self(batch)
        total = objective = None
        for i, (t, spec) in enumerate(self.tasks.items()):
            mask = batch["mask"][t]
            n = int(mask.sum())
            pred, target = out.outputs[t][mask], batch["y"][t][mask]
            # No label for this task in the batch: zero, with a gradient path, never NaN.
            loss = self.task_loss(t, pred, target) if n else out.outputs[t].sum() * 0.0
            w = self.task_weights[t]
            total = w * loss if total is None else total + w * loss
            term = w * loss
            if self.log_vars is not None:
                term = w * (torch.exp(-self.log_vars[i]) * loss + self.log_vars[i])
            objective = term if objective is None else objective + term
            self.log(f"{split}/{t}/loss", loss, batch_size=max(n, 1), on_step=False,
                     on_epoch=True)
            if n:
                metrics = self.metrics[f"{split}_{t}"]
                if spec["type"] == "binary":
                    p = torch.sigmoid(pred.detach())
                    metrics["auc"].update(p, target.long())
                    metrics["gauc"].update(p, target.long(), batch[self.group_key][mask])
                elif spec["type"] == "multiclass":
                    metrics["acc"].update(pred.detach(), target.long())
                else:
                    metrics["rmse"].update(pred.detach(), target.float())
                self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n,
                              prog_bar=split == "val")
        B = batch["user"].numel()
        self.log(f"{split}/loss", total, batch_size=B, on_step=False, on_epoch=True,
                 prog_bar=split != "test")
        if self.log_vars is not None and split == "train":
            for i, t in enumerate(self.tasks):
                self.log(f"train/{t}/log_var", self.log_vars[i], batch_size=B,
                         on_step=False, on_epoch=True)
        return (objective if split == "train" else total), out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, out = self._step(batch, "val")
        if batch_idx == 0 and out.gates:
            diag = self.diagnostics(out)
            self.log_dict({f"val/{k}": v for k, v in multitask_summary(diag).items()},
                          batch_size=batch["user"].numel(), on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "test")[0]

    def diagnostics(self, out: MultiTaskOutput) -> dict:
        r""":func:`~moegraph.diagnostics.multitask_diagnostics` of one output
        of the network's head."""
        head = getattr(self.net, "head", self.net)
        return multitask_diagnostics(out.gates, out.experts,
                                     getattr(head, "expert_labels", []), list(self.tasks),
                                     getattr(head, "group_of", None))

    @torch.no_grad()
    def write_diagnostics(self, datamodule, output_dir: Path) -> dict[str, float]:
        r"""After training, on the test rows: print the diagnostics, save them
        as ``multitask_diagnostics.json`` and the heatmaps
        ``gate_usage.png`` / ``expert_collapse.png`` in ``output_dir``."""
        self.eval()
        outs = [self(self.transfer_batch_to_device(b, self.device, 0))
                for b in datamodule.test_dataloader()]
        if not outs or not outs[0].gates:
            return {}
        gates = {k: torch.cat([o.gates[k] for o in outs]) for k in outs[0].gates}
        experts = tuple(torch.cat([o.experts[i] for o in outs])
                        for i in range(len(outs[0].experts)))
        diag = self.diagnostics(MultiTaskOutput({}, gates, experts))
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "multitask_diagnostics.json", "w") as f:
            json.dump(diag, f, indent=1)
        name = type(getattr(self.net, "head", self.net)).__name__
        plot_multitask_diagnostics({name: diag}, output_dir / "gate_usage.png", "gates")
        plot_multitask_diagnostics({name: diag}, output_dir / "expert_collapse.png", "collapse")
        print("[moegraph] multi-task expert diagnostics on the test rows:")
        print(format_multitask_diagnostics(diag))
        return {f"test/{k}": v for k, v in multitask_summary(diag).items()}

    def configure_optimizers(self):
        return build_optimizers(self.optimizer_factory, self.scheduler_factory,
                                self.parameters())
