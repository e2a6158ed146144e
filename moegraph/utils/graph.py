r"""Graph utilities shared by the layers, the data modules and the tasks:
edge-index checks, the pairs at distance two, a CSR view of a graph's
in-edges, the hop-ordered computation subgraph of some nodes, what of a GNN
can be trimmed layer by layer on it, and GCN's normalised edges of a whole
graph (sparse inference of :class:`~moegraph.nn.Mowst`)."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import Module
from torch_geometric.nn import GCNConv, MessagePassing

__all__ = ["HopGraph", "check_edge_index", "two_hop_edge_index",
           "trimmable_convs", "HopSubgraph", "hop_ordered_subgraph", "gcn_normalized_edges",
           "gcn_degree_inv_sqrt"]


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    r"""Raise a clear error unless ``edge_index`` is a ``[2, M]`` integer
    tensor with every node id in ``[0, num_nodes)`` (an empty one may have
    any dtype, e.g. ``torch.tensor([[], []])``)."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"'edge_index' must be a tensor (got {type(edge_index).__name__})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"'edge_index' must have shape [2, num_edges] "
                         f"(got {tuple(edge_index.shape)})")
    if edge_index.numel() > 0 and edge_index.dtype not in (torch.long, torch.int):
        raise ValueError(f"'edge_index' must hold integers (got {edge_index.dtype})")
    if edge_index.numel() > 0:
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(f"'edge_index' holds node {low if low < 0 else high}, outside "
                             f"[0, {num_nodes - 1}] for {num_nodes} nodes")


