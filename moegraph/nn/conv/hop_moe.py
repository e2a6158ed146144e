r"""Graph Mixture-of-Experts convolution with hop-1 and hop-2 experts
(GMoE, Wang et al., NeurIPS 2023), computed sparsely."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import add_self_loops, remove_self_loops, softmax

from moegraph.nn.dispatch import apply_capacity, combine, indices_and_bins
from moegraph.nn.experts import LinearExperts, MLPExperts, grouped_linear
from moegraph.nn.moe import MoEOutput
from moegraph.nn.routing import Router, build_router
from moegraph.utils.checks import check_int, check_positive_float
from moegraph.utils.graph import HopGraph, check_edge_index, two_hop_edge_index

__all__ = ["HOP_EXPERT_CONVS", "HopGraph", "HopMoEConv", "check_edge_index", "reset_submodules",
           "two_hop_edge_index"]

HOP_EXPERT_CONVS = ("gcn", "sage", "gin", "gat")
HOP2_MODES = ("pairs", "square", "mix", "concat", "blend")
EXPERT_INITS = ("independent", "shared")
BALANCES = ("all", "per_hop")


class HopMoEConv(MessagePassing):
    r"""A graph Mixture-of-Experts convolution whose experts see different
    receptive fields (Wang et al., NeurIPS 2023, `"Graph Mixture of Experts"
    <https://arxiv.org/abs/2304.02806>`_): hop-1 experts convolve over
    ``edge_index``, hop-2 experts over the pairs at distance exactly two.
    Each node is routed to a few experts:

    .. math::
        \mathbf{y}_i = \sum_{e \in \mathcal{S}(\mathbf{x}_i)} g_e(\mathbf{x}_i)\,
        \mathrm{Conv}_e\big(\mathbf{X}, \mathcal{E}_{h(e)}\big)_i

    where :math:`h(e) \in \{1, 2\}` is the hop of expert :math:`e`, and the
    router (noisy top-k with the importance and load losses by default)
    chooses :math:`\mathcal{S}` and the weights :math:`g_e`.

    Only what the routing asks for is computed, unlike the reference code of
    GMoE, which runs every expert on every node. An expert receives messages
    only on the in-edges of the nodes routed to it, and transforms only
    those nodes. For experts whose messages are linear in the features
    (``"gcn"``, ``"sage"``, ``"gin"``), :math:`\hat{\mathbf{A}}_h\mathbf{X}
    \mathbf{W}_e = (\hat{\mathbf{A}}_h\mathbf{X})\mathbf{W}_e`, so the
    aggregation is shared by the experts of a hop. It is done once per hop,
    into the nodes routed to at least one of them, before each node's
    features go through the weights of its own experts only. When the
    input is wide and a hop graph dense (e.g. 1,000 features on a social
    graph's 2-hop pairs), transforming first is cheaper: each active expert
    then transforms every node and aggregates only into its own nodes; the
    layer picks the order with fewer multiply-adds (``aggregate_first``).
    GAT experts
    attend with their own parameters: each aggregates its own edges, with
    the attention logits folded into the input space
    (:math:`\mathbf{a}^\top\mathbf{W}_e\mathbf{x}_j = (\mathbf{W}_e
    \mathbf{a})^\top\mathbf{x}_j`), so no expert transforms a node that was
    not routed to it.

    Each expert computes exactly what the PyG convolution of its type would
    (``GCNConv``, ``SAGEConv`` with mean aggregation, ``GINConv`` with a
    two-layer MLP, ``GATConv`` with concatenated heads), on its hop graph.

    The hop-2 graph is built on the fly by :func:`two_hop_edge_index` and
    cached for the last graph seen (``cached=True``): it is rebuilt when a
    different ``edge_index`` tensor, or the same one modified in place, comes
    in. Mini-batches (e.g. from ``NeighborLoader``) each build their own.

    Host synchronisations in the forward pass: the number of expanded edges
    per hop (needed to allocate them) and the expert block sizes (one matmul
    per non-empty block), plus the graph checks.

    Args:
        in_channels (int): input size :math:`F`.
        out_channels (int): output size :math:`O`.
        num_experts (int, optional): experts :math:`E`. (default: :obj:`8`)
        num_hop2_experts (int, optional): how many of them see the hop-2
            graph (the last ones); :obj:`None` gives ``num_experts // 2``.
        k (int, optional): experts per node for the top-k router;
            :obj:`None` means 2. (default: :obj:`None`)
        conv (str, optional): expert type, ``"gcn"``, ``"sage"``, ``"gin"``
            or ``"gat"``. (default: :obj:`"gcn"`)
        router (str or Router, optional): ``"topk"``, ``"topp"``,
            ``"expert_choice"``, or a router module. (default: :obj:`"topk"`)
        router_kwargs (dict, optional): further arguments of a router given
            by name; :obj:`None` gives ``{"noisy": True}`` for the top-k
            router, as GMoE.
        capacity_factor (float, optional): per-expert capacity, as in
            :class:`~moegraph.nn.SparseMoE`; :obj:`None` is dropless.
        heads (int, optional): attention heads of GAT experts; must divide
            ``out_channels``. (default: :obj:`1`)
        bias (bool, optional): experts learn biases. (default: :obj:`True`)
        cached (bool, optional): keep the hop graphs of the last graph.
            (default: :obj:`True`)
        aggregate_first (bool, optional): for GCN and SAGE experts, aggregate
            once per hop before the experts' weights (:obj:`True`), or let
            each active expert transform all nodes and aggregate into its own
            (:obj:`False`); :obj:`None` picks, per hop and step, the order
            with fewer multiply-adds. Same result either way.
            (default: :obj:`None`)
        deterministic (bool, optional): combine without scatter-add where
            every node has ``k`` experts (always on CUDA).
        hop2 (str, optional): the receptive field of the hop-2 experts:
            ``"pairs"``, the pairs at distance exactly two (normalised as the
            expert type normalises a graph), or ``"square"`` (GCN experts
            only), the normalised adjacency applied twice,
            :math:`\hat{\mathbf{A}}^2\mathbf{X}` (MixHop's 2-hop
            propagation): paths weighted by their count, the node and its
            1-hop neighbours kept, and no 2-hop graph built. On a dense graph
            ``"pairs"`` averages over most of the graph (a node loses its own
            features); ``"square"`` does not, but still puts most of a row on
            the nodes two steps away (69-74% on the social graphs reed98 and
            amherst41, whose labels agree there no more than chance). Two
            further modes (GCN experts only) keep the hop-1 aggregation in a
            hop-2 expert: ``"mix"``, :math:`\tfrac12(\hat{\mathbf{A}} +
            \hat{\mathbf{A}}^2)\mathbf{X}\mathbf{W}_e + \mathbf{b}_e`, and
            ``"concat"``, :math:`\hat{\mathbf{A}}\mathbf{X}\mathbf{W}_e +
            \hat{\mathbf{A}}^2\mathbf{X}\mathbf{W}'_e + \mathbf{b}_e` (the
            concatenated powers 1 and 2 of MixHop, Abu-El-Haija et al., 2019,
            with the weights ``hop2_weight [E_2, F, O]`` of the hop-2 experts
            at zero at init): a hop-2 expert starts as a hop-1 expert and uses
            the 2-hop aggregation only as far as training finds it useful, so
            a node routed to it does not lose its 1-hop neighbourhood. It
            transforms twice (about twice the FLOPs of a hop-1 expert).
            Under Adam a zero-initialised weight moves by up to the learning
            rate per step, so :math:`\mathbf{W}'_e` soon has the size of
            :math:`\mathbf{W}_e`: twice the weights of a hop-1 expert.
            ``"blend"`` learns one scalar per hop-2 expert instead,
            :math:`\big((1 - \alpha_e)\hat{\mathbf{A}}\mathbf{X} + \alpha_e
            \hat{\mathbf{A}}^2\mathbf{X}\big)\mathbf{W}_e + \mathbf{b}_e`
            (``hop2_alpha [E_2]``, zero at init, not constrained; a learned
            hop weight as in GPR-GNN, Chien et al., 2021): it starts as a
            hop-1 expert, with the FLOPs and weights of one.
            (default: :obj:`"pairs"`)
        expert_init (str, optional): ``"independent"``, each expert
            initialised on its own, or ``"shared"``: every expert starts as
            expert 0 (the same weights, biases and attention vectors; GCN
            experts of one hop then start as one ``GCNConv``) and the experts
            diverge only through the nodes routed to them. With independent
            experts, a node's next layer aggregates neighbours whose features
            came out of unrelated random bases while routing is still
            arbitrary. :meth:`share_expert_init` applies it; a container that
            resets the expert bank after this layer calls it again
            (:func:`reset_submodules`).
            (default: :obj:`"independent"`)
        shared_expert (bool, optional): add a dense expert that every node
            runs: the PyG convolution of the expert type (``GCNConv``,
            ``SAGEConv``, ``GINConv`` with the experts' two-layer MLP,
            ``GATConv``) on ``edge_index``, its output added to the routed
            mixture, :math:`\mathbf{y}_i = \mathrm{Conv}_s(\mathbf{X},
            \mathcal{E})_i + \sum_{e} g_e \mathrm{Conv}_e(\ldots)_i` (the
            shared expert of DeepSeekMoE, Dai et al., 2024, and the
            Residual-MoE of DeepSpeed-MoE, Rajbhandari et al., 2022): the
            routed experts then learn corrections to one convolution that
            sees every labelled node. It adds the active FLOPs of one dense
            layer (at ``k=1``, twice those of the plain GNN layer).
            (default: :obj:`False`)
        balance (str, optional): what the router's balance losses balance:
            ``"all"``, every expert against every other (the paper), which
            pushes half of the nodes onto the hop-2 experts when half of the
            experts are hop-2, whether or not the data wants them; or
            ``"per_hop"``, the hop-1 experts among themselves and the hop-2
            experts among themselves (``TopKRouter(balance_groups=...)``), so
            that the share of nodes on each hop is left to the task's
            gradient. Needs the ``"topk"`` router given by name.
            (default: :obj:`"all"`)

    Shapes:
        - **input:** ``x [N, F]``, ``edge_index [2, M]``
        - **output:** :class:`~moegraph.nn.MoEOutput` with ``out [N, O]`` and
          the :class:`~moegraph.nn.Routing`
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int = 8,
        num_hop2_experts: Optional[int] = None,
        k: Optional[int] = None,
        conv: str = "gcn",
        router: Union[str, Router] = "topk",
        router_kwargs: Optional[dict[str, Any]] = None,
        capacity_factor: Optional[float] = None,
        heads: int = 1,
        bias: bool = True,
        cached: bool = True,
        aggregate_first: Optional[bool] = None,
        deterministic: bool = False,
        hop2: str = "pairs",
        expert_init: str = "independent",
        shared_expert: bool = False,
        balance: str = "all",
    ):
        super().__init__(aggr="add", node_dim=0)
        in_channels = check_int("in_channels", in_channels)
        out_channels = check_int("out_channels", out_channels)
        num_experts = check_int("num_experts", num_experts)
        heads = check_int("heads", heads)
        if conv not in HOP_EXPERT_CONVS:
            raise ValueError(f"'conv' must be one of {HOP_EXPERT_CONVS} (got {conv!r})")
        num_hop2_experts = num_experts // 2 if num_hop2_experts is None else num_hop2_experts
        num_hop2_experts = check_int("num_hop2_experts", num_hop2_experts, 0, num_experts,
                                     " (num_experts)")
        if conv == "gat" and out_channels % heads != 0:
            raise ValueError(f"GAT experts: out_channels={out_channels} is not divisible by "
                             f"heads={heads}")
        if conv != "gat" and heads != 1:
            raise ValueError(f"'heads' applies to GAT experts only (conv={conv!r})")
        if capacity_factor is not None:
            capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        if hop2 not in HOP2_MODES:
            raise ValueError(f"'hop2' must be one of {HOP2_MODES} (got {hop2!r})")
        if hop2 != "pairs" and conv != "gcn":
            raise ValueError(f"'hop2={hop2!r}' applies to GCN experts only (conv={conv!r})")
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"'expert_init' must be one of {EXPERT_INITS} (got {expert_init!r})")
        if balance not in BALANCES:
            raise ValueError(f"'balance' must be one of {BALANCES} (got {balance!r})")
        if balance == "per_hop" and router != "topk":
            raise ValueError("balance='per_hop' needs the 'topk' router given by name (got "
                             f"{router if isinstance(router, str) else type(router).__name__})")
        if aggregate_first is False and conv not in ("gcn", "sage"):
            raise ValueError(f"'aggregate_first=False' applies to GCN and SAGE experts only "
                             f"(conv={conv!r}): the others aggregate before they transform")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_experts = num_experts
        self.num_hop2_experts = num_hop2_experts
        self.num_hop1_experts = num_experts - num_hop2_experts
        self.conv = conv
        self.heads = heads
        self.capacity_factor = capacity_factor
        self.cached = cached
        self.aggregate_first = aggregate_first
        self.deterministic = deterministic
        self.hop2 = hop2
        self.expert_init = expert_init

        self.balance = balance
        if router_kwargs is None and router == "topk":
            router_kwargs = {"noisy": True}
        if balance == "per_hop":
            groups = [n for n in (self.num_hop1_experts, self.num_hop2_experts) if n > 0]
            router_kwargs = {**(router_kwargs or {}), "balance_groups": groups}
        self.router = build_router(router, in_channels, num_experts, k, router_kwargs)

        self.experts: Union[MLPExperts, LinearExperts]
        if conv == "gin":
            self.experts = MLPExperts(in_channels, out_channels, out_channels, num_experts,
                                      act="relu", bias=bias)
        elif conv == "sage":  # [mean of neighbours, root] -> lin_l(mean) + lin_r(root)
            self.experts = LinearExperts(2 * in_channels, out_channels, num_experts, bias)
        else:  # gcn; gat uses the stacked weight and bias of a linear bank too
            self.experts = LinearExperts(in_channels, out_channels, num_experts, bias)
        if conv == "gat":
            C = out_channels // heads
            self.att_src = Parameter(torch.empty(num_experts, heads, C))
            self.att_dst = Parameter(torch.empty(num_experts, heads, C))
        else:
            self.register_parameter("att_src", None)
            self.register_parameter("att_dst", None)
        if hop2 == "concat":  # the hop-2 experts' weights on A^2 x, zero at init
            self.hop2_weight = Parameter(torch.empty(num_hop2_experts, in_channels,
                                                     out_channels))
        else:
            self.register_parameter("hop2_weight", None)
        if hop2 == "blend":  # each hop-2 expert's share of A^2 x, zero at init
            self.hop2_alpha = Parameter(torch.empty(num_hop2_experts))
        else:
            self.register_parameter("hop2_alpha", None)
        self.shared_expert = bool(shared_expert)
        self.shared_conv: Optional[torch.nn.Module] = (
            _dense_conv(conv, in_channels, out_channels, heads, bias) if shared_expert else None)
        self._cache: Optional[tuple] = None
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.att_src is not None:
            for att in (self.att_src, self.att_dst):
                for e in range(self.num_experts):
                    torch.nn.init.xavier_uniform_(att[e].view(1, -1))
        for param in (self.hop2_weight, self.hop2_alpha):
            if param is not None:
                torch.nn.init.zeros_(param)
        if self.shared_conv is not None:
            self.shared_conv.reset_parameters()
        self.share_expert_init()
        self._cache = None

    def share_expert_init(self):
        r"""With ``expert_init="shared"``, copy expert 0's parameters to the
        other experts (nothing otherwise). :meth:`reset_parameters` calls it;
        a container that resets the expert bank again after this layer calls
        it after (:func:`reset_submodules` does)."""
        if self.expert_init != "shared":
            return
        params = list(self.experts.parameters())
        if self.att_src is not None:
            params += [self.att_src, self.att_dst]
        with torch.no_grad():
            for param in params:  # stacked per expert: first dimension E
                param[1:] = param[0]

    # Hop graphs ###############################################################

    def hop_graphs(self, edge_index: Tensor, num_nodes: int) -> dict[int, HopGraph]:
        r"""The hop graphs the experts need, built for this expert type
        (GCN: normalised with self-loops; GAT: with self-loops; SAGE, GIN:
        plain), cached for the last ``edge_index`` when ``cached``."""
        # An inference tensor (made under torch.inference_mode, e.g. a batch
        # collated in Lightning's evaluation loops) has no version counter and
        # cannot be edited in place: its version is fixed.
        version = 0 if edge_index.is_inference() else edge_index._version
        key = (edge_index, version, num_nodes, edge_index.device)
        if self.cached and self._cache is not None:
            old = self._cache[0]
            # Holding the tensor keeps its storage alive, so identity is safe.
            if old[0] is key[0] and old[1:] == key[1:]:
                return self._cache[1]
        graphs: dict[int, HopGraph] = {}
        for hop, needed in ((1, self.num_hop1_experts), (2, self.num_hop2_experts)):
            if needed == 0:
                continue
            if hop == 2 and self.hop2 != "pairs" and 1 in graphs:
                graphs[2] = graphs[1]  # the hop-1 graph, aggregated twice
                continue
            ei = (edge_index.long() if hop == 1 or self.hop2 != "pairs"
                  else two_hop_edge_index(edge_index, num_nodes))
            weight = None
            if self.conv == "gcn":
                ei, weight = gcn_norm(ei, None, num_nodes, improved=False, add_self_loops=True)
            elif self.conv == "gat":
                ei, _ = remove_self_loops(ei)
                ei, _ = add_self_loops(ei, num_nodes=num_nodes)
            graphs[hop] = HopGraph.build(ei, num_nodes, weight)
        if self.cached:
            self._cache = (key, graphs)
        return graphs

    # Forward ##################################################################

    def forward(self, x: Tensor, edge_index: Tensor) -> MoEOutput:
        r"""
        Args:
            x (Tensor): node features ``[N, F]``.
            edge_index (Tensor): edges ``[2, M]``.

        Returns:
            :class:`~moegraph.nn.MoEOutput`: ``out [N, O]`` and the routing
            of the N nodes over the E experts (A assignments).
        """
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"'x' must be a 2-D tensor [num_nodes, in_channels] (got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__})")
        if x.size(1) != self.in_channels:
            raise ValueError(f"'x' has {x.size(1)} features but {self.__class__.__name__} "
                             f"expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"'x' must be a floating-point tensor (got {x.dtype})")
        N = x.size(0)
        check_edge_index(edge_index, N)
        graphs = self.hop_graphs(edge_index, N)

        routing = apply_capacity(self.router(x), self.num_experts, self.capacity_factor)
        bins = indices_and_bins(routing, self.num_experts)
        # the node and expert of each assignment, sorted by expert; counts per expert
        rows, experts, counts = bins.rows, bins.experts, bins.counts  # [A], [A], [E]
        # Hop-1 experts come first, so the hop-1 assignments are a prefix.
        split = int(counts[:self.num_hop1_experts].sum())
        blocks = [(hop, slice(0, split) if hop == 1 else slice(split, rows.numel()))
                  for hop in graphs]

        if self.conv == "gat":
            y = self._gat(x, graphs, blocks, rows, experts, counts)
        else:
            ys = []
            for hop, part in blocks:
                lo, hi = ((0, self.num_hop1_experts) if hop == 1
                          else (self.num_hop1_experts, self.num_experts))
                # the distinct nodes of the hop's assignments, and which each is
                targets, inverse = torch.unique(rows[part], return_inverse=True)  # [T], [A_h]
                powers = hop == 2 and self.hop2 != "pairs"  # powers of the 1-hop adjacency
                if not powers and self._transform_first(x, graphs[hop], rows[part], targets,
                                                        counts[lo:hi]):
                    ys.append(self._transform_then_aggregate(x, graphs[hop], rows[part],
                                                             counts[lo:hi], lo))
                else:
                    hop_counts = torch.zeros_like(counts)
                    hop_counts[lo:hi] = counts[lo:hi]
                    source = x
                    if powers:  # A x on every node, then A (A x) into the targets
                        every = torch.arange(N, device=x.device)
                        source = self.propagate(graphs[hop].adjacency_to(every), x=x,
                                                edge_weight=None)  # [N, F]
                    z = self._aggregate(source, graphs[hop], rows[part], targets, inverse)
                    if powers and self.hop2 == "mix":  # (A x + A (A x)) / 2
                        z = 0.5 * (source[rows[part]] + z)
                    if powers and self.hop2 == "blend":  # A x + alpha_e (A (A x) - A x)
                        assert self.hop2_alpha is not None
                        alpha = self.hop2_alpha[experts[part] - lo].unsqueeze(-1)
                        ax = source[rows[part]]
                        z = ax + alpha.to(z.dtype) * (z - ax)
                    if powers and self.hop2 == "concat":  # A x W_e + A (A x) W'_e
                        ys.append(self.experts(source[rows[part]], hop_counts)
                                  + self._hop2_term(z, counts[lo:hi]))
                    else:
                        ys.append(self.experts(z, hop_counts))  # [A_h, O]
            y = torch.cat(ys)  # [A, O]
        y = y * bins.weight.to(y.dtype).unsqueeze(-1)
        out = combine(y, rows, N, routing.fixed_k, self.deterministic or x.is_cuda)
        if self.shared_conv is not None:
            out = out + self.shared_conv(x, edge_index)
        return MoEOutput(out, routing)

    def _hop2_term(self, z: Tensor, counts: Tensor) -> Tensor:
        r"""``hop2="concat"``: :math:`(\hat{\mathbf{A}}^2\mathbf{X})
        \mathbf{W}'_e` of the hop-2 assignments ``z [A_2, F]`` (sorted by
        expert, ``counts`` per hop-2 expert)."""
        assert self.hop2_weight is not None
        return grouped_linear(z, counts, self.hop2_weight)

    def _transform_first(self, x: Tensor, graph: HopGraph, rows: Tensor, targets: Tensor,
                         counts: Tensor) -> bool:
        r"""Whether a hop's GCN or SAGE experts should transform before they
        aggregate: aggregating first costs ``nnz(targets) * F + A_h * F * O``
        multiply-adds, transforming first ``E_h * N * F * O + nnz(A_h) * O``
        (each active expert transforms every node, then aggregates only into
        its own). Wide inputs on dense hop-2 graphs favour the second."""
        if self.conv not in ("gcn", "sage") or rows.numel() == 0:
            return False
        if self.aggregate_first is not None:
            return not self.aggregate_first
        F, O = self.in_channels, self.out_channels
        width = F if self.conv == "gcn" else 2 * F
        # host syncs: the cost estimates
        aggregate = int(graph.deg[targets].sum()) * F + rows.numel() * width * O
        transform = (int((counts > 0).sum()) * x.size(0) * F * O
                     + int(graph.deg[rows].sum()) * O)
        return transform < aggregate

    def _transform_then_aggregate(self, x: Tensor, graph: HopGraph, rows: Tensor,
                                  counts: Tensor, first: int) -> Tensor:
        r"""Outputs of a hop's assignments ``rows [A_h]`` (sorted by expert,
        ``counts`` per expert of the hop, the first being expert ``first``):
        each active expert transforms every node, then aggregates into its
        own nodes only."""
        F = self.in_channels
        bank = self._linear_experts()
        weights = bank.weight.unbind(0)  # views: no [E, F, O] gradient per expert
        biases = (bank.bias.unbind(0) if bank.bias is not None
                  else [None] * self.num_experts)
        outs, start = [], 0
        for j, size in enumerate(counts.tolist()):  # host sync: block sizes
            if size == 0:
                continue
            e, own = first + j, rows[start:start + size]
            start += size
            adj_t = graph.adjacency_to(own)  # [n_e, N]
            if self.conv == "gcn":
                h = self.propagate(adj_t, x=x @ weights[e], edge_weight=None)
            else:  # sage: lin_l(mean_j x_j) + lin_r(x_i)
                deg = graph.deg[own].clamp(min=1).unsqueeze(-1).to(x.dtype)
                h = (self.propagate(adj_t, x=x @ weights[e][:F], edge_weight=None) / deg
                     + x[own] @ weights[e][F:])
            outs.append(h if biases[e] is None else h + biases[e])
        return torch.cat(outs) if outs else x.new_zeros(0, self.out_channels)

    def _aggregate(self, x: Tensor, graph: HopGraph, rows: Tensor, targets: Tensor,
                   inverse: Tensor) -> Tensor:
        r"""Expert inputs of the assignments at nodes ``rows [A_h]``: the
        hop's aggregation, computed once for each distinct node ``targets
        [T]`` (``rows == targets[inverse]``)."""
        adj_t = graph.adjacency_to(targets)  # [T, N], the in-edges of the targets only
        agg = self.propagate(adj_t, x=x, edge_weight=None)  # [T, F]
        if self.conv == "gcn":
            return agg[inverse]
        root = x[rows]
        if self.conv == "gin":  # (1 + eps) x_i + sum_j x_j, eps = 0
            return agg[inverse] + root
        mean = agg / graph.deg[targets].clamp(min=1).unsqueeze(-1).to(agg.dtype)
        return torch.cat([mean[inverse], root], dim=-1)  # sage

    def _gat(self, x: Tensor, graphs: dict[int, HopGraph], blocks: list, rows: Tensor,
             experts: Tensor, counts: Tensor) -> Tensor:
        E, H, C = self.num_experts, self.heads, self.out_channels // self.heads
        bank = self._linear_experts()
        weight = bank.weight.view(E, self.in_channels, H, C)
        # a^T W_e x = (W_e a)^T x: attention logits from the input features.
        u_src = torch.einsum("efhc,ehc->feh", weight, self.att_src).reshape(-1, E * H)
        u_dst = torch.einsum("efhc,ehc->feh", weight, self.att_dst).reshape(-1, E * H)
        s_src = (x @ u_src.to(x.dtype)).view(-1, E, H)  # [N, E, H]
        s_dst = (x @ u_dst.to(x.dtype)).view(-1, E, H)  # [N, E, H]
        zs = []
        for hop, part in blocks:
            graph, a_rows, a_experts = graphs[hop], rows[part], experts[part]
            pos, local = graph.in_edges(a_rows)  # edges into each assignment's node
            src, expert = graph.src[pos], a_experts[local]
            logit = F.leaky_relu(s_src[src, expert] + s_dst[a_rows[local], expert], 0.2)
            alpha = softmax(logit, local, num_nodes=a_rows.numel())  # [M_h, H]
            zs.append(self.propagate(torch.stack([src, local]), x=(x, None), edge_weight=alpha,
                                     size=(x.size(0), a_rows.numel())))  # [A_h, H, F]
        z = torch.cat(zs)  # [A, H, F]
        sizes = counts.tolist()  # host sync: block sizes
        outs = []
        for e, ze in enumerate(z.split(sizes)):
            if ze.size(0) > 0:
                outs.append(torch.einsum("nhf,fhc->nhc", ze, weight[e]).reshape(-1, H * C))
        y = torch.cat(outs) if outs else x.new_zeros(0, H * C)
        if bank.bias is not None:
            y = y + bank.bias[experts]
        return y

    def _linear_experts(self) -> LinearExperts:
        r"""The stacked linear experts of GCN, SAGE and GAT experts."""
        assert isinstance(self.experts, LinearExperts), self.conv
        return self.experts

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor,
                              edge_weight: Optional[Tensor] = None) -> Tensor:
        # A sparse [T, N] by dense [N, F] product: no [M, F] message tensor
        # (the edge weights are the values of adj_t).
        return torch.sparse.mm(adj_t, x)

    def message(self, x_j: Tensor, edge_weight: Optional[Tensor]) -> Tensor:
        if edge_weight is None:
            return x_j
        if edge_weight.dim() == 2:  # GAT: per-head attention [M, H]
            return edge_weight.unsqueeze(-1) * x_j.unsqueeze(1)  # [M, H, F]
        return edge_weight.unsqueeze(-1) * x_j

    def __repr__(self) -> str:
        k = getattr(self.router, "k", None)
        extra = f", k={k}" if k is not None else f", router={self.router.__class__.__name__}"
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_experts={self.num_experts}, num_hop2_experts={self.num_hop2_experts}"
                f"{extra}, conv={self.conv}"
                f"{'' if self.hop2 == 'pairs' else f', hop2={self.hop2}'}"
                f"{', shared_expert=True' if self.shared_expert else ''}"
                f"{', balance=' + repr(self.balance) if self.balance != 'all' else ''})")


