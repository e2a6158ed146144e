r"""Multi-task networks: an encoder shared by every task, then a multi-task
head (shared-bottom, MMoE, CGC, PLE or HoME). The encoder is the data's:
LightGCN over a user-item graph (:class:`MultiTaskRecommender`) or numeric
plus categorical columns (:class:`TabularMultiTaskNet`);
:func:`multitask_net` picks the one the data module names."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn import Embedding, Linear, Module
from torch_geometric.nn import LGConv

from moegraph.nn.multitask import MultiTaskHead, MultiTaskOutput, Tasks, task_out_channels


class BipartiteLightGCN(Module):
    r"""LightGCN (`He et al., 2020 <https://arxiv.org/abs/2002.02126>`_) over
    the user-item graph, with side features.

    Users and items are the nodes of one graph (items after users). Each
    node's layer-0 embedding is its id embedding plus a linear map of its
    side features; ``num_layers`` parameter-free propagations with the
    symmetric normalisation follow, and the layers are averaged:

    .. math::
        \mathbf{e}^{(0)}_v = \mathbf{E}_v + \mathbf{x}_v\mathbf{W}_{\tau(v)},
        \qquad \mathbf{e}^{(k+1)} = \mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}
        \mathbf{e}^{(k)}, \qquad
        \mathbf{e}_v = \frac{1}{K+1}\sum_{k=0}^{K} \mathbf{e}^{(k)}_v

    Args:
        num_users (int): number of users.
        num_items (int): number of items.
        user_channels (int): size of the user side features (0 for none).
        item_channels (int): size of the item side features (0 for none).
        embedding_channels (int): embedding size.
        num_layers (int, optional): propagation steps. (default: :obj:`2`)

    Shapes:
        - **input:** ``user_x [U, Fu]``, ``item_x [I, Fi]``, ``edge_index [2, M]``
          (user index, item index)
        - **output:** ``[U, D]``, ``[I, D]``
    """

    def __init__(self, num_users: int, num_items: int, user_channels: int,
                 item_channels: int, embedding_channels: int, num_layers: int = 2):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"'num_layers' must be non-negative (got {num_layers})")
        self.num_users, self.num_items = num_users, num_items
        self.embedding_channels, self.num_layers = embedding_channels, num_layers
        self.embedding = Embedding(num_users + num_items, embedding_channels)
        self.user_lin = Linear(user_channels, embedding_channels) if user_channels else None
        self.item_lin = Linear(item_channels, embedding_channels) if item_channels else None
        self.conv = LGConv()
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.normal_(self.embedding.weight, std=0.1)
        for lin in (self.user_lin, self.item_lin):
            if lin is not None:
                lin.reset_parameters()

    def forward(self, user_x: Tensor, item_x: Tensor, edge_index: Tensor
                ) -> tuple[Tensor, Tensor]:
        U = self.num_users
        if user_x.size(0) != U or item_x.size(0) != self.num_items:
            raise ValueError(f"expected {U} users and {self.num_items} items (got "
                             f"{user_x.size(0)} and {item_x.size(0)})")
        h = self.embedding.weight
        side = []
        side.append(self.user_lin(user_x) if self.user_lin is not None
                    else user_x.new_zeros(U, self.embedding_channels))
        side.append(self.item_lin(item_x) if self.item_lin is not None
                    else item_x.new_zeros(self.num_items, self.embedding_channels))
        h = h + torch.cat(side)  # [U + I, D]
        src, dst = edge_index[0], edge_index[1] + U
        graph = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])  # both directions
        out = h
        for _ in range(self.num_layers):
            h = self.conv(h, graph)
            out = out + h
        out = out / (self.num_layers + 1)
        return out[:U], out[U:]

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.num_users}, {self.num_items}, "
                f"{self.embedding_channels}, num_layers={self.num_layers})")


class MultiTaskRecommender(Module):
    r"""A bipartite graph encoder shared by every task, then a multi-task
    head (shared-bottom, MMoE, CGC, PLE or HoME) on each (user, item) pair.

    .. math::
        \mathbf{z}_{ui} = [\mathbf{e}_u \,\|\, \mathbf{e}_i \,\|\,
        \mathbf{e}_u \odot \mathbf{e}_i], \qquad
        \{\hat{y}_t\}_t = \mathrm{head}(\mathbf{z}_{ui})

    Args:
        num_users (int): number of users.
        num_items (int): number of items.
        user_channels (int): size of the user side features.
        item_channels (int): size of the item side features.
        tasks (list or dict): task names, or names -> output counts.
        head (callable or MultiTaskHead): the head, or a factory called as
            ``head(in_channels=3 * embedding_channels, tasks=tasks)`` (e.g. a
            Hydra ``_partial_`` of :class:`~moegraph.nn.HoME`).
        embedding_channels (int, optional): embedding size. (default: :obj:`32`)
        num_layers (int, optional): LightGCN propagation steps.
            (default: :obj:`2`)
        encoder (str, optional): the encoder the data asks for (see
            :func:`multitask_net`); anything but ``"lightgcn"`` is an error.
            (default: :obj:`"lightgcn"`)

    Shapes:
        - **input:** ``user_x [U, Fu]``, ``item_x [I, Fi]``, ``edge_index [2, M]``,
          ``user [B]``, ``item [B]``
        - **output:** :class:`~moegraph.nn.MultiTaskOutput`
    """

    def __init__(self, num_users: int, num_items: int, user_channels: int,
                 item_channels: int, tasks: Tasks,
                 head: Union[MultiTaskHead, Callable[..., MultiTaskHead]],
                 embedding_channels: int = 32, num_layers: int = 2,
                 encoder: str = "lightgcn"):
        super().__init__()
        if encoder != "lightgcn":
            raise ValueError(f"MultiTaskRecommender is the 'lightgcn' encoder; the data asks for "
                             f"{encoder!r} (use multitask_net, or a network for that data)")
        out_channels = task_out_channels(tasks)
        self.tasks = list(out_channels)
        self.encoder = BipartiteLightGCN(num_users, num_items, user_channels, item_channels,
                                         embedding_channels, num_layers)
        if not isinstance(head, Module):
            head = head(in_channels=3 * embedding_channels, tasks=out_channels)
        if not isinstance(head, MultiTaskHead):
            raise TypeError(f"'head' must be a MultiTaskHead (got {type(head).__name__})")
        if head.tasks != self.tasks:
            raise ValueError(f"the head's tasks {head.tasks} differ from the data's tasks "
                             f"{self.tasks}")
        if head.in_channels != 3 * embedding_channels:
            raise ValueError(f"the head expects {head.in_channels} input channels; the encoder "
                             f"gives 3 * {embedding_channels}")
        self.head = head

    def reset_parameters(self):
        self.encoder.reset_parameters()
        self.head.reset_parameters()

    def forward(self, user_x: Tensor, item_x: Tensor, edge_index: Tensor, user: Tensor,
                item: Tensor) -> MultiTaskOutput:
        r"""
        Args:
            user_x (Tensor): user side features ``[U, Fu]``.
            item_x (Tensor): item side features ``[I, Fi]``.
            edge_index (Tensor): message-passing edges ``[2, M]`` (user, item).
            user (Tensor): user of each row ``[B]``.
            item (Tensor): item of each row ``[B]``.
        """
        for name, ids, n in (("user", user, self.encoder.num_users),
                             ("item", item, self.encoder.num_items)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                raise ValueError(f"{name} id out of range: got [{int(ids.min())}, "
                                 f"{int(ids.max())}], there are {n} {name}s")
        eu, ei = self.encoder(user_x, item_x, edge_index)
        zu, zi = eu[user], ei[item]  # [B, D]
        return self.head(torch.cat([zu, zi, zu * zi], dim=-1))  # [B, 3D] -> per task

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.encoder}, {self.head})"


class TabularMultiTaskNet(Module):
    r"""Numeric columns and embedded categorical columns, concatenated, then
    a multi-task head.

    .. math::
        \mathbf{z} = [\mathbf{x} \,\|\, \mathbf{E}^{(1)}_{c_1} \,\|\, \dots
        \,\|\, \mathbf{E}^{(K)}_{c_K}], \qquad
        \{\hat{y}_t\}_t = \mathrm{head}(\mathbf{z})

    With one-hot categoricals (the data module's default) there is no
    categorical column left and :math:`\mathbf{z} = \mathbf{x}`.

    Args:
        in_channels (int): numeric (and one-hot) columns of ``x``.
        tasks (list or dict): task names, or names -> output counts.
        head (callable or MultiTaskHead): the head, or a factory called as
            ``head(in_channels=..., tasks=tasks)``.
        cardinalities (list of int, optional): categories per embedded
            column (index 0: unknown). (default: none)
        categorical_channels (int, optional): embedding size of each
            categorical column. (default: :obj:`8`)
        encoder (str, optional): the encoder the data asks for; anything but
            ``"tabular"`` is an error. (default: :obj:`"tabular"`)

    Shapes:
        - **input:** ``x [B, in_channels]``, ``x_cat [B, K]`` (long, optional)
        - **output:** :class:`~moegraph.nn.MultiTaskOutput`
    """

    def __init__(self, in_channels: int, tasks: Tasks,
                 head: Union[MultiTaskHead, Callable[..., MultiTaskHead]],
                 cardinalities: Sequence[int] = (), categorical_channels: int = 8,
                 encoder: str = "tabular"):
        super().__init__()
        if encoder != "tabular":
            raise ValueError(f"TabularMultiTaskNet is the 'tabular' encoder; the data asks for "
                             f"{encoder!r}")
        self.cardinalities = [int(c) for c in cardinalities]
        if any(c < 1 for c in self.cardinalities):
            raise ValueError(f"'cardinalities' must be positive (got {self.cardinalities})")
        if in_channels < 0 or (in_channels == 0 and not self.cardinalities):
            raise ValueError(f"'in_channels' must be positive, or zero with categorical columns "
                             f"(got {in_channels})")
        out_channels = task_out_channels(tasks)
        self.tasks = list(out_channels)
        self.in_channels = in_channels
        self.categorical_channels = categorical_channels
        self.embeddings = torch.nn.ModuleList(
            [Embedding(c, categorical_channels) for c in self.cardinalities])
        width = in_channels + len(self.cardinalities) * categorical_channels
        if not isinstance(head, Module):
            head = head(in_channels=width, tasks=out_channels)
        if not isinstance(head, MultiTaskHead):
            raise TypeError(f"'head' must be a MultiTaskHead (got {type(head).__name__})")
        if head.tasks != self.tasks:
            raise ValueError(f"the head's tasks {head.tasks} differ from the data's tasks "
                             f"{self.tasks}")
        if head.in_channels != width:
            raise ValueError(f"the head expects {head.in_channels} input channels; the encoder "
                             f"gives {width}")
        self.head = head

    def reset_parameters(self):
        for emb in self.embeddings:
            emb.reset_parameters()
        self.head.reset_parameters()

    def forward(self, x: Tensor, x_cat: Optional[Tensor] = None) -> MultiTaskOutput:
        r"""
        Args:
            x (Tensor): numeric (and one-hot) features ``[B, in_channels]``.
            x_cat (Tensor, optional): category index per embedded column
                ``[B, K]``.
        """
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(f"'x' must have shape [B, {self.in_channels}] (in_channels="
                             f"{self.in_channels}); got {list(x.shape)}")
        K = len(self.cardinalities)
        if K == 0:
            if x_cat is not None and x_cat.numel():
                raise ValueError("'x_cat' given but the network has no categorical column")
            return self.head(x)
        if x_cat is None or x_cat.dim() != 2 or x_cat.size(1) != K or x_cat.size(0) != x.size(0):
            raise ValueError(f"'x_cat' must have shape [{x.size(0)}, {K}] (one index per "
                             f"categorical column); got "
                             f"{None if x_cat is None else list(x_cat.shape)}")
        for k, c in enumerate(self.cardinalities):
            col = x_cat[:, k]
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= c):
                raise ValueError(f"'x_cat' column {k}: category index out of range [0, {c - 1}] "
                                 f"(got [{int(col.min())}, {int(col.max())}])")
        z = torch.cat([x] + [emb(x_cat[:, k]) for k, emb in enumerate(self.embeddings)], 1)
        return self.head(z)  # [B, F + K * D] -> per task

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, "
                f"categorical={self.cardinalities}, {self.head})")


ENCODERS = ("lightgcn", "tabular")


def multitask_net(encoder: str, tasks: Tasks,
                  head: Union[MultiTaskHead, Callable[..., MultiTaskHead]],
                  embedding_channels: int = 32, num_layers: int = 2,
                  categorical_channels: int = 8, **data: Any) -> Module:
    r"""The multi-task network for the data: ``encoder`` (from the data
    module's ``net_kwargs()``) picks :class:`MultiTaskRecommender`
    (``"lightgcn"``: ``embedding_channels``, ``num_layers``) or
    :class:`TabularMultiTaskNet` (``"tabular"``: ``categorical_channels``);
    ``data`` holds the rest of what the data module says (sizes)."""
    if encoder == "lightgcn":
        return MultiTaskRecommender(tasks=tasks, head=head,
                                    embedding_channels=embedding_channels,
                                    num_layers=num_layers, **data)
    if encoder == "tabular":
        return TabularMultiTaskNet(tasks=tasks, head=head,
                                   categorical_channels=categorical_channels, **data)
    raise ValueError(f"unknown multi-task encoder {encoder!r}; known: {ENCODERS}")
