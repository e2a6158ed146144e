r"""Multi-gate task experts: shared-bottom, MMoE, CGC, PLE and HoME.

Every layer maps one representation ``[N, F]`` (from any encoder: an MLP, a
GNN, embeddings) to one output per task, and returns the gate weights and the
expert activations beside them, for diagnostics
(:class:`MultiTaskOutput`).

All gated layers are built from one piece, :class:`MultiGateLevel`: a set of
experts, each owned by ``"shared"``, a meta-task group or a task, and a set of
softmax gates, each allowed to see only some of them (a boolean mask). MMoE is
one level whose gates see every expert; CGC is one level whose task gates see
the shared and their own experts; PLE stacks CGC levels with a shared gate
between levels; HoME is two levels (meta-task groups, then tasks) with
expert normalisation, feature-gates and self-gates, each switchable.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Module, ModuleDict, ModuleList, Parameter

EXPERT_NORMS = (None, "none", "batch_norm", "layer_norm")
ACTIVATIONS = (None, "relu", "silu")
GAIN = 0.1  # HoME's default initial gain of the expert normalisation (the paper's: 1)
INPUT = "input"

Tasks = Union[Sequence[str], Mapping[str, int]]


class MultiTaskOutput(NamedTuple):
    r"""Per-task predictions plus the record diagnostics read.

    Attributes:
        outputs (dict): one prediction per task name, ``[N]`` for a task with
            one output (binary, regression) and ``[N, C]`` otherwise.
        gates (dict): gate weights by gate name ``"<level>/<stream>"``, each
            ``[N, E_l]`` over all experts of its level (exactly zero for an
            expert the gate's mask hides).
        experts (tuple of Tensor): expert activations per level, ``[N, E_l, H]``.
    """

    outputs: dict[str, Tensor]
    gates: dict[str, Tensor] = {}
    experts: tuple[Tensor, ...] = ()


def task_out_channels(tasks: Tasks) -> dict[str, int]:
    r"""``{task: out_channels}`` from a list of names (one output each) or a
    mapping name -> output count, with clear errors for a bad task list."""
    if isinstance(tasks, str):
        raise TypeError("'tasks' must be a list of task names or a mapping name -> "
                        f"out_channels (got the string {tasks!r})")
    out = dict(tasks) if isinstance(tasks, Mapping) else {t: 1 for t in tasks}
    if len(out) == 0:
        raise ValueError("'tasks' must name at least one task")
    if not isinstance(tasks, Mapping) and len(out) != len(list(tasks)):
        raise ValueError(f"duplicate task names in {list(tasks)}")
    for name, c in out.items():
        if not isinstance(name, str) or "/" in name or name in ("shared", INPUT):
            raise ValueError(f"invalid task name {name!r} (a string without '/', not "
                             f"'shared' or '{INPUT}')")
        if int(c) < 1:
            raise ValueError(f"task {name!r}: out_channels must be positive (got {c})")
    return {k: int(v) for k, v in out.items()}


def _per_task_count(value: Union[int, Mapping[str, int]], tasks: Sequence[str],
                    what: str) -> dict[str, int]:
    r"""An expert count given once for all tasks (int) or per task (mapping)."""
    if isinstance(value, Mapping):
        if set(value) != set(tasks):
            raise ValueError(f"'{what}' names tasks {sorted(value)} but the task list is "
                             f"{sorted(tasks)}")
        counts = {t: int(value[t]) for t in tasks}
    else:
        counts = {t: int(value) for t in tasks}
    for t, c in counts.items():
        if c < 1:
            raise ValueError(f"'{what}': the expert group of task {t!r} is empty ({c} "
                             "experts); every group needs at least one expert")
    return counts


def _select(idx: tuple[int, ...]) -> Union[slice, Tensor]:
    r"""A slice for consecutive expert indices, else an index tensor."""
    if idx == tuple(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, dtype=torch.long)


class _FeatureGatedExperts(torch.autograd.Function):
    r"""All ``E`` feature-gated experts of a level, over one or more input
    streams, into one ``[N, E * H]`` output in expert order, without a
    ``[k, N, F]`` tensor: forward and backward run over blocks of rows (about
    ``BLOCK_ELEMENTS`` gated inputs each, the experts of one stream batched),
    and backward recomputes the gates from the streams and the low-rank
    logits ``z`` (the only activations saved besides the streams). Memory:
    the streams, ``z``, the output and a few blocks, whatever ``N``.

    ``y_j = (x_{s(j)} * 2 sigmoid(z_j B_j)) W_j + b_j`` with
    ``z_j = x_{s(j)} A_j``; ``groups[i]`` lists the experts reading ``xs[i]``.
    """

    BLOCK_ELEMENTS = 1 << 18  # k * rows * F per block: 1 MiB of float32

    @staticmethod
    def _rows(k: int, F_in: int) -> int:
        return max(1, _FeatureGatedExperts.BLOCK_ELEMENTS // max(k * F_in, 1))

    @staticmethod
    def forward(ctx, groups: tuple[tuple[int, ...], ...], a: Tensor, b: Tensor,
                weight: Tensor, bias: Tensor, *xs: Tensor) -> Tensor:
        N, F_in = xs[0].shape
        E, r, H = b.size(0), b.size(1), weight.size(2)
        out = xs[0].new_empty(N, E, H)
        a3 = a.view(F_in, E, r)
        zs = []
        for x, idx in zip(xs, groups, strict=True):
            k, sel = len(idx), _select(idx)
            bg, wg, bias_g = b[sel], weight[sel], bias[sel].unsqueeze(1)
            # low-rank logits z = x A, as [k, N, r] (small) so that row blocks are contiguous
            z = (x @ a3[:, sel].reshape(F_in, k * r)).view(N, k, r).transpose(0, 1).contiguous()
            zs.append(z)
            step = _FeatureGatedExperts._rows(k, F_in)
            for lo in range(0, N, step):
                xc, zk = x[lo:lo + step], z[:, lo:lo + step]  # zk: [k, rows, r]
                gated = torch.bmm(zk, bg).sigmoid_().mul_(xc)  # [k, rows, F]: half the gated input
                res = torch.baddbmm(bias_g, gated, wg, alpha=2.0)  # [k, rows, H]
                if isinstance(sel, slice):
                    out[lo:lo + step, sel] = res.transpose(0, 1)
                else:  # one copy per expert: cheaper than an index_put on CPU
                    for j, e in enumerate(idx):
                        out[lo:lo + step, e] = res[j]
        ctx.groups = groups
        ctx.num_streams = len(xs)
        ctx.save_for_backward(a, b, weight, *xs, *zs)
        return out.view(N, E * H)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        a, b, weight, *rest = ctx.saved_tensors
        xs, zs = rest[:ctx.num_streams], rest[ctx.num_streams:]
        N, F_in = xs[0].shape
        E, r, H = b.size(0), b.size(1), weight.size(2)
        g3 = grad_out.reshape(N, E, H)
        a3 = a.view(F_in, E, r)
        grad_a = torch.empty_like(a)
        grad_b, grad_w = torch.empty_like(b), torch.empty_like(weight)
        grad_bias = g3.sum(0)  # [E, H]
        grad_xs = []
        for x, z, idx in zip(xs, zs, ctx.groups, strict=True):
            k, sel = len(idx), _select(idx)
            bg, wg = b[sel], weight[sel]
            ag = a3[:, sel].reshape(F_in, k * r)
            grad_x, grad_z = torch.empty_like(x), torch.empty_like(z)
            gb, gw = torch.zeros_like(bg), torch.zeros_like(wg)
            step = _FeatureGatedExperts._rows(k, F_in)
            for lo in range(0, N, step):
                xc = x[lo:lo + step]
                gc = (g3[lo:lo + step, sel].transpose(0, 1) if isinstance(sel, slice) else
                      torch.stack([g3[lo:lo + step, e] for e in idx]))  # [k, rows, H]
                zk = z[:, lo:lo + step]  # [k, rows, r]
                s = torch.bmm(zk, bg).sigmoid_()  # [k, rows, F]
                gw.baddbmm_((s * xc).transpose(1, 2), gc, alpha=2.0)  # s * x: half gated input
                gxt = torch.bmm(gc, wg.transpose(1, 2))  # [k, rows, F]: d loss / d gated input
                if k == 1:
                    torch.mul(gxt[0], s[0], out=grad_x[lo:lo + step]).mul_(2.0)
                else:
                    torch.sum(gxt * s, 0, out=grad_x[lo:lo + step]).mul_(2.0)
                # d(x 2 sigmoid(u)) / du = 2 x s (1 - s): 2 sigmoid_backward(gxt * x, s)
                gu = torch.ops.aten.sigmoid_backward.grad_input(gxt.mul_(xc), s,
                                                                 grad_input=gxt)
                gb.baddbmm_(zk.transpose(1, 2), gu, alpha=2.0)
                torch.bmm(gu, bg.transpose(1, 2), out=grad_z[:, lo:lo + step])  # [k, rows, r]
            gzf = grad_z.transpose(0, 1).reshape(N, k * r).mul_(2.0)  # d loss / d (x A)
            grad_x.addmm_(gzf, ag.T)
            grad_a.view(F_in, E, r)[:, sel] = (x.T @ gzf).view(F_in, k, r)
            grad_b[sel], grad_w[sel] = gb, gw
            grad_xs.append(grad_x)
        return (None, grad_a, grad_b, grad_w, grad_bias, *grad_xs)


def _feature_gated_experts(groups: tuple[tuple[int, ...], ...], xs: Sequence[Tensor],
                           a: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    r"""``_FeatureGatedExperts`` in one dtype. Under autocast every operand is
    cast to the autocast dtype (as ``nn.Linear`` would run) and autocast is off
    inside, so that backward, which runs outside autocast, meets the dtypes
    forward saved; the casts carry the gradients back to float32 parameters."""
    device_type = xs[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return _FeatureGatedExperts.apply(groups, a, b, weight, bias, *xs)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        return _FeatureGatedExperts.apply(groups, a.to(dtype), b.to(dtype), weight.to(dtype),
                                          bias.to(dtype), *(x.to(dtype) for x in xs))


class GateSpec(NamedTuple):
    r"""One gate of a level: the stream it writes, the stream it reads (its
    input and, with a self-gate, its residual) and the experts it may see."""

    name: str
    input: str
    allowed: tuple[int, ...]


class MultiGateLevel(Module):
    r"""One level of experts and masked softmax gates, the building block of
    MMoE, CGC, PLE and HoME.

    Expert :math:`e` reads stream :math:`s(e)`, gate :math:`g` reads stream
    :math:`s(g)` and may see the experts :math:`\mathcal{A}_g`:

    .. math::
        \tilde{\mathbf{x}}_e &= \mathbf{x}_{s(e)} \odot
            2\sigma(\mathbf{x}_{s(e)} \mathbf{A}_e \mathbf{B}_e)
            \qquad \text{(feature-gate, optional)}

        \mathbf{h}_e &= \phi\big(\mathrm{Norm}_e(\tilde{\mathbf{x}}_e
            \mathbf{W}_e + \mathbf{b}_e)\big)

        \mathbf{w}_g &= \mathrm{softmax}_{e \in \mathcal{A}_g}
            (\mathbf{x}_{s(g)} \mathbf{V}_g + \mathbf{c}_g)

        \mathbf{y}_g &= \sum_{e \in \mathcal{A}_g} w_{g,e} \mathbf{h}_e
            + \sigma(\mathbf{x}_{s(g)} \mathbf{U}_g) \odot \mathbf{x}_{s(g)}
            \qquad \text{(self-gate, optional)}

    with :math:`\phi` = ReLU without expert normalisation and Swish (SiLU)
    with it (HoME), unless ``activation`` names one.

    Args:
        in_channels (int): size of every input stream.
        hidden_channels (int): width of each expert (size of every output).
        expert_inputs (list of str): the stream each expert reads.
        gates (list of GateSpec): the gates, in output order.
        expert_norm (str, optional): ``"batch_norm"``, ``"layer_norm"`` or
            :obj:`None`, applied to each expert's output separately.
            (default: :obj:`None`)
        feature_gate_rank (int, optional): rank of the per-expert input gate;
            :obj:`None` or ``0`` for none. (default: :obj:`None`)
        self_gate (bool, optional): add the gated residual of each gate's input
            stream (needs ``in_channels == hidden_channels``).
            (default: :obj:`False`)
        activation (str, optional): ``"relu"`` or ``"silu"``; :obj:`None`
            picks ReLU without ``expert_norm`` and SiLU with it.
            (default: :obj:`None`)
        norm_gain (float, optional): initial gain :math:`\gamma_0` of the
            expert normalisation (its learnable per-unit scale).
            (default: :obj:`1.0`, as :class:`torch.nn.BatchNorm1d`)

    Shapes:
        - **input:** dict of streams, each ``[N, F]``
        - **output:** dict of streams (one per gate) ``[N, H]``, gate weights
          ``[N, G, E]``, expert activations ``[N, E, H]``
    """

    gate_index: Tensor  # buffer: position of each gate's logits in the dense [G, E] matrix

    def __init__(self, in_channels: int, hidden_channels: int, expert_inputs: Sequence[str],
                 gates: Sequence[GateSpec], expert_norm: Optional[str] = None,
                 feature_gate_rank: Optional[int] = None, self_gate: bool = False,
                 activation: Optional[str] = None, norm_gain: float = 1.0):
        super().__init__()
        if not norm_gain > 0 or not math.isfinite(norm_gain):
            raise ValueError(f"'norm_gain' must be a positive number (got {norm_gain})")
        if expert_norm not in EXPERT_NORMS:
            raise ValueError(f"'expert_norm' must be one of {EXPERT_NORMS} (got {expert_norm!r})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"'activation' must be one of {ACTIVATIONS} (got {activation!r})")
        if len(expert_inputs) == 0:
            raise ValueError("a level needs at least one expert")
        if self_gate and in_channels != hidden_channels:
            raise ValueError("a self-gate needs in_channels == hidden_channels "
                             f"(got {in_channels} and {hidden_channels})")
        E = len(expert_inputs)
        for gate in gates:
            if not gate.allowed:
                raise ValueError(f"gate {gate.name!r} sees no expert")
            if min(gate.allowed) < 0 or max(gate.allowed) >= E:
                raise ValueError(f"gate {gate.name!r} sees an expert outside [0, {E - 1}]")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_experts = E
        self.expert_inputs = list(expert_inputs)
        # Maximal runs of consecutive experts reading the same stream: (stream, (start, end)).
        runs: list[tuple[str, tuple[int, int]]] = []
        for e, name in enumerate(self.expert_inputs):
            if runs and runs[-1][0] == name:
                runs[-1] = (name, (runs[-1][1][0], e + 1))
            else:
                runs.append((name, (e, e + 1)))
        self._stream_groups = runs
        # The experts reading each stream, streams in order of first use (feature-gates).
        sets: dict[str, list[int]] = {}
        for e, name in enumerate(self.expert_inputs):
            sets.setdefault(name, []).append(e)
        self._stream_sets = tuple((name, tuple(idx)) for name, idx in sets.items())
        gate_sets: dict[str, list[int]] = {}  # the gates reading each stream
        for gi, g in enumerate(gates):
            gate_sets.setdefault(g.input, []).append(gi)
        self._gate_streams = tuple((name, tuple(gis)) for name, gis in gate_sets.items())
        self.gate_specs = list(gates)
        self.expert_norm = None if expert_norm == "none" else expert_norm
        self.activation = activation or ("silu" if self.expert_norm is not None else "relu")
        self.norm_gain = float(norm_gain)
        self.feature_gate_rank = int(feature_gate_rank or 0)
        self.self_gate = self_gate

        self.weight = Parameter(torch.empty(E, in_channels, hidden_channels))
        self.bias = Parameter(torch.empty(E, hidden_channels))
        if self.expert_norm == "batch_norm":
            self.norm: Optional[Module] = torch.nn.BatchNorm1d(E * hidden_channels)
            self.norm_weight, self.norm_bias = None, None
        elif self.expert_norm == "layer_norm":
            self.norm = None
            self.norm_weight = Parameter(torch.empty(E, hidden_channels))
            self.norm_bias = Parameter(torch.empty(E, hidden_channels))
        else:
            self.register_module("norm", None)
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        r = self.feature_gate_rank
        if r > 0:
            self.fg_a = Parameter(torch.empty(in_channels, E * r))
            self.fg_b = Parameter(torch.empty(E, r, in_channels))
        else:
            self.register_parameter("fg_a", None)
            self.register_parameter("fg_b", None)
        self.gate_lins = ModuleList([Linear(in_channels, len(g.allowed)) for g in gates])
        self.self_gates = (ModuleList([Linear(in_channels, hidden_channels) for _ in gates])
                           if self_gate else None)
        # Position of each gate's logits in the flattened dense [G, E] gate matrix.
        index = [gi * E + e for gi, g in enumerate(gates) for e in g.allowed]
        self.register_buffer("gate_index", torch.tensor(index, dtype=torch.long),
                             persistent=False)
        mask = torch.zeros(len(gates), E, dtype=torch.bool)
        for gi, g in enumerate(gates):
            mask[gi, list(g.allowed)] = True
        self.register_buffer("gate_mask", mask, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_channels)
        for e in range(self.num_experts):  # as torch.nn.Linear, expert by expert
            torch.nn.init.kaiming_uniform_(self.weight[e].T, a=math.sqrt(5))
            torch.nn.init.uniform_(self.bias[e], -bound, bound)
        if self.norm is not None:
            self.norm.reset_parameters()
            torch.nn.init.constant_(self.norm.weight, self.norm_gain)
        if self.norm_weight is not None:
            torch.nn.init.constant_(self.norm_weight, self.norm_gain)
            torch.nn.init.zeros_(self.norm_bias)
        if self.fg_a is not None:
            # B = 0: every feature-gate starts as the identity (2 * sigmoid(0) = 1).
            torch.nn.init.normal_(self.fg_a, std=1.0 / math.sqrt(self.in_channels))
            torch.nn.init.zeros_(self.fg_b)
        for lin in self.gate_lins:
            lin.reset_parameters()
        if self.self_gates is not None:
            for lin in self.self_gates:
                lin.reset_parameters()

    def forward(self, streams: dict[str, Tensor]
                ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        r"""
        Args:
            streams (dict): input streams by name, each ``[N, F]``.

        Letters: N rows, F input features, E experts, G gates, H expert width,
        r feature-gate rank.
        """
        E, H = self.num_experts, self.hidden_channels
        N = streams[self.expert_inputs[0]].size(0)
        if self.training and self.norm is not None and N < 2:
            raise ValueError(f"expert_norm='batch_norm' needs at least 2 rows per training "
                             f"batch (got {N}): batch statistics of one row are undefined; "
                             "use larger batches (drop a last batch of one row) or "
                             "expert_norm='layer_norm'")
        if self.fg_a is None:  # experts grouped by the stream they read: one matmul per run
            parts = []
            for stream, (s, e) in self._stream_groups:
                w = self.weight[s:e].permute(1, 0, 2).reshape(self.in_channels, (e - s) * H)
                parts.append(torch.addmm(self.bias[s:e].reshape(-1), streams[stream], w))
            h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [N, E*H]
        else:  # all feature-gated experts in one pass over row blocks, written in place
            assert self.fg_b is not None
            h = _feature_gated_experts(tuple(idx for _, idx in self._stream_sets),
                                       [streams[name] for name, _ in self._stream_sets],
                                       self.fg_a, self.fg_b, self.weight, self.bias)
        if self.norm is not None:
            h = self.norm(h)
        h = h.view(N, E, H)
        if self.norm_weight is not None and self.norm_bias is not None:  # layer_norm
            h = F.layer_norm(h, (H,)) * self.norm_weight + self.norm_bias
        h = F.silu(h) if self.activation == "silu" else F.relu(h)  # [N, E, H]

        logits, res_gates = self._gate_logits(streams)
        G = len(self.gate_specs)
        dense = logits.new_full((N, G * E), float("-inf"))
        dense = dense.index_copy(1, self.gate_index, logits)
        weights = torch.softmax(dense.view(N, G, E), dim=-1)  # [N, G, E], 0 where hidden
        mixed = torch.bmm(weights, h)  # [N, G, H]
        out = {}
        for gi, (g, y) in enumerate(zip(self.gate_specs, mixed.unbind(1), strict=True)):
            if res_gates is not None:
                res = streams[g.input]
                y = y + torch.sigmoid(res_gates[gi]) * res
            out[g.name] = y
        return out, weights, h

    def _gate_logits(self, streams: dict[str, Tensor]
                     ) -> tuple[Tensor, Optional[list[Tensor]]]:
        r"""The gates' logits ``[N, sum_g |A_g|]`` (gate order) and, with
        self-gates, each gate's self-gate pre-activation ``x_{s(g)} U_g``
        ``[N, H]``. With self-gates, the gate and self-gate layers reading one
        stream run as one matmul (their weights concatenated)."""
        if self.self_gates is None:
            return torch.cat([lin(streams[g.input]) for g, lin in
                              zip(self.gate_specs, self.gate_lins, strict=True)], dim=1), None
        logit_parts: list[Optional[Tensor]] = [None] * len(self.gate_specs)
        res_parts: list[Optional[Tensor]] = [None] * len(self.gate_specs)
        for stream, gis in self._gate_streams:
            lins = [cast(Linear, m) for m in ([self.gate_lins[gi] for gi in gis]
                                              + [self.self_gates[gi] for gi in gis])]
            out = F.linear(streams[stream], torch.cat([lin.weight for lin in lins]),
                           torch.cat([lin.bias for lin in lins]))
            parts = out.split([lin.out_features for lin in lins], dim=1)
            for j, gi in enumerate(gis):
                logit_parts[gi], res_parts[gi] = parts[j], parts[len(gis) + j]
        return (torch.cat(cast(list[Tensor], logit_parts), dim=1),
                cast(list[Tensor], res_parts))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"num_experts={self.num_experts}, num_gates={len(self.gate_specs)})")


class Tower(Module):
    r"""A task tower: ``Linear(H, T) -> ReLU -> Linear(T, C)`` (one
    ``Linear(H, C)`` when ``tower_channels`` is 0)."""

    def __init__(self, in_channels: int, tower_channels: int, out_channels: int):
        super().__init__()
        if tower_channels > 0:
            self.net: Module = torch.nn.Sequential(Linear(in_channels, tower_channels),
                                                   torch.nn.ReLU(),
                                                   Linear(tower_channels, out_channels))
        else:
            self.net = Linear(in_channels, out_channels)
        self.out_channels = out_channels

    def reset_parameters(self):
        for m in self.net.modules():
            if isinstance(m, Linear):
                m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.out_channels == 1 else out


class MultiTaskHead(Module):
    r"""Base of the multi-task layers: levels of :class:`MultiGateLevel` (none
    for the shared bottom) and one :class:`Tower` per task.

    Subclasses describe the levels; this class runs them and the towers.
    ``expert_labels[l][e]`` names the owner of expert ``e`` of level ``l``
    (``"shared"``, ``"group:<name>"`` or ``"task:<name>"``).
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 tower_channels: int = 16):
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = task_out_channels(tasks)
        self.tasks = list(self.out_channels)
        self.num_tasks = len(self.tasks)
        self.tower_channels = tower_channels
        self.levels = ModuleList()
        self.expert_labels: list[list[str]] = []
        self.towers = ModuleDict({t: Tower(hidden_channels, tower_channels, c)
                                  for t, c in self.out_channels.items()})

    def _add_level(self, labels: Sequence[str], expert_inputs: Sequence[str],
                   gates: Sequence[GateSpec], **kwargs) -> None:
        in_channels = self.in_channels if len(self.levels) == 0 else self.hidden_channels
        self.levels.append(MultiGateLevel(in_channels, self.hidden_channels, expert_inputs,
                                          gates, **kwargs))
        self.expert_labels.append(list(labels))

    def reset_parameters(self):
        for level in self.levels:
            level.reset_parameters()
        for tower in self.towers.values():
            tower.reset_parameters()

    @property
    def gate_names(self) -> list[str]:
        return [f"{li}/{g.name}" for li, level in enumerate(self.levels)
                for g in cast(MultiGateLevel, level).gate_specs]

    def check_input(self, x: Tensor) -> None:
        r"""Raise a clear error for an input that is not a finite float
        ``[N, in_channels]`` tensor."""
        name = type(self).__name__
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: 'x' must be a float tensor [N, {self.in_channels}] "
                            f"(got {getattr(x, 'dtype', type(x).__name__)})")
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(f"{name}: 'x' must have shape [N, {self.in_channels}] "
                             f"(in_channels={self.in_channels}); got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(1).sum())
            raise ValueError(f"{name}: 'x' holds NaN or infinite values ({bad} of {x.size(0)} "
                             "rows); clean or impute the features first")

    def forward(self, x: Tensor) -> MultiTaskOutput:
        r"""
        Args:
            x (Tensor): representation ``[N, F]``.
        """
        self.check_input(x)
        streams = {INPUT: x}
        gates, experts = {}, []
        for li, level in enumerate(self.levels):
            streams, weights, h = level(streams)
            for gi, g in enumerate(cast(MultiGateLevel, level).gate_specs):
                gates[f"{li}/{g.name}"] = weights[:, gi]  # [N, E_l]
            experts.append(h)
        outputs = {t: self.towers[t](streams[t]) for t in self.tasks}
        return MultiTaskOutput(outputs, gates, tuple(experts))

    def __repr__(self) -> str:
        E = [level.num_experts for level in self.levels]
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"tasks={self.tasks}, experts={E})")


