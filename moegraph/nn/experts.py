r"""Expert banks: run each expert on the contiguous block of rows routed to it.

An expert bank receives rows already sorted by expert (``x_sorted``) and the
number of rows for each expert (``counts``), and returns one output row per
input row, in the same order. Only the rows routed to an expert touch its
weights.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import Module, ModuleList, Parameter
from torch_geometric.nn.resolver import activation_resolver

from moegraph.utils.checks import check_int

BACKENDS = ("auto", "loop", "grouped_mm")


def _has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def resolve_backend(backend: str) -> str:
    r"""The compute path for stacked experts.

    ``"loop"``: one matmul per non-empty expert block (pure PyTorch, every
    device). ``"grouped_mm"``: :func:`torch._grouped_mm` over all blocks in one
    call. ``"auto"`` picks ``"loop"``: on CPU it measured faster than
    ``grouped_mm`` (see ``experiments/bench_moe.py``); the CUDA choice is left
    to measurement on a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"'backend' must be one of {BACKENDS} (got {backend!r})")
    if backend == "grouped_mm" and not _has_grouped_mm():
        raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm (PyTorch >= 2.8)")
    return "loop" if backend == "auto" else backend


EXPERT_INITS = ("independent", "shared")


def spectral_normalize(weight: Tensor) -> Tensor:
    r"""``weight`` divided by its spectral norm (largest singular value), per
    matrix over the last two dimensions (Miyato et al., 2018, computed
    exactly, not by power iteration): a linear map of operator norm 1, whose
    gradient flows through the division.

    Args:
        weight (Tensor): ``[..., M, K]``, e.g. a :class:`~torch.nn.Linear`
            weight ``[O, F]`` or stacked expert weights ``[E, F, H]``.
    """
    if weight.dim() < 2:
        raise ValueError(f"'weight' must have at least 2 dimensions (got shape "
                         f"{tuple(weight.shape)})")
    sigma = torch.linalg.matrix_norm(weight, ord=2, keepdim=True)  # [..., 1, 1]
    # A zero matrix stays zero instead of 0 / 0.
    return weight / sigma.clamp_min(torch.finfo(weight.dtype).tiny)


class SpectralLinear(torch.nn.Linear):
    r"""A :class:`~torch.nn.Linear` whose weight is used divided by its
    spectral norm (:func:`spectral_normalize`): ``x W^T / sigma_max(W) + b``,
    so the map cannot stretch its input, ``||f(a) - f(b)|| <= ||a - b||``,
    whatever the optimiser does to the scale of ``W``. Initialised, reset
    and stored (``weight``, ``bias``) as a :class:`~torch.nn.Linear`."""

    def normalized_weight(self) -> Tensor:
        return spectral_normalize(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.normalized_weight(), self.bias)


class Experts(Module):
    r"""Base class of expert banks.

    ``forward(x_sorted, counts, weight=None) -> y_sorted``: rows sorted by
    expert, ``counts[e]`` rows for expert ``e``; if ``weight [A]`` is given,
    each output row is scaled by it (the combine weight of its assignment).
    """

    num_experts: int
    in_channels: int
    out_channels: int

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _gelu_kernels(act: torch.nn.GELU) -> tuple[Callable, Callable]:
    approximate = act.approximate
    return (lambda hp: torch.nn.functional.gelu(hp, approximate=approximate),
            lambda grad, hp, h: torch.ops.aten.gelu_backward(grad, hp, approximate=approximate))


def _relu_kernels(act: torch.nn.ReLU) -> tuple[Callable, Callable]:
    return torch.relu, lambda grad, hp, h: torch.ops.aten.threshold_backward(grad, h, 0)


# Activations whose forward and backward kernels :class:`_SegmentMLP` calls
# itself (the very kernels autograd would call), sparing an autograd graph and
# an ``autograd.grad`` call per expert block; any other activation goes through
# autograd.
_ACT_KERNELS: dict[type, Callable[[Any], tuple[Callable, Callable]]] = {
    torch.nn.GELU: _gelu_kernels,
    torch.nn.ReLU: _relu_kernels,
}


