r"""Graph-level networks: a GCN / GIN / GMoE stack over the nodes of many
small graphs, pooled into one prediction per graph (OGB's molecule models)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Embedding, Linear, Module, ModuleList, Parameter, Sequential
from torch_geometric.nn import GCNConv, GINConv, MessagePassing
from torch_geometric.nn.aggr import AttentionalAggregation
from torch_geometric.nn.pool import global_add_pool, global_max_pool, global_mean_pool
from torch_geometric.utils import degree, scatter

from moegraph.nn.conv.hop_moe import HopMoEConv, reset_submodules
from moegraph.nn.output import ModelOutput
from moegraph.nn.routing import Router, sum_aux_losses

GRAPH_CONVS = ("gcn", "gin")
POOLS = ("mean", "sum", "max", "attention")
EDGE_MODES = ("message", "node", "none")


def atom_feature_dims() -> list[int]:
    r"""Vocabulary sizes of OGB's nine atom features."""
    from ogb.utils.features import get_atom_feature_dims

    return list(get_atom_feature_dims())


def bond_feature_dims() -> list[int]:
    r"""Vocabulary sizes of OGB's three bond features."""
    from ogb.utils.features import get_bond_feature_dims

    return list(get_bond_feature_dims())


class FeatureEncoder(Module):
    r"""Embeds integer categorical features and sums the embeddings: OGB's
    ``AtomEncoder`` / ``BondEncoder`` (Xavier-uniform tables), with a
    ``reset_parameters``.

    .. math::
        \mathbf{h}_i = \sum_{f} \mathbf{E}_f[x_{i,f}]

    Args:
        feature_dims (sequence of int): vocabulary size of each feature.
        channels (int): embedding size.

    Shapes:
        - **input:** ``x [N, F]`` integers, ``0 <= x[:, f] < feature_dims[f]``
        - **output:** ``[N, channels]``
    """

    def __init__(self, feature_dims: Sequence[int], channels: int):
        super().__init__()
        self.feature_dims = list(feature_dims)
        self.channels = channels
        self.embeddings = ModuleList([Embedding(d, channels) for d in self.feature_dims])
        self.reset_parameters()

    def reset_parameters(self):
        for emb in self.embeddings:
            torch.nn.init.xavier_uniform_(emb.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.size(1) != len(self.embeddings):
            raise ValueError(f"expected integer features [N, {len(self.embeddings)}] (got "
                             f"{tuple(x.shape)})")
        dtype = cast(Embedding, self.embeddings[0]).weight.dtype
        out = x.new_zeros(x.size(0), self.channels, dtype=dtype)
        for f, emb in enumerate(self.embeddings):
            out = out + emb(x[:, f])
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self.feature_dims)}, {self.channels})"


class BondGCNConv(MessagePassing):
    r"""OGB's GCN convolution with bond features (Hu et al. 2020, the
    ogbg-mol* reference):

    .. math::
        \mathbf{h}_i = \sum_{j \in \mathcal{N}(i)} \frac{\mathrm{ReLU}(
        \mathbf{W}\mathbf{x}_j + \mathbf{e}_{ji})}{\sqrt{d_i d_j}}
        + \frac{\mathrm{ReLU}(\mathbf{W}\mathbf{x}_i + \mathbf{r})}{d_i}

    with :math:`d_i` the degree plus one, :math:`\mathbf{e}_{ji}` the bond
    embedding and :math:`\mathbf{r}` a learned root embedding.

    Shapes:
        - **input:** ``x [N, C]``, ``edge_index [2, M]``, ``edge_attr [M, 3]``
        - **output:** ``[N, C]``
    """

    def __init__(self, channels: int, edge_dims: Optional[Sequence[int]] = None):
        super().__init__(aggr="add")
        self.channels = channels
        self.lin = Linear(channels, channels)
        self.root_emb = Embedding(1, channels)
        self.bond_encoder = FeatureEncoder(edge_dims or bond_feature_dims(), channels)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin.reset_parameters()
        self.root_emb.reset_parameters()
        self.bond_encoder.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        x = self.lin(x)
        edge_emb = self.bond_encoder(edge_attr)  # [M, C]
        row, col = edge_index
        deg = degree(row, x.size(0), dtype=x.dtype) + 1  # [N]
        inv_sqrt = deg.pow(-0.5)
        norm = inv_sqrt[row] * inv_sqrt[col]  # [M]
        out = self.propagate(edge_index, x=x, edge_attr=edge_emb, norm=norm)
        return out + F.relu(x + self.root_emb.weight) / deg.view(-1, 1)

    def message(self, x_j: Tensor, edge_attr: Tensor, norm: Tensor) -> Tensor:
        return norm.view(-1, 1) * F.relu(x_j + edge_attr)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels})"


