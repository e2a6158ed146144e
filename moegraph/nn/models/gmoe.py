r"""GMoE: a GNN whose every layer is a hop-expert graph MoE convolution; and
:func:`make_gmoe`, which builds it or its residual-block counterpart."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, ModuleList
from torch_geometric.nn.resolver import activation_resolver

from moegraph.nn.conv.hop_moe import HopMoEConv, reset_submodules
from moegraph.nn.models.gnn import MoEGNN, baseline_input_dropout, make_norm
from moegraph.nn.output import ModelOutput
from moegraph.nn.routing import Router, sum_aux_losses


class GMoE(Module):
    r"""Graph Mixture of Experts (Wang et al., NeurIPS 2023, `"Graph Mixture
    of Experts: Learning on Large-Scale Graphs with Explicit Diversity
    Modeling" <https://arxiv.org/abs/2304.02806>`_): the layout of PyG's
    :class:`~torch_geometric.nn.models.BasicGNN` with each convolution
    replaced by a :class:`~moegraph.nn.conv.HopMoEConv` of hop-1 and hop-2
    experts, computed sparsely.

    .. math::
        \mathbf{H}^{(l+1)} = \mathrm{Drop}\big(\sigma\big(\mathrm{Norm}\big(
        \mathrm{HopMoEConv}^{(l)}(\mathbf{H}^{(l)}, \mathcal{E})\big)\big)\big)

    with no normalisation, activation or dropout after the last layer,
    whose output is the class scores. This class is the paper's plain stack
    only; the residual blocks of Platonov et al. with hop-expert
    convolutions are :class:`~moegraph.nn.models.MoEGNN` with
    ``conv="hop_moe"`` and ``ffn="dense"``, which :func:`make_gmoe` builds
    with ``residual=True``.

    At ``k=1`` each node runs one expert per layer: the active FLOPs of the
    plain GNN of the same width, plus the router and, for hop-2 experts, a
    larger neighbourhood (and with ``hop2="concat"`` a second transform).

    Args:
        in_channels (int): node feature size.
        hidden_channels (int): width of the hidden layers.
        out_channels (int): number of classes.
        num_layers (int, optional): number of layers. (default: :obj:`2`)
        conv (str, optional): expert type, ``"gcn"``, ``"sage"``, ``"gin"``
            or ``"gat"``. (default: :obj:`"gcn"`)
        num_experts (int, optional): experts per layer. (default: :obj:`8`)
        num_hop2_experts (int, optional): hop-2 experts per layer;
            :obj:`None` gives half. (default: :obj:`None`)
        k (int, optional): experts per node for the top-k router.
        router (str or Router, optional): router by name. (default: :obj:`"topk"`)
        router_kwargs (dict, optional): arguments of the router;
            :obj:`None` gives noisy top-k.
        capacity_factor (float, optional): per-expert capacity; dropless if
            :obj:`None`.
        heads (int, optional): attention heads of GAT experts in the hidden
            layers (the last has one). (default: :obj:`1`)
        act (str, optional): activation. (default: :obj:`"relu"`)
        norm (str, optional): ``"batch_norm"``, ``"layer_norm"`` or
            :obj:`None`. (default: :obj:`None`)
        dropout (float, optional): dropout between layers. (default: :obj:`0.5`)
        input_dropout (float, optional): dropout on the input features;
            :obj:`None` means none. (default: :obj:`0.0`)
        residual (bool, optional): must be :obj:`False`; :obj:`True` raises
            a :class:`ValueError` that points to :func:`make_gmoe` (the
            residual variant is another architecture). (default: :obj:`False`)
        hop2 (str, optional): receptive field of the hop-2 experts,
            ``"pairs"``, ``"square"``, ``"mix"``, ``"concat"`` or ``"blend"`` (see
            :class:`~moegraph.nn.conv.HopMoEConv`). (default: :obj:`"pairs"`)
        expert_init (str, optional): ``"independent"`` or ``"shared"``
            (every expert of a layer starts as the same one; see
            :class:`~moegraph.nn.conv.HopMoEConv`).
            (default: :obj:`"independent"`)
        shared_expert (bool, optional): each layer adds a dense convolution
            of the expert type that every node runs (see
            :class:`~moegraph.nn.conv.HopMoEConv`): twice the active FLOPs
            of the plain GNN at ``k=1``. (default: :obj:`False`)
        balance (str, optional): ``"all"`` or ``"per_hop"``: what the
            router's balance losses balance (see
            :class:`~moegraph.nn.conv.HopMoEConv`). (default: :obj:`"all"`)

    Shapes:
        - **input:** ``x [N, F]``, ``edge_index [2, M]``
        - **output:** :class:`~moegraph.nn.output.ModelOutput` with
          ``logits [N, C]`` and one routing record per layer
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 2,
        conv: str = "gcn",
        num_experts: int = 8,
        num_hop2_experts: Optional[int] = None,
        k: Optional[int] = None,
        router: Union[str, Router] = "topk",
        router_kwargs: Optional[dict[str, Any]] = None,
        capacity_factor: Optional[float] = None,
        heads: int = 1,
        act: Union[str, Module] = "relu",
        norm: Optional[str] = None,
        dropout: float = 0.5,
        input_dropout: Optional[float] = 0.0,
        residual: bool = False,
        hop2: str = "pairs",
        expert_init: str = "independent",
        shared_expert: bool = False,
        balance: str = "all",
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"'num_layers' must be positive (got {num_layers})")
        if residual:
            raise ValueError("GMoE is the paper's plain stack and takes no 'residual=True': "
                             "build the residual blocks with make_gmoe(..., residual=True) "
                             "or MoEGNN(conv='hop_moe', ffn='dense', conv_kwargs=...)")
        if not isinstance(router, str) and num_layers > 1:
            raise ValueError("a Router module cannot be shared by several layers: give the "
                             "router by name")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.conv_name = conv
        self.num_experts = num_experts
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.hop2 = hop2
        self.act = activation_resolver(act)
        self.convs = ModuleList()
        self.norms = ModuleList()
        for layer in range(num_layers):
            last = layer == num_layers - 1
            self.convs.append(HopMoEConv(
                in_channels if layer == 0 else hidden_channels,
                out_channels if last else hidden_channels,
                num_experts=num_experts, num_hop2_experts=num_hop2_experts, k=k, conv=conv,
                router=router, router_kwargs=router_kwargs, capacity_factor=capacity_factor,
                heads=1 if last else heads, hop2=hop2, expert_init=expert_init,
                shared_expert=shared_expert, balance=balance))
            if not last:
                self.norms.append(make_norm(norm, hidden_channels))
        self.reset_parameters()

    def reset_parameters(self):
        reset_submodules(self)

    def forward(self, x: Tensor, edge_index: Tensor) -> ModelOutput:
        r"""
        Args:
            x (Tensor): node features ``[N, F]``.
            edge_index (Tensor): edges ``[2, M]``.
        """
        x = F.dropout(x, self.input_dropout or 0.0, self.training)
        routings = []
        for layer, conv in enumerate(self.convs):
            x, routing = conv(x, edge_index)
            routings.append(routing)
            if layer < self.num_layers - 1:
                x = F.dropout(self.act(self.norms[layer](x)), self.dropout, self.training)
        return ModelOutput(x, sum_aux_losses(routings), tuple(routings))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"{self.out_channels}, num_layers={self.num_layers}, conv={self.conv_name}, "
                f"num_experts={self.num_experts})")


