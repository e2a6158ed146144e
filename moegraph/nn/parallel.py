r"""Expert parallelism: the experts of a sparse MoE block sharded across processes.

Each of the ``W`` processes of a :mod:`torch.distributed` group holds
``E / W`` of the ``E`` experts and routes its own rows with a replicated router
(data parallelism). Rows travel to the process that holds their expert and
back with two :func:`torch.distributed.all_to_all_single` calls (dropless: the
numbers of rows are exchanged first), as in GShard (Lepikhin et al., 2020,
`"GShard" <https://arxiv.org/abs/2006.16668>`_) and Switch Transformers.

.. code-block:: python

    moe = SparseMoE(64, 256, num_experts=8, k=2)     # the same on every rank
    shard_experts(moe)                               # after init_process_group
    model = DistributedDataParallel(moe)             # the router is all-reduced,
                                                     # the experts are not

**Gradient scale.** Every parameter gets
:math:`\frac{1}{W}\sum_r \partial L_r / \partial\theta`, with :math:`L_r` the
loss of rank :math:`r`: DDP averages the replicated parameters (router, shared
experts, the rest of the model), and the sharded expert parameters, which
collect the gradient of every rank's rows through the all-to-all, are scaled
by :math:`1/W` in the backward pass. So ``W`` ranks with local-mean losses on
equal local batches make the same update as one process with the mean loss on
the global batch.

**Checkpoints** hold the full stacked tensors ``[E, ...]`` under the keys of
the unsharded bank: :meth:`~torch.nn.Module.state_dict` gathers them (a
collective: call it on every rank, as Lightning does) and
:meth:`~torch.nn.Module.load_state_dict` keeps this rank's slice, so a
checkpoint loads for any number of processes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module, Parameter

from moegraph.nn.experts import Experts, LinearExperts, MLPExperts, ModuleExperts
from moegraph.nn.moe import SparseMoE

STACKED = {MLPExperts: ("weight1", "bias1", "weight2", "bias2"), LinearExperts: ("weight", "bias")}
"""Expert banks with weights stacked over the experts (dimension 0), and those weights."""
SUPPORTED = (*STACKED, ModuleExperts)


def _group_info(group: Optional[Any]) -> tuple[int, int]:
    r"""``(world_size, rank)`` of ``group``; ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process 'group' was given but torch.distributed is not "
                               "initialised")
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the expert-parallel 'group'")
    return dist.get_world_size(group), rank


def _check_supported(experts: Module) -> None:
    if type(experts) not in SUPPORTED:
        raise TypeError(f"expert parallelism supports "
                        f"{', '.join(cls.__name__ for cls in SUPPORTED)} "
                        f"(got {type(experts).__name__})")


