r"""Dispatch and combine: the one place where routed rows meet their experts.

Every sparse MoE layer of moegraph (:class:`~moegraph.nn.SparseMoE`,
:class:`~moegraph.nn.HopMoEConv`, :class:`~moegraph.nn.models.PatchMoE`) runs
the same steps, named as in MegaBlocks (Gale et al., 2023, `"MegaBlocks"
<https://arxiv.org/abs/2211.15841>`_):

1. :func:`apply_capacity`: drop the overflow of each expert when a capacity
   factor is set (dropless otherwise);
2. :func:`indices_and_bins`: sort the assignments by expert (stable, so
   within an expert in assignment order) and count them per expert;
3. :func:`permute_and_compute`: gather the rows in that order, run every
   expert once on its contiguous block, weight each output by its combine
   weight and :func:`combine` them back into their rows.

A layer whose experts need more than the rows (e.g. a graph aggregation
between the gather and the experts) calls 1, 2 and :func:`combine` and does
its own compute in between.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moegraph.nn.experts import Experts
from moegraph.nn.routing import Routing, count_index, drop_overflow, expert_capacity


class Bins(NamedTuple):
    r"""The assignments of a :class:`~moegraph.nn.routing.Routing` sorted by
    expert (``A`` assignments, ``E`` experts).

    Attributes:
        order (Tensor): ``[A]`` the sorting permutation of the assignments.
        rows (Tensor): ``[A]`` the row of each sorted assignment.
        experts (Tensor): ``[A]`` the expert of each sorted assignment
            (non-decreasing).
        weight (Tensor): ``[A]`` the combine weight of each sorted assignment.
        counts (Tensor): ``[E]`` assignments per expert: expert ``e`` owns the
            block ``counts[:e].sum() : counts[:e + 1].sum()``.
    """

    order: Tensor
    rows: Tensor
    experts: Tensor
    weight: Tensor
    counts: Tensor


def apply_capacity(routing: Routing, num_experts: int,
                   capacity_factor: Optional[float]) -> Routing:
    r"""Keep at most ``ceil(capacity_factor * A / E)`` assignments per expert
    (see :func:`~moegraph.nn.routing.drop_overflow`); the routing unchanged
    when ``capacity_factor`` is :obj:`None` (dropless) or it has no
    assignments."""
    if capacity_factor is None or routing.row.numel() == 0:
        return routing
    capacity = expert_capacity(routing.row.numel(), num_experts, capacity_factor)
    return drop_overflow(routing, capacity)


def indices_and_bins(routing: Routing, num_experts: int) -> Bins:
    r"""Sort the assignments of ``routing`` by expert and count them per
    expert (MegaBlocks' ``indices_and_bins``). The sort is stable: within an
    expert, assignments keep their order (rows ascending for the routers of
    :mod:`moegraph.nn.routing`)."""
    order = torch.argsort(routing.expert, stable=True)  # [A]
    counts = count_index(routing.expert, num_experts)  # [E], no host sync
    return Bins(order, routing.row[order], routing.expert[order], routing.weight[order], counts)


def combine(y_sorted: Tensor, rows: Tensor, num_rows: int, fixed_k: Optional[int] = None,
            deterministic: bool = False) -> Tensor:
    r"""Sum weighted expert outputs back into their rows.

    Args:
        y_sorted (Tensor): ``[A, O]`` weighted expert outputs, sorted by expert.
        rows (Tensor): ``[A]`` the row of each of them.
        num_rows (int): ``N``.
        fixed_k (int, optional): if every row has exactly ``k`` assignments,
            laid out row-major before sorting.
        deterministic (bool, optional): with ``fixed_k``, un-permute and sum
            over ``k`` instead of a scatter-add, which is deterministic on
            CUDA too (a CPU scatter-add already is). (default: :obj:`False`)
    """
    if deterministic and fixed_k is not None:
        # Group each row's k outputs together (their order within a row does
        # not matter for the sum), then reduce: a gather and a sum, no atomics.
        order = torch.argsort(rows, stable=True)  # [A]
        y = y_sorted.index_select(0, order).view(num_rows, fixed_k, y_sorted.size(-1))
        return y.sum(dim=1)  # [N, O]
    out = y_sorted.new_zeros(num_rows, y_sorted.size(-1))
    return out.index_add_(0, rows, y_sorted)


def permute_and_compute(x: Tensor, bins: Bins, experts: Experts, fixed_k: Optional[int] = None,
                        deterministic: bool = False) -> Tensor:
    r"""Run the experts on the rows routed to them and combine
    (MegaBlocks' ``permute_and_compute`` followed by the un-permute):

    .. math::
        \mathbf{y}_n = \sum_{a:\, \mathrm{row}_a = n} w_a\, e_{\mathrm{expert}_a}(\mathbf{x}_n)

    Args:
        x (Tensor): ``[N, ...]`` the rows.
        bins (Bins): the sorted assignments, from :func:`indices_and_bins`.
        experts (Experts): an expert bank, ``experts(x_sorted, counts,
            weight) -> y_sorted [A, O]``.
        fixed_k (int, optional): the routing's ``fixed_k``, see :func:`combine`.
        deterministic (bool, optional): see :func:`combine`.

    Returns:
        Tensor: ``[N, O]`` (zero for a row with no assignment).
    """
    if not deterministic:
        # A bank that gathers its rows and adds its outputs itself (the same
        # additions in the same order) spares the [A, F] and [A, O] copies.
        # With one assignment per row (top-1), the rows are a permutation.
        fused = getattr(experts, "gather_and_combine", None)
        out = None if fused is None else fused(x, bins.rows, bins.counts, bins.weight,
                                               unique=fixed_k == 1)
        if out is not None:
            return out
    y_sorted = experts(x.index_select(0, bins.rows), bins.counts, bins.weight)  # [A, O]
    return combine(y_sorted, bins.rows, x.size(0), fixed_k, deterministic)