def make_gmoe(in_channels: int, hidden_channels: int, out_channels: int, num_layers: int = 2,
              conv: str = "gcn", num_experts: int = 8, num_hop2_experts: Optional[int] = None,
              k: Optional[int] = None, router: Union[str, Router] = "topk",
              router_kwargs: Optional[dict[str, Any]] = None,
              capacity_factor: Optional[float] = None, heads: int = 1,
              act: Union[str, Module] = "relu", norm: Optional[str] = None,
              dropout: float = 0.5, input_dropout: Optional[float] = 0.0,
              residual: bool = False, hop2: str = "pairs",
              expert_init: str = "independent", shared_expert: bool = False,
              balance: str = "all") -> Module:
    r"""A hop-expert graph MoE by the layout of the experiment's backbone, as
    :func:`~moegraph.nn.models.make_backbone` builds the dense ones: with
    ``residual=False`` the paper's plain stack :class:`GMoE`; with
    ``residual=True`` the residual blocks of Platonov et al. (an input
    projection, ``num_layers`` blocks of a :class:`~moegraph.nn.HopMoEConv`
    then a dense two-layer FFN, each added back and normalised, and a linear
    classifier), i.e. :class:`~moegraph.nn.models.MoEGNN` with
    ``conv="hop_moe"`` and ``ffn="dense"``.

    Args:
        residual (bool, optional): the residual blocks instead of the plain
            stack. (default: :obj:`False`)
        input_dropout (float, optional): dropout on the input features;
            :obj:`None`: that of the GNN baseline of the layout
            (:func:`~moegraph.nn.models.gnn.baseline_input_dropout`: ``dropout``
            with ``residual=True``, as
            :func:`~moegraph.nn.models.make_backbone`'s residual model; none in
            the plain stack, as PyG's ``GCN``), so that GMoE differs from its
            baseline by its hop experts only. (default: :obj:`0.0`)
        **others: as :class:`GMoE`.
    """
    if input_dropout is None:
        input_dropout = baseline_input_dropout(dropout, residual)
    if not residual:
        return GMoE(in_channels, hidden_channels, out_channels, num_layers=num_layers, conv=conv,
                    num_experts=num_experts, num_hop2_experts=num_hop2_experts, k=k,
                    router=router, router_kwargs=router_kwargs,
                    capacity_factor=capacity_factor, heads=heads, act=act, norm=norm,
                    dropout=dropout, input_dropout=input_dropout, hop2=hop2,
                    expert_init=expert_init, shared_expert=shared_expert, balance=balance)
    if not isinstance(router, str) and num_layers > 1:
        raise ValueError("a Router module cannot be shared by several layers: give the "
                         "router by name")
    conv_kwargs = dict(num_experts=num_experts, num_hop2_experts=num_hop2_experts, k=k,
                       conv=conv, router=router, router_kwargs=router_kwargs,
                       capacity_factor=capacity_factor, heads=heads, hop2=hop2,
                       expert_init=expert_init, shared_expert=shared_expert, balance=balance)
    return MoEGNN(in_channels, hidden_channels, out_channels, num_layers, conv="hop_moe",
                  conv_kwargs=conv_kwargs, ffn="dense", act=act, norm=norm, dropout=dropout,
                  input_dropout=input_dropout)