class _AllToAll(torch.autograd.Function):
    r"""Differentiable :func:`torch.distributed.all_to_all_single` along dim 0.

    The backward pass is the same exchange with the split sizes swapped: the
    gradient of each row goes back to the rank the row came from.
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    r"""Identity in the forward pass, gradient times ``scale`` in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ShardedExperts(Experts):
    r"""The local shard of an expert bank, with the all-to-all dispatch: rank
    :math:`r` of a group of :math:`W` holds experts
    :math:`[rE/W, (r+1)E/W)` and runs them on the rows that every rank routed
    to them.

    It has the :class:`~moegraph.nn.experts.Experts` interface of the full
    bank (rows sorted by global expert, ``counts [E]``), so
    :class:`~moegraph.nn.SparseMoE` uses it unchanged; :func:`shard_experts`
    puts it in place. The forward pass, on every rank:

    1. exchanges the ``[E]`` row counts (an all-to-all of ``E`` integers);
    2. **host synchronisation**: the send and receive split sizes are copied
       to the host in one ``tolist()`` (the all-to-all needs them there); the
       local bank then copies its ``E / W`` block sizes to the host as well
       (a second, small copy), as it does unsharded (all banks but
       :class:`MLPExperts` with ``backend="grouped_mm"``);
    3. sends each row to the rank of its expert (all-to-all), sorts the
       received rows by local expert, runs the local experts, and sends the
       outputs back (all-to-all); the combine weight is applied on the
       sending rank, so its gradient stays local.

    The backward pass runs the two exchanges in reverse, with the split sizes
    kept from the forward pass (no further host synchronisation). Every rank
    must call the forward (and backward) pass the same number of times, with
    zero rows if it has none. The gradients of the local expert parameters are
    scaled by :math:`1/W` (see :mod:`moegraph.nn.parallel`); activation
    parameters shared by all experts (e.g. a PReLU) are replicated, not
    sharded, and left to DDP.

    With a capacity factor, :class:`~moegraph.nn.SparseMoE` drops overflow on
    each rank's own assignments before the dispatch: capacity is per rank (per
    local batch), as under plain data parallelism, so each rank's output
    equals that of the unsharded layer on its rows alone. The same holds for
    the expert-choice router.

    Args:
        experts (MLPExperts, LinearExperts or ModuleExperts): the
            full bank of ``E`` experts,
            identical on every rank; it is sliced in place.
        group (ProcessGroup, optional): the expert-parallel group; the default
            group if :obj:`None`. Without torch.distributed the world size is 1
            and this is the full bank. (default: :obj:`None`)

    Shapes:
        - **input:** ``x_sorted [A, F]`` sorted by expert, ``counts [E]``,
          ``weight [A]`` (optional)
        - **output:** ``[A, O]``
    """

    def __init__(self, experts: Experts, group: Optional[Any] = None):
        super().__init__()
        _check_supported(experts)
        world_size, rank = _group_info(group)
        E = experts.num_experts
        if E % world_size != 0:
            raise ValueError(f"expert parallelism needs num_experts divisible by the world "
                             f"size (got num_experts={E} and world_size={world_size})")
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.num_experts = E
        self.num_local_experts = E // world_size
        self.offset = rank * self.num_local_experts
        self.in_channels = experts.in_channels
        self.out_channels = experts.out_channels

        end = self.offset + self.num_local_experts
        if isinstance(experts, ModuleExperts):
            experts = ModuleExperts(list(experts.experts)[self.offset:end],
                                    experts.in_channels, experts.out_channels)
            sharded = [name for name, _ in experts.named_parameters()]
        else:
            sharded = [name for name in STACKED[type(experts)]
                       if getattr(experts, name) is not None]
            for name in sharded:
                param = getattr(experts, name)
                setattr(experts, name, Parameter(param.detach()[self.offset:end].clone(),
                                                 requires_grad=param.requires_grad))
            experts.num_experts = self.num_local_experts
        self.local = experts
        self._sharded = tuple(sharded)
        self.register_state_dict_post_hook(_gather_state_dict)
        self.register_load_state_dict_pre_hook(_slice_state_dict)

    def reset_parameters(self):
        r"""Re-initialise the local experts (from this rank's random state)."""
        self.local.reset_parameters()

    def sharded_names(self) -> list[str]:
        r"""Names (relative to this module) of the parameters and buffers that
        differ per rank: the stacked MLP weights, or everything of the local
        expert modules."""
        names = [f"local.{name}" for name in self._sharded]
        if isinstance(self.local, ModuleExperts):
            names += [f"local.{name}" for name, _ in self.local.named_buffers()]
        return names

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:
        r"""
        Args:
            x_sorted (Tensor): ``[A, F]`` this rank's rows, sorted by expert
                (A assignments, F features).
            counts (Tensor): ``[E]`` number of rows for each of the E experts.
            weight (Tensor, optional): ``[A]`` combine weights.

        Returns:
            Tensor: ``[A, O]`` the expert outputs, in the order of ``x_sorted``.
        """
        if counts.numel() != self.num_experts:
            raise ValueError(f"'counts' has {counts.numel()} entries but there are "
                             f"{self.num_experts} experts")
        if self.world_size == 1:
            return self.local(x_sorted, counts, weight)
        W, El = self.world_size, self.num_local_experts

        counts = counts.to(torch.int64).contiguous()
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [W * El]
        # recv_counts[s * El + j]: rows from rank s for local expert j
        send_splits = counts.view(W, El).sum(dim=1)  # [W]
        recv_splits = recv_counts.view(W, El).sum(dim=1)  # [W]
        splits = torch.cat([send_splits, recv_splits]).tolist()  # host sync
        send, recv = splits[:W], splits[W:]

        x_recv = _AllToAll.apply(x_sorted, recv, send, self.group)  # [R, F], by source rank
        # Received rows come grouped by source rank, then by local expert:
        # sort them by local expert (stable, so by source rank within one).
        local_expert = torch.arange(El, device=counts.device).repeat(W)
        local_expert = local_expert.repeat_interleave(recv_counts, output_size=sum(recv))
        order = torch.argsort(local_expert, stable=True)  # [R]
        local_counts = recv_counts.view(W, El).sum(dim=0)  # [El]

        params = {name: _ScaleGrad.apply(p, 1.0 / W)
                  for name, p in self.local.named_parameters() if name in self._sharded}
        y_local = torch.func.functional_call(
            self.local, params, (x_recv.index_select(0, order), local_counts))  # [R, O]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_recv = y_local.index_select(0, inverse)  # [R, O], by source rank
        y = _AllToAll.apply(y_recv, send, recv, self.group)  # [A, O]
        return y if weight is None else y * weight.to(y.dtype).unsqueeze(-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.local}, num_experts={self.num_experts}, "
                f"rank={self.rank}, world_size={self.world_size})")


