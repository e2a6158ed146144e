r"""Routers for sparse Mixture-of-Experts layers.

A router only routes: it maps rows ``x`` of shape ``[N, F]`` (nodes, edges or
tokens) to a list of *assignments* ``(row, expert, weight)`` and returns the
auxiliary losses that keep the routing healthy. It never runs experts and
never stores state between calls; the layer that owns it dispatches, runs the
experts and combines (see :class:`moegraph.nn.SparseMoE`).

Routing is computed in float32 with autocast disabled, whatever precision the
experts run in.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter

from moegraph.utils.checks import check_int, check_positive_float

AUX_LOSS_NAMES = ("load_balance", "z_loss", "importance", "entropy")
"""Names of the auxiliary losses a router can return (unweighted)."""


def count_index(index: Tensor, size: int) -> Tensor:
    r"""How often each value in ``[0, size)`` occurs in ``index`` (int64
    ``[size]``): :func:`torch.bincount` with ``minlength=size`` for indices
    known to be below ``size``, without its host synchronisation on CUDA
    (``bincount`` reads the maximum to size its output)."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.long))


class Routing(NamedTuple):
    r"""The routing decision for ``N`` rows over ``E`` experts.

    Assignments are stored flat (``A`` of them): assignment ``a`` sends row
    ``row[a]`` to expert ``expert[a]`` with combine weight ``weight[a]``. This
    covers a fixed number of experts per row (top-k), a variable number
    (top-p, null experts, dropped overflow) and expert-chosen rows alike.

    Attributes:
        row (Tensor): ``[A]`` row index of each assignment.
        expert (Tensor): ``[A]`` expert index of each assignment, in ``[0, E)``.
            Null experts never appear here: they cost nothing.
        weight (Tensor): ``[A]`` float32 combine weight of each assignment.
        probs (Tensor): ``[N, E + E_null]`` float32 router probabilities.
        load (Tensor): ``[E]`` float32 number of assignments per expert.
        aux_loss (dict): unweighted auxiliary losses by name (see
            :data:`AUX_LOSS_NAMES`); zero tensors in eval mode.
        fixed_k (int, optional): if set, the assignments are laid out row-major
            with exactly ``fixed_k`` per row (``row == arange(N).repeat_interleave(k)``),
            which lets the layer combine without a scatter.
        dropped (Tensor, optional): number of assignments dropped for lack of
            capacity, when a capacity was applied.
    """

    row: Tensor
    expert: Tensor
    weight: Tensor
    probs: Tensor
    load: Tensor
    aux_loss: dict[str, Tensor]
    fixed_k: Optional[int] = None
    dropped: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.probs.size(0)

    @property
    def num_experts(self) -> int:
        return self.load.numel()

    def experts_per_row(self) -> Tensor:
        r"""Number of real experts each row was sent to, ``[N]``."""
        return torch.bincount(self.row, minlength=self.num_rows)

    def dense_weight(self) -> Tensor:
        r"""Combine weights as a dense ``[N, E]`` matrix (zero where not routed).

        Meant for diagnostics and tests, not for the forward pass.
        """
        out = self.weight.new_zeros(self.num_rows, self.num_experts)
        return out.index_put_((self.row, self.expert), self.weight, accumulate=True)


# Auxiliary losses ############################################################


def load_balancing_loss(probs: Tensor, top1: Tensor) -> Tensor:
    r"""Switch Transformer load-balancing loss (Fedus et al., 2021).

    .. math::
        \mathcal{L}_{\text{balance}} = E \sum_{i=1}^{E} f_i P_i,

    with :math:`f_i` the fraction of rows whose first choice is expert
    :math:`i` and :math:`P_i` the mean router probability of expert :math:`i`.
    Equals 1 under perfectly uniform routing.

    Args:
        probs (Tensor): router probabilities ``[N, E]``.
        top1 (Tensor): first-choice expert of each row ``[N]``.
    """
    N, E = probs.shape
    if N == 0:
        return probs.new_zeros(())
    f = count_index(top1, E).to(probs.dtype) / N
    P = probs.mean(dim=0)
    return E * (f * P).sum()