class _SegmentMLP(torch.autograd.Function):
    r"""Two-layer MLP experts over contiguous row blocks, one matmul per block.

    Outputs and gradients are written into preallocated buffers (no ``cat`` of
    blocks in either direction) and the combine weight is applied per block
    while the block is still in cache. Saves what a dense FFN saves: the
    input, and per block the activation's own autograd graph (its input and
    output), so any activation module works and nothing is recomputed; the
    activation's own trainable parameters are passed as trailing inputs so that
    they get their gradient too (e.g. PReLU). GELU and ReLU skip the graph:
    their forward and backward kernels are called directly (the ones autograd
    would call, so the numbers are the same).

    With ``rows`` (the row of each sorted assignment), ``x`` holds the
    unsorted rows ``[N, F]``: each block gathers its rows itself and adds its
    weighted outputs into ``out [N, O]`` (and, backward, its input gradients
    into ``grad_x [N, F]``), so the sorted copies of the input, the output and
    their gradients, ``[A, F]`` and ``[A, O]`` each, are never allocated. The
    additions happen in the order of the sorted assignments, exactly as an
    ``index_add_`` of the sorted outputs would do them. With ``unique`` (each
    row has exactly one assignment: top-1 routing) the rows are a permutation,
    so outputs and input gradients are copied into place (``index_copy_``)
    instead of added into zeroed buffers.

    The unweighted outputs ``[A, O]`` are kept for the backward pass only when
    the combine weight needs a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, rows, num_rows, sizes, unique, act, w1, b1, w2, b2,
                *act_params):
        gather = rows is not None
        unique = unique and gather
        A, O = sum(sizes), w2.size(-1)
        # the unweighted outputs, sorted by expert: a buffer when the backward
        # pass needs them (for the weight's gradient) or they are returned
        keep_y = weight is not None and ctx.needs_input_grad[1]
        y = x.new_empty(A, O) if keep_y or not gather else None
        out = None
        if gather:  # every row written exactly once when unique
            out = x.new_empty(num_rows, O) if unique else x.new_zeros(num_rows, O)
        graphs = []  # per block: (activation input, activation output)
        fused = _ACT_KERNELS.get(type(act), lambda a: None)(act)
        start = 0
        for e, size in enumerate(sizes):
            if size == 0:
                continue
            end = start + size
            xe = x.index_select(0, rows[start:end]) if gather else x[start:end]
            hp = xe @ w1[e] if b1 is None else torch.addmm(b1[e], xe, w1[e])
            if fused is not None:  # no autograd graph per block
                h = fused[0](hp)
            else:
                with torch.enable_grad():
                    hp.requires_grad_()
                    h = act(hp)
            graphs.append((hp, h))
            ye = None if y is None else y[start:end]
            if b2 is None:
                ye = torch.mm(h.detach(), w2[e], out=ye)
            else:
                ye = torch.addmm(b2[e], h.detach(), w2[e], out=ye)
            if gather:
                if weight is not None:
                    ye = ye * weight[start:end, None]
                if unique:
                    out.index_copy_(0, rows[start:end], ye)
                else:
                    out.index_add_(0, rows[start:end], ye)
            start = end
        ctx.sizes, ctx.graphs, ctx.act_params, ctx.fused = sizes, graphs, act_params, fused
        ctx.has_b1, ctx.has_b2, ctx.unique = b1 is not None, b2 is not None, unique
        ctx.save_for_backward(x, rows, weight, y if keep_y else None, w1, w2)
        if gather:
            return out
        return y if weight is None else y * weight.unsqueeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, rows, weight, y, w1, w2 = ctx.saved_tensors
        gather = rows is not None
        sizes, graphs = ctx.sizes, iter(ctx.graphs)
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = None
        if need_x:
            grad_x = torch.zeros_like(x) if gather and not ctx.unique else torch.empty_like(x)
        grad_weight = torch.empty_like(weight) if (need_w and weight is not None) else None
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gb1 = w1.new_empty(w1.size(0), w1.size(2)) if ctx.has_b1 else None
        gb2 = w2.new_empty(w2.size(0), w2.size(2)) if ctx.has_b2 else None
        grad_act = [torch.zeros_like(p) for p in ctx.act_params]
        start = 0
        for e, size in enumerate(sizes):
            if size == 0:
                gw1[e].zero_()
                gw2[e].zero_()
                if gb1 is not None:
                    gb1[e].zero_()
                if gb2 is not None:
                    gb2[e].zero_()
                continue
            end = start + size
            g = grad_out.index_select(0, rows[start:end]) if gather else grad_out[start:end]
            if weight is not None:
                if grad_weight is not None:
                    grad_weight[start:end] = (g * y[start:end]).sum(dim=-1)
                g = g * weight[start:end].unsqueeze(-1)
            hp, h = next(graphs)
            torch.mm(h.detach().t(), g, out=gw2[e])
            if gb2 is not None:
                torch.sum(g, dim=0, out=gb2[e])
            if ctx.fused is not None:  # the kernel autograd would call
                grad_h = ctx.fused[1](g @ w2[e].t(), hp, h)
            else:
                grad_h, *grad_p = torch.autograd.grad(h, (hp, *ctx.act_params), g @ w2[e].t(),
                                                      retain_graph=True, allow_unused=True)
                for acc, grad in zip(grad_act, grad_p, strict=True):
                    if grad is not None:
                        acc += grad
            xe = x.index_select(0, rows[start:end]) if gather else x[start:end]
            torch.mm(xe.t(), grad_h, out=gw1[e])
            if gb1 is not None:
                torch.sum(grad_h, dim=0, out=gb1[e])
            if grad_x is not None:
                if ctx.unique:
                    grad_x.index_copy_(0, rows[start:end], grad_h @ w1[e].t())
                elif gather:
                    grad_x.index_add_(0, rows[start:end], grad_h @ w1[e].t())
                else:
                    torch.mm(grad_h, w1[e].t(), out=grad_x[start:end])
            start = end
        return (grad_x, grad_weight, None, None, None, None, None, gw1, gb1, gw2, gb2,
                *grad_act)


class MLPExperts(Experts):
    r"""``E`` two-layer MLP experts with stacked weights.

    .. math::
        e_i(\mathbf{x}) = \sigma(\mathbf{x}\mathbf{W}^{(1)}_i + \mathbf{b}^{(1)}_i)
        \mathbf{W}^{(2)}_i + \mathbf{b}^{(2)}_i,
        \qquad \mathbf{W}^{(1)} \in \mathbb{R}^{E\times F\times H},\;
        \mathbf{W}^{(2)} \in \mathbb{R}^{E\times H\times O}

    Each slice is initialised like a :class:`torch.nn.Linear` of its shape.

    Args:
        in_channels (int): input size :math:`F`.
        hidden_channels (int): hidden size :math:`H` of each expert.
        out_channels (int): output size :math:`O`.
        num_experts (int): number of experts :math:`E`.
        act (str or Module, optional): activation, resolved by PyG's
            :func:`activation_resolver`. (default: :obj:`"gelu"`)
        act_kwargs (dict, optional): arguments of the activation.
        bias (bool, optional): learn biases. (default: :obj:`True`)
        backend (str, optional): ``"auto"``, ``"loop"`` or ``"grouped_mm"``
            (see :func:`resolve_backend`). (default: :obj:`"auto"`)
        spectral_norm (bool, optional): use each expert's weight matrices
            divided by their spectral norm (:func:`spectral_normalize`), so no
            expert can stretch its input by more than the activation does.
            (default: :obj:`False`)
        init (str, optional): ``"independent"``: each expert initialised
            on its own; ``"shared"``: every expert starts as expert 0 (same
            weights and biases) and the experts diverge only through the
            rows routed to them (the dense start of sparse upcycling,
            Komatsuzaki et al., 2023). Applied by :meth:`reset_parameters`.
            (default: :obj:`"independent"`)

    Shapes:
        - **input:** ``x_sorted [A, F]`` sorted by expert, ``counts [E]``
        - **output:** ``[A, O]``
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 num_experts: int, act: str | Module = "gelu",
                 act_kwargs: Optional[dict[str, Any]] = None, bias: bool = True,
                 backend: str = "auto", spectral_norm: bool = False,
                 init: str = "independent"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("out_channels", out_channels), ("num_experts", num_experts)):
            check_int(name, value)
        if backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {BACKENDS} (got {backend!r})")
        if init not in EXPERT_INITS:
            raise ValueError(f"'init' must be one of {EXPERT_INITS} (got {init!r})")
        self.init = init
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_experts = num_experts
        self.act = activation_resolver(act, **(act_kwargs or {}))
        self.backend = backend
        self.spectral_norm = bool(spectral_norm)
        E = num_experts
        self.weight1 = Parameter(torch.empty(E, in_channels, hidden_channels))
        self.weight2 = Parameter(torch.empty(E, hidden_channels, out_channels))
        if bias:
            self.bias1 = Parameter(torch.empty(E, hidden_channels))
            self.bias2 = Parameter(torch.empty(E, out_channels))
        else:
            self.register_parameter("bias1", None)
            self.register_parameter("bias2", None)
        self.reset_parameters()

    def reset_parameters(self):
        for weight, bias in ((self.weight1, self.bias1), (self.weight2, self.bias2)):
            bound = 1.0 / math.sqrt(weight.size(1))  # nn.Linear's default, per slice
            for e in range(self.num_experts):
                torch.nn.init.uniform_(weight[e], -bound, bound)
                if bias is not None:
                    torch.nn.init.uniform_(bias[e], -bound, bound)
        if self.init == "shared":
            with torch.no_grad():
                for param in self.parameters():  # stacked per expert: first dimension E
                    param[1:] = param[0]

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:
        return self._run(x_sorted, counts, weight)

    def gather_and_combine(self, x: Tensor, rows: Tensor, counts: Tensor,
                           weight: Optional[Tensor] = None,
                           unique: bool = False) -> Optional[Tensor]:
        r"""The experts on the rows ``x [N, F]`` routed to them and the
        weighted outputs added back into their rows, ``[N, O]``: what
        ``combine(self(x[rows], counts, weight), rows, N)`` computes, with the
        same additions in the same order, without the sorted copies. With
        ``unique`` (``rows`` is a permutation of ``0..N-1``: one assignment
        per row), the outputs are copied into place, nothing is added. Used by
        :func:`~moegraph.nn.dispatch.permute_and_compute`; :obj:`None` where
        this bank has no such path (``backend="grouped_mm"``)."""
        if resolve_backend(self.backend) != "loop":
            return None
        return self._run(x, counts, weight, rows, unique)

    def _run(self, x: Tensor, counts: Tensor, weight: Optional[Tensor],
             rows: Optional[Tensor] = None, unique: bool = False) -> Tensor:
        backend = resolve_backend(self.backend)
        # Under autocast the experts run in the autocast dtype, as nn.Linear would.
        device_type = x.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else x.dtype)
        w1: Tensor = self.weight1
        w2: Tensor = self.weight2
        if self.spectral_norm:
            w1, w2 = spectral_normalize(w1), spectral_normalize(w2)
        params = [p if p is None else p.to(dtype) for p in (w1, self.bias1, w2, self.bias2)]
        x = x.to(dtype).contiguous()
        weight = None if weight is None else weight.to(dtype)
        with torch.autocast(device_type=device_type, enabled=False):
            if backend == "grouped_mm":
                y = self._grouped_mm(x, counts, params[0], params[1], params[2], params[3])
                return y if weight is None else y * weight.unsqueeze(-1)
            sizes = counts.tolist()  # host sync: block sizes are needed on the host
            act_params = [p for p in self.act.parameters() if p.requires_grad]
            return _SegmentMLP.apply(x, weight, rows, x.size(0), sizes, unique, self.act,
                                     *params, *act_params)

    def _grouped_mm(self, x: Tensor, counts: Tensor, w1: Tensor, b1: Optional[Tensor],
                    w2: Tensor, b2: Optional[Tensor]) -> Tensor:
        step = 16 // x.element_size()
        sizes = (self.in_channels, self.hidden_channels, self.out_channels)
        if any(size % step for size in sizes):
            raise ValueError(f"backend='grouped_mm' in {x.dtype} needs in/hidden/out channels "
                             f"that are multiples of {step} (16-byte rows), got {sizes}; "
                             f"use backend='loop'")
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x, w1, offs=offs)
        if b1 is not None or b2 is not None:
            eid = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device),
                                          counts, output_size=x.size(0))
        if b1 is not None:
            h = h + b1[eid]
        h = self.act(h)
        y = torch._grouped_mm(h, w2, offs=offs)
        if b2 is not None:
            y = y + b2[eid]
        return y

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"{self.out_channels}, num_experts={self.num_experts}"
                f"{', spectral_norm=True' if self.spectral_norm else ''})")


