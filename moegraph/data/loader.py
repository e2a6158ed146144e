r"""Mini-batches of seed nodes with sampled neighbourhoods, in pure PyTorch.

:class:`TorchNeighborLoader` is the fallback of PyG's
:class:`~torch_geometric.loader.NeighborLoader` (which needs ``pyg-lib`` or
``torch-sparse`` to sample). Like it, it is a :class:`torch.utils.data.DataLoader`
over the seed nodes whose ``collate_fn`` samples the subgraph, so Lightning's
``use_distributed_sampler`` shards the seeds across processes by itself; unlike
it, it can resume in the middle of an epoch (``state_dict`` /
``load_state_dict``, which Lightning stores in the checkpoint).
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, get_worker_info
from torch_geometric.data import Data


class NeighborSampler:
    r"""Node-wise neighbour sampling on the in-edges of a graph, vectorised.

    The edges are sorted by target once (a CSR of in-edges). A batch expands
    its seed nodes hop by hop: each node of the frontier keeps ``fanout``
    of its in-edges chosen uniformly without replacement (all of them when
    it has fewer, or when ``fanout = -1``), and the sources not yet in the
    subgraph form the next frontier. The choice is one sort of random keys
    offset by the segment index: the first ``fanout`` of each segment win.

    The output is laid out as :class:`~torch_geometric.loader.NeighborLoader`'s:
    seed nodes first (in their given order, duplicates kept as separate
    nodes), then the nodes of each hop; edges run from the sampled neighbour
    to the node that sampled it.

    Args:
        edge_index (Tensor): edges of the graph, ``[2, M]`` (messages flow from
            ``edge_index[0]`` to ``edge_index[1]``).
        num_nodes (int): nodes of the graph.
        num_neighbors (list of int): neighbours sampled per hop; ``-1`` takes all.

    Shapes:
        - **input:** ``seeds [B]``
        - **output:** ``n_id [n]`` (``n_id[:B] = seeds``), ``edge_index [2, e]``
          (local ids), ``e_id [e]``, nodes and edges per hop
    """

    def __init__(self, edge_index: Tensor, num_nodes: int, num_neighbors: Sequence[int]):
        num_neighbors = [int(k) for k in num_neighbors]
        if not num_neighbors or any(k < -1 or k == 0 for k in num_neighbors):
            raise ValueError(f"'num_neighbors' must be a non-empty list of positive ints or -1 "
                             f"(got {num_neighbors})")
        self.num_nodes = num_nodes
        self.num_neighbors = num_neighbors
        # The CSR is the largest thing the sampler holds (two ids per edge):
        # int32 when the ids fit (half of int64), built without int64 copies of
        # the edges beside the sort's own output.
        num_edges = edge_index.size(1)
        index_dtype = torch.int32 if max(num_nodes, num_edges) < 2**31 else torch.long
        col = edge_index[1]
        perm = torch.argsort(col.to(index_dtype), stable=True).to(index_dtype)
        # position in the CSR -> original edge id
        self.perm = perm
        self.row = edge_index[0].to(index_dtype)[perm]  # sources, grouped by target
        count = torch.bincount(col, minlength=num_nodes)
        self.ptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(count, 0, out=self.ptr[1:])
        # global -> local id of the current batch (-1: not in it); reset after use
        self._local = torch.full((num_nodes,), -1, dtype=torch.long)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_nodes={self.num_nodes}, " \
               f"num_neighbors={self.num_neighbors})"

    def _choose(self, targets: Tensor, fanout: int,
                generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        r"""Positions in the CSR of the in-edges kept for each target, and the
        index (into ``targets``) of the target of each."""
        start, deg = self.ptr[targets], self.ptr[targets + 1] - self.ptr[targets]
        total = int(deg.sum())
        seg = torch.repeat_interleave(torch.arange(targets.numel()), deg)  # [total]
        first = torch.cumsum(deg, 0) - deg
        pos = start[seg] + torch.arange(total) - first[seg]
        if fanout < 0 or total == 0 or int(deg.max()) <= fanout:
            return pos, seg
        # Random keys, offset by the segment: sorting them orders each segment
        # at random; the first `fanout` of each segment are kept.
        key = torch.rand(total, generator=generator, dtype=torch.float64) + seg
        order = torch.argsort(key)
        rank = torch.arange(total) - first[seg]  # seg is sorted, so seg[order] == seg
        keep = order[rank < fanout]
        return pos[keep], seg[keep]

    def sample(self, seeds: Tensor, generator: Optional[torch.Generator] = None
               ) -> tuple[Tensor, Tensor, Tensor, list[int], list[int]]:
        r"""Sample the computation subgraph of ``seeds``; returns ``n_id``,
        ``edge_index`` (local), ``e_id``, the nodes and the edges per hop."""
        local = self._local
        B = seeds.numel()
        n_ids, rows, cols, e_ids = [seeds], [], [], []
        num_nodes, num_edges = [B], []
        local[seeds] = torch.arange(B)  # a duplicated seed: the last copy gets its id
        frontier, frontier_local, n = seeds, torch.arange(B), B
        try:
            for fanout in self.num_neighbors:
                pos, seg = self._choose(frontier, fanout, generator)
                src = self.row[pos].long()
                src_local = local[src]
                new = src[src_local < 0].unique()  # sorted ids of the nodes first seen
                local[new] = torch.arange(n, n + new.numel())
                n += new.numel()
                rows.append(local[src])
                cols.append(frontier_local[seg])
                e_ids.append(self.perm[pos].long())
                n_ids.append(new)
                num_nodes.append(new.numel())
                num_edges.append(pos.numel())
                frontier, frontier_local = new, local[new]
        finally:
            n_id = torch.cat(n_ids)
            local[n_id] = -1
        edge_index = torch.stack([torch.cat(rows), torch.cat(cols)])
        return n_id, edge_index, torch.cat(e_ids), num_nodes, num_edges


class EpochRandomSampler(RandomSampler):
    r"""A random order of the seeds that depends only on ``seed + epoch``,
    drawn exactly as :class:`~torch.utils.data.DistributedSampler` draws it:
    one process and several then see the same global order (each of ``W``
    processes takes every ``W``-th seed of it), and an epoch can be replayed
    after a restart. Lightning calls :meth:`set_epoch`; its
    ``use_distributed_sampler`` replaces this sampler (a
    :class:`~torch.utils.data.RandomSampler`) by a ``DistributedSampler``
    with the same seed.

    Args:
        data_source (Sized): what to sample from.
        seed (int, optional): base seed; Lightning's (``PL_GLOBAL_SEED``, set by
            ``seed_everything``), as its distributed sampler uses, if :obj:`None`.
    """

    def __init__(self, data_source, seed: Optional[int] = None):
        super().__init__(data_source)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class ShardSampler(DistributedSampler):
    r"""Every ``num_replicas``-th index from ``rank``, without the padding of
    :class:`~torch.utils.data.DistributedSampler` (which repeats indices so
    that every process gets as many): for evaluation, where a repeated node
    would count twice. Shards differ in size by one at most; a shard may be
    empty (fewer nodes than processes). Being a ``DistributedSampler``,
    Lightning keeps it as it is."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class _ResumableBatches:
    r"""The batches of indices of a :class:`TorchNeighborLoader`, without the
    first ``loader._skip`` of them (read when iteration starts, after
    Lightning's ``set_epoch``), and at least ``loader.min_batches`` (empty
    ones added)."""

    def __init__(self, batches, loader: TorchNeighborLoader):
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return max(len(self.batches), self.loader.min_batches)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.loader._skip = self.loader._skip, 0
        count = 0
        for index in itertools.islice(iter(self.batches), skip, None):
            count += 1
            yield index
        for _ in range(self.loader.min_batches - skip - count):
            yield []