# Checkpoints in the layout of the full bank ###################################


def _all_gather(tensor: Tensor, group) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _module_expert_key(name: str, offset: int) -> str:
    r"""A key of the local :class:`ModuleExperts`, ``experts.<j>.<rest>``, as
    the key of the full bank, ``experts.<offset + j>.<rest>``."""
    head, index, rest = name.split(".", 2)
    return f"{head}.{int(index) + offset}.{rest}"


def _gather_state_dict(module: ShardedExperts, state_dict: dict[str, Any], prefix: str,
                       local_metadata: dict) -> None:
    r"""State-dict post-hook: replace the local shard by the full bank
    (a collective when the world size is above 1)."""
    local = prefix + "local."
    entries = {key[len(local):]: value for key, value in state_dict.items()
               if key.startswith(local)}
    gathered: dict[str, Any] = {}
    if not isinstance(module.local, ModuleExperts):
        for name, value in entries.items():
            if name in module._sharded and module.world_size > 1:
                value = _all_gather(value, module.group)
            gathered[name] = value
    else:  # ModuleExperts: every entry belongs to one expert; they may differ in shape
        mine = {_module_expert_key(name, module.offset): value.detach().cpu()
                for name, value in entries.items()}
        if module.world_size > 1:
            everyone: list[Any] = [None] * module.world_size
            dist.all_gather_object(everyone, mine, group=module.group)
        else:
            everyone = [mine]
        device = next(iter(entries.values())).device if entries else torch.device("cpu")
        parts = sorted(((name, value) for part in everyone for name, value in part.items()),
                       key=lambda item: int(item[0].split(".", 2)[1]))
        gathered = {name: value.to(device) for name, value in parts}
    # Rebuild in place, the full bank where the shard was: the key order of
    # the unsharded layer.
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if not key.startswith(local):
            state_dict[key] = value
        elif gathered:
            state_dict.update((prefix + name, tensor) for name, tensor in gathered.items())
            gathered = {}


