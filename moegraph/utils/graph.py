r"""Graph utilities shared by the layers and the data modules: edge-index
checks, the pairs at distance two, and a CSR view of a graph's in-edges."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["HopGraph", "check_edge_index", "two_hop_edge_index"]


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