class BondGINConv(MessagePassing):
    r"""OGB's GIN convolution with bond features (GINE, Hu et al. 2020):

    .. math::
        \mathbf{h}_i = \mathrm{MLP}\Big((1 + \epsilon)\mathbf{x}_i +
        \sum_{j \in \mathcal{N}(i)} \mathrm{ReLU}(\mathbf{x}_j + \mathbf{e}_{ji})\Big)

    with the MLP ``Linear(C, 2C) - BatchNorm - ReLU - Linear(2C, C)`` and a
    learned :math:`\epsilon`.

    Shapes:
        - **input:** ``x [N, C]``, ``edge_index [2, M]``, ``edge_attr [M, 3]``
        - **output:** ``[N, C]``
    """

    def __init__(self, channels: int, edge_dims: Optional[Sequence[int]] = None):
        super().__init__(aggr="add")
        self.channels = channels
        self.mlp = Sequential(Linear(channels, 2 * channels), BatchNorm1d(2 * channels),
                              torch.nn.ReLU(), Linear(2 * channels, channels))
        self.eps = Parameter(torch.zeros(1))
        self.bond_encoder = FeatureEncoder(edge_dims or bond_feature_dims(), channels)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        for module in self.mlp:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.eps.data.zero_()
        self.bond_encoder.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        edge_emb = self.bond_encoder(edge_attr)  # [M, C]
        return self.mlp((1 + self.eps) * x + self.propagate(edge_index, x=x, edge_attr=edge_emb))

    def message(self, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        return F.relu(x_j + edge_attr)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels})"


