r"""Sparse Mixture-of-Experts feed-forward block."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Module, Sequential
from torch_geometric.nn.resolver import activation_resolver

from moegraph.nn.dispatch import apply_capacity, combine, indices_and_bins, permute_and_compute
from moegraph.nn.experts import Experts, MLPExperts, ModuleExperts, SpectralLinear
from moegraph.nn.routing import ExpertChoiceRouter, Router, Routing, build_router
from moegraph.utils.checks import check_int, check_positive_float

__all__ = ["MoEOutput", "SparseMoE", "combine"]


class MoEOutput(NamedTuple):
    r"""Output of :class:`SparseMoE`: the combined rows and the routing record."""

    out: Tensor
    routing: Routing


class SparseMoE(Module):
    r"""Sparse Mixture-of-Experts feed-forward block (Shazeer et al., 2017;
    Fedus et al., 2021), with optional always-on shared experts (Dai et al.,
    2024, `"DeepSeekMoE" <https://arxiv.org/abs/2401.06066>`_).

    .. math::
        \mathbf{y}_n = \sum_{i \in \mathcal{S}(\mathbf{x}_n)} g_i(\mathbf{x}_n)\,
        e_i(\mathbf{x}_n) \;+\; \sum_{j=1}^{S} s_j(\mathbf{x}_n)

    where the router chooses the set :math:`\mathcal{S}(\mathbf{x}_n)` and the
    weights :math:`g_i`, and :math:`s_j` are the shared experts. Rows are
    sorted by expert and each expert runs once on its contiguous block, so a
    row touches only the weights of the experts it was routed to (dropless by
    default). Works on any ``[N, F]`` input: nodes, edges or tokens.

    With ``capacity_factor`` set, each expert takes at most
    ``ceil(capacity_factor * A / E)`` assignments (``A = N * k`` for top-k);
    the overflow is dropped deterministically (first choices first, then by
    row index) and contributes nothing.

    Host synchronisations per call (what makes a CUDA host wait): one scalar
    read for the router's NaN/Inf check of its logits, and, with the
    ``"loop"`` backend, one ``counts.tolist()`` for the block sizes of the
    per-expert matmuls (``"grouped_mm"`` takes the offsets on the device).
    Counting the assignments per expert, the auxiliary losses, the combine
    and the whole backward pass need none. Data-dependent sizes add one
    each where they are asked for: null experts and ``capacity_factor``
    (dropped assignments), the top-p router (a variable number per row).
    ``tests/nn/test_moe.py::test_host_syncs_per_call`` counts them.

    Args:
        in_channels (int): input size :math:`F`.
        hidden_channels (int): hidden size of each MLP expert.
        out_channels (int, optional): output size; :obj:`in_channels` if
            :obj:`None`. (default: :obj:`None`)
        num_experts (int, optional): routed experts :math:`E`. (default: :obj:`8`)
        k (int, optional): experts per row for the ``"topk"`` router;
            :obj:`None` means 2. Not accepted by the other routers.
            (default: :obj:`None`)
        router (str or Router, optional): ``"topk"``, ``"topp"``,
            ``"expert_choice"``, or a router module. (default: :obj:`"topk"`)
        router_kwargs (dict, optional): further arguments of a router given by
            name (``noisy``, ``num_null_experts``, ``p``, ...).
        experts (Experts or sequence of Module, optional): custom experts,
            replacing the stacked MLP experts. (default: :obj:`None`)
        num_shared_experts (int, optional): always-on experts :math:`S`.
            (default: :obj:`0`)
        shared_hidden_channels (int, optional): hidden size of each shared
            expert; :obj:`hidden_channels` if :obj:`None`.
        capacity_factor (float, optional): per-expert capacity factor;
            :obj:`None` is dropless. (default: :obj:`None`)
        act (str or Module, optional): expert activation. (default: :obj:`"gelu"`)
        act_kwargs (dict, optional): arguments of the activation.
        bias (bool, optional): experts learn biases. (default: :obj:`True`)
        backend (str, optional): compute path of the stacked experts, see
            :func:`moegraph.nn.experts.resolve_backend`. (default: :obj:`"auto"`)
        deterministic (bool, optional): combine without scatter-add when every
            row has exactly ``k`` experts; always on for CUDA inputs, where a
            scatter-add is not deterministic. (default: :obj:`False`)
        spectral_norm (bool, optional): every weight matrix of the routed
            and the shared MLP experts is used divided by its spectral norm
            (:func:`~moegraph.nn.experts.spectral_normalize`); needs the
            built-in MLP experts (no ``experts``). (default: :obj:`False`)
        expert_init (str, optional): ``"independent"`` or ``"shared"``
            (every routed expert starts as the first one), see
            :class:`~moegraph.nn.MLPExperts`' ``init``; needs the built-in
            MLP experts. (default: :obj:`"independent"`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MoEOutput` with ``out [N, O]`` and the
          :class:`Routing`
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: Optional[int] = None,
        num_experts: int = 8,
        k: Optional[int] = None,
        router: Union[str, Router] = "topk",
        router_kwargs: Optional[dict[str, Any]] = None,
        experts: Union[Experts, Sequence[Module], None] = None,
        num_shared_experts: int = 0,
        shared_hidden_channels: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        act: Union[str, Module] = "gelu",
        act_kwargs: Optional[dict[str, Any]] = None,
        bias: bool = True,
        backend: str = "auto",
        deterministic: bool = False,
        spectral_norm: bool = False,
        expert_init: str = "independent",
    ):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        hidden_channels = check_int("hidden_channels", hidden_channels)
        out_channels = in_channels if out_channels is None else out_channels
        out_channels = check_int("out_channels", out_channels)
        num_experts = check_int("num_experts", num_experts)
        num_shared_experts = check_int("num_shared_experts", num_shared_experts, low=0)
        if shared_hidden_channels is not None:
            shared_hidden_channels = check_int("shared_hidden_channels", shared_hidden_channels)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_shared_experts = num_shared_experts
        self.deterministic = deterministic

        router = build_router(router, in_channels, num_experts, k, router_kwargs)
        self.router = router
        self.num_experts = num_experts

        if capacity_factor is not None:
            if isinstance(router, ExpertChoiceRouter):
                raise ValueError("the expert-choice router sets its own capacity: pass "
                                 "'capacity_factor' in 'router_kwargs', not to SparseMoE")
            capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.capacity_factor = capacity_factor

        if experts is None:
            experts = MLPExperts(in_channels, hidden_channels, out_channels, num_experts, act,
                                 act_kwargs, bias, backend, spectral_norm=spectral_norm,
                                 init=expert_init)
        elif spectral_norm:
            raise ValueError("'spectral_norm' applies to the built-in MLP experts: it "
                             "cannot be combined with custom 'experts'")
        elif expert_init != "independent":
            raise ValueError("'expert_init' applies to the built-in MLP experts: it "
                             "cannot be combined with custom 'experts'")
        elif not isinstance(experts, Experts):
            experts = ModuleExperts(list(experts), in_channels, out_channels)
        if experts.num_experts != num_experts:
            raise ValueError(f"got {experts.num_experts} experts but num_experts={num_experts}")
        self.experts = experts

        self.shared: Optional[Sequential]
        if num_shared_experts > 0:
            # S shared experts of hidden size h summed == one MLP of hidden S * h.
            width = num_shared_experts * (shared_hidden_channels or hidden_channels)
            lin = SpectralLinear if spectral_norm else Linear
            self.shared = Sequential(
                lin(in_channels, width, bias=bias),
                activation_resolver(act, **(act_kwargs or {})),
                lin(width, out_channels, bias=bias),
            )
        else:
            self.shared = None
        self.reset_parameters()

    def reset_parameters(self):
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared is not None:
            for module in self.shared:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(self, x: Tensor, router_input: Optional[Tensor] = None) -> MoEOutput:
        r"""
        Args:
            x (Tensor): rows ``[N, F]`` (N rows, F features).
            router_input (Tensor, optional): what the router reads in place
                of ``x``, ``[N, F]`` (the same rows): e.g. ``x`` before
                dropout, so that training routes as evaluation does (see
                :class:`~moegraph.nn.models.MoEGNN`'s ``route_before_dropout``).
                The experts still compute on ``x``. (default: :obj:`None`)

        Returns:
            :class:`MoEOutput`: ``out [N, O]`` and the :class:`Routing` over
            the E experts (A assignments).
        """
        if router_input is not None:
            if not isinstance(router_input, Tensor) or not isinstance(x, Tensor):
                raise TypeError("'x' and 'router_input' must be tensors")
            if router_input.shape != x.shape:
                raise ValueError(f"'router_input' must have the shape of 'x' "
                                 f"{tuple(x.shape)} (got {tuple(router_input.shape)})")
        routing = self.router(x if router_input is None else router_input)  # checks it
        routing = apply_capacity(routing, self.num_experts, self.capacity_factor)
        bins = indices_and_bins(routing, self.num_experts)
        out = permute_and_compute(x, bins, self.experts, routing.fixed_k,
                                  self.deterministic or x.is_cuda)  # [N, O]
        if self.shared is not None:
            out = out + self._shared(x)
        return MoEOutput(out, routing)

    def _shared(self, x: Tensor) -> Tensor:
        r"""The shared experts, in the dtype the routed experts run in: the
        autocast dtype under autocast, else that of ``x`` (as
        :class:`~moegraph.nn.MLPExperts`)."""
        assert self.shared is not None
        lin1, act, lin2 = self.shared
        assert isinstance(lin1, Linear) and isinstance(lin2, Linear)
        if torch.is_autocast_enabled(x.device.type) or lin1.weight.dtype == x.dtype:
            return self.shared(x)

        def to_x(p: Optional[Tensor]) -> Optional[Tensor]:
            return None if p is None else p.to(x.dtype)

        def weight(lin: Linear) -> Tensor:
            w = lin.normalized_weight() if isinstance(lin, SpectralLinear) else lin.weight
            return w.to(x.dtype)

        h = act(F.linear(x, weight(lin1), to_x(lin1.bias)))
        return F.linear(h, weight(lin2), to_x(lin2.bias))

    def __repr__(self) -> str:
        k = getattr(self.router, "k", None)
        extra = f", k={k}" if k is not None else f", router={self.router.__class__.__name__}"
        if self.num_shared_experts:
            extra += f", num_shared_experts={self.num_shared_experts}"
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"{self.out_channels}, num_experts={self.num_experts}{extra})")