class SharedBottom(MultiTaskHead):
    r"""The shared-bottom baseline (Caruana, 1997): one MLP shared by all
    tasks, then one tower per task.

    .. math::
        \hat{y}_t = \mathrm{tower}_t\big(\mathrm{MLP}(\mathbf{x})\big)

    Args:
        in_channels (int): size of the representation.
        hidden_channels (int): width of the shared MLP.
        tasks (list or dict): task names, or names -> output counts.
        num_layers (int, optional): layers of the shared MLP. (default: :obj:`1`)
        tower_channels (int, optional): hidden width of each tower.
            (default: :obj:`16`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MultiTaskOutput` (no gates)
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 num_layers: int = 1, tower_channels: int = 16):
        super().__init__(in_channels, hidden_channels, tasks, tower_channels)
        if num_layers < 1:
            raise ValueError(f"'num_layers' must be positive (got {num_layers})")
        self.num_layers = num_layers
        layers: list[Module] = []
        for i in range(num_layers):
            layers += [Linear(in_channels if i == 0 else hidden_channels, hidden_channels),
                       torch.nn.ReLU()]
        self.bottom = torch.nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        for m in self.bottom.modules():
            if isinstance(m, Linear):
                m.reset_parameters()

    def forward(self, x: Tensor) -> MultiTaskOutput:
        self.check_input(x)
        h = self.bottom(x)  # [N, H]
        return MultiTaskOutput({t: self.towers[t](h) for t in self.tasks})

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"tasks={self.tasks}, num_layers={self.num_layers})")


class MMoE(MultiTaskHead):
    r"""Multi-gate Mixture-of-Experts from the `"Modeling Task Relationships
    in Multi-task Learning with Multi-gate Mixture-of-Experts"
    <https://dl.acm.org/doi/10.1145/3219819.3220007>`_ paper (Ma et al., 2018):
    shared experts, one softmax gate and one tower per task.

    .. math::
        \hat{y}_t = \mathrm{tower}_t\Big(\sum_{e=1}^{E}
        \mathrm{softmax}(\mathbf{x}\mathbf{V}_t)_e\,
        \mathrm{ReLU}(\mathbf{x}\mathbf{W}_e + \mathbf{b}_e)\Big)

    Args:
        in_channels (int): size of the representation.
        hidden_channels (int): width of each expert.
        tasks (list or dict): task names, or names -> output counts.
        num_experts (int, optional): shared experts. (default: :obj:`4`)
        tower_channels (int, optional): hidden width of each tower.
            (default: :obj:`16`)
        expert_norm (str, optional): per-expert normalisation (see
            :class:`MultiGateLevel`). (default: :obj:`None`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MultiTaskOutput` with gates ``"0/<task>"``
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 num_experts: int = 4, tower_channels: int = 16,
                 expert_norm: Optional[str] = None):
        super().__init__(in_channels, hidden_channels, tasks, tower_channels)
        if num_experts < 1:
            raise ValueError(f"'num_experts' must be positive (got {num_experts})")
        self.num_experts = num_experts
        every = tuple(range(num_experts))
        self._add_level(["shared"] * num_experts, [INPUT] * num_experts,
                        [GateSpec(t, INPUT, every) for t in self.tasks],
                        expert_norm=expert_norm)
        self.reset_parameters()


class PLE(MultiTaskHead):
    r"""Progressive Layered Extraction from the `"Progressive Layered
    Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations" <https://dl.acm.org/doi/10.1145/3383313.3412236>`_
    paper (Tang et al., 2020): ``num_levels`` stacked CGC levels.

    Each level has ``num_shared_experts`` shared experts and
    ``num_task_experts`` experts per task. Task :math:`t`'s gate sees the
    shared and task :math:`t`'s experts; in every level but the last a shared
    gate sees all experts and feeds the next level's shared experts, while the
    next level's task-:math:`t` experts and gate read task :math:`t`'s output:

    .. math::
        \mathbf{y}^{(l)}_t = \sum_{e \in S \cup T_t}
        \mathrm{softmax}_{S \cup T_t}(\mathbf{y}^{(l-1)}_t \mathbf{V}_t)_e\,
        \mathbf{h}^{(l)}_e, \qquad
        \mathbf{y}^{(l)}_{\mathrm{shared}} = \sum_{e} \mathrm{softmax}
        (\mathbf{y}^{(l-1)}_{\mathrm{shared}}\mathbf{V}_s)_e\,\mathbf{h}^{(l)}_e

    with :math:`\mathbf{y}^{(0)}_\cdot = \mathbf{x}`.

    Args:
        in_channels (int): size of the representation.
        hidden_channels (int): width of each expert.
        tasks (list or dict): task names, or names -> output counts.
        num_levels (int, optional): number of CGC levels. (default: :obj:`2`)
        num_shared_experts (int, optional): shared experts per level.
            (default: :obj:`2`)
        num_task_experts (int or dict, optional): experts per task and level,
            once for all tasks or per task name. (default: :obj:`1`)
        tower_channels (int, optional): hidden width of each tower.
            (default: :obj:`16`)
        expert_norm (str, optional): per-expert normalisation.
            (default: :obj:`None`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MultiTaskOutput` with gates ``"<l>/<task>"`` and
          ``"<l>/shared"`` (all levels but the last)
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 num_levels: int = 2, num_shared_experts: int = 2,
                 num_task_experts: Union[int, Mapping[str, int]] = 1,
                 tower_channels: int = 16, expert_norm: Optional[str] = None):
        super().__init__(in_channels, hidden_channels, tasks, tower_channels)
        if num_levels < 1:
            raise ValueError(f"'num_levels' must be positive (got {num_levels})")
        if num_shared_experts < 1:
            raise ValueError("'num_shared_experts': the shared expert group is empty "
                             f"({num_shared_experts} experts)")
        self.num_levels = num_levels
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = _per_task_count(num_task_experts, self.tasks,
                                                "num_task_experts")
        S = num_shared_experts
        for li in range(num_levels):
            labels = ["shared"] * S
            inputs = [INPUT if li == 0 else "shared"] * S
            own: dict[str, list[int]] = {}
            for t in self.tasks:
                own[t] = list(range(len(labels), len(labels) + self.num_task_experts[t]))
                labels += [f"task:{t}"] * self.num_task_experts[t]
                inputs += [INPUT if li == 0 else t] * self.num_task_experts[t]
            gates = [GateSpec(t, INPUT if li == 0 else t, tuple(range(S)) + tuple(own[t]))
                     for t in self.tasks]
            if li < num_levels - 1:
                gates.append(GateSpec("shared", INPUT if li == 0 else "shared",
                                      tuple(range(len(labels)))))
            self._add_level(labels, inputs, gates, expert_norm=expert_norm)
        self.reset_parameters()


class CGC(PLE):
    r"""Customized Gate Control (Tang et al., 2020): one level of
    :class:`PLE`, shared plus task-specific experts, each task's gate over the
    shared and its own experts.

    .. math::
        \hat{y}_t = \mathrm{tower}_t\Big(\sum_{e \in S \cup T_t}
        \mathrm{softmax}_{S \cup T_t}(\mathbf{x}\mathbf{V}_t)_e\,
        \mathbf{h}_e\Big)

    Args:
        in_channels (int): size of the representation.
        hidden_channels (int): width of each expert.
        tasks (list or dict): task names, or names -> output counts.
        num_shared_experts (int, optional): shared experts. (default: :obj:`2`)
        num_task_experts (int or dict, optional): experts per task.
            (default: :obj:`1`)
        tower_channels (int, optional): hidden width of each tower.
            (default: :obj:`16`)
        expert_norm (str, optional): per-expert normalisation.
            (default: :obj:`None`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MultiTaskOutput` with gates ``"0/<task>"``
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 num_shared_experts: int = 2,
                 num_task_experts: Union[int, Mapping[str, int]] = 1,
                 tower_channels: int = 16, expert_norm: Optional[str] = None):
        super().__init__(in_channels, hidden_channels, tasks, num_levels=1,
                         num_shared_experts=num_shared_experts,
                         num_task_experts=num_task_experts, tower_channels=tower_channels,
                         expert_norm=expert_norm)


class HoME(MultiTaskHead):
    r"""Hierarchy of Multi-gate Experts from the `"HoME: Hierarchy of
    Multi-Gate Experts for Multi-Task Learning at Kuaishou"
    <https://arxiv.org/abs/2408.05430>`_ paper (Wang et al., 2024).

    Tasks are grouped into meta-task groups. Level 1 has globally shared
    experts and one expert group per meta-task group; gate :math:`g` (one per
    group) sees the shared and group :math:`g`'s experts, and a shared gate
    sees all of them. Level 2 has shared, group and task-specific experts;
    task :math:`t` in group :math:`g` has a gate over the shared, group
    :math:`g`'s and its own experts, reading group :math:`g`'s level-1 output:

    .. math::
        \mathbf{y}^{(1)}_g &= \sum_{e \in S^1 \cup G^1_g}
            \mathrm{softmax}(\mathbf{x}\mathbf{V}_g)_e\,\mathbf{h}^{(1)}_e

        \mathbf{y}^{(2)}_t &= \sum_{e \in S^2 \cup G^2_g \cup T_t}
            \mathrm{softmax}(\mathbf{y}^{(1)}_g\mathbf{V}_t)_e\,\mathbf{h}^{(2)}_e
            + \sigma(\mathbf{y}^{(1)}_g \mathbf{U}_t) \odot \mathbf{y}^{(1)}_g

        \mathbf{h}_e &= \mathrm{Swish}\big(\mathrm{BN}_e(\tilde{\mathbf{x}}_e
            \mathbf{W}_e + \mathbf{b}_e)\big), \qquad
        \tilde{\mathbf{x}}_e = \mathbf{x}_e \odot 2\sigma(\mathbf{x}_e
            \mathbf{A}_e \mathbf{B}_e)

    Level-2 shared experts read the level-1 shared gate's output, group
    experts their group's output, task experts their group's output. Each
    part can be switched off: ``expert_norm=None`` (plain ReLU experts),
    ``hierarchy_mask=False`` (every gate sees every expert of its level),
    ``feature_gate=False``, ``self_gate=False``. With all four off, each
    task's output is an MMoE-style softmax mixture of ReLU experts.

    Args:
        in_channels (int): size of the representation.
        hidden_channels (int): width of each expert.
        tasks (list or dict): task names, or names -> output counts.
        groups (dict): meta-task group name -> list of its tasks; every task
            in exactly one group. :obj:`None` puts each task in its own group.
        num_shared_experts (int or list of two ints, optional): shared
            experts per level, once for both levels or per level.
            (default: :obj:`2`)
        num_group_experts (int, optional): experts per group and level.
            (default: :obj:`1`)
        num_task_experts (int or dict, optional): task experts (level 2).
            (default: :obj:`1`)
        tower_channels (int, optional): hidden width of each tower.
            (default: :obj:`16`)
        expert_norm (str, optional): ``"batch_norm"``, ``"layer_norm"`` or
            :obj:`None`. (default: :obj:`"batch_norm"`)
        hierarchy_mask (bool, optional): mask the gates as above.
            (default: :obj:`True`)
        feature_gate (bool, optional): per-expert input gates.
            (default: :obj:`True`)
        feature_gate_rank (int, optional): rank of :math:`\mathbf{A}_e
            \mathbf{B}_e`. (default: :obj:`4`)
        self_gate (bool, optional): the level-2 gated residual.
            (default: :obj:`True`)
        activation (str, optional): the experts' activation, ``"relu"`` or
            ``"silu"``; :obj:`None`: Swish with ``expert_norm``, ReLU
            without. (default: :obj:`None`)
        expert_norm_gain (float, optional): initial gain :math:`\gamma_0` of
            the expert normalisation, :math:`\mathrm{BN}_e(\mathbf{u}) =
            \gamma \hat{\mathbf{u}} + \beta` with :math:`\gamma` learned from
            :math:`\gamma_0`. The paper's BatchNorm starts at 1; moegraph starts
            at 0.1, since at 1 the normalised experts start at unit scale and
            memorise sparse (one-hot) tabular input within a few epochs (see
            ``experiments/results/home_diagnosis.md``). Pass ``1.0`` for the
            paper's exact form. (default: :obj:`0.1`)

    Shapes:
        - **input:** ``[N, F]``
        - **output:** :class:`MultiTaskOutput` with gates ``"0/<group>"``,
          ``"0/shared"`` and ``"1/<task>"``
    """

    def __init__(self, in_channels: int, hidden_channels: int, tasks: Tasks,
                 groups: Optional[Mapping[str, Sequence[str]]] = None,
                 num_shared_experts: Union[int, Sequence[int]] = 2, num_group_experts: int = 1,
                 num_task_experts: Union[int, Mapping[str, int]] = 1,
                 tower_channels: int = 16, expert_norm: Optional[str] = "batch_norm",
                 hierarchy_mask: bool = True, feature_gate: bool = True,
                 feature_gate_rank: int = 4, self_gate: bool = True,
                 activation: Optional[str] = None, expert_norm_gain: float = GAIN):
        super().__init__(in_channels, hidden_channels, tasks, tower_channels)
        group_lists: dict[str, list[str]] = {t: [t] for t in self.tasks} if groups is None else {
            str(g): list(ts) for g, ts in dict(groups).items()}
        self.group_of = self._check_groups(group_lists)
        self.groups = group_lists
        shared = ([int(num_shared_experts)] * 2 if isinstance(num_shared_experts, int)
                  else [int(n) for n in num_shared_experts])
        if len(shared) != 2 or min(shared) < 1:
            raise ValueError("'num_shared_experts' must be a positive count, or two (one per "
                             f"level); an empty shared expert group is not allowed (got "
                             f"{num_shared_experts})")
        if num_group_experts < 1:
            raise ValueError("'num_group_experts': every meta-task group's expert group is "
                             f"empty ({num_group_experts} experts)")
        if not expert_norm_gain > 0 or not math.isfinite(expert_norm_gain):
            raise ValueError(f"'expert_norm_gain' must be a positive number (got "
                             f"{expert_norm_gain})")
        if feature_gate and feature_gate_rank < 1:
            raise ValueError(f"'feature_gate_rank' must be positive (got {feature_gate_rank})")
        self.num_shared_experts = shared
        self.num_group_experts = num_group_experts
        self.num_task_experts = _per_task_count(num_task_experts, self.tasks,
                                                "num_task_experts")
        self.expert_norm = None if expert_norm == "none" else expert_norm
        self.hierarchy_mask = hierarchy_mask
        self.feature_gate = feature_gate
        self.feature_gate_rank = feature_gate_rank
        self.self_gate = self_gate
        self.activation = activation
        self.expert_norm_gain = expert_norm_gain
        rank = feature_gate_rank if feature_gate else None
        S, Gn = shared[0], num_group_experts

        # Level 1: shared + one expert group per meta-task group.
        labels, inputs = ["shared"] * S, [INPUT] * S
        own1: dict[str, list[int]] = {}
        for g in group_lists:
            own1[g] = list(range(len(labels), len(labels) + Gn))
            labels += [f"group:{g}"] * Gn
            inputs += [INPUT] * Gn
        every1 = tuple(range(len(labels)))
        gates = [GateSpec(g, INPUT, tuple(range(S)) + tuple(own1[g]) if hierarchy_mask
                          else every1) for g in group_lists]
        gates.append(GateSpec("shared", INPUT, every1))
        self._add_level(labels, inputs, gates, expert_norm=expert_norm,
                        feature_gate_rank=rank, activation=activation,
                        norm_gain=expert_norm_gain)

        # Level 2: shared + group + task experts; one gate per task.
        S = shared[1]
        labels, inputs = ["shared"] * S, ["shared"] * S
        own2: dict[str, list[int]] = {}
        for g in group_lists:
            own2[g] = list(range(len(labels), len(labels) + Gn))
            labels += [f"group:{g}"] * Gn
            inputs += [g] * Gn
        for t in self.tasks:
            own2[t] = list(range(len(labels), len(labels) + self.num_task_experts[t]))
            labels += [f"task:{t}"] * self.num_task_experts[t]
            inputs += [self.group_of[t]] * self.num_task_experts[t]
        every2 = tuple(range(len(labels)))
        gates = [GateSpec(t, self.group_of[t],
                          tuple(range(S)) + tuple(own2[self.group_of[t]]) + tuple(own2[t])
                          if hierarchy_mask else every2) for t in self.tasks]
        self._add_level(labels, inputs, gates, expert_norm=expert_norm,
                        feature_gate_rank=rank, self_gate=self_gate, activation=activation,
                        norm_gain=expert_norm_gain)
        self.reset_parameters()

    def _check_groups(self, groups: dict[str, list[str]]) -> dict[str, str]:
        if not groups:
            raise ValueError("'groups' must hold at least one meta-task group")
        group_of: dict[str, str] = {}
        for g, members in groups.items():
            if g in ("shared", INPUT) or "/" in g:
                raise ValueError(f"invalid meta-task group name {g!r}")
            if g in self.tasks and members != [g]:
                raise ValueError(f"meta-task group {g!r} has the name of a task but other "
                                 "members; rename it")
            if not members:
                raise ValueError(f"meta-task group {g!r} is empty: every group needs at least "
                                 "one task")
            for t in members:
                if t not in self.tasks:
                    raise ValueError(f"task {t!r} in meta-task group {g!r} is not in the task "
                                     f"list {self.tasks}")
                if t in group_of:
                    raise ValueError(f"task {t!r} is in two meta-task groups ({group_of[t]!r} "
                                     f"and {g!r})")
                group_of[t] = g
        missing = [t for t in self.tasks if t not in group_of]
        if missing:
            raise ValueError(f"task(s) {missing} are in no meta-task group of {groups}")
        return group_of

    def __repr__(self) -> str:
        parts = [p for p, on in (("norm", self.expert_norm is not None),
                                 ("mask", self.hierarchy_mask),
                                 ("feature_gate", self.feature_gate),
                                 ("self_gate", self.self_gate)) if on]
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"tasks={self.tasks}, groups={list(self.groups)}, "
                f"parts=[{', '.join(parts)}])")