Z_LOSS_QUADRATIC_UP_TO = 1e4
r"""Beyond this ``|log-sum-exp|`` the z-loss grows logarithmically, not
quadratically, so that it stays finite for any finite router logits."""


def z_loss(logits: Tensor) -> Tensor:
    r"""Router z-loss of ST-MoE (Zoph et al., 2022):
    :math:`\frac{1}{N}\sum_n \phi\big(\log\sum_i e^{z_{ni}}\big)` with
    :math:`\phi(l) = l^2` for :math:`|l| \le T`
    (:data:`Z_LOSS_QUADRATIC_UP_TO`, far above any healthy router) and
    :math:`T^2 (1 + 2 \log(|l| / T))` beyond: same value and slope at
    :math:`T`, still pulling the logits down, but finite (and with finite
    gradients) for finite logits of any size, where :math:`l^2` overflows
    float32 from :math:`|l| \approx 1.8 \cdot 10^{19}`."""
    if logits.size(0) == 0:
        return logits.new_zeros(())
    lse = torch.logsumexp(logits, dim=-1).abs()  # [N]
    T = Z_LOSS_QUADRATIC_UP_TO
    big = lse > T
    # Each branch is evaluated where it is not selected too: keep both finite.
    quadratic = torch.where(big, T, lse).pow(2)
    logarithmic = T * T * (1 + 2 * torch.log(torch.where(big, lse, T) / T))
    return torch.where(big, logarithmic, quadratic).mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    r"""Squared coefficient of variation :math:`\mathrm{Var}(x) / \mathrm{mean}(x)^2`,
    with the unbiased variance as in Shazeer et al. (2017); zero for one element."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean().pow(2) + eps)


def importance_loss(gates: Tensor, load: Tensor) -> Tensor:
    r"""Balance loss of Shazeer et al. (2017):
    :math:`\mathrm{CV}(\text{importance})^2 + \mathrm{CV}(\text{load})^2`.

    Args:
        gates (Tensor): dense combine weights ``[N, E]``; importance is their
            column sum.
        load (Tensor): per-expert load ``[E]`` (the smooth estimator under
            noisy gating, otherwise assignment counts).
    """
    return cv_squared(gates.sum(dim=0)) + cv_squared(load)


def check_balance_groups(groups: Optional[Sequence[int]], num_experts: int,
                         num_null_experts: int = 0) -> Optional[tuple[int, ...]]:
    r"""``groups`` as a tuple of positive ints summing to ``num_experts``
    (:obj:`None` stays :obj:`None`); raises a :class:`ValueError` otherwise,
    or when the router has null experts."""
    if groups is None:
        return None
    sizes = tuple(groups)
    if (len(sizes) == 0 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                                   for g in sizes)):
        raise ValueError(f"'balance_groups' must be a non-empty list of positive ints "
                         f"(got {groups!r})")
    if sum(sizes) != num_experts:
        raise ValueError(f"'balance_groups' {list(sizes)} must sum to num_experts={num_experts} "
                         f"(got {sum(sizes)})")
    if num_null_experts > 0:
        raise ValueError("'balance_groups' cannot be combined with null experts")
    return sizes


def _group_slices(groups: Sequence[int]) -> list[slice]:
    slices, start = [], 0
    for size in groups:
        slices.append(slice(start, start + size))
        start += size
    return slices


def _group_shares(top1: Tensor, groups: Sequence[int]) -> list[tuple[slice, Tensor, Tensor]]:
    r"""Each group's slice, the mask of the rows whose first choice is in it
    and the share of those rows (a constant: no gradient)."""
    N = max(top1.numel(), 1)
    out = []
    for g in _group_slices(groups):
        inside = (top1 >= g.start) & (top1 < g.stop)
        out.append((g, inside, inside.sum().to(torch.float32) / N))
    return out


def grouped_importance_loss(gates: Tensor, load: Tensor, top1: Tensor,
                            groups: Optional[Sequence[int]] = None) -> Tensor:
    r""":func:`importance_loss` of each group of consecutive experts
    (``groups``: their sizes), weighted by the share of rows whose first
    choice (``top1 [N]``) is in the group: 0 when the routing is balanced
    within every group, whatever the share each group gets. The plain loss
    when ``groups`` is :obj:`None`."""
    if groups is None:
        return importance_loss(gates, load)
    total = gates.new_zeros(())
    for g, _, share in _group_shares(top1, groups):
        total = total + share.to(gates.dtype) * importance_loss(gates[:, g], load[g])
    return total


def grouped_load_balancing_loss(probs: Tensor, top1: Tensor,
                                groups: Optional[Sequence[int]] = None) -> Tensor:
    r""":func:`load_balancing_loss` of each group of consecutive experts over
    the rows whose first choice is in it, with the probabilities renormalised
    over the group, weighted by the group's share of those rows: 1 under
    uniform routing within every group, whatever the share each group gets.
    The plain loss when ``groups`` is :obj:`None`.

    With :math:`n_g` rows in group :math:`g` of :math:`E_g` experts, each
    group adds :math:`\frac{n_g}{N} E_g \sum_{i \in g} f_i P_i` with
    :math:`f_i` and :math:`P_i` over those rows, which is
    :math:`\frac{E_g}{N n_g} \sum_{i \in g} c_i \sum_{r \in g} q_{ri}`
    (:math:`c_i` the rows whose first choice is :math:`i`, :math:`q` the
    probabilities renormalised over the group): computed with the rows
    masked by multiplication, not selected, so that there is no host sync on
    CUDA."""
    if groups is None:
        return load_balancing_loss(probs, top1)
    N = probs.size(0)
    if N == 0:
        return probs.new_zeros(())
    counts = count_index(top1, probs.size(1)).to(probs.dtype)  # [E]
    total = probs.new_zeros(())
    for g, inside, _ in _group_shares(top1, groups):
        q = probs[:, g]
        q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # [N, E_g]
        mask = inside.to(probs.dtype)
        rows = mask.sum().clamp_min(1.0)  # n_g (no rows: every c_i is 0)
        summed = (q * mask.unsqueeze(-1)).sum(dim=0)  # [E_g]: sum over the group's rows
        total = total + (q.size(1) / (N * rows)) * (counts[g] * summed).sum()
    return total


def entropy_loss(probs: Tensor) -> Tensor:
    r"""Mean entropy of the router distribution, the "dynamic loss" of top-p
    routing (Huang et al., 2024) that keeps the router from going uniform."""
    if probs.size(0) == 0:
        return probs.new_zeros(())
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()


def sum_aux_losses(routings: Iterable[Routing]) -> dict[str, Tensor]:
    r"""Sum the auxiliary losses of several routings (e.g. one per layer) by name."""
    total: dict[str, Tensor] = {}
    for routing in routings:
        for name, value in routing.aux_loss.items():
            total[name] = total[name] + value if name in total else value
    return total


# Capacity ####################################################################


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    r"""Per-expert capacity ``ceil(capacity_factor * A / E)`` for ``A`` assignments
    (``A = N * k`` for top-k routing)."""
    return math.ceil(capacity_factor * num_assignments / num_experts)


def drop_overflow(routing: Routing, capacity: int) -> Routing:
    r"""Keep at most ``capacity`` assignments per expert, dropping the rest
    deterministically.

    Priority follows GShard / Switch: all first choices come before all second
    choices, and so on; within the same choice rank, lower row index first. A
    dropped assignment contributes nothing to its row (its weight is not given
    to the other experts). The routing must list each row's assignments
    together, rows in ascending order, best choice first (as
    :class:`TopKRouter` and :class:`TopPRouter` do).
    """
    if capacity < 0:
        raise ValueError(f"'capacity' must be non-negative (got {capacity})")
    A, N, E = routing.row.numel(), routing.num_rows, routing.num_experts
    device = routing.row.device
    # Rank of each assignment within its row (0 = first choice).
    per_row = count_index(routing.row, N)
    start = torch.cumsum(per_row, 0) - per_row
    rank = torch.arange(A, device=device) - start[routing.row]
    # Order by (expert, rank, row) with two stable sorts.
    order = torch.argsort(rank * max(N, 1) + routing.row, stable=True)
    order = order[torch.argsort(routing.expert[order], stable=True)]
    counts = count_index(routing.expert, E)
    expert_start = torch.cumsum(counts, 0) - counts
    sorted_expert = routing.expert[order]
    position = torch.arange(A, device=device) - expert_start[sorted_expert]
    keep = torch.zeros(A, dtype=torch.bool, device=device)
    keep[order] = position < capacity
    expert = routing.expert[keep]
    return routing._replace(
        row=routing.row[keep],
        expert=expert,
        weight=routing.weight[keep],
        load=count_index(expert, E).to(routing.load.dtype),
        fixed_k=None,
        dropped=(~keep).sum(),
    )


# Routers #####################################################################


class Router(Module):
    r"""Base class of the routers: a float32 linear gate ``logits = x W_g^T``
    plus the checks every router shares."""

    def __init__(self, in_channels: int, num_experts: int, num_null_experts: int = 0):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_experts = check_int("num_experts", num_experts)
        num_null_experts = check_int("num_null_experts", num_null_experts, low=0)
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.num_null_experts = num_null_experts
        self.weight = Parameter(torch.empty(num_experts + num_null_experts, in_channels))

    @property
    def num_total_experts(self) -> int:
        return self.num_experts + self.num_null_experts

    def reset_parameters(self):
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _check_input(self, x: Tensor):
        if not isinstance(x, Tensor):
            raise TypeError(f"'x' must be a tensor (got {type(x).__name__})")
        if x.dim() != 2:
            raise ValueError(
                f"'x' must be 2-D [num_rows, in_channels] (got shape {tuple(x.shape)})")
        if x.size(1) != self.in_channels:
            raise ValueError(f"'x' has {x.size(1)} features but {self.__class__.__name__} "
                             f"expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"'x' must be a floating-point tensor (got {x.dtype}); "
                            f"convert integer or boolean features with x.float()")

    def _logits(self, x: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        r"""Float32 logits, autocast off. Raises on non-finite values."""
        weight = self.weight if weight is None else weight
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), weight.float())
        # NaN propagates through max and min, and +-Inf shows in one of them:
        # two reductions, no [N, E] temporaries; one host sync.
        if (not torch.compiler.is_compiling() and logits.numel() > 0
                and not bool(torch.isfinite(torch.stack([logits.amax(), logits.amin()])).all())):
            bad = int((~torch.isfinite(logits).all(dim=-1)).sum())
            raise ValueError(f"{self.__class__.__name__} got non-finite router logits in {bad} "
                             f"row(s): 'x' contains NaN or Inf")
        return logits

    def _drop_null(self, row: Tensor, expert: Tensor, weight: Tensor,
                   fixed_k: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Optional[int]]:
        r"""Drop assignments to null experts."""
        if self.num_null_experts > 0:
            real = expert < self.num_experts
            row, expert, weight = row[real], expert[real], weight[real]
            fixed_k = None
        return row, expert, weight, fixed_k

    def __repr__(self) -> str:
        extra = f", num_null_experts={self.num_null_experts}" if self.num_null_experts else ""
        return (f"{self.__class__.__name__}({self.in_channels}, "
                f"num_experts={self.num_experts}{self._repr_args()}{extra})")

    def _repr_args(self) -> str:
        return ""


NOISES = ("gaussian", "uniform", "constant")


class TopKRouter(Router):
    r"""Top-k softmax router (Shazeer et al., 2017, `"Outrageously Large Neural
    Networks" <https://arxiv.org/abs/1701.06538>`_), optionally with noisy
    gating and null experts (Zeng et al., 2024, `"AdaMoE"
    <https://arxiv.org/abs/2406.13233>`_).

    .. math::
        h(\mathbf{x}) &= \mathbf{x}\mathbf{W}_g + \epsilon \cdot
        \mathrm{softplus}(\mathbf{x}\mathbf{W}_n),\quad \epsilon\sim\mathcal{N}(0, 1)
        \text{ (training, noisy only)}

        \mathcal{K}(\mathbf{x}) &= \mathrm{TopK}(h(\mathbf{x}), k),\qquad
        g_i(\mathbf{x}) = \frac{e^{h_i}}{\sum_{j\in\mathcal{K}} e^{h_j}},\; i\in\mathcal{K}

    With ``num_null_experts > 0`` the top-k is taken over the real and the null
    experts; assignments to null experts are dropped, so a row uses between
    ``0`` and ``k`` real experts and its real weights sum to at most one.

    Returned auxiliary losses: ``load_balance`` (Switch, over first choices),
    ``z_loss``, and ``importance`` (Shazeer's :math:`\mathrm{CV}^2` of
    importance plus load, with the smooth load estimator when noisy).

    Args:
        in_channels (int): size of each input row.
        num_experts (int): number of real experts :math:`E`.
        k (int, optional): experts per row, ``1 <= k <= E + num_null_experts``.
            (default: :obj:`2`)
        noisy (bool, optional): add noise to the logits in training.
            (default: :obj:`False`)
        noise (str, optional): with ``noisy``, ``"gaussian"``: the learned
            Gaussian noise above (Shazeer et al.); ``"uniform"``:
            :math:`r_m \sim \mathcal{U}[0, 1)` drawn for every row and expert,
            as Chen et al. (2022) explore with. (default: :obj:`"gaussian"`)
        num_null_experts (int, optional): zero-compute experts. (default: :obj:`0`)
        normalize (bool, optional): renormalise the weights over the chosen
            experts; otherwise use the full-softmax probabilities.
            (default: :obj:`True`)
        straight_through (bool, optional): with ``k=1`` and ``normalize``,
            whose gate is the constant 1 (no gradient for the router from the
            task), use :math:`1 + p_e - \mathrm{sg}(p_e)` with :math:`p_e` the
            full-softmax probability of the chosen expert: the value stays 1,
            the router gets the gradient of the Switch gate :math:`p_e`
            (Fedus et al., 2021) without its scaling of the output.
            (default: :obj:`False`)
        balance_groups (list of int, optional): sizes of consecutive groups
            of experts (summing to ``num_experts``; no null experts) that are
            balanced each within itself: the ``load_balance`` and
            ``importance`` losses are the sums over the groups of the losses
            computed on each group alone (Switch's over the rows whose first
            choice is in the group, with the probabilities renormalised over
            the group), each weighted by the share of rows whose first choice
            is in the group, so nothing pushes rows from one group to
            another.
            :class:`~moegraph.nn.conv.HopMoEConv` uses it to balance its
            hop-1 and hop-2 experts separately while the router learns which
            hop a node needs. :obj:`None`: one group. (default: :obj:`None`)

    Shapes:
        - **input:** ``[N, in_channels]``
        - **output:** :class:`Routing` with ``A <= N * k`` assignments
    """

    def __init__(self, in_channels: int, num_experts: int, k: int = 2, noisy: bool = False,
                 num_null_experts: int = 0, normalize: bool = True, noise_epsilon: float = 1e-2,
                 straight_through: bool = False, noise: str = "gaussian",
                 balance_groups: Optional[Sequence[int]] = None):
        super().__init__(in_channels, num_experts, num_null_experts)
        if noise not in NOISES:
            raise ValueError(f"'noise' must be one of {NOISES} (got {noise!r})")
        self.balance_groups = check_balance_groups(balance_groups, num_experts,
                                                   num_null_experts)
        if straight_through and not (normalize and k == 1):
            raise ValueError("'straight_through' applies to k=1 with normalize=True only "
                             f"(got k={k}, normalize={normalize})")
        self.straight_through = straight_through
        self.k = check_int("k", k, 1, self.num_total_experts,
                           " (num_experts + num_null_experts)")
        self.noisy = noisy
        self.normalize = normalize
        self.noise_epsilon = noise_epsilon
        self.noise = noise
        if noisy and noise == "gaussian":
            self.noise_weight = Parameter(torch.empty_like(self.weight))
        else:
            self.register_parameter("noise_weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        if self.noise_weight is not None:
            torch.nn.init.zeros_(self.noise_weight)  # as in Shazeer et al.

    def _repr_args(self) -> str:
        return (f", k={self.k}" + (", noisy=True" if self.noisy else "")
                + (f", noise={self.noise!r}" if self.noisy and self.noise != "gaussian" else "")
                + (", straight_through=True" if self.straight_through else "")
                + (f", balance_groups={list(self.balance_groups)}" if self.balance_groups
                   else ""))

    def forward(self, x: Tensor) -> Routing:
        r"""Route ``x`` of shape ``[N, F]`` (N rows, F features) to ``K = k`` experts each."""
        self._check_input(x)
        N, k, Et = x.size(0), self.k, self.num_total_experts
        clean = self._logits(x)  # [N, Et]
        noise_std = None
        if self.noisy and self.training and self.noise == "uniform":
            logits = clean + torch.rand_like(clean)
        elif self.noisy and self.training and self.noise == "constant":
            noise_std = clean.new_full((), math.log(2.0) + self.noise_epsilon)
            logits = clean + torch.randn_like(clean) * noise_std
        elif self.noisy and self.training:
            noise_std = F.softplus(self._logits(x, self.noise_weight)) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        probs = logits.softmax(dim=-1)  # [N, Et]
        top_logits, top_idx = logits.topk(k, dim=-1)  # [N, K]
        if self.normalize and k == 1:
            # the softmax over one choice is 1, a constant: its gradient is zero
            top_weight = torch.ones_like(top_logits)
            if self.straight_through:  # value 1, the gradient of the probability
                chosen = probs.gather(1, top_idx)
                top_weight = top_weight + (chosen - chosen.detach())
        elif self.normalize:
            top_weight = top_logits.softmax(dim=-1)
        else:
            top_weight = probs.gather(1, top_idx)
        row = torch.arange(N, device=x.device).repeat_interleave(k)
        expert, weight = top_idx.reshape(-1), top_weight.reshape(-1)

        if self.training:
            gates = torch.zeros_like(probs).scatter_(1, top_idx, top_weight)  # [N, Et]
            if noise_std is not None and k < Et:
                load = self._smooth_load(clean, logits, noise_std)
            else:
                load = count_index(expert, Et).to(probs.dtype)
            losses = {
                "load_balance": grouped_load_balancing_loss(probs, top_idx[:, 0],
                                                            self.balance_groups),
                "z_loss": z_loss(logits),
                "importance": grouped_importance_loss(gates, load, top_idx[:, 0],
                                                      self.balance_groups),
            }
        else:
            losses = dict.fromkeys(("load_balance", "z_loss", "importance"), probs.new_zeros(()))

        row, expert, weight, fixed_k = self._drop_null(row, expert, weight, k)
        load = count_index(expert, self.num_experts).to(probs.dtype)
        return Routing(row, expert, weight, probs, load, losses, fixed_k)

    def _smooth_load(self, clean: Tensor, noisy: Tensor, noise_std: Tensor) -> Tensor:
        r"""Shazeer's differentiable load estimate: the probability that each
        expert stays in the top-k when only its own noise is re-drawn."""
        top_vals, _ = noisy.topk(self.k + 1, dim=-1)  # [N, K+1]
        threshold_if_in = top_vals[:, self.k:self.k + 1]
        threshold_if_out = top_vals[:, self.k - 1:self.k]
        is_in = noisy > threshold_if_in
        # the standard normal CDF; torch.distributions.Normal would validate its
        # arguments and inputs, four host syncs per call on CUDA
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)  # [Et]


class TopPRouter(Router):
    r"""Top-p dynamic router (Huang et al., 2024, `"Harder Tasks Need More
    Experts: Dynamic Routing in MoE Models" <https://arxiv.org/abs/2403.07652>`_).

    Experts are sorted by probability; each row keeps the smallest prefix whose
    probability mass reaches ``p`` (the expert that crosses ``p`` included):

    .. math::
        t = \min\Big\{m : \sum_{j\le m} P_{(j)}(\mathbf{x}) \ge p\Big\},\qquad
        \mathcal{S}(\mathbf{x}) = \{(1), \dots, (t)\}

    and the row's output is :math:`\sum_{i\in\mathcal{S}} P_i\, e_i(\mathbf{x})`
    (``normalize=False``, as in the paper) or with the kept probabilities
    renormalised to one.

    Returned auxiliary losses: ``load_balance``, ``z_loss``, ``importance`` and
    ``entropy`` (the paper's dynamic loss, which stops the router from
    spreading mass to activate every expert).

    Args:
        in_channels (int): size of each input row.
        num_experts (int): number of real experts.
        p (float, optional): probability threshold in ``(0, 1]``. (default: :obj:`0.5`)
        max_k (int, optional): cap on experts per row. (default: :obj:`None`)
        num_null_experts (int, optional): zero-compute experts. (default: :obj:`0`)
        normalize (bool, optional): renormalise kept weights to sum to one.
            (default: :obj:`False`)
    """

    def __init__(self, in_channels: int, num_experts: int, p: float = 0.5,
                 max_k: Optional[int] = None, num_null_experts: int = 0,
                 normalize: bool = False):
        super().__init__(in_channels, num_experts, num_null_experts)
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 < p <= 1.0):
            raise ValueError(f"'p' must be in (0, 1] (got {p!r})")
        if max_k is not None:
            max_k = check_int("max_k", max_k, 1, self.num_total_experts)
        self.p = float(p)
        self.max_k = max_k
        self.normalize = normalize
        self.reset_parameters()

    def _repr_args(self) -> str:
        return f", p={self.p}"

    def forward(self, x: Tensor) -> Routing:
        r"""Route ``x`` of shape ``[N, F]``; the number of experts varies per row."""
        self._check_input(x)
        logits = self._logits(x)  # [N, Et]
        probs = logits.softmax(dim=-1)
        sorted_p, sorted_idx = probs.sort(dim=-1, descending=True)  # [N, Et]
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep = mass_before < self.p  # [N, Et]
        keep[:, 0] = True
        if self.max_k is not None:
            keep[:, self.max_k:] = False
        row, col = keep.nonzero(as_tuple=True)  # row-major: grouped by row, best first
        expert, weight = sorted_idx[row, col], sorted_p[row, col]
        if self.normalize:
            total = torch.zeros_like(probs[:, 0]).index_add_(0, row, weight)
            weight = weight / total[row]

        if self.training:
            gates = torch.zeros_like(probs).index_put_((row, expert), weight)
            load = count_index(expert, self.num_total_experts).to(probs.dtype)
            losses = {
                "load_balance": load_balancing_loss(probs, sorted_idx[:, 0]),
                "z_loss": z_loss(logits),
                "importance": importance_loss(gates, load),
                "entropy": entropy_loss(probs),
            }
        else:
            losses = dict.fromkeys(("load_balance", "z_loss", "importance", "entropy"),
                                   probs.new_zeros(()))
        row, expert, weight, _ = self._drop_null(row, expert, weight, None)
        load = count_index(expert, self.num_experts).to(probs.dtype)
        return Routing(row, expert, weight, probs, load, losses, None)


class ExpertChoiceRouter(Router):
    r"""Expert-choice router (Zhou et al., 2022, `"Mixture-of-Experts with
    Expert Choice Routing" <https://arxiv.org/abs/2202.09368>`_).

    Each expert picks its top-``c`` rows by router score, so the load is
    balanced by construction and a row may be taken by any number of experts
    (zero included):

    .. math::
        \mathbf{S} = \mathrm{softmax}(\mathbf{X}\mathbf{W}_g) \in \mathbb{R}^{N\times E},
        \qquad c = \Big\lceil \frac{N \cdot \text{capacity\_factor}}{E} \Big\rceil,

    expert :math:`i` takes the rows of :math:`\mathrm{TopK}(\mathbf{S}_{:, i}, c)`
    with weights :math:`S_{ni}`. Since the choice depends on the whole batch,
    a row's output depends on the other rows in it (not on their order).

    Returned auxiliary losses: ``z_loss``.

    Args:
        in_channels (int): size of each input row.
        num_experts (int): number of experts.
        capacity_factor (float, optional): average experts per row.
            (default: :obj:`1.0`)
    """

    def __init__(self, in_channels: int, num_experts: int, capacity_factor: float = 1.0):
        super().__init__(in_channels, num_experts, 0)
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.reset_parameters()

    def _repr_args(self) -> str:
        return f", capacity_factor={self.capacity_factor}"

    def capacity(self, num_rows: int) -> int:
        return min(num_rows, math.ceil(num_rows * self.capacity_factor / self.num_experts))

    def forward(self, x: Tensor) -> Routing:
        r"""Route ``x`` of shape ``[N, F]``; each of the E experts takes ``c`` rows."""
        self._check_input(x)
        E = self.num_experts
        logits = self._logits(x)  # [N, E]
        probs = logits.softmax(dim=-1)
        c = self.capacity(x.size(0))
        top_w, top_rows = probs.topk(c, dim=0)  # [c, E]
        row = top_rows.t().reshape(-1)  # grouped by expert
        weight = top_w.t().reshape(-1)
        expert = torch.arange(E, device=x.device).repeat_interleave(c)
        losses = {"z_loss": z_loss(logits) if self.training else probs.new_zeros(())}
        load = torch.full((E,), float(c), device=x.device)
        return Routing(row, expert, weight, probs, load, losses, None)


ROUTERS = {
    "topk": TopKRouter,
    "topp": TopPRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(router: str | Router, in_channels: int, num_experts: int,
                 k: Optional[int] = None, router_kwargs: Optional[dict] = None,
                 default_k: int = 2) -> Router:
    r"""A router from a name (``"topk"``, ``"topp"``, ``"expert_choice"``) and
    its arguments, or a given :class:`Router` checked against
    ``in_channels`` and ``num_experts``. ``k`` applies to the top-k router
    only (:obj:`None` gives ``default_k``); the other routers take their own
    arguments in ``router_kwargs``."""
    if isinstance(router, str):
        if router not in ROUTERS:
            raise ValueError(f"'router' must be one of {sorted(ROUTERS)} or a Router "
                             f"module (got {router!r})")
        kwargs = dict(router_kwargs or {})
        if router == "topk":
            if k is not None and kwargs.get("k", k) != k:
                raise ValueError(f"'k' given twice: k={k} and router_kwargs['k']={kwargs['k']}")
            kwargs.setdefault("k", default_k if k is None else k)
        elif k is not None:
            raise ValueError(f"'k' applies to the 'topk' router only (router={router!r}); "
                             f"pass that router's own arguments in 'router_kwargs'")
        return ROUTERS[router](in_channels, num_experts, **kwargs)
    if not isinstance(router, Router):
        raise TypeError(f"'router' must be a name or a Router (got {type(router).__name__})")
    if router.in_channels != in_channels or router.num_experts != num_experts:
        raise ValueError(f"the router {router} does not match in_channels={in_channels}, "
                         f"num_experts={num_experts}")
    return router