def _dense_conv(conv: str, in_channels: int, out_channels: int, heads: int,
                bias: bool) -> torch.nn.Module:
    r"""The PyG convolution that one expert of type ``conv`` computes, as a
    dense layer over every node: :class:`HopMoEConv`'s shared expert."""
    from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv

    if conv == "gcn":
        return GCNConv(in_channels, out_channels, bias=bias)
    if conv == "sage":
        return SAGEConv(in_channels, out_channels, aggr="mean", bias=bias)
    if conv == "gin":
        return GINConv(torch.nn.Sequential(torch.nn.Linear(in_channels, out_channels, bias=bias),
                                           torch.nn.ReLU(),
                                           torch.nn.Linear(out_channels, out_channels,
                                                           bias=bias)))
    return GATConv(in_channels, out_channels // heads, heads=heads, bias=bias)


def reset_submodules(root: torch.nn.Module) -> None:
    r"""Call ``reset_parameters`` of every submodule of ``root`` (in
    :meth:`~torch.nn.Module.modules` order), then re-apply the shared expert
    init of every :class:`HopMoEConv` in it: the loop reaches a convolution's
    expert bank after the convolution itself, and its reset would leave the
    experts independent. What the models holding hop-expert convolutions
    (:class:`~moegraph.nn.models.GMoE`, :class:`~moegraph.nn.models.MoEGNN`,
    the graph-level stack) call in their ``reset_parameters``."""
    for module in root.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not root and callable(reset):
            reset()
    for module in root.modules():
        if isinstance(module, HopMoEConv):
            module.share_expert_init()
