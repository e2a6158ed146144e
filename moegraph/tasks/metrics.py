r"""Metrics of the tasks: the metric a dataset is judged by (:data:`METRICS`),
the expected scores of Mowst's sampled inference and every Mowst score of a
split (:class:`MowstMetrics`), and GAUC (:class:`GroupAUROC`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Accuracy, Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, MultilabelAccuracy, MultilabelAUROC
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from moegraph.nn.mowst import MowstOutput, mixture_log_probs

METRICS = ("acc", "auroc")


class MeanTaskAUROC(MultilabelAUROC):
    r"""The ROC-AUC of each binary task, averaged over the tasks that hold
    both classes among their labelled entries (``-1``: unlabelled), as
    ``ogb``'s Evaluator does for ogbn-proteins (torchmetrics' ``"macro"``
    average counts a task without positives as 0); ``NaN`` when no task has
    both classes."""

    def __init__(self, num_labels: int, **kwargs: Any):
        super().__init__(num_labels=num_labels, average="none", ignore_index=-1, **kwargs)

    # as torchmetrics' own AUROC classes: their curve base class types compute() as curves
    def compute(self) -> Tensor:  # type: ignore[override]
        per_task = super().compute()
        target = dim_zero_cat(self.target)
        valid = (target == 1).any(0) & (target == 0).any(0)
        if not bool(valid.any()):
            return per_task.new_tensor(float("nan"))
        return per_task[valid].mean()


def make_metrics(metric: str, num_classes: int, multilabel: bool = False) -> MetricCollection:
    r"""Accuracy, plus binary ROC-AUC (on the positive-class probability)
    when ``metric="auroc"``. With ``multilabel``, ``num_classes`` binary
    tasks: the accuracy and (``metric="auroc"``) the ROC-AUC of each task,
    averaged over the tasks (:class:`MeanTaskAUROC`), the entries labelled
    ``-1`` ignored."""
    if metric not in METRICS:
        raise ValueError(f"'metric' must be one of {METRICS} (got {metric!r})")
    if multilabel:
        metrics_ml: dict[str, Metric | MetricCollection] = {
            "acc": MultilabelAccuracy(num_labels=num_classes, ignore_index=-1)}
        if metric == "auroc":
            metrics_ml["auroc"] = MeanTaskAUROC(num_classes)
        return MetricCollection(metrics_ml)
    metrics: dict[str, Metric | MetricCollection] = {
        "acc": Accuracy(task="multiclass", num_classes=num_classes)}
    if metric == "auroc":
        if num_classes != 2:
            raise ValueError(f"metric 'auroc' needs two classes (got {num_classes})")
        metrics["auroc"] = BinaryAUROC()
    return MetricCollection(metrics)


def update_metrics(metrics: MetricCollection, logits: Tensor, target: Tensor,
                   multilabel: bool = False) -> None:
    r"""Feed class scores ``[N, C]`` to each metric in the form it takes
    (with ``multilabel``: the probabilities of the ``C`` tasks, and targets
    in ``{-1, 0, 1}``)."""
    if multilabel:
        probs = logits.float().sigmoid()
        for metric in metrics.values():
            metric.update(probs, target)
        return
    for name, metric in metrics.items(keep_base=True):
        if name.endswith("auroc"):
            metric.update(logits.float().softmax(-1)[:, 1], target)
        else:
            metric.update(logits, target)


def expected_accuracy(weak_logits: Tensor, strong_logits: Tensor, confidence: Tensor,
                      target: Tensor) -> Tensor:
    r"""Expected accuracy of Mowst's sampled prediction (weak with probability
    :math:`C_v`): :math:`\frac{1}{|V|}\sum_v C_v [\hat y^w_v = y_v]
    + (1 - C_v)[\hat y^s_v = y_v]`."""
    weak_ok = (weak_logits.argmax(-1) == target).float()
    strong_ok = (strong_logits.argmax(-1) == target).float()
    return (confidence * weak_ok + (1 - confidence) * strong_ok).mean()


def _count_less(values: Tensor, sorted_ref: Tensor, prefix: Tensor) -> tuple[Tensor, Tensor]:
    r"""For each value: the weight of ``sorted_ref`` strictly below it and equal to
    it, given ``prefix`` (cumulative weights with a leading zero)."""
    lo = torch.searchsorted(sorted_ref, values, right=False)
    hi = torch.searchsorted(sorted_ref, values, right=True)
    return prefix[lo], prefix[hi] - prefix[lo]


def expected_binary_auroc(weak_scores: Tensor, strong_scores: Tensor, confidence: Tensor,
                          target: Tensor) -> Tensor:
    r"""Exact expected ROC-AUC of Mowst's sampled prediction, each node scored
    by the weak expert with probability :math:`C_v` and by the strong one
    otherwise, independently:

    .. math::
        \mathbb{E}[\mathrm{AUC}] = \frac{1}{|P||N|}\sum_{i\in P}\sum_{j\in N}
        \sum_{a, b \in \{w, s\}} \pi^a_i \pi^b_j \big([s^a_i > s^b_j]
        + \tfrac12 [s^a_i = s^b_j]\big)

    computed in :math:`O(n \log n)` by sorting. ``NaN`` when a class is absent.
    """
    pos = target == 1
    neg = ~pos
    if not pos.any() or not neg.any():
        return weak_scores.new_tensor(float("nan"))
    c = confidence.double()
    s_w, s_s = weak_scores.double(), strong_scores.double()
    total = s_w.new_zeros(())
    for s_neg, w_neg in ((s_w[neg], c[neg]), (s_s[neg], 1 - c[neg])):
        order = s_neg.argsort()
        ref, weights = s_neg[order], w_neg[order]
        prefix = torch.cat([weights.new_zeros(1), weights.cumsum(0)])
        for s_pos, w_pos in ((s_w[pos], c[pos]), (s_s[pos], 1 - c[pos])):
            below, equal = _count_less(s_pos, ref, prefix)
            total = total + (w_pos * (below + 0.5 * equal)).sum()
    return (total / (pos.sum() * neg.sum())).float()


class MowstMetrics(Metric):
    r"""Every score of a Mowst model on one split, from the experts' logits
    and the confidence of each node:

    - ``expected``: expectation of the metric under Mowst's sampled inference
      (weak expert with probability :math:`C_v`), exact for accuracy
      and ROC-AUC;
    - ``tau``: the deterministic prediction (weak where :math:`C_v \ge \tau`);
    - ``mixture``: the argmax (or positive probability) of the Mowst* mixture;
    - ``weak`` and ``strong``: each expert alone;
    - ``confidence`` (mean :math:`C`) and ``confident`` (share with
      :math:`C \ge \tau`).
    """

    full_state_update = False
    weak: list[Tensor]
    strong: list[Tensor]
    gate: list[Tensor]
    target: list[Tensor]
    num_updates: Tensor

    def __init__(self, metric: str = "acc", threshold: float = 0.5):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"'metric' must be one of {METRICS} (got {metric!r})")
        self.metric = metric
        self.threshold = threshold
        for name in ("weak", "strong", "gate", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Its own count of updates (torchmetrics keeps one privately), summed
        # across processes and carried by a checkpoint with the other states.
        self.add_state("num_updates", default=torch.zeros((), dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, out: MowstOutput, target: Tensor) -> None:
        self.weak.append(out.weak_logits.detach().float())
        self.strong.append(out.strong_logits.detach().float())
        self.gate.append(out.gate_logit.detach().float())
        self.target.append(target.detach())
        self.num_updates += 1

    def compute(self) -> dict[str, Tensor]:
        cat = (lambda v: torch.cat(v) if isinstance(v, list) else v)  # noqa: E731
        weak, strong, gate, target = (cat(self.weak), cat(self.strong), cat(self.gate),
                                      cat(self.target))
        c = torch.sigmoid(gate)
        confident = c >= self.threshold
        mixture = mixture_log_probs(weak, strong, gate)
        if self.metric == "acc":
            def score(logits: Tensor) -> Tensor:
                return (logits.argmax(-1) == target).float().mean()
            expected = expected_accuracy(weak, strong, c, target)
        else:
            def score(logits: Tensor) -> Tensor:
                return binary_auroc(logits.softmax(-1)[:, 1], target)
            expected = expected_binary_auroc(weak.softmax(-1)[:, 1], strong.softmax(-1)[:, 1],
                                             c, target)
        tau = torch.where(confident.unsqueeze(-1), weak.log_softmax(-1), strong.log_softmax(-1))
        return {"expected": expected, "tau": score(tau), "mixture": score(mixture),
                "weak": score(weak), "strong": score(strong), "confidence": c.mean(),
                "confident": confident.float().mean()}


def grouped_auc(preds: Tensor, target: Tensor, group: Tensor) -> tuple[Tensor, int]:
    r"""GAUC: the ROC AUC within each group (user), averaged over the groups
    that hold both classes (unweighted); ties count one half.

    Per group, :math:`\mathrm{AUC} = (\sum_{i \in +} r_i - P(P+1)/2) / (P\,Q)`
    with :math:`r_i` the within-group rank of positive :math:`i` (ties
    averaged), :math:`P` positives and :math:`Q` negatives.

    Returns:
        the mean AUC (``nan`` when no group has both classes) and the number
        of groups averaged.
    """
    preds, target, group = preds.detach().double(), target.detach().bool(), group.detach()
    if preds.numel() == 0:
        return preds.new_tensor(float("nan")), 0
    _, group = torch.unique(group, return_inverse=True)
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, then score
    g, p, t = group[order], preds[order], target[order]
    # Average rank within runs of equal (group, score).
    new_run = torch.ones_like(g, dtype=torch.bool)
    new_run[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    run = torch.cumsum(new_run, 0) - 1
    counts = torch.bincount(g)
    start = torch.cumsum(counts, 0) - counts
    pos_in_group = torch.arange(g.numel(), device=g.device) - start[g] + 1  # 1-based
    run_sum = torch.zeros(int(run[-1]) + 1, dtype=torch.double,
                          device=g.device).index_add_(0, run, pos_in_group.double())
    run_len = torch.bincount(run).double()
    rank = (run_sum / run_len)[run]
    P = torch.bincount(g, weights=t.double(), minlength=counts.numel())
    Q = counts.double() - P
    rank_pos = torch.zeros_like(P).index_add_(0, g, rank * t.double())
    valid = (P > 0) & (Q > 0)
    if not bool(valid.any()):
        return preds.new_tensor(float("nan")), 0
    auc = (rank_pos[valid] - P[valid] * (P[valid] + 1) / 2) / (P[valid] * Q[valid])
    return auc.mean().float(), int(valid.sum())


class GroupAUROC(Metric):
    r"""GAUC (see :func:`grouped_auc`) as a torchmetrics metric; ``update``
    takes ``(preds, target, group)``."""

    full_state_update = False
    higher_is_better = True
    preds: list[Tensor]
    target: list[Tensor]
    group: list[Tensor]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, group: Tensor) -> None:
        self.preds.append(preds.detach().float())
        self.target.append(target.detach())
        self.group.append(group.detach())

    def compute(self) -> Tensor:
        cat = lambda v: torch.cat(v) if isinstance(v, list) else v  # noqa: E731
        return grouped_auc(cat(self.preds), cat(self.target), cat(self.group))[0]