class ModuleExperts(Experts):
    r"""Arbitrary :class:`torch.nn.Module` experts, each mapping ``[n, F]`` to
    ``[n, O]``. An expert is called only on the rows routed to it, and not at
    all when none are.

    Args:
        experts (sequence of Module): the experts.
        in_channels (int): input size :math:`F`.
        out_channels (int): output size :math:`O` of every expert.
    """

    def __init__(self, experts: Sequence[Module], in_channels: int, out_channels: int):
        super().__init__()
        if len(experts) < 1:
            raise ValueError("'experts' must hold at least one module")
        self.experts = ModuleList(experts)
        self.num_experts = len(self.experts)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def reset_parameters(self):
        for expert in self.experts:
            if hasattr(expert, "reset_parameters"):
                expert.reset_parameters()

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:
        sizes = counts.tolist()  # host sync
        outs = []
        for expert, xe, size in zip(self.experts, x_sorted.split(sizes), sizes, strict=True):
            if size == 0:
                continue
            y = expert(xe)
            if y.dim() != 2 or y.size(0) != size or y.size(1) != self.out_channels:
                raise ValueError(f"expert {expert.__class__.__name__} returned shape "
                                 f"{tuple(y.shape)}, expected [{size}, {self.out_channels}]")
            outs.append(y)
        y = torch.cat(outs, dim=0) if outs else x_sorted.new_zeros(0, self.out_channels)
        return y if weight is None else y * weight.to(y.dtype).unsqueeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_experts={self.num_experts})"


