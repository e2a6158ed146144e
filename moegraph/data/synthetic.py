r"""Graphs generated in-process: nothing to download."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch_geometric.data import Data

_CHUNK = 1 << 20  # rows or edges per chunk of the in-place passes


def undirected_edges(src: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    r"""The undirected graph of the pairs ``(src, dst)`` without self loops or
    duplicates, each edge in both directions, sorted by (row, column): what
    ``coalesce(to_undirected(remove_self_loops(...)))`` returns, in about a
    third of its memory (one int64 key per pair, sorted in place, instead of
    the concatenated, sorted and permuted copies of ``edge_index``).

    ``src`` and ``dst`` are consumed (overwritten).
    """
    if src.numel() == 0:
        return torch.empty(2, 0, dtype=torch.long)
    N = num_nodes
    # key = min * N + max of each pair, in src's memory
    hi = torch.maximum(src, dst)
    lo = torch.minimum(src, dst, out=src)
    del src, dst  # the caller's dst may be freed; lo is src's memory
    keep = lo != hi
    key = lo.mul_(N).add_(hi)
    del hi, lo
    key = _sort_in_place(key[keep])
    del keep
    if key.numel() > 1:
        first = torch.ones(key.numel(), dtype=torch.bool)
        torch.ne(key[1:], key[:-1], out=first[1:])
        key = key[first]  # unique pairs (lo < hi)
        del first
    U = key.numel()
    both = torch.empty(2 * U, dtype=torch.long)
    both[:U] = key
    # the reversed pairs: hi * N + lo
    for a in range(0, U, _CHUNK):
        b = min(a + _CHUNK, U)
        k = key[a:b]
        both[U + a:U + b] = (k % N) * N + k // N
    del key
    both = _sort_in_place(both)
    edge_index = torch.empty(2, 2 * U, dtype=torch.long)
    torch.div(both, N, rounding_mode="floor", out=edge_index[0])
    torch.remainder(both, N, out=edge_index[1])
    return edge_index


def _sort_in_place(t: Tensor) -> Tensor:
    r"""``t`` sorted ascending in its own memory (NumPy's in-place sort: torch's
    sort also returns int64 indices, as large again as an int64 ``t``)."""
    t.numpy().sort()
    return t


def random_split_masks(num_nodes: int, train_ratio: float, val_ratio: float,
                       generator: torch.Generator,
                       candidates: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Boolean train/val/test masks from a random permutation of ``candidates``
    (all nodes by default); the test set is the rest."""
    if not (0 < train_ratio < 1 and 0 <= val_ratio < 1 and train_ratio + val_ratio < 1):
        raise ValueError(f"need 0 < train_ratio, 0 <= val_ratio and train_ratio + val_ratio < 1 "
                         f"(got {train_ratio}, {val_ratio})")
    if candidates is None:
        candidates = torch.arange(num_nodes)
    perm = candidates[torch.randperm(candidates.numel(), generator=generator)]
    n_train = int(round(train_ratio * perm.numel()))
    n_val = int(round(val_ratio * perm.numel()))
    masks = []
    for idx in (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]):
        mask = torch.zeros(num_nodes, dtype=torch.bool)
        mask[idx] = True
        masks.append(mask)
    return masks[0], masks[1], masks[2]


def csbm_graph(
    num_nodes: int = 3000,
    num_classes: int = 4,
    num_features: int = 32,
    avg_degree: float = 6.0,
    homophily: float = 0.8,
    signal: float = 0.25,
    noise: float = 1.0,
    num_modes: int = 2,
    train_ratio: float = 0.5,
    val_ratio: float = 0.25,
    seed: int = 0,
) -> Data:
    r"""A contextual stochastic block model graph for node classification
    (Deshpande et al., 2018), with multi-modal classes.

    Each node gets a class :math:`y` (balanced) and a mode :math:`m`; its
    features are :math:`\mathbf{x} = \boldsymbol\mu_{y,m} + \sigma\boldsymbol\epsilon`
    with :math:`\|\boldsymbol\mu_{y,m}\| = \text{signal}\cdot\sqrt{F}` random
    directions and :math:`\boldsymbol\epsilon\sim\mathcal{N}(0, I)`. Several
    modes per class give the features a cluster structure that experts can
    specialise on. Each of the ``num_nodes * avg_degree / 2`` undirected edges
    starts at a uniform node and ends, with probability ``homophily``, at a
    uniform node of the same class, else at one of another class.

    Returns:
        :class:`torch_geometric.data.Data` with ``x``, ``edge_index``, ``y``,
        ``mode`` and ``train_mask`` / ``val_mask`` / ``test_mask``.
    """
    if num_classes < 2:
        raise ValueError(f"'num_classes' must be at least 2 (got {num_classes})")
    if num_nodes < num_classes:
        raise ValueError(f"'num_nodes' ({num_nodes}) must be at least num_classes "
                         f"({num_classes})")
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"'homophily' must be in [0, 1] (got {homophily})")
    if num_features < 1 or num_modes < 1 or avg_degree < 0:
        raise ValueError("'num_features' and 'num_modes' must be positive and "
                         "'avg_degree' non-negative")
    g = torch.Generator().manual_seed(seed)
    N, C, F = num_nodes, num_classes, num_features

    y = torch.arange(N) % C
    y = y[torch.randperm(N, generator=g)]
    mode = torch.randint(num_modes, (N,), generator=g)
    means = torch.randn(C, num_modes, F, generator=g)
    means = signal * math.sqrt(F) * means / means.norm(dim=-1, keepdim=True)
    # x = means[y, mode] + noise * eps, in place and by chunks of rows (no
    # [N, F] temporaries beside x itself)
    x = torch.randn(N, F, generator=g).mul_(noise)
    means = means.view(C * num_modes, F)
    for lo in range(0, N, _CHUNK):
        hi = min(lo + _CHUNK, N)
        x[lo:hi].add_(means[y[lo:hi] * num_modes + mode[lo:hi]])

    # Nodes grouped by class, to draw a uniform node of a given class.
    by_class = torch.argsort(y, stable=True)
    count = torch.bincount(y, minlength=C)
    start = torch.cumsum(count, 0) - count
    M = int(round(N * avg_degree / 2))
    src = torch.randint(N, (M,), generator=g)
    same = torch.rand(M, generator=g) < homophily
    # the class of each edge's end: y[src] when `same`, else one of the others
    dst_class = torch.randint(C - 1, (M,), generator=g)
    y_src = y[src]
    dst_class.add_(y_src).add_(1).remainder_(C)
    torch.where(same, y_src, dst_class, out=dst_class)
    del same, y_src
    offset = torch.rand(M, generator=g).mul_(count[dst_class])  # float32, as drawn
    dst = start[dst_class]
    del dst_class
    dst.add_(offset.long())
    del offset
    edge_index = undirected_edges(src, by_class[dst], N)
    del src, dst

    train, val, test = random_split_masks(N, train_ratio, val_ratio, g)
    return Data(x=x, edge_index=edge_index, y=y, mode=mode, train_mask=train, val_mask=val,
                test_mask=test, num_nodes=N)