def two_hop_edge_index(edge_index: Tensor, num_nodes: int,
                       max_paths_per_chunk: int = 1 << 24) -> Tensor:
    r"""The pairs at distance exactly two: ``(i, m)`` with a path
    ``i -> j -> m`` in ``edge_index``, ``i != m``, and ``i -> m`` not itself
    an edge. Each pair appears once; pairs are sorted by target, then source.

    Computed in pure PyTorch (no ``torch-sparse``): the in-neighbours of each
    edge's source are expanded through a CSR index, in chunks of at most
    ``max_paths_per_chunk`` paths, and de-duplicated. The memory is bounded
    by the chunk size plus the result, whose size is that of
    :math:`(\mathbf{A}^2 > 0)` minus :math:`\mathbf{A}` and the diagonal.

    Args:
        edge_index (Tensor): ``[2, M]`` edges ``source -> target``.
        num_nodes (int): number of nodes :math:`N`.
        max_paths_per_chunk (int, optional): paths expanded at once.

    Returns:
        Tensor: ``[2, M2]`` the 2-hop edges.
    """
    check_edge_index(edge_index, num_nodes)
    N = num_nodes
    src, dst = edge_index[0].long(), edge_index[1].long()
    empty = torch.empty(2, 0, dtype=torch.long, device=edge_index.device)
    if src.numel() == 0:
        return empty
    # The in-edges i -> j of every node j, through a CSR index.
    graph = HopGraph.build(torch.stack([src, dst]), N)
    # Every edge j -> m extends each in-edge i -> j of its source into i -> j -> m.
    ends = graph.deg[src].cumsum(0)  # [M] paths through the edges up to each one
    keys = []
    start = 0
    while start < src.numel():
        # The largest run of edges whose paths fit in one chunk (at least one edge).
        base = int(ends[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(ends, base + max_paths_per_chunk, right=True))
        stop = max(stop, start + 1)
        pos, edge = graph.in_edges(src[start:stop])
        i, m = graph.src[pos], dst[start:stop][edge]
        keep = i != m
        if keep.any():
            keys.append(torch.unique(m[keep] * N + i[keep]))
        start = stop
    if not keys:
        return empty
    key = torch.unique(torch.cat(keys))  # sorted: by target, then source
    one_hop = torch.unique(dst * N + src)
    key = key[~torch.isin(key, one_hop)]
    return torch.stack([key % N, key // N])


class HopGraph(NamedTuple):
    r"""A graph (e.g. one receptive field of
    :class:`~moegraph.nn.HopMoEConv`), its edges sorted by
    target with a CSR pointer, so that the in-edges of any set of targets are
    found without scanning the graph.

    Attributes:
        src (Tensor): ``[M]`` source of each edge, edges sorted by target.
        dst (Tensor): ``[M]`` target of each edge (non-decreasing).
        rowptr (Tensor): ``[N + 1]`` the in-edges of node ``i`` are
            ``rowptr[i]:rowptr[i + 1]``.
        weight (Tensor, optional): ``[M]`` edge weights (GCN normalisation).
        deg (Tensor): ``[N]`` in-degree, self-loops included where present.
    """

    src: Tensor
    dst: Tensor
    rowptr: Tensor
    weight: Optional[Tensor]
    deg: Tensor

    @classmethod
    def build(cls, edge_index: Tensor, num_nodes: int,
              weight: Optional[Tensor] = None) -> HopGraph:
        dst = edge_index[1]
        perm = torch.argsort(dst, stable=True)
        src, dst = edge_index[0][perm], dst[perm]
        deg = torch.bincount(dst, minlength=num_nodes)
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=dst.device)
        torch.cumsum(deg, 0, out=rowptr[1:])
        return cls(src, dst, rowptr, None if weight is None else weight[perm], deg)

    def in_edges(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        r"""The in-edges of ``targets [T]`` (repeats allowed): their position
        in this graph ``[M_T]`` and the index of their target in
        ``targets`` ``[M_T]``."""
        start = self.rowptr[targets]
        count = self.rowptr[targets + 1] - start  # [T]
        total = int(count.sum())  # host sync: the size of the expanded edge list
        local = torch.repeat_interleave(torch.arange(targets.numel(), device=targets.device),
                                        count, output_size=total)
        offset = torch.arange(total, device=targets.device) - (count.cumsum(0) - count)[local]
        return start[local] + offset, local

    def adjacency_to(self, targets: Tensor) -> Tensor:
        r"""The in-edges of ``targets [T]`` as a sparse CSR matrix ``[T, N]``
        (row ``t``: the in-edges of ``targets[t]``; columns: sources; values:
        the edge weights, or ones)."""
        pos, local = self.in_edges(targets)
        crow = torch.zeros(targets.numel() + 1, dtype=torch.long, device=targets.device)
        torch.cumsum(torch.bincount(local, minlength=targets.numel()), 0, out=crow[1:])
        values = (self.weight[pos] if self.weight is not None
                  else torch.ones(pos.numel(), device=targets.device))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, self.src[pos], values,
                                           size=(targets.numel(), self.rowptr.numel() - 1),
                                           check_invariants=False)



def trimmable_convs(module: Module) -> Optional[list[MessagePassing]]:
    r"""The message-passing layers of ``module`` if
    :meth:`~moegraph.nn.Mowst.strong_forward_at` can run it trimmed layer by layer on a
    hop-ordered subgraph (:func:`hop_ordered_subgraph`), else :obj:`None`.

    That is a PyG :class:`~torch_geometric.nn.models.basic_gnn.BasicGNN`
    (``GCN``, ``GraphSAGE``, ``GAT``, ``GIN``, ...) without jumping knowledge,
    whose layers pass messages from source to target, whose normalisations act
    on each node alone (none, batch norm, or node-wise layer norm) and whose
    layers, if GCN layers, share the same normalisation flags.
    """
    from torch_geometric.nn.models.basic_gnn import BasicGNN
    from torch_geometric.nn.norm import BatchNorm
    from torch_geometric.nn.norm import LayerNorm as PyGLayerNorm

    if not isinstance(module, BasicGNN) or module.jk_mode is not None:
        return None
    convs = list(module.convs)
    inner = [m for m in module.modules() if isinstance(m, MessagePassing)]
    if len(inner) != len(convs) or any(c.flow != "source_to_target" for c in convs):
        return None
    gcn = [c for c in convs if isinstance(c, GCNConv)]
    if gcn and (len(gcn) != len(convs)
                or len({(c.normalize, c.improved, c.add_self_loops) for c in gcn}) != 1):
        return None  # one edge weight is shared by all layers
    nodewise = (torch.nn.Identity, torch.nn.BatchNorm1d, torch.nn.LayerNorm, BatchNorm)
    for norm in module.norms:
        if not (isinstance(norm, nodewise)
                or (isinstance(norm, PyGLayerNorm) and norm.mode == "node")):
            return None
    return convs


class HopSubgraph(NamedTuple):
    r"""The computation subgraph of some nodes, ordered by hop distance, as
    returned by :func:`hop_ordered_subgraph`.

    Attributes:
        subset (Tensor): ``[n]`` the original ids of its nodes, sorted by hop
            (then by id).
        edge_index (Tensor): ``[2, e]`` its edges, relabelled, grouped by the
            hop of their target node.
        edge_id (Tensor): ``[e]`` positions of its edges in the original
            ``edge_index`` (to carry edge weights over); ``-1`` for a
            self-loop added by ``add_self_loops=True``.
        mapping (Tensor): ``[len(index)]`` the position of each node of
            ``index`` in :attr:`subset`.
        num_nodes_per_hop (list[int]): ``num_hops + 1`` node counts, hop 0 first.
        num_edges_per_hop (list[int]): ``num_hops`` edge counts, by the hop of
            the target node (0 to ``num_hops - 1``).
    """

    subset: Tensor
    edge_index: Tensor
    edge_id: Tensor
    mapping: Tensor
    num_nodes_per_hop: list[int]
    num_edges_per_hop: list[int]


def hop_ordered_subgraph(index: Tensor, num_hops: int, edge_index: Tensor,
                         num_nodes: int, add_self_loops: bool = False) -> HopSubgraph:
    r"""The ``num_hops``-hop computation subgraph of the nodes ``index``
    (messages flow from ``edge_index[0]`` to ``edge_index[1]``), laid out as
    :class:`~torch_geometric.loader.NeighborLoader` lays out its samples so
    that a :class:`~torch_geometric.nn.models.basic_gnn.BasicGNN` can trim it
    layer by layer (``num_sampled_nodes_per_hop`` /
    ``num_sampled_edges_per_hop``): nodes sorted by their hop distance from
    ``index`` (a breadth-first search against the edge direction), edges
    whose target lies within ``num_hops - 1`` hops grouped by the hop of their
    target. Layer :math:`\ell` of :math:`k` then computes outputs at the nodes
    within :math:`k - \ell` hops from the edges into them only, which is
    exact: such a node keeps all its in-edges.

    Within a hop, edges keep their order in ``edge_index``, so every node
    receives its messages in the same order as on the whole graph (and a sum
    over them gives the same bits). With ``add_self_loops=True`` the edges are
    those of PyG's :func:`~torch_geometric.utils.add_remaining_self_loops`:
    existing self-loops are dropped and each node within ``num_hops - 1`` hops
    gets one self-loop, after its other in-edges (as GCN's normalisation lays
    them out on the whole graph).

    The search costs one gather and one comparison over the edges per hop, on
    one byte per edge.

    Args:
        index (Tensor): the target nodes (ids, duplicates allowed).
        num_hops (int): hops :math:`k \ge 0`.
        edge_index (Tensor): edges of the whole graph.
        num_nodes (int): nodes of the whole graph.
        add_self_loops (bool, optional): see above. (default: :obj:`False`)

    Shapes:
        - **input:** ``index [B]``, ``edge_index [2, M]``
        - **output:** :class:`HopSubgraph` with ``subset [n]``,
          ``edge_index [2, e]``, ``edge_id [e]``, ``mapping [B]``
    """
    device = edge_index.device
    index = index.to(device=device, dtype=torch.long).view(-1)
    row, col = edge_index[0], edge_index[1]
    unreached = num_hops + 1
    # one byte per node and per edge: the gathers over all edges dominate
    hop_dtype = torch.uint8 if unreached <= 255 else torch.long
    hop = torch.full((num_nodes,), unreached, dtype=hop_dtype, device=device)
    hop[index] = 0
    target_hop = hop[col] if num_hops > 0 else hop[:0]  # [M]
    for h in range(1, num_hops + 1):  # one pass over the edges per hop
        src = row[target_hop == h - 1]
        hop[src[hop[src] > h]] = h
        if h < num_hops:  # hops below h are final, and so are those of targets
            target_hop = hop[col]
    nodes_by_hop = [(hop == h).nonzero().view(-1) for h in range(num_hops + 1)]
    subset = torch.cat(nodes_by_hop)
    num_nodes_per_hop = [t.numel() for t in nodes_by_hop]
    new_id = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    new_id[subset] = torch.arange(subset.numel(), device=device)

    keep = (row != col) if add_self_loops else None  # [M] the edges that are not loops
    ids, pieces, num_edges_per_hop = [], [], []
    start = 0
    for h in range(num_hops):  # targets within num_hops - 1 hops (their hops are final)
        mask = target_hop == h
        if keep is not None:
            mask &= keep
        edge_id = mask.nonzero().view(-1)
        ids.append(edge_id)
        pieces.append(new_id[edge_index.index_select(1, edge_id)])
        count = edge_id.numel()
        if add_self_loops:  # one loop per node of hop h, after its other in-edges
            loops = torch.arange(start, start + num_nodes_per_hop[h], device=device)
            ids.append(torch.full_like(loops, -1))
            pieces.append(loops.expand(2, -1))
            count += loops.numel()
        start += num_nodes_per_hop[h]
        num_edges_per_hop.append(count)
    if num_hops > 0:
        edge_id, sub_edge_index = torch.cat(ids), torch.cat(pieces, dim=1)
    else:
        edge_id = torch.empty(0, dtype=torch.long, device=device)
        sub_edge_index = torch.empty(2, 0, dtype=torch.long, device=device)
    return HopSubgraph(
        subset=subset,
        edge_index=sub_edge_index,
        edge_id=edge_id,
        mapping=new_id[index],
        num_nodes_per_hop=num_nodes_per_hop,
        num_edges_per_hop=num_edges_per_hop,
    )


def gcn_degree_inv_sqrt(convs: list[GCNConv], edge_index: Tensor, num_nodes: int,
                        dtype: torch.dtype) -> Tensor:
    r""":math:`\hat{d}_v^{-1/2}` of every node, the degree (in-edges, self-loops
    as GCN adds them) that the GCN layers ``convs`` (which share
    ``add_self_loops`` and ``flow``) compute in their forward pass on a graph
    without edge weights: bit for bit what
    :func:`~torch_geometric.nn.conv.gcn_conv.gcn_norm` finds, from one count
    over the edges instead of a normalisation of the whole graph. The
    normalised weight of an edge ``u -> v`` (or of the loop of ``v``) is then
    ``dinv[u] * dinv[v]``, computed for the edges one needs only.

    PyG (2.8) adds every self-loop with weight one when no edge weight is
    given, whatever ``improved`` says; ``tests/nn/test_mowst_sparse.py``
    compares with :func:`gcn_normalized_edges` to catch a change.

    Shapes:
        - **input:** ``edge_index [2, M]``
        - **output:** ``[N]``
    """
    flags = {(c.add_self_loops, c.flow) for c in convs}
    if len(flags) != 1:
        raise ValueError(f"the GCN layers must share add_self_loops and flow (got "
                         f"{sorted(flags)})")
    add_self_loops, flow = flags.pop()
    row, col = edge_index[0], edge_index[1]
    idx = (col if flow == "source_to_target" else row).long()
    if add_self_loops:  # the existing loops are replaced by one per node
        idx = idx[row != col]
    # a float sum of ones, in any order, is this integer (below 2**24 per node)
    deg = torch.bincount(idx, minlength=num_nodes).to(dtype)
    if add_self_loops:
        deg += 1
    dinv = deg.pow_(-0.5)
    return dinv.masked_fill_(dinv == float("inf"), 0.0)


def gcn_normalized_edges(convs: list[GCNConv], edge_index: Tensor, num_nodes: int,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""The self-looped edges of the whole graph and their normalised weights
    :math:`\hat{D}^{-1/2}\hat{A}\hat{D}^{-1/2}`, exactly as the GCN layers
    ``convs`` (which share ``improved``, ``add_self_loops`` and ``flow``)
    compute them in their forward pass. Nothing of the layers is read or
    written but their public flags.

    Shapes:
        - **input:** ``edge_index [2, M]``
        - **output:** ``edge_index [2, M']``, ``edge_weight [M']``
    """
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    flags = {(c.improved, c.add_self_loops, c.flow) for c in convs}
    if len(flags) != 1:
        raise ValueError(f"the GCN layers must share improved, add_self_loops and flow "
                         f"(got {sorted(flags)})")
    improved, add_self_loops, flow = flags.pop()
    out_index, out_weight = gcn_norm(edge_index, None, num_nodes, improved, add_self_loops,
                                     flow, dtype)
    return out_index, out_weight
