r"""Multi-task learning as a LightningModule around a multi-task network."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, ModuleDict
from torchmetrics import Accuracy, MeanSquaredError, Metric, R2Score
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


def check_task_batch(task: str, spec: dict[str, Any], pred: Tensor, target: Tensor,
                     mask: Tensor) -> None:
    r"""Raise a clear error, naming ``task``, for a mask that is not a bool
    ``[B]`` tensor (``B`` rows predicted) or labels under it that the task
    type does not allow (NaN anywhere; binary outside {0, 1}; multiclass not
    an integer in ``[0, C)``)."""
    B = pred.size(0)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = getattr(mask, "dtype", type(mask).__name__)
        hint = (" (an integer 0/1 mask would index rows, not select them; convert it with "
                "mask.bool())" if isinstance(mask, Tensor) and not mask.is_floating_point()
                else "")
        raise TypeError(f"task {task!r}: the label mask must be a bool tensor of shape [{B}] "
                        f"(one entry per row), got {kind}{hint}")
    if mask.dim() != 1 or mask.numel() != B:
        raise ValueError(f"task {task!r}: the label mask must have shape [{B}] (one entry per "
                         f"predicted row), got {list(mask.shape)}")
    if not isinstance(target, Tensor) or target.size(0) != B:
        raise ValueError(f"task {task!r}: the labels must have {B} rows (one per predicted "
                         f"row), got {list(getattr(target, 'shape', []))}")
    y = target[mask]
    if y.numel() == 0:
        return
    kind = spec["type"]
    if y.is_floating_point() and bool(torch.isnan(y).any()):
        raise ValueError(f"task {task!r}: {int(torch.isnan(y).sum())} labels under the mask are "
                         "NaN; mask them out (mask False) or fill them")
    if kind == "binary":
        bad = (y != 0) & (y != 1)
        if bool(bad.any()):
            raise ValueError(f"task {task!r} is binary: labels must be 0 or 1, got "
                             f"{y[bad][0].item()} ({int(bad.sum())} such labels)")
    elif kind == "multiclass":
        C = int(spec["num_classes"])
        bad = (y < 0) | (y >= C) | (y != y.round() if y.is_floating_point() else y < 0)
        if bool(bad.any()):
            raise ValueError(f"task {task!r} is multiclass with {C} classes: labels must be "
                             f"integers in [0, {C - 1}], got {y[bad][0].item()} "
                             f"({int(bad.sum())} such labels)")
    elif not bool(torch.isfinite(y.float()).all()):
        raise ValueError(f"task {task!r}: regression labels under the mask must be finite")


class MultiTaskLearning(L.LightningModule):
    r"""Multi-task training of any network that returns one prediction per
    task (:class:`~moegraph.nn.MultiTaskOutput`), with a label mask per task.

    A batch is a dict: ``inputs`` (what the network takes: a dict of keyword
    arguments, or one tensor), ``y`` and ``mask`` (dicts by task, ``[B]``;
    the mask is bool) and, optionally, ``group`` (``[B]``, e.g. the user of
    each row, for GAUC). The recommendation encoder over MovieLens
    (:class:`~moegraph.nn.models.MultiTaskRecommender`) is one such network, a
    tabular encoder (:class:`~moegraph.nn.models.TabularMultiTaskNet`) or a
    bare head (:class:`~moegraph.nn.MMoE` on ``inputs = x``) are others.

    The loss is :math:`\sum_t w_t \mathcal{L}_t` over the rows labelled for
    task :math:`t` (binary cross-entropy, cross-entropy or MSE); a task with no
    labelled row in a batch contributes zero. With
    ``uncertainty_weighting=True`` (`Kendall et al., 2018
    <https://arxiv.org/abs/1705.07115>`_) it is :math:`\sum_t w_t
    (e^{-s_t}\mathcal{L}_t + s_t)` with a learnt log-variance :math:`s_t`.

    Logs ``{split}/loss`` (the weighted sum, without the uncertainty terms),
    ``{split}/<task>/loss`` and per task ``auc`` and, with groups, ``gauc``
    (binary: AUC per group, averaged over groups with both classes; not
    logged, with one warning, when no group has both classes), ``acc``
    (multiclass) or ``rmse`` and ``r2`` (regression); then two means over the
    tasks: ``{split}/mean_auc`` (binary tasks) and ``{split}/mean_score``, the
    ``task_weights``-weighted mean of AUC (binary), accuracy (multiclass) and
    :math:`R^2` (regression), higher is better, for checkpointing and tuning
    on mixed task types. On the first validation batch of each epoch it logs
    the diagnostics of :func:`~moegraph.diagnostics.multitask_summary` as
    ``val/diag/...`` (expert collapse, degradation, underfitting).

    Every batch is checked: a mask that is not a bool ``[B]`` tensor, or
    labels under it that the task type does not allow (NaN, a binary label
    not in {0, 1}, a multiclass label out of range), raise an error naming
    the task.

    Args:
        net (Module): called as ``net(**batch["inputs"])`` (or
            ``net(batch["inputs"])`` for a tensor).
        tasks (dict): task name -> ``"binary"``, ``"regression"`` or
            ``{"type": "multiclass", "num_classes": C}`` (given by the data).
        optimizer (callable): partial optimizer, called with the parameters.
        scheduler (callable, optional): partial LR scheduler.
        task_weights (dict, optional): loss weight per task (default 1 each).
        uncertainty_weighting (bool, optional): learn the task weights.
            (default: :obj:`False`)
        group_key (str, optional): batch entry that groups rows for GAUC; no
            GAUC when a batch has none. (default: :obj:`"group"`)
    """

    def __init__(self, net: Module, tasks: dict[str, Any],
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 task_weights: Optional[dict[str, float]] = None,
                 uncertainty_weighting: bool = False, group_key: Optional[str] = "group"):
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
        if any(not w >= 0 or math.isinf(w) for w in weights.values()):
            raise ValueError(f"task weights must be finite and non-negative (got {weights})")
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
                    m = {"rmse": MeanSquaredError(squared=False), "r2": R2Score()}
                metrics[f"{split}_{t}"] = ModuleDict(m)
        self.metrics = ModuleDict(metrics)
        self._warned: set[str] = set()

    def forward(self, batch: dict[str, Any]) -> MultiTaskOutput:
        if "inputs" not in batch:
            raise KeyError("a multi-task batch needs 'inputs' (the network's keyword arguments, "
                           f"or one tensor), 'y' and 'mask'; got keys {sorted(batch)}")
        inputs = batch["inputs"]
        return self.net(**inputs) if isinstance(inputs, dict) else self.net(inputs)

    def _check_batch(self, batch: dict[str, Any]) -> None:
        for key in ("y", "mask"):
            if key not in batch:
                raise KeyError(f"a multi-task batch needs {key!r} (a dict by task); got keys "
                               f"{sorted(batch)}")
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
        missing = [t for t in self.tasks if t not in out.outputs]
        if missing:
            raise ValueError(f"the network predicts no output for task(s) {missing}")
        for t, spec in self.tasks.items():
            check_task_batch(t, spec, out.outputs[t], batch["y"][t], batch["mask"][t])
        group = batch.get(self.group_key) if self.group_key else None
        B = next(iter(out.outputs.values())).size(0)
        total: Optional[Tensor] = None
        objective: Optional[Tensor] = None
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
                metrics = self._metrics(split, t)
                if spec["type"] == "binary":
                    p = torch.sigmoid(pred.detach())
                    metrics["auc"].update(p, target.long())
                    if group is not None:
                        metrics["gauc"].update(p, target.long(), group[mask])
                elif spec["type"] == "multiclass":
                    metrics["acc"].update(pred.detach(), target.long())
                elif n >= 2:  # R2 needs two rows
                    metrics["rmse"].update(pred.detach(), target.float())
                    metrics["r2"].update(pred.detach(), target.float())
        assert total is not None and objective is not None  # check_tasks: at least one task
        self.log(f"{split}/loss", total, batch_size=B, on_step=False, on_epoch=True,
                 prog_bar=split != "test")
        if self.log_vars is not None and split == "train":
            for i, t in enumerate(self.tasks):
                self.log(f"train/{t}/log_var", self.log_vars[i], batch_size=B,
                         on_step=False, on_epoch=True)
        return (objective if split == "train" else total), out

    def _metrics(self, split: str, task: str) -> Mapping[str, Metric]:
        r"""The metrics of ``task`` on ``split`` (a :class:`ModuleDict` of them)."""
        return cast("Mapping[str, Metric]", self.metrics[f"{split}_{task}"])

    def _epoch_end(self, split: str) -> None:
        r"""Compute, log and reset the per-task metrics of ``split``, then
        their means ``{split}/mean_auc`` and ``{split}/mean_score``."""
        aucs, scores, weights = [], [], []
        for t, spec in self.tasks.items():
            values = {}
            for name, metric in self._metrics(split, t).items():
                if metric.update_count == 0:
                    continue
                value = metric.compute()
                metric.reset()
                if name == "gauc" and bool(torch.isnan(value)):
                    if f"{split}/{t}" not in self._warned:
                        self._warned.add(f"{split}/{t}")
                        warnings.warn(f"{split}/{t}/gauc is undefined: no group holds both "
                                      "classes (e.g. every group is a single row); it is not "
                                      "logged", stacklevel=2)
                    continue
                values[name] = value
                self.log(f"{split}/{t}/{name}", value, prog_bar=split == "val"
                         and name in ("auc", "acc", "rmse"))
            key = {"binary": "auc", "multiclass": "acc", "regression": "r2"}[spec["type"]]
            if key in values:
                if key == "auc":
                    aucs.append(values[key])
                scores.append(values[key])
                weights.append(self.task_weights[t])
        if aucs:
            self.log(f"{split}/mean_auc", torch.stack(aucs).mean())
        if scores:
            w = torch.tensor(weights) if sum(weights) > 0 else torch.ones(len(scores))
            score = (torch.stack(scores).cpu().double() * w.double()).sum() / w.sum()
            self.log(f"{split}/mean_score", score.float(), prog_bar=split == "val")

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, out = self._step(batch, "val")
        if batch_idx == 0 and out.gates:
            diag = self.diagnostics(out)
            B = next(iter(out.outputs.values())).size(0)
            self.log_dict({f"val/{k}": v for k, v in multitask_summary(diag).items()},
                          batch_size=B, on_step=False, on_epoch=True)
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
