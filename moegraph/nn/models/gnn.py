r"""GNN backbones whose feed-forward part can be a sparse MoE block."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Identity, Linear, Module, ModuleList, Parameter, ParameterList
from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv
from torch_geometric.nn.resolver import activation_resolver

from moegraph.nn.conv.hop_moe import HopMoEConv, reset_submodules
from moegraph.nn.experts import SpectralLinear
from moegraph.nn.moe import MoEOutput, SparseMoE
from moegraph.nn.output import ModelOutput
from moegraph.nn.routing import Routing, sum_aux_losses
from moegraph.utils.checks import check_finite_float, check_int

CONVS = ("gcn", "sage", "gat", "gin", "hop_moe", "none")


class NodeLinear(Linear):
    r"""A linear layer with a convolution's signature, ``forward(x,
    edge_index=None)``, that ignores the graph: ``conv="none"`` turns
    :class:`MoEGNN` into a residual MLP on node features (the weak expert of
    :class:`~moegraph.nn.Mowst`, the ResNet baseline of Platonov et al.)."""

    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None) -> Tensor:
        return super().forward(x)
NORMS = (None, "none", "layer_norm", "batch_norm")


def make_conv(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> Module:
    r"""A PyG graph convolution by name: ``"gcn"``, ``"sage"``, ``"gat"``
    (heads concatenated to ``out_channels``), ``"gin"`` (two-layer MLP),
    ``"hop_moe"`` (a :class:`~moegraph.nn.HopMoEConv` of hop-1 and hop-2
    experts, ``kwargs`` its arguments) or ``"none"`` (a :class:`NodeLinear`
    that ignores the graph)."""
    if name == "none":
        return NodeLinear(in_channels, out_channels, **kwargs)
    if name == "hop_moe":
        return HopMoEConv(in_channels, out_channels, **kwargs)
    if name == "gcn":
        return GCNConv(in_channels, out_channels, **kwargs)
    if name == "sage":
        return SAGEConv(in_channels, out_channels, **kwargs)
    if name == "gat":
        heads = kwargs.pop("heads", 1)
        if out_channels % heads != 0:
            raise ValueError(f"GAT: out_channels={out_channels} is not divisible by "
                             f"heads={heads}")
        return GATConv(in_channels, out_channels // heads, heads=heads, **kwargs)
    if name == "gin":
        mlp = torch.nn.Sequential(Linear(in_channels, out_channels), torch.nn.ReLU(),
                                  Linear(out_channels, out_channels))
        return GINConv(mlp, **kwargs)
    raise ValueError(f"'conv' must be one of {CONVS} (got {name!r})")


def make_norm(name: Optional[str], channels: int) -> Module:
    r"""Per-node normalisation: ``"layer_norm"``, ``"batch_norm"`` or none."""
    if name in (None, "none"):
        return Identity()
    if name == "layer_norm":
        return torch.nn.LayerNorm(channels)
    if name == "batch_norm":
        return torch.nn.BatchNorm1d(channels)
    raise ValueError(f"'norm' must be one of {NORMS} (got {name!r})")


def dense_twin_width(ffn_hidden_channels: int, k: int,
                     moe_kwargs: Optional[dict[str, Any]] = None) -> int:
    r"""The hidden width of the dense feed-forward part that stands in for a
    top-:obj:`k` :class:`~moegraph.nn.SparseMoE` block of experts
    :obj:`ffn_hidden_channels` wide, at equal active width: the :obj:`k`
    routed experts' and the always-on shared experts' of :obj:`moe_kwargs`
    (``num_shared_experts`` x ``shared_hidden_channels``, the latter
    :obj:`ffn_hidden_channels` if not given) together."""
    moe_kwargs = moe_kwargs or {}
    num_shared = check_int("num_shared_experts", moe_kwargs.get("num_shared_experts", 0), low=0)
    shared_hidden = moe_kwargs.get("shared_hidden_channels") or ffn_hidden_channels
    return (ffn_hidden_channels * check_int("k", k)
            + num_shared * check_int("shared_hidden_channels", shared_hidden))


def baseline_input_dropout(dropout: float, residual: bool) -> float:
    r"""The input-feature dropout of the GNN baseline of a layout, what
    :class:`MoEGNN` takes for ``input_dropout=None``: :obj:`dropout` in the
    residual layout (as :func:`~moegraph.nn.models.make_backbone`'s residual
    model), none in the plain stack (PyG's
    :class:`~torch_geometric.nn.models.GCN` drops out between layers only)."""
    return dropout if residual else 0.0


class MoEGNN(Module):
    r"""A GNN of blocks, each a graph convolution followed by a feed-forward
    part that is a sparse MoE block every ``moe_every``-th layer
    (Switch-style) and a dense FFN (or nothing) elsewhere.

    .. math::
        \mathbf{H} &\leftarrow \mathrm{Norm}\big([\mathbf{H} +]\, \mathrm{Drop}(
        \sigma(\mathrm{Conv}(\mathbf{H}, \mathcal{E})))\big)

        \mathbf{H} &\leftarrow \mathrm{Norm}\big(\mathbf{H} + \mathrm{Drop}(
        \mathrm{FFN}(\mathbf{H}))\big),\qquad
        \mathrm{FFN} \in \{\mathrm{SparseMoE}, \mathrm{MLP}, 0\}

    Two layouts, chosen by ``residual``:

    * ``residual=True``: the blocks of Platonov et al. for heterophilous
      graphs (with ``norm="layer_norm"``): an input projection to
      ``hidden_channels`` before the first block (after dropout on the input
      features), the convolution's input added back in every block, and a
      linear classifier after the last.
    * ``residual=False``: PyG's plain stack (as :class:`~torch_geometric.nn.models.GCN`)
      with a feed-forward part after every convolution but the last: the first
      convolution reads the (dropped-out) input features, the last one gives
      the class scores, and there is no input projection and no classifier.
      It needs ``num_layers >= 2`` unless ``ffn="none"``. On the small
      homophilous graphs (Cora, CiteSeer) the extra linear maps of the
      residual layout cost GCN's accuracy: an unsmoothed input projection
      carried to the classifier by the residual costs 10 points and more, and
      without the residual the input projection and the feed-forward part
      after the last convolution still cost 4.6-5.3 points (see
      ``experiments/results/graph_moe_ablation.md``).

    Args:
        in_channels (int): node feature size.
        hidden_channels (int): width of every block.
        out_channels (int): number of classes.
        num_layers (int, optional): number of blocks. (default: :obj:`2`)
        conv (str, optional): ``"gcn"``, ``"sage"``, ``"gat"``, ``"gin"``,
            ``"hop_moe"`` (:class:`~moegraph.nn.HopMoEConv`, routed) or
            ``"none"`` (no message passing: a residual MLP). (default: :obj:`"gcn"`)
        conv_kwargs (dict, optional): further arguments of the convolution.
        ffn (str, optional): ``"moe"``, ``"dense"`` or ``"none"``.
            (default: :obj:`"moe"`)
        moe_every (int, optional): put the MoE block in every n-th layer, a
            dense FFN in the others. (default: :obj:`1`)
        ffn_hidden_channels (int, optional): hidden size of each expert (and
            of the dense FFN); :obj:`hidden_channels` if :obj:`None`.
            With :obj:`ffn="dense"` and :obj:`k` given, the dense FFN is
            :obj:`k * ffn_hidden_channels` wide, plus the width of the shared
            experts named in :obj:`moe_kwargs` (``num_shared_experts`` x
            ``shared_hidden_channels``): the active width of the MoE block it
            stands in for (``model=dense_gnn``).
        num_experts (int, optional): experts per MoE block. (default: :obj:`8`)
        k (int, optional): experts per node for the top-k router (with
            :obj:`ffn="dense"`: the width multiplier above).
        moe_kwargs (dict, optional): further arguments of
            :class:`~moegraph.nn.SparseMoE` (router, router_kwargs,
            num_shared_experts, capacity_factor, ...).
        act (str, optional): activation. (default: :obj:`"relu"`)
        norm (str, optional): ``"layer_norm"``, ``"batch_norm"`` or
            :obj:`None`. (default: :obj:`"layer_norm"`)
        dropout (float, optional): dropout rate. (default: :obj:`0.0`)
        input_dropout (float, optional): dropout on the input features;
            :obj:`None`: that of the GNN baseline of the layout
            (:func:`baseline_input_dropout`: ``dropout`` in the residual
            layout, none in the plain stack), so that with ``ffn="none"`` the
            network is the baseline in training too. (default: :obj:`0.0`)
        residual (bool, optional): the residual layout (each convolution's
            input added back to its output) or the plain stack (see above).
            GAT's last convolution in the plain stack has one head.
            (default: :obj:`True`)
        spectral_norm (bool, optional): the feed-forward parts use their
            weight matrices (each expert's, the dense FFN's) divided by their
            spectral norm (:func:`~moegraph.nn.experts.spectral_normalize`),
            so that a feed-forward part cannot stretch its input
            (:math:`\|\mathrm{FFN}(a) - \mathrm{FFN}(b)\| \le \|a - b\|`
            with a 1-Lipschitz activation) and the residual step
            :math:`h + \mathrm{FFN}(h)` stays on the scale of :math:`h`. With
            plain weights, under Adam at the Planetoid protocol's learning
            rate, the trained FFN's output grows to 4-20 times its input on
            Cora and CiteSeer, the training loss falls to ~0 within 30 epochs
            and the validation accuracy peaks early (see the section "The
            FFN's scale" of ``experiments/results/graph_moe_ablation.md``).
            (default: :obj:`False`)
        ffn_bias (bool, optional): the feed-forward parts (dense FFN, MoE
            experts) learn biases. Without them and with ``spectral_norm``, a
            feed-forward part cannot make a node's vector longer,
            :math:`\|\mathrm{FFN}(h)\| \le \|h\|` (ReLU; a top-k mix
            renormalised over the chosen experts); with them a routed block
            can still add a per-expert offset chosen by its unbounded router,
            which on Cora left the MoE's output at 2.7 times its input under
            spectral norm (0.65 without biases). (default: :obj:`True`)
        route_before_dropout (bool, optional): in training, a MoE block's
            router reads the block's input as it was before this block's
            dropout (the convolution's activated output, normalised as the
            block does); the experts still compute on the dropped-out
            input. At evaluation there is no dropout, so the router reads
            the same thing either way: the option makes training route each
            node as evaluation does, instead of by a random dropout mask.
            With the router reading the dropped-out input, the trained
            MoE-GNN's top-2 choice of a node in training agreed with its
            test-time choice for about 30% of Cora's nodes; with the option
            for 76%, but the routing then concentrated on about 4 of 8
            experts and Cora's test accuracy fell (79.10 ± 1.54 against
            80.48 ± 1.19, 10 seeds), so ``model=moe_gnn`` leaves this off
            (section "Routing under dropout" of
            ``experiments/results/graph_moe_ablation.md``). A dropout on
            the network's input features (``input_dropout``) and on earlier
            blocks still reaches the router. With a batch norm the block's
            norm is applied to both inputs (its running statistics are
            updated twice per step). No effect without dropout, at
            evaluation or on dense feed-forward parts. (default: :obj:`False`)
        ffn_scale (float, optional): LayerScale (Touvron et al., 2021) of
            the feed-forward parts: each block's feed-forward output is
            multiplied by a learned per-channel vector :math:`\gamma` started
            at this value, :math:`h + \gamma \odot \mathrm{FFN}(h)`; with
            :obj:`0.0` (ReZero, Bachlechner et al., 2021) the network starts as
            the convolutions alone and the feed-forward parts enter only as
            far as training moves :math:`\gamma` (which the optimiser's
            weight decay pulls back to zero). :obj:`None`: no scale.
            (default: :obj:`None`)

    Shapes:
        - **input:** ``x [N, F]``, ``edge_index [2, M]``
        - **output:** :class:`~moegraph.nn.output.ModelOutput` with
          ``logits [N, C]`` and one routing record per MoE convolution and
          MoE block, in order
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 2,
        conv: str = "gcn",
        conv_kwargs: Optional[dict[str, Any]] = None,
        ffn: str = "moe",
        moe_every: int = 1,
        ffn_hidden_channels: Optional[int] = None,
        num_experts: int = 8,
        k: Optional[int] = None,
        moe_kwargs: Optional[dict[str, Any]] = None,
        act: Union[str, Module] = "relu",
        norm: Optional[str] = "layer_norm",
        dropout: float = 0.0,
        input_dropout: Optional[float] = 0.0,
        residual: bool = True,
        spectral_norm: bool = False,
        ffn_bias: bool = True,
        route_before_dropout: bool = False,
        ffn_scale: Optional[float] = None,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"'num_layers' must be positive (got {num_layers})")
        if ffn not in ("moe", "dense", "none"):
            raise ValueError(f"'ffn' must be 'moe', 'dense' or 'none' (got {ffn!r})")
        if moe_every < 1:
            raise ValueError(f"'moe_every' must be positive (got {moe_every})")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.conv_name = conv
        self.ffn = ffn
        self.moe_every = moe_every
        self.dropout = dropout
        if input_dropout is None:
            input_dropout = baseline_input_dropout(dropout, residual)
        self.input_dropout = input_dropout
        self.residual = residual
        self.spectral_norm = bool(spectral_norm)
        moe_kwargs = dict(moe_kwargs or {})
        for name in ("spectral_norm", "bias"):
            if name in moe_kwargs:
                arg = "ffn_bias" if name == "bias" else name
                raise ValueError(f"give '{arg}' to MoEGNN, not '{name}' in 'moe_kwargs' (it "
                                 f"applies to the dense FFNs too)")
        self.ffn_bias = bool(ffn_bias)
        if not isinstance(route_before_dropout, bool):
            raise TypeError(f"'route_before_dropout' must be a bool (got "
                            f"{type(route_before_dropout).__name__})")
        self.route_before_dropout = route_before_dropout
        self.act = activation_resolver(act)
        ffn_hidden = ffn_hidden_channels or hidden_channels
        dense_hidden = ffn_hidden
        if ffn == "dense" and k is not None:
            dense_hidden = dense_twin_width(ffn_hidden, k, moe_kwargs)

        if not residual and num_layers < 2 and ffn != "none":
            raise ValueError("residual=False puts the feed-forward parts between "
                             "convolutions: it needs num_layers >= 2 (got "
                             f"{num_layers}; or ffn='none')")
        # The residual layout projects the input to the blocks' width and
        # classifies after the last block; the plain stack's first
        # convolution reads the features and its last gives the class scores.
        self.lin_in = Linear(in_channels, hidden_channels) if residual else None
        self.convs = ModuleList()
        self.conv_norms = ModuleList()
        self.ffns = ModuleList()
        self.ffn_norms = ModuleList()
        num_blocks = num_layers if residual else num_layers - 1  # convs followed by an FFN
        for layer in range(num_layers):
            kwargs = dict(conv_kwargs or {})
            conv_in = in_channels if not residual and layer == 0 else hidden_channels
            if layer == num_blocks:  # the plain stack's last convolution
                if conv == "gat":
                    kwargs["heads"] = 1
                self.convs.append(make_conv(conv, conv_in, out_channels, **kwargs))
                break
            self.convs.append(make_conv(conv, conv_in, hidden_channels, **kwargs))
            self.conv_norms.append(make_norm(norm, hidden_channels))
            if ffn == "moe" and (layer + 1) % moe_every == 0:
                block: Module = SparseMoE(hidden_channels, ffn_hidden, hidden_channels,
                                          num_experts=num_experts, k=k, act=act,
                                          spectral_norm=self.spectral_norm,
                                          bias=self.ffn_bias, **moe_kwargs)
            elif ffn in ("moe", "dense"):
                width = dense_hidden if ffn == "dense" else ffn_hidden
                lin = SpectralLinear if self.spectral_norm else Linear
                block = torch.nn.Sequential(lin(hidden_channels, width, bias=self.ffn_bias),
                                            activation_resolver(act),
                                            lin(width, hidden_channels, bias=self.ffn_bias))
            else:
                block = Identity()
            self.ffns.append(block)
            # No FFN, no residual step to normalise: no dead norm parameters.
            self.ffn_norms.append(make_norm(norm if ffn != "none" else None, hidden_channels))
        self.lin_out = Linear(hidden_channels, out_channels) if residual else None
        if ffn_scale is not None:
            ffn_scale = check_finite_float("ffn_scale", ffn_scale)
        self.ffn_scale = ffn_scale
        self.ffn_scales: Optional[ParameterList] = None
        if ffn_scale is not None and ffn != "none":
            self.ffn_scales = ParameterList(
                [Parameter(torch.empty(hidden_channels)) for _ in self.ffns])
        self.reset_parameters()

    def reset_parameters(self):
        reset_submodules(self)
        if self.ffn_scales is not None:
            assert self.ffn_scale is not None
            for gamma in self.ffn_scales:
                torch.nn.init.constant_(gamma, self.ffn_scale)

    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None) -> ModelOutput:
        r"""
        Args:
            x (Tensor): node features ``[N, F]``.
            edge_index (Tensor, optional): edges ``[2, M]`` (unused when
                ``conv="none"``).
        """
        if edge_index is None and self.conv_name != "none":
            raise ValueError(f"'edge_index' is required by conv={self.conv_name!r}")
        x = F.dropout(x, self.input_dropout, self.training)
        h = self.lin_in(x) if self.lin_in is not None else x  # [N, H] or [N, F]
        routings = []
        for layer, conv in enumerate(self.convs):
            c = conv(h, edge_index)
            if isinstance(c, MoEOutput):  # a graph MoE convolution: keep its routing
                c, routing = c
                routings.append(routing)
            if layer == len(self.ffns):  # the plain stack's last convolution
                return ModelOutput(c, sum_aux_losses(routings), tuple(routings))
            a = self.act(c)
            c = F.dropout(a, self.dropout, self.training)
            h_prev, h = h, self.conv_norms[layer](h + c if self.residual else c)
            if isinstance(self.ffns[layer], Identity):
                continue
            route = None  # the router reads h, or h without this block's dropout
            if (self.route_before_dropout and self.training and self.dropout > 0
                    and isinstance(self.ffns[layer], SparseMoE)):
                route = self.conv_norms[layer](h_prev + a if self.residual else a)
            y, ffn_routing = self.ffn_branch(layer, h, route)
            if ffn_routing is not None:
                routings.append(ffn_routing)
            h = self.ffn_norms[layer](h + F.dropout(y, self.dropout, self.training))
        assert self.lin_out is not None  # the residual layout
        logits = self.lin_out(h)  # [N, C]
        return ModelOutput(logits, sum_aux_losses(routings), tuple(routings))

    def ffn_branch(self, layer: int, h: Tensor,
                   router_input: Optional[Tensor] = None) -> tuple[Tensor, Optional[Routing]]:
        r"""What the feed-forward part of block ``layer`` adds to ``h [N, H]``
        (before dropout and the residual step; times its LayerScale vector
        with ``ffn_scale``), and its routing record
        (:obj:`None` for a dense FFN); a MoE block's router reads
        ``router_input`` if given (else ``h``)."""
        ffn = self.ffns[layer]
        routing = None
        if isinstance(ffn, SparseMoE):
            y, routing = ffn(h, router_input)
        else:
            y = ffn(h)
        if self.ffn_scales is not None:
            y = y * self.ffn_scales[layer]
        return y, routing

    def __repr__(self) -> str:
        num_moe = sum(isinstance(f, SparseMoE) for f in self.ffns)
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"{self.out_channels}, num_layers={self.num_layers}, conv={self.conv_name}, "
                f"moe_layers={num_moe}{'' if self.residual else ', residual=False'}"
                f"{', spectral_norm=True' if self.spectral_norm else ''})")