def _slice_state_dict(module: ShardedExperts, state_dict: dict[str, Any], prefix: str,
                      local_metadata: dict, strict: bool, missing_keys: list[str],
                      unexpected_keys: list[str], error_msgs: list[str]) -> None:
    r"""Load-state-dict pre-hook: keep this rank's slice of the full bank."""
    keys = [key for key in state_dict
            if key.startswith(prefix) and not key.startswith(prefix + "local.")]
    start, stop = module.offset, module.offset + module.num_local_experts
    for key in keys:
        name, value = key[len(prefix):], state_dict.pop(key)
        if not isinstance(module.local, ModuleExperts):
            if name in STACKED[type(module.local)]:
                if value.size(0) != module.num_experts:
                    error_msgs.append(f"{key}: the checkpoint holds {value.size(0)} experts, "
                                      f"the layer {module.num_experts}")
                    continue
                value = value[start:stop]
            state_dict[prefix + "local." + name] = value
        else:
            head, index, rest = name.split(".", 2)
            if start <= int(index) < stop:
                state_dict[f"{prefix}local.{head}.{int(index) - start}.{rest}"] = value
            elif not 0 <= int(index) < module.num_experts:
                unexpected_keys.append(key)


# Sharding a model ##############################################################


def sharded_names(module: Module) -> list[str]:
    r"""Fully qualified names, relative to ``module``, of the sharded expert
    parameters (and buffers) inside it: the ones DDP must neither broadcast
    nor all-reduce."""
    return [f"{name}.{entry}" if name else entry
            for name, child in module.named_modules() if isinstance(child, ShardedExperts)
            for entry in child.sharded_names()]


def ignore_sharded_in_ddp(module: Module) -> list[str]:
    r"""Tell :class:`~torch.nn.parallel.DistributedDataParallel` to leave the
    sharded expert parameters of ``module`` alone (no broadcast from rank 0 at
    wrapping, no gradient all-reduce); other names already ignored are kept.

    Call it on the module that DDP wraps, before wrapping: with Lightning, the
    :class:`~lightning.pytorch.LightningModule` (for example in its
    ``configure_model`` hook). :func:`shard_experts` calls it for you on the
    module it is given.

    Returns:
        list[str]: the names now ignored.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    names += [name for name in sharded_names(module) if name not in names]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def shard_experts(module: Module, group: Optional[Any] = None) -> Module:
    r"""Shard the experts of every :class:`~moegraph.nn.SparseMoE` inside
    ``module`` (itself included) across the processes of ``group``, in place,
    and make DDP ignore them (:func:`ignore_sharded_in_ddp` on
    ``module``).

    Call it on every rank, after :func:`torch.distributed.init_process_group`,
    before wrapping ``module`` in DDP and before making the optimizer (the
    expert parameters are replaced by their slices), on a model identical on
    every rank (same seed, or a loaded checkpoint); each rank keeps its
    ``E / W`` experts. With Lightning, call it in
    ``LightningModule.configure_model`` (the process group exists by then)
    on the LightningModule itself, whose names DDP sees.

    Without torch.distributed, or in a group of one process, it returns
    ``module`` unchanged: the layer is exactly :class:`~moegraph.nn.SparseMoE`.

    Args:
        module (Module): a model holding sparse MoE blocks.
        group (ProcessGroup, optional): the expert-parallel group; the default
            group if :obj:`None`. DDP's own all-reduces may share it: both are
            issued in the same order on every rank. (default: :obj:`None`)

    Returns:
        Module: ``module``.

    Raises:
        ValueError: if a block's number of experts is not divisible by the
            world size.
        TypeError: if a block has experts other than :class:`MLPExperts`,
            :class:`LinearExperts` or :class:`ModuleExperts`.
    """
    world_size, _ = _group_info(group)
    if world_size == 1:
        return module
    blocks = [moe for moe in module.modules()
              if isinstance(moe, SparseMoE) and not isinstance(moe.experts, ShardedExperts)]
    for moe in blocks:  # check them all before changing any
        _check_supported(moe.experts)
        if moe.num_experts % world_size != 0:
            raise ValueError(f"expert parallelism needs num_experts divisible by the world "
                             f"size (got num_experts={moe.num_experts} and "
                             f"world_size={world_size})")
    for moe in blocks:
        moe.experts = ShardedExperts(moe.experts, group)
    ignore_sharded_in_ddp(module)
    return module
