r"""Cross-fitting (stacking) of Mowst's experts: out-of-fold predictions of
both experts on every training node, from which the gate learns.

Why: the gate of Mowst learns which expert to trust from the difference of
their losses on a node. On a training node both experts have fit the label
(the weak MLP memorises it, the GNN too), so that difference says nothing
about an unseen node, where the gate is used (see
``experiments/results/mowst_diagnosis.md``). Splitting the training nodes
into :math:`K` folds and training a fresh copy of each expert on the other
folds gives, for every training node, the prediction of each expert that has
never seen it, the situation of a test node for both experts alike. The
final experts (trained on all training nodes) are what the gate is applied
to at test time.

Plain full-batch PyTorch, no Lightning: :class:`~moegraph.tasks.MowstTask`
calls :func:`crossfit_logits` once, before the gate's turn.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module

__all__ = ["CrossFit", "crossfit_logits", "fold_assignment", "reset_module"]


def fold_assignment(mask: Tensor, folds: int, seed: int) -> Tensor:
    r"""The fold of each node selected by ``mask``: a random permutation of
    those nodes (seeded by ``seed``, the same on every device) dealt out in
    turn, so that the folds are disjoint, cover the selected nodes and
    differ in size by one node at most; :obj:`-1` for the other nodes.

    Shapes:
        - **input:** ``mask [N]`` bool
        - **output:** ``[N]`` long, in ``[-1, folds)``
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"'folds' must be an integer of at least 2 (got {folds!r})")
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError("'mask' must be a one-dimensional bool tensor")
    index = mask.nonzero().view(-1).cpu()
    if index.numel() < folds:
        raise ValueError(f"cross-fitting with {folds} folds needs at least {folds} training "
                         f"nodes (got {index.numel()})")
    generator = torch.Generator().manual_seed(int(seed))
    order = index[torch.randperm(index.numel(), generator=generator)]
    fold = torch.full((mask.numel(),), -1, dtype=torch.long)
    fold[order] = torch.arange(order.numel()) % folds
    return fold.to(mask.device)


def reset_module(module: Module) -> None:
    r"""Re-initialise every sub-module that has ``reset_parameters``."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


class CrossFit(NamedTuple):
    r"""Out-of-fold logits of both experts.

    Attributes:
        weak_logits (Tensor): ``[N, C]``; row :math:`v` is the prediction of
            the weak expert trained without :math:`v`'s fold (zero outside the
            training nodes).
        strong_logits (Tensor): ``[N, C]``, the same for the strong expert.
        fold (Tensor): ``[N]`` the fold of each training node, :obj:`-1`
            elsewhere.
        epochs (list): epochs each fold's expert trained, as
            ``[(expert, fold, epochs, best validation score)]``.
    """

    weak_logits: Tensor
    strong_logits: Tensor
    fold: Tensor
    epochs: list


def _score(logits: Tensor, y: Tensor, metric: str) -> float:
    if metric == "auroc":
        from torchmetrics.functional.classification import binary_auroc
        return float(binary_auroc(logits.float().softmax(-1)[:, 1], y))
    return float((logits.argmax(-1) == y).float().mean())


def _fit_fold(model: Module, forward: Callable[[Module], Tensor], y: Tensor, fit: Tensor,
              val: Tensor, optimizer: torch.optim.Optimizer, max_epochs: int, patience: int,
              metric: str) -> tuple[int, float]:
    r"""Train ``model`` on the ``fit`` nodes, early-stopped on the ``val``
    nodes (or for ``max_epochs`` without them); leave it at its best epoch."""
    best, best_state, stale, done = -math.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        done = epoch
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(model)[fit].float(), y[fit])
        loss.backward()
        optimizer.step()
        if not bool(val.any()):
            continue
        model.eval()
        with torch.no_grad():
            score = _score(forward(model)[val], y[val], metric)
        if score > best:
            best, stale = score, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return done, best


def crossfit_logits(weak: Module, strong: Module, weak_forward: Callable[[Module], Tensor],
                    strong_forward: Callable[[Module], Tensor], y: Tensor, train_mask: Tensor,
                    val_mask: Tensor, folds: int, seed: int,
                    optimizer: Callable[..., torch.optim.Optimizer], max_epochs: tuple[int, int],
                    patience: int, metric: str = "acc",
                    fold: Optional[Tensor] = None) -> CrossFit:
    r"""Out-of-fold logits of both experts on the training nodes of one
    graph (full batch).

    For each fold :math:`k` of :func:`fold_assignment`, a fresh copy of each
    expert (re-initialised) is trained on the training nodes outside fold
    :math:`k`, early-stopped on the validation nodes (its own score,
    ``patience`` epochs without gain, ``max_epochs[i]`` at most for the weak
    (:math:`i=0`) and the strong (:math:`i=1`) expert), and predicts fold
    :math:`k`. The experts given are not changed.

    Args:
        weak, strong (Module): the experts (copied, never trained here).
        weak_forward, strong_forward (callable): ``model -> logits [N, C]`` on
            the whole graph.
        y (Tensor): labels ``[N]``.
        train_mask, val_mask (Tensor): ``[N]`` bool.
        folds (int): :math:`K \ge 2`.
        seed (int): seeds the folds.
        optimizer (callable): ``optimizer(params=...)`` makes an optimizer.
        max_epochs (tuple): epochs at most of the weak and the strong copies.
        patience (int): epochs without gain that stop a copy.
        metric (str, optional): ``"acc"`` or ``"auroc"``. (default: :obj:`"acc"`)
        fold (Tensor, optional): the folds, instead of drawing them.

    Shapes:
        - **output:** :class:`CrossFit` with ``[N, C]`` logits
    """
    if fold is None:
        fold = fold_assignment(train_mask, folds, seed)
    out: list[Tensor] = []
    epochs = []
    for name, expert, forward, budget in (("weak", weak, weak_forward, max_epochs[0]),
                                          ("strong", strong, strong_forward, max_epochs[1])):
        logits: Optional[Tensor] = None
        for k in range(folds):
            model = copy.deepcopy(expert)
            reset_module(model)
            model.requires_grad_(True)
            held = fold == k
            done, best = _fit_fold(model, forward, y, train_mask & ~held, val_mask,
                                   optimizer(params=list(model.parameters())), max(budget, 1),
                                   patience, metric)
            epochs.append((name, k, done, best))
            with torch.no_grad():
                pred = forward(model).detach().float()
            if logits is None:
                logits = torch.zeros_like(pred)
            logits[held] = pred[held]
        assert logits is not None
        out.append(logits)
    return CrossFit(out[0], out[1], fold, epochs)