def grouped_linear(x_sorted: Tensor, counts: Tensor, weight: Tensor,
                   bias: Optional[Tensor] = None) -> Tensor:
    r"""One linear map per expert over rows sorted by expert:
    ``x_sorted [A, F]`` in blocks of ``counts [E]`` rows, ``weight [E, F, O]``,
    ``bias [E, O]`` (optional); output ``[A, O]``."""
    sizes = counts.tolist()  # host sync: block sizes are needed on the host
    weights = weight.unbind(0)  # views: the backward stacks, no [E, F, O] per block
    biases = bias.unbind(0) if bias is not None else None
    outs = []
    for e, xe in enumerate(x_sorted.split(sizes)):
        if xe.size(0) == 0:
            continue
        ye = xe @ weights[e].to(xe.dtype)
        outs.append(ye if biases is None else ye + biases[e].to(ye.dtype))
    return torch.cat(outs, dim=0) if outs else x_sorted.new_zeros(0, weight.size(2))


class LinearExperts(Experts):
    r"""``E`` linear experts with stacked weights, one matmul per non-empty
    block of rows.

    .. math::
        e_i(\mathbf{x}) = \mathbf{x}\mathbf{W}_i + \mathbf{b}_i,
        \qquad \mathbf{W} \in \mathbb{R}^{E\times F\times O}

    Each slice is initialised like the weight of a PyG
    :class:`~torch_geometric.nn.dense.Linear` with ``weight_initializer=
    "glorot"`` (the linear part of a graph convolution), biases at zero.

    Args:
        in_channels (int): input size :math:`F`.
        out_channels (int): output size :math:`O`.
        num_experts (int): number of experts :math:`E`.
        bias (bool, optional): learn biases. (default: :obj:`True`)

    Shapes:
        - **input:** ``x_sorted [A, F]`` sorted by expert, ``counts [E]``
        - **output:** ``[A, O]``
    """

    def __init__(self, in_channels: int, out_channels: int, num_experts: int,
                 bias: bool = True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_experts", num_experts)):
            check_int(name, value)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_experts = num_experts
        self.weight = Parameter(torch.empty(num_experts, in_channels, out_channels))
        if bias:
            self.bias = Parameter(torch.empty(num_experts, out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        for e in range(self.num_experts):
            torch.nn.init.xavier_uniform_(self.weight[e].T)  # glorot of [O, F], as PyG
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:
        y = grouped_linear(x_sorted, counts, self.weight, self.bias)
        return y if weight is None else y * weight.to(y.dtype).unsqueeze(-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_experts={self.num_experts})")