class GraphLevelGNN(Module):
    r"""A graph-level GNN in the layout of OGB's molecule baselines (Hu et
    al. 2020): an atom encoder, ``num_layers`` convolutions each followed by
    BatchNorm, ReLU (not after the last) and dropout, a graph pooling and a
    linear head, one score per task:

    .. math::
        \mathbf{H}^{(l+1)} = \mathrm{Drop}\big(\sigma\big(\mathrm{BN}\big(
        \mathrm{Conv}^{(l)}(\mathbf{H}^{(l)}, \mathcal{E}, \mathbf{E}^{(l)})
        \big)\big)\big), \qquad
        \hat{\mathbf{y}}_g = \mathbf{W}\,\mathrm{Pool}\big(\{\mathbf{h}_i^{(L)}
        : i \in g\}\big) + \mathbf{b}

    The convolution is dense (``num_experts=None``): ``"gcn"`` or
    ``"gin"``; or a GMoE layer (``num_experts`` set): a
    :class:`~moegraph.nn.conv.HopMoEConv` of hop-1 and hop-2 experts of that
    type, routed per atom (Wang et al., NeurIPS 2023).

    Bond features (``edge_attr``) enter by ``edge_mode``:

    - ``"message"``: inside the message, OGB's convolutions
      (:class:`BondGCNConv`, :class:`BondGINConv`); dense layers only.
    - ``"node"``: each layer adds to every atom the mean of its bonds'
      embeddings, :math:`\mathbf{h}_i + \mathrm{mean}_{j \in \mathcal{N}(i)}
      \mathbf{e}^{(l)}_{ji}`, before a plain convolution (PyG's
      ``GCNConv`` / ``GINConv``, or the hop experts, which take no edge
      features). Dense and MoE layers then see the bonds identically.
    - ``"none"``: bonds ignored.

    Args:
        hidden_channels (int): width :math:`C`.
        out_channels (int): number of tasks :math:`T`.
        num_layers (int, optional): convolutions. (default: :obj:`5`)
        conv (str, optional): ``"gcn"`` or ``"gin"``. (default: :obj:`"gcn"`)
        in_channels (int, optional): size of float node features; :obj:`None`
            means OGB's integer atom features through an atom encoder.
        pool (str, optional): ``"mean"``, ``"sum"``, ``"max"`` or
            ``"attention"`` (a gated sum, PyG's ``AttentionalAggregation``).
            (default: :obj:`"mean"`)
        edge_mode (str, optional): ``"message"``, ``"node"`` or ``"none"``;
            :obj:`None` gives ``"message"`` for dense layers and ``"node"``
            for MoE layers. (default: :obj:`None`)
        dropout (float, optional): dropout after each layer. (default: :obj:`0.5`)
        residual (bool, optional): add each layer's input to its output.
            (default: :obj:`False`)
        num_experts (int, optional): experts per GMoE layer; :obj:`None`
            for dense layers. (default: :obj:`None`)
        num_hop2_experts (int, optional): hop-2 experts per layer; :obj:`None`
            gives half.
        k (int, optional): experts per atom. (default: :obj:`None`, the
            router's own default)
        router (str, optional): router by name. (default: :obj:`"topk"`)
        router_kwargs (dict, optional): arguments of the router.
        capacity_factor (float, optional): expert capacity; dropless if :obj:`None`.
        balance (str, optional): ``"all"`` or ``"per_hop"``: what the
            router's balance losses balance (see
            :class:`~moegraph.nn.conv.HopMoEConv`). (default: :obj:`"all"`)

    Shapes:
        - **input:** ``x [N, 9]`` (integer atom features) or ``[N, F]``,
          ``edge_index [2, M]``, ``edge_attr [M, 3]`` (optional),
          ``batch [N]`` (optional, one graph if absent)
        - **output:** :class:`~moegraph.nn.output.ModelOutput` with
          ``logits [B, T]`` and one routing record per MoE layer
    """

    def __init__(
        self,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 5,
        conv: str = "gcn",
        in_channels: Optional[int] = None,
        pool: str = "mean",
        edge_mode: Optional[str] = None,
        dropout: float = 0.5,
        residual: bool = False,
        num_experts: Optional[int] = None,
        num_hop2_experts: Optional[int] = None,
        k: Optional[int] = None,
        router: Union[str, Router] = "topk",
        router_kwargs: Optional[dict[str, Any]] = None,
        capacity_factor: Optional[float] = None,
        balance: str = "all",
    ):
        super().__init__()
        for name, value in (("hidden_channels", hidden_channels),
                            ("out_channels", out_channels), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"'{name}' must be a positive integer (got {value})")
        if conv not in GRAPH_CONVS:
            raise ValueError(f"'conv' must be one of {GRAPH_CONVS} (got {conv!r})")
        if pool not in POOLS:
            raise ValueError(f"'pool' must be one of {POOLS} (got {pool!r})")
        moe = num_experts is not None
        edge_mode = edge_mode or ("node" if moe else "message")
        if edge_mode not in EDGE_MODES:
            raise ValueError(f"'edge_mode' must be one of {EDGE_MODES} (got {edge_mode!r})")
        if moe and edge_mode == "message":
            raise ValueError("'edge_mode=\"message\"' needs dense layers: the hop experts take "
                             "no edge features (use 'node' or 'none' with num_experts)")
        if not isinstance(router, str) and moe and num_layers > 1:
            raise ValueError("a Router module cannot be shared by several layers: give the "
                             "router by name")
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.conv_name = conv
        self.in_channels = in_channels
        self.pool_name = pool
        self.edge_mode = edge_mode
        self.dropout = dropout
        self.residual = residual
        self.num_experts = num_experts

        C = hidden_channels
        self.encoder = (FeatureEncoder(atom_feature_dims(), C) if in_channels is None
                        else Linear(in_channels, C))
        self.convs = ModuleList()
        self.norms = ModuleList([BatchNorm1d(C) for _ in range(num_layers)])
        self.bond_encoders = ModuleList()
        for _ in range(num_layers):
            if num_experts is not None:  # moe
                self.convs.append(HopMoEConv(C, C, num_experts=num_experts,
                                             num_hop2_experts=num_hop2_experts, k=k, conv=conv,
                                             router=router, router_kwargs=router_kwargs,
                                             capacity_factor=capacity_factor,
                                             balance=balance))
            elif edge_mode == "message":
                self.convs.append(BondGCNConv(C) if conv == "gcn" else BondGINConv(C))
            elif conv == "gcn":
                self.convs.append(GCNConv(C, C))
            else:
                self.convs.append(GINConv(Sequential(Linear(C, 2 * C), BatchNorm1d(2 * C),
                                                     torch.nn.ReLU(), Linear(2 * C, C)),
                                          train_eps=True))
            if edge_mode == "node":
                self.bond_encoders.append(FeatureEncoder(bond_feature_dims(), C))
        self.pool = (AttentionalAggregation(Linear(C, 1)) if pool == "attention" else None)
        self.head = Linear(C, out_channels)
        self.reset_parameters()

    def reset_parameters(self):
        reset_submodules(self)

    def _pool(self, x: Tensor, batch: Tensor, size: int) -> Tensor:
        if self.pool is not None:
            return self.pool(x, batch, dim_size=size)
        fn = {"mean": global_mean_pool, "sum": global_add_pool, "max": global_max_pool}
        return fn[self.pool_name](x, batch, size)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Optional[Tensor] = None,
                batch: Optional[Tensor] = None, num_graphs: Optional[int] = None
                ) -> ModelOutput:
        r"""
        Args:
            x (Tensor): node features ``[N, 9]`` (atoms) or ``[N, F]``.
            edge_index (Tensor): edges ``[2, M]``.
            edge_attr (Tensor, optional): bond features ``[M, 3]``; needed
                unless ``edge_mode="none"``.
            batch (Tensor, optional): graph of each node ``[N]``.
            num_graphs (int, optional): ``B``; ``batch.max() + 1`` if absent.
        """
        if self.edge_mode != "none" and edge_attr is None:
            raise ValueError(f"edge_mode={self.edge_mode!r} needs 'edge_attr' (bond features); "
                             f"use edge_mode='none' for graphs without them")
        if batch is None:
            batch = x.new_zeros(x.size(0), dtype=torch.long)
        B = num_graphs if num_graphs is not None else (int(batch.max()) + 1 if batch.numel()
                                                       else 1)
        h = self.encoder(x if self.in_channels is None else x.float())  # [N, C]
        routings = []
        for layer, conv in enumerate(self.convs):
            h_in = h
            if self.edge_mode == "node":
                bonds = self.bond_encoders[layer](edge_attr)  # [M, C]
                h = h + scatter(bonds, edge_index[1], 0, dim_size=h.size(0), reduce="mean")
            if isinstance(conv, HopMoEConv):
                h, routing = conv(h, edge_index)
                routings.append(routing)
            elif self.edge_mode == "message":
                h = conv(h, edge_index, edge_attr)
            else:
                h = conv(h, edge_index)
            h = self.norms[layer](h)
            if layer < self.num_layers - 1:
                h = F.relu(h)
            h = F.dropout(h, self.dropout, self.training)
            if self.residual:
                h = h + h_in
        logits = self.head(self._pool(h, batch, B))  # [B, T]
        return ModelOutput(logits, sum_aux_losses(routings), tuple(routings))

    def __repr__(self) -> str:
        moe = f", num_experts={self.num_experts}" if self.num_experts is not None else ""
        return (f"{self.__class__.__name__}({self.hidden_channels}, {self.out_channels}, "
                f"num_layers={self.num_layers}, conv={self.conv_name}{moe}, "
                f"pool={self.pool_name}, edge_mode={self.edge_mode})")