class TorchNeighborLoader(DataLoader):
    r"""Mini-batches of seed nodes and their sampled neighbourhoods, in pure
    PyTorch: a :class:`torch.utils.data.DataLoader` over the seeds whose
    ``collate_fn`` runs a :class:`NeighborSampler` (as PyG's
    :class:`~torch_geometric.loader.NeighborLoader`, which it stands in for
    when neither ``pyg-lib`` nor ``torch-sparse`` is installed).

    Each batch is a :class:`~torch_geometric.data.Data` with the node-level
    attributes of ``data`` (``x``, ``y``, masks, ...) for its nodes, the
    sampled ``edge_index`` (and the edge-level attributes, by ``e_id``),
    ``n_id``, ``e_id``, ``batch_size`` (the seeds, first in ``n_id``),
    ``num_sampled_nodes`` and ``num_sampled_edges`` per hop.

    Being a plain ``DataLoader`` with a :class:`~torch.utils.data.RandomSampler`
    (shuffle) or a ``SequentialSampler``, it gets Lightning's
    ``DistributedSampler`` under DDP: each process sees its share of the seeds.
    It is stateful: :meth:`state_dict` counts the batches given out in the
    current epoch, and after :meth:`load_state_dict` the next epoch starts
    after them (with the same seed order: see :class:`EpochRandomSampler`),
    which is what Lightning needs to resume in the middle of an epoch.

    Args:
        data (Data): the graph.
        num_neighbors (list of int): neighbours sampled per hop (``-1``: all).
        input_nodes (Tensor, optional): the seed nodes, a boolean mask or ids;
            every node if :obj:`None`.
        batch_size (int, optional): seeds per batch. (default: :obj:`1`)
        shuffle (bool, optional): a new seed order each epoch
            (:class:`EpochRandomSampler`). (default: :obj:`False`)
        seed (int, optional): seed of the shuffling and of the neighbour
            sampling; Lightning's global seed if :obj:`None`.
        min_batches (int, optional): yield empty batches (no seed) up to this
            many, so that every process of a distributed evaluation runs as many
            steps as needed to call the same collectives. (default: :obj:`0`)
        neighbor_sampler (NeighborSampler, optional): a sampler of ``data``
            with these ``num_neighbors`` to share (its CSR is built once for
            all the loaders of a graph). (default: :obj:`None`)
        **kwargs: other arguments of :class:`~torch.utils.data.DataLoader`
            (``num_workers``, ``sampler``, ``drop_last``, ...).
    """

    def __init__(self, data: Data, num_neighbors: Sequence[int],
                 input_nodes: Optional[Tensor] = None, batch_size: int = 1,
                 shuffle: bool = False, seed: Optional[int] = None, min_batches: int = 0,
                 neighbor_sampler: Optional[NeighborSampler] = None, **kwargs: Any):
        kwargs.pop("dataset", None)
        kwargs.pop("collate_fn", None)
        if input_nodes is None:
            input_nodes = torch.arange(data.num_nodes)
        elif input_nodes.dtype == torch.bool:
            input_nodes = input_nodes.nonzero().view(-1)
        self.data = data
        self.num_neighbors = list(num_neighbors)
        self.input_nodes = input_nodes
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.min_batches = min_batches
        if neighbor_sampler is None:
            neighbor_sampler = NeighborSampler(data.edge_index, data.num_nodes,
                                               self.num_neighbors)
        elif neighbor_sampler.num_neighbors != self.num_neighbors:
            raise ValueError(f"'neighbor_sampler' samples {neighbor_sampler.num_neighbors} "
                             f"neighbours, the loader asks for {self.num_neighbors}")
        self.neighbor_sampler = neighbor_sampler
        self._generator = torch.Generator().manual_seed(self.seed)
        self._skip, self._given = 0, 0
        dataset = range(input_nodes.numel())
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["sampler"], shuffle = EpochRandomSampler(dataset, self.seed), False
        # any sized, indexable dataset works; torch annotates `Dataset` only
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle,  # type: ignore[arg-type]
                         collate_fn=self.collate, **kwargs)

    @property
    def _index_sampler(self):
        return _ResumableBatches(super()._index_sampler, self)

    def __len__(self) -> int:
        return len(self._index_sampler)

    def __iter__(self):
        # Runs at the first batch (after Lightning's set_epoch). A new epoch
        # samples from `seed + epoch` (+ the rank): evaluation sees the same
        # neighbourhoods each time, training a new draw per epoch, the same
        # after a restart; an epoch resumed in its middle goes on with the
        # generator of the checkpoint.
        if self._skip == 0:
            sampler = self.sampler
            offset = getattr(sampler, "epoch", 0) + 7919 * getattr(sampler, "rank", 0)
            self._generator.manual_seed(self.seed + offset)
        self._given = self._skip
        for batch in super().__iter__():
            self._given += 1
            yield batch

    def collate(self, index: list[int]) -> Data:
        r"""The sampled subgraph of the seeds at positions ``index``."""
        seeds = self.input_nodes[torch.as_tensor(index, dtype=torch.long)]
        n_id, edge_index, e_id, num_nodes, num_edges = self.neighbor_sampler.sample(
            seeds, self._worker_generator())
        data = self.data
        batch = Data(edge_index=edge_index, num_nodes=n_id.numel())
        for key, value in data.items():
            if key in ("edge_index", "num_nodes") or not isinstance(value, Tensor):
                continue
            if data.is_node_attr(key):
                batch[key] = value[n_id]
            elif data.is_edge_attr(key):
                batch[key] = value[e_id]
        batch.n_id, batch.e_id, batch.batch_size = n_id, e_id, seeds.numel()
        batch.num_sampled_nodes, batch.num_sampled_edges = num_nodes, num_edges
        return batch

    def _worker_generator(self) -> torch.Generator:
        r"""The loader's generator in the main process; in a worker, one seeded
        by the worker's own seed (copies of one state would draw alike)."""
        info = get_worker_info()
        if info is None:
            return self._generator
        if getattr(self, "_worker_state", None) != info.id:
            self._worker_state = info.id
            self._worker_rng = torch.Generator().manual_seed(info.seed)
        return self._worker_rng

    # -- resuming in the middle of an epoch (Lightning's `_Stateful` protocol) ------
    def state_dict(self) -> dict[str, Any]:
        r"""The batches given out in the current epoch, and the sampling RNG."""
        return {"batches": self._given, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = int(state["batches"])
        self._skip = given if 0 < given < len(self) else 0  # an epoch's end: start anew
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.neighbor_sampler}, " \
               f"seeds={self.input_nodes.numel()}, batch_size={self.batch_size})"


class KHopLoader(TorchNeighborLoader):
    r"""Mini-batches of seed nodes with their full ``num_hops``-hop
    in-neighbourhoods: a :class:`TorchNeighborLoader` with ``num_neighbors =
    [-1] * num_hops``.

    Args:
        data (Data): the graph.
        input_nodes (Tensor): boolean mask (or ids) of the seed nodes.
        num_hops (int): hops of neighbourhood.
        batch_size (int): seed nodes per batch.
        shuffle (bool, optional): shuffle the seeds each epoch. (default: :obj:`False`)
        **kwargs: other arguments of :class:`TorchNeighborLoader`.
    """

    def __init__(self, data: Data, input_nodes: Tensor, num_hops: int, batch_size: int,
                 shuffle: bool = False, **kwargs: Any):
        super().__init__(data, [-1] * num_hops, input_nodes=input_nodes, batch_size=batch_size,
                         shuffle=shuffle, **kwargs)


def num_batches(num_seeds: int, batch_size: int, world_size: int = 1) -> int:
    r"""Batches per process of an epoch over ``num_seeds`` seeds, with the
    padding of :class:`~torch.utils.data.DistributedSampler`."""
    return math.ceil(math.ceil(num_seeds / world_size) / batch_size)
