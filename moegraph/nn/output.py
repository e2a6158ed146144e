r"""The record every moegraph model returns beside its predictions."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from moegraph.nn.routing import Routing


class ModelOutput(NamedTuple):
    r"""Predictions plus what a task or a diagnostic needs to know about them.

    Attributes:
        logits (Tensor): ``[N, C]`` class scores (or ``[N]`` for one output).
        aux_loss (dict): unweighted auxiliary losses by name, summed over
            layers; the task weights and logs them.
        routing (tuple of Routing): one routing record per MoE layer, in order.
        confidence (Tensor, optional): ``[N]`` per-node confidence of a gated
            model (Mowst), :obj:`None` otherwise.
    """

    logits: Tensor
    aux_loss: dict[str, Tensor] = {}
    routing: tuple[Routing, ...] = ()
    confidence: Optional[Tensor] = None


def as_model_output(out) -> ModelOutput:
    r"""Wrap a plain tensor returned by any PyG model into a :class:`ModelOutput`."""
    if isinstance(out, ModelOutput):
        return out
    if isinstance(out, Tensor):
        return ModelOutput(out)
    raise TypeError(f"a model must return a Tensor or a ModelOutput (got {type(out).__name__})")
