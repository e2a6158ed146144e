r"""Optimisers that ``torch.optim`` does not ship, for the training
procedures of the papers moegraph reproduces."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

NORMALIZE = ("none", "tensor", "slice")


class NormalizedGD(torch.optim.Optimizer):
    r"""Gradient descent whose step has a fixed length: normalised gradient
    descent, as Chen et al. (2022) train the experts of their mixture
    (`"Towards Understanding the Mixture-of-Experts Layer in Deep Learning"
    <https://arxiv.org/abs/2208.02813>`_):

    .. math::
        \mathbf{W} \leftarrow \mathbf{W} - \eta\,
        \frac{\nabla_{\mathbf{W}} L}{\|\nabla_{\mathbf{W}} L\|_F}

    ``normalize`` (a per-group option) says over what the norm is taken:
    ``"tensor"`` the whole parameter, ``"slice"`` each slice along the first
    dimension on its own (each expert of a ``[E, ...]`` expert bank moves by
    ``lr``, whatever share of the samples it was given), ``"none"`` plain
    gradient descent (for the router, which the paper trains by gradient
    descent at its own rate: give it a group of its own). A zero gradient
    (slice) leaves its parameters unchanged.

    Args:
        params (iterable): parameters or groups of parameters (``dict``).
        lr (float): step length :math:`\eta`.
        normalize (str, optional): ``"slice"``, ``"tensor"`` or ``"none"``.
            (default: :obj:`"slice"`)
        eps (float, optional): added to the norm. (default: :obj:`1e-12`)
    """

    def __init__(self, params: Iterable[Any], lr: float, normalize: str = "slice",
                 eps: float = 1e-12):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"'lr' must be a positive number (got {lr!r})")
        _check_normalize(normalize)
        super().__init__(params, {"lr": float(lr), "normalize": normalize, "eps": eps})
        for group in self.param_groups:
            _check_normalize(group["normalize"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(_normalized(p.grad, group["normalize"], group["eps"]), alpha=-group["lr"])
        return loss


def _check_normalize(normalize: Any) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"'normalize' must be one of {NORMALIZE} (got {normalize!r})")


def _normalized(grad: Tensor, normalize: str, eps: float) -> Tensor:
    if normalize == "none":
        return grad
    if normalize == "tensor" or grad.dim() < 2:
        return grad / (grad.norm() + eps)
    norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return grad / (norms + eps)
