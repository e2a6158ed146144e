r"""Graph-level (multi-label) classification as a LightningModule, scored by
OGB's :class:`~ogb.graphproppred.Evaluator`."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.data import Batch

from moegraph.nn.output import ModelOutput, as_model_output
from moegraph.tasks.common import build_optimizers
from moegraph.tasks.node_classification import check_aux_loss_weights, weighted_aux_loss


def masked_bce_with_logits(logits: Tensor, y: Tensor) -> Tensor:
    r"""Binary cross-entropy averaged over the labelled entries of ``y``
    (NaN: missing label, as in OGB's multi-task sets):

    .. math::
        \mathcal{L} = \frac{1}{|\Omega|}\sum_{(g, t) \in \Omega}
        \mathrm{BCE}(\sigma(z_{g,t}), y_{g,t}), \quad
        \Omega = \{(g, t) : y_{g,t} \ne \mathrm{NaN}\}

    Zero (with a gradient path) when nothing is labelled.

    Shapes:
        - **input:** ``logits [B, T]``, ``y [B, T]``
        - **output:** scalar
    """
    if logits.shape != y.shape:
        raise ValueError(f"'logits' {tuple(logits.shape)} and 'y' {tuple(y.shape)} must have "
                         f"the same shape [num_graphs, num_tasks]")
    labelled = ~torch.isnan(y)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[labelled].float(), y[labelled].float())


class GraphClassificationTask(L.LightningModule):
    r"""Graph-level binary (multi-label) classification on batches of many
    small graphs.

    The network is called as ``net(x, edge_index, edge_attr, batch,
    num_graphs)`` and returns ``logits [B, T]`` or a
    :class:`~moegraph.nn.output.ModelOutput`. The loss is the binary
    cross-entropy over the labelled entries (:func:`masked_bce_with_logits`)
    plus the weighted auxiliary losses of the routers. Validation and test
    predictions of an epoch are scored together by OGB's
    :class:`~ogb.graphproppred.Evaluator` of ``evaluator`` (ROC-AUC for
    ogbg-molhiv: per task over its labelled graphs, averaged over tasks),
    logged as ``{split}/<metric>`` (e.g. ``val/rocauc``); ``{split}/loss``
    too, and ``train/aux_loss``, ``train/aux/<name>``.

    Args:
        net (Module): the network.
        num_tasks (int): number of binary tasks :math:`T`.
        optimizer (callable): partial optimizer, called with the parameters.
        scheduler (callable, optional): partial LR scheduler.
        aux_loss_weights (dict, optional): weight of each auxiliary loss by name.
        evaluator (str, optional): OGB dataset name whose evaluator scores
            the predictions. (default: :obj:`"ogbg-molhiv"`)
    """

    def __init__(self, net: Module, num_tasks: int,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 aux_loss_weights: Optional[dict[str, float]] = None,
                 evaluator: str = "ogbg-molhiv"):
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"'num_tasks' must be a positive integer (got {num_tasks})")
        from ogb.graphproppred import Evaluator

        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.num_tasks = num_tasks
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.aux_loss_weights = check_aux_loss_weights(aux_loss_weights)
        self.evaluator = Evaluator(evaluator)
        if self.evaluator.num_tasks != num_tasks:
            raise ValueError(f"evaluator {evaluator!r} scores {self.evaluator.num_tasks} tasks, "
                             f"the data has num_tasks={num_tasks}")
        self.metric = self.evaluator.eval_metric
        self._outputs: dict[str, list[tuple[Tensor, Tensor]]] = {"val": [], "test": []}

    def forward(self, data: Batch) -> ModelOutput:
        return as_model_output(self.net(data.x, data.edge_index, data.get("edge_attr"),
                                        data.batch, data.num_graphs))

    def score(self, y_true: Tensor, y_pred: Tensor) -> float:
        r"""OGB's evaluator on ``y_true [G, T]`` (NaN: missing) and scores
        ``y_pred [G, T]``; NaN (with a warning) where no task has both
        classes among its labelled graphs (e.g. a tiny smoke-run batch)."""
        y_true, y_pred = y_true.detach().float().cpu(), y_pred.detach().float().cpu()
        if self.metric == "rocauc":
            labelled = ~torch.isnan(y_true)
            both = [bool((y_true[labelled[:, t], t] == 1).any()
                         and (y_true[labelled[:, t], t] == 0).any())
                    for t in range(y_true.size(1))]
            if not any(both):
                warnings.warn("ROC-AUC undefined: no task has both classes among the labelled "
                              "graphs", stacklevel=2)
                return float("nan")
        result = self.evaluator.eval({"y_true": y_true.numpy(), "y_pred": y_pred.numpy()})
        return float(result[self.metric])

    def _step(self, data: Batch, split: str) -> Tensor:
        out = self(data)
        y = data.y.view(out.logits.shape).float()
        loss = masked_bce_with_logits(out.logits, y)
        self.log(f"{split}/loss", loss, batch_size=data.num_graphs, prog_bar=split != "test",
                 on_step=split == "train", on_epoch=True)
        if split != "train":
            self._outputs[split].append((y.detach().cpu(), out.logits.detach().float().cpu()))
            return loss
        aux = weighted_aux_loss(out.aux_loss, self.aux_loss_weights, loss)
        self.log("train/aux_loss", aux, batch_size=data.num_graphs)
        for name, value in out.aux_loss.items():
            self.log(f"train/aux/{name}", value, batch_size=data.num_graphs)
        return loss + aux

    def _epoch_end(self, split: str) -> None:
        outputs, self._outputs[split] = self._outputs[split], []
        if not outputs:
            return
        y_true = torch.cat([y for y, _ in outputs])
        y_pred = torch.cat([p for _, p in outputs])
        if self._trainer is not None and self._trainer.world_size > 1:  # DDP: all graphs
            y_true = cast(Tensor, self.all_gather(y_true)).flatten(0, 1)
            y_pred = cast(Tensor, self.all_gather(y_pred)).flatten(0, 1)
        self.log(f"{split}/{self.metric}", self.score(y_true, y_pred), prog_bar=True)

    def training_step(self, data: Batch, batch_idx: int) -> Tensor:
        return self._step(data, "train")

    def validation_step(self, data: Batch, batch_idx: int) -> Tensor:
        return self._step(data, "val")

    def test_step(self, data: Batch, batch_idx: int) -> Tensor:
        return self._step(data, "test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, data: Batch, batch_idx: int) -> Tensor:
        return torch.sigmoid(self(data).logits)

    @torch.no_grad()
    def write_diagnostics(self, datamodule, output_dir: Path) -> dict[str, float]:
        r"""After training, for a model with routed layers: the per-expert
        load of each layer over the test graphs (``expert_load.json``,
        ``[layers, experts]`` shares) and the share of assignments that went
        to hop-2 experts (``diag/hop2_share``), over all layers."""
        from moegraph.diagnostics import format_expert_load
        from moegraph.nn.conv.hop_moe import HopMoEConv

        self.eval()
        loads: Optional[Tensor] = None
        for data in datamodule.test_dataloader():
            routing = self(data.to(self.device)).routing
            if not routing:
                return {}
            load = torch.stack([r.load.detach().float().cpu() for r in routing])  # [L, E]
            loads = load if loads is None else loads + load
        if loads is None:
            return {}
        share = loads / loads.sum(1, keepdim=True).clamp_min(1.0)
        print("[moegraph] per-expert load on the test graphs (% of assignments):")
        print(format_expert_load(share))
        (Path(output_dir) / "expert_load.json").write_text(json.dumps(share.tolist()))
        convs = [m for m in self.net.modules() if isinstance(m, HopMoEConv)]
        metrics = {}
        if len(convs) == loads.size(0):
            hop2 = sum(float(loads[i, c.num_hop1_experts:].sum()) for i, c in enumerate(convs))
            metrics["diag/hop2_share"] = hop2 / max(float(loads.sum()), 1.0)
        metrics["diag/max_over_mean_load"] = float((share.max(1).values
                                                    * share.size(1)).mean())
        return metrics

    def configure_optimizers(self):
        return build_optimizers(self.optimizer_factory, self.scheduler_factory,
                                self.parameters())
