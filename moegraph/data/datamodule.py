r"""Node-classification data behind one LightningDataModule interface: real
datasets through PyG's own classes, and the synthetic generator."""
from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader
from torch_geometric.data import Data

from moegraph.data.loader import (  # noqa: F401 (KHopLoader: re-exported)
    KHopLoader,
    NeighborSampler,
    ShardSampler,
    TorchNeighborLoader,
)
from moegraph.data.synthetic import csbm_graph, random_split_masks
from moegraph.utils.graph import check_edge_index


class DatasetSpec(NamedTuple):
    r"""Where a real dataset lives and how it is evaluated."""

    folder: str            # PyG root under the data dir, e.g. "Planetoid"
    subfolder: str         # folder holding raw/ under that root, e.g. "Cora"
    factory: Callable[[str], Any]  # root -> PyG dataset
    metric: str            # "acc" or "auroc"
    split: str             # "public", "official" (10 given), "random" (50/25/25) or "ogb"
    # what is copied from the data dir to the cache (relative to the subfolder)
    files: tuple[str, ...] = ("raw",)


def _planetoid(name: str) -> Callable[[str], Any]:
    def make(root: str):
        from torch_geometric.datasets import Planetoid
        return Planetoid(root, name)
    return make


def _heterophilous(name: str) -> Callable[[str], Any]:
    def make(root: str):
        from torch_geometric.datasets import HeterophilousGraphDataset
        return HeterophilousGraphDataset(root, name)
    return make


def _linkx(name: str) -> Callable[[str], Any]:
    def make(root: str):
        from torch_geometric.datasets import LINKXDataset
        return LINKXDataset(root, name)
    return make


def _pyg_data_classes() -> list[Any]:
    r"""The classes of a saved PyG graph, for ``torch.load(weights_only=True)``."""
    from torch_geometric.data.data import Data, DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import EdgeStorage, GlobalStorage, NodeStorage

    return [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage, NodeStorage, EdgeStorage]


def _ogb_node(name: str) -> Callable[[str], Any]:
    r"""An OGB node-property dataset through ``ogb``'s own
    :class:`~ogb.nodeproppred.PygNodePropPredDataset`, with its official split
    as masks (and single-task labels as ``[N]``)."""
    def make(root: str):
        from ogb.nodeproppred import PygNodePropPredDataset

        with torch.serialization.safe_globals(_pyg_data_classes()):  # ogb's own torch.load
            dataset = PygNodePropPredDataset(name, root)
        data = dataset[0]
        for key, index in dataset.get_idx_split().items():
            mask = torch.zeros(data.num_nodes, dtype=torch.bool)
            mask[index] = True
            data[f"{'val' if key == 'valid' else key}_mask"] = mask
        if data.y.dim() == 2 and data.y.size(1) == 1:
            data.y = data.y.view(-1)
        if data.x is None and data.edge_attr is not None:  # ogbn-proteins: mean edge features
            from torch_geometric.utils import scatter

            data.x = scatter(data.edge_attr, data.edge_index[1], 0, data.num_nodes, "mean")
        data.ogb_name = name
        return [data]
    return make


OGB_FILES = ("raw", "split", "RELEASE_v1.txt")

REAL_DATASETS: dict[str, DatasetSpec] = {
    "cora": DatasetSpec("Planetoid", "Cora", _planetoid("Cora"), "acc", "public"),
    "citeseer": DatasetSpec("Planetoid", "CiteSeer", _planetoid("CiteSeer"), "acc", "public"),
    "minesweeper": DatasetSpec("HeterophilousGraphDataset", "minesweeper",
                               _heterophilous("Minesweeper"), "auroc", "official"),
    "tolokers": DatasetSpec("HeterophilousGraphDataset", "tolokers",
                            _heterophilous("Tolokers"), "auroc", "official"),
    "amherst41": DatasetSpec("LINKX", "amherst41", _linkx("amherst41"), "acc", "random"),
    "reed98": DatasetSpec("LINKX", "reed98", _linkx("reed98"), "acc", "random"),
    # OGB (Hu et al., 2020): official splits; scored with ogb's Evaluator as well
    "ogbn_arxiv": DatasetSpec("ogb", "ogbn_arxiv", _ogb_node("ogbn-arxiv"), "acc", "given",
                              OGB_FILES),
    "ogbn_products": DatasetSpec("ogb", "ogbn_products", _ogb_node("ogbn-products"), "acc",
                                 "given", OGB_FILES),
    "ogbn_proteins": DatasetSpec("ogb", "ogbn_proteins", _ogb_node("ogbn-proteins"), "auroc",
                                 "given", OGB_FILES),
}
# a graph given in Python (NodeDataModule.from_data) or as a file (name="pyg_file")
DATASETS = ("synthetic", "pyg_file", *REAL_DATASETS)
METRICS = ("acc", "auroc")


def dataset_metric(name: str) -> str:
    r"""The metric the literature reports for a dataset: ``"acc"`` or ``"auroc"``."""
    return REAL_DATASETS[name].metric if name in REAL_DATASETS else "acc"


def labelled_nodes(y: torch.Tensor) -> torch.Tensor:
    r"""The nodes with a label: ``y >= 0``, or with at least one labelled task
    for multi-label ``y [N, T]``."""
    labelled = y >= 0
    return labelled.any(-1) if labelled.dim() == 2 else labelled


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


MANIFEST = ".moegraph-source.json"


def _file_table(folder: Path, entries: Sequence[str]) -> dict[str, list[int]]:
    r"""Size and modification time of every file under ``entries`` of ``folder``."""
    table = {}
    for entry in entries:
        path = folder / entry
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
            [path] if path.is_file() else [])
        for f in files:
            stat = f.stat()
            table[str(f.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
    return table


def sync_cache(source: Path, target: Path, entries: Sequence[str]) -> bool:
    r"""Copy ``entries`` (files or folders) of ``source`` to ``target`` unless the
    cache already holds the same files: the cache records the size and time of
    each source file (``.moegraph-source.json``), and is refreshed, its
    ``processed/`` folder removed, when the source changed (another data
    folder, a fixed file) or a cached file's size differs (a truncated copy).
    Returns whether it copied."""
    now = _file_table(source, entries)
    manifest = target / MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())
        except ValueError:
            recorded = None
        cached = _file_table(target, entries)
        if recorded == {"source": str(source), "files": now} and all(
                key in cached and cached[key][0] == size for key, (size, _) in now.items()):
            return False
    elif target.is_dir() and _file_table(target, entries) and not now:
        return False  # a cache filled by hand (or by a download), without a source
    for entry in entries:
        src, dst = source / entry, target / entry
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.rmtree(target / "processed", ignore_errors=True)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"source": str(source), "files": now}))
    return True


def load_real_dataset(name: str, root: Optional[str], cache_dir: Optional[str] = None) -> Data:
    r"""Load a real dataset through its PyG class.

    The raw files are looked up under ``root`` in PyG's layout (e.g.
    ``root/Planetoid/Cora/raw``). With ``cache_dir``, they are first copied to
    ``cache_dir`` (PyG writes ``processed/`` beside ``raw/``, and ``root`` may
    be read-only); without it, PyG reads and writes under ``root``. When the
    files are absent, PyG downloads them; offline, a :class:`FileNotFoundError`
    says where to put them.
    """
    _check_name(name)
    spec = REAL_DATASETS[name]
    source = Path(root).expanduser() / spec.folder if root else None
    target = Path(cache_dir).expanduser() / spec.folder if cache_dir else source
    if target is None:
        raise ValueError(f"{name}: give 'root' (the data folder) or 'cache_dir'")
    raw_source = source / spec.subfolder / "raw" if source is not None else None
    raw_target = target / spec.subfolder / "raw"
    # Runs in parallel (a sweep, two study processes) share the cache: one
    # process at a time refreshes it and lets PyG write processed/, the others
    # wait and then read the finished files.
    lock: Any = contextlib.nullcontext()
    if cache_dir:
        (target / spec.subfolder).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target / spec.subfolder / ".moegraph.lock"))
    with lock:
        return _load_locked(name, spec, source, target, raw_source, raw_target)


def _load_locked(name: str, spec: DatasetSpec, source: Optional[Path], target: Path,
                 raw_source: Optional[Path], raw_target: Path) -> Data:
    if raw_source is not None and raw_source != raw_target and raw_source.is_dir():
        sync_cache(raw_source.parent, raw_target.parent, spec.files)
    try:
        dataset = spec.factory(str(target))
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
            KeyError, IndexError) as error:
        files = sorted(_file_table(target / spec.subfolder, (*spec.files, "processed")))
        raise RuntimeError(
            f"dataset {name!r}: reading its files in {target / spec.subfolder} failed "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
            f"A file there is corrupt or truncated (files: {files}). Delete the cache folder "
            f"{target / spec.subfolder} and check the source files"
            f"{f' in {source / spec.subfolder}' if source is not None else ''}."
        ) from error
    except OSError as error:  # URLError (offline) and missing files are OSErrors
        where = raw_source if raw_source is not None else raw_target
        raise FileNotFoundError(
            f"dataset {name!r}: the raw files are not at {where} and could not be "
            f"downloaded ({error}). Put PyG's raw files of {name!r} there (e.g. copy "
            f"../shared/data/{spec.folder}/{spec.subfolder}/raw) or set "
            f"MOEGRAPH_DATA_DIR / paths.data_dir to a folder that has them."
        ) from error
    return dataset[0]


def ogb_scores(data: Data, logits: torch.Tensor) -> dict[str, float]:
    r"""The scores of ``ogb``'s own :class:`~ogb.nodeproppred.Evaluator` on the
    validation and test nodes of an OGB graph (``data.ogb_name``), from the
    class scores ``logits [N, C]`` (the scores of the tasks, for a multi-label
    graph scored by ROC-AUC): ``{split}/ogb_<metric>`` (e.g. ``test/ogb_acc``,
    ``test/ogb_rocauc`` for ogbn-proteins); empty for a graph that is not
    from OGB."""
    name = getattr(data, "ogb_name", None)
    if name is None:
        return {}
    from ogb.nodeproppred import Evaluator

    evaluator = Evaluator(name)
    scores = {}
    for split in ("val", "test"):
        mask = data[f"{split}_mask"].cpu()
        if evaluator.eval_metric == "rocauc":  # multi-label: the score of every task
            y_true = data.y.cpu()[mask]
            y_pred = logits.detach().float().cpu()[mask]
        else:
            y_true = data.y.cpu()[mask].view(-1, 1)
            y_pred = logits.detach().cpu()[mask].argmax(-1).view(-1, 1)
        result = evaluator.eval({"y_true": y_true, "y_pred": y_pred})
        scores.update({f"{split}/ogb_{k}": float(v) for k, v in result.items()})
    return scores


def _random_split(data: Data, name: str, split: int, train_ratio: float,
                  val_ratio: float) -> None:
    r"""Set ``data``'s masks to a random ``train_ratio``/``val_ratio``/rest
    split of its labelled nodes, seeded by ``split``."""
    if split < 0:
        raise ValueError(f"{name}: 'split' must be non-negative (got {split})")
    generator = torch.Generator().manual_seed(split)
    labelled = labelled_nodes(data.y).nonzero().view(-1)
    data.train_mask, data.val_mask, data.test_mask = random_split_masks(
        data.num_nodes, train_ratio, val_ratio, generator, candidates=labelled)


def select_split(data: Data, name: str, split: int = 0, train_ratio: float = 0.5,
                 val_ratio: float = 0.25) -> Data:
    r"""Leave ``data`` with one-dimensional ``train_mask``/``val_mask``/``test_mask``:
    the public split (Planetoid), column ``split`` of the official ones
    (heterophilous graphs, 10 splits), or a random ``train_ratio``/``val_ratio``/
    rest split of the labelled nodes seeded by ``split`` (LINKX)."""
    kind = REAL_DATASETS[name].split
    data = data.clone()
    if kind == "given":  # masks set by the loader (OGB's official split)
        if split != 0:
            raise ValueError(f"{name} has one official split: 'split' must be 0 (got {split})")
        data.x = data.x.float()
        return data
    if kind == "official":
        num_splits = data.train_mask.size(1)
        if not 0 <= split < num_splits:
            raise ValueError(f"{name}: 'split' must lie in [0, {num_splits - 1}] (got {split})")
        for key in ("train_mask", "val_mask", "test_mask"):
            data[key] = data[key][:, split].contiguous()
    elif kind == "random":
        _random_split(data, name, split, train_ratio, val_ratio)
    elif split != 0:
        raise ValueError(f"{name} has one {kind} split: 'split' must be 0 (got {split})")
    data.x = data.x.float()
    return data


def load_node_dataset(name: str, root: Optional[str] = None, cache_dir: Optional[str] = None,
                      split: int = 0, **kwargs: Any) -> Data:
    r"""One node-classification graph with ``train_mask``/``val_mask``/``test_mask``.

    Args:
        name (str): dataset name, one of :data:`DATASETS`.
        root (str, optional): folder holding the raw files (real datasets), in
            PyG's layout.
        cache_dir (str, optional): where raw files are copied and processed.
        split (int, optional): which split (official or random seed).
        **kwargs: arguments of the generator (``synthetic``) or of the random
            split (``train_ratio``, ``val_ratio``).
    """
    _check_name(name)
    if name == "synthetic":
        return csbm_graph(**kwargs)
    return select_split(load_real_dataset(name, root, cache_dir), name, split, **kwargs)


def row_normalize_features(data: Data, name: str) -> Data:
    r"""A copy of ``data`` whose feature rows are divided by their sums (rows
    summing to 0 stay 0): PyG's
    :class:`~torch_geometric.transforms.NormalizeFeatures`, the convention for
    the non-negative bag-of-words features of Planetoid. Negative features
    raise a :class:`ValueError` naming the graph (a sum is no norm for them)."""
    from torch_geometric.transforms import NormalizeFeatures

    if data.x is None:
        raise ValueError(f"{name}: normalize_features needs node features 'x'")
    if bool((data.x < 0).any()):
        raise ValueError(f"{name}: normalize_features divides each row by its sum and "
                         f"needs non-negative features (min {float(data.x.min()):g}); "
                         f"set data.normalize_features=false for this graph")
    out = data.clone()
    out.x = out.x.float()
    return NormalizeFeatures()(out)


def load_pyg_file(path: str) -> Data:
    r"""A graph saved with ``torch.save``: a :class:`~torch_geometric.data.Data`
    (or a dict of its attributes) with ``x``, ``edge_index``, ``y`` and, if
    given, the masks. Loaded with ``weights_only=True`` when the file allows it
    (plain tensors in a dict), else as a pickle: load only files you trust."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path: no graph file at {str(file)!r}")
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # a Data object: not a plain-tensor file
            obj = torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ValueError(f"data.path: {str(file)!r} is not a file written by torch.save (or it "
                         f"is truncated): {type(error).__name__}: {error}") from error
    if isinstance(obj, dict):
        obj = Data(**obj)
    if not isinstance(obj, Data):
        raise TypeError(f"data.path: {str(file)!r} holds a {type(obj).__name__}; save a "
                        f"torch_geometric.data.Data (or a dict) with x, edge_index and y")
    return obj


def prepare_graph(data: Data, name: str, split: int = 0, train_ratio: float = 0.5,
                  val_ratio: float = 0.25) -> Data:
    r"""A user's graph ready for :class:`NodeDataModule`: its masks if it has
    them (column ``split`` of ``[N, S]`` masks), else a random
    ``train_ratio``/``val_ratio``/rest split of the labelled nodes (``y >= 0``)
    seeded by ``split``; float features."""
    for key in ("x", "edge_index", "y"):
        if data.get(key) is None:
            raise ValueError(f"{name}: the graph has no '{key}' (it needs x, edge_index and y)")
    data = data.clone()
    keys = ("train_mask", "val_mask", "test_mask")
    given = [data.get(k) is not None for k in keys]
    if any(given) and not all(given):
        raise ValueError(f"{name}: give all of {keys} or none (random split); got "
                         f"{[k for k, g in zip(keys, given, strict=True) if g]}")
    if all(given):
        for key in keys:
            if data[key].dim() == 2:
                if not 0 <= split < data[key].size(1):
                    raise ValueError(f"{name}: 'split' must lie in [0, {data[key].size(1) - 1}]"
                                     f" (got {split})")
                data[key] = data[key][:, split].contiguous()
    else:
        _random_split(data, name, split, train_ratio, val_ratio)
    data.x = data.x.float()
    return data


def check_graph(data: Data, name: str) -> None:
    r"""Raise a clear error for a graph that cannot be trained on."""
    N = data.num_nodes
    if data.x is None or data.x.dim() != 2 or data.x.size(0) != N:
        raise ValueError(f"{name}: 'x' must be [num_nodes, num_features]")
    try:
        check_edge_index(data.edge_index, N)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: {error}") from None
    labels = data.y[data.y >= 0]
    if labels.unique().numel() < 2:
        raise ValueError(f"{name}: node classification needs at least two classes")
    for key in ("train_mask", "val_mask", "test_mask"):
        mask = data.get(key)
        if mask is None or mask.dtype != torch.bool or mask.shape != (N,):
            raise ValueError(f"{name}: '{key}' must be a boolean mask of shape [{N}]")
        if bool((~labelled_nodes(data.y[mask])).any()):
            raise ValueError(f"{name}: '{key}' holds unlabelled nodes (y < 0)")


class NodeDataModule(L.LightningDataModule):
    r"""Node classification on one graph.

    Full-batch by default: each loader yields the whole graph and the task
    reads the split from its masks. With ``batch_size``, loaders are PyG
    :class:`~torch_geometric.loader.NeighborLoader` mini-batches whose seed
    nodes are the split's nodes (for graphs too large for one step), or,
    without ``pyg-lib`` / ``torch-sparse``, the pure-torch
    :class:`~moegraph.data.loader.TorchNeighborLoader` with the same
    ``num_neighbors`` (``-1``: all neighbours of a hop).

    Under DDP, Lightning shards the training seeds (its ``DistributedSampler``,
    which pads the shards to equal sizes); evaluation seeds are sharded without
    padding, every node once, with at least one batch per process.

    Args:
        name (str): dataset name (see :func:`load_node_dataset`).
        root (str, optional): data folder of real datasets (PyG layout).
        cache_dir (str, optional): where real datasets are copied and
            processed (``root`` may be read-only).
        split (int, optional): official split index or random-split seed.
            (default: :obj:`0`)
        metric (str, optional): ``"acc"`` or ``"auroc"``; the dataset's own
            (:func:`dataset_metric`) if :obj:`None`.
        batch_size (int, optional): seed nodes per mini-batch; full-batch if
            :obj:`None`. (default: :obj:`None`)
        num_neighbors (list of int, optional): neighbours sampled per hop in
            mini-batch mode, ``-1`` for all. (default: :obj:`[10, 10]`)
        num_workers (int, optional): loader workers. (default: :obj:`0`)
        dataset_kwargs (dict, optional): arguments of the generator / split
            (``train_ratio``, ``val_ratio`` of a random split).
        path (str, optional): the graph file of ``name="pyg_file"`` (see
            :func:`load_pyg_file`).
        normalize_features (bool, optional): divide each node's features by
            their sum (:func:`row_normalize_features`: the bag-of-words
            convention of Planetoid, as in Kipf & Welling). Needs non-negative
            features. (default: :obj:`False`)

    A graph in memory: :meth:`from_data`.
    """

    def __init__(self, name: str = "synthetic", root: Optional[str] = None,
                 cache_dir: Optional[str] = None, split: int = 0,
                 metric: Optional[str] = None, batch_size: Optional[int] = None,
                 num_neighbors: Optional[Sequence[int]] = None, num_workers: int = 0,
                 dataset_kwargs: Optional[dict[str, Any]] = None, path: Optional[str] = None,
                 normalize_features: bool = False):
        super().__init__()
        _check_name(name)
        if (name == "pyg_file") != (path is not None):
            raise ValueError("give 'path' (the graph file) exactly when name='pyg_file' "
                             f"(got name={name!r}, path={path!r})")
        metric = metric or dataset_metric(name)
        if metric not in METRICS:
            raise ValueError(f"'metric' must be one of {METRICS} (got {metric!r})")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"'batch_size' must be positive (got {batch_size})")
        if num_neighbors is not None:
            num_neighbors = list(num_neighbors)
            if not num_neighbors or any(isinstance(n, bool) or not isinstance(n, int)
                                        or n == 0 or n < -1 for n in num_neighbors):
                raise ValueError(f"'num_neighbors' must be a non-empty list of positive ints "
                                 f"(or -1: all neighbours), one per hop (got {num_neighbors})")
        self.name: str = name
        self.root = root
        self.cache_dir = cache_dir
        self.split = split
        self.metric = metric
        self.batch_size = batch_size
        self.num_neighbors = list(num_neighbors or [10, 10])
        self.num_workers = num_workers
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.path = path
        self.normalize_features = bool(normalize_features)
        self.data: Optional[Data] = None
        self._sampler: Optional[NeighborSampler] = None

    @classmethod
    def from_data(cls, data: Data, split: int = 0, train_ratio: float = 0.5,
                  val_ratio: float = 0.25, **kwargs: Any) -> NodeDataModule:
        r"""A data module around a graph in memory: a
        :class:`~torch_geometric.data.Data` with ``x``, ``edge_index``, ``y``
        and masks (or a random ``train_ratio``/``val_ratio``/rest split of the
        labelled nodes, seeded by ``split``). ``kwargs`` as in the constructor
        (``batch_size``, ``num_neighbors``, ``metric``, ...)."""
        module = cls(name="synthetic", split=split, **kwargs)
        module.name = "custom"
        module.data = prepare_graph(data, "custom", split, train_ratio, val_ratio)
        check_graph(module.data, "custom")
        if module.normalize_features:
            module.data = row_normalize_features(module.data, "custom")
        return module

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            if self.name == "pyg_file":
                assert self.path is not None  # the constructor checks it
                data = prepare_graph(load_pyg_file(self.path), self.path, self.split,
                                     **self.dataset_kwargs)
            else:
                data = load_node_dataset(self.name, self.root, self.cache_dir, self.split,
                                         **self.dataset_kwargs)
            check_graph(data, self.name)
            if self.normalize_features:
                data = row_normalize_features(data, self.name)
            self.data = data

    def _graph(self) -> Data:
        r"""The graph, loaded on first use."""
        self.setup()
        assert self.data is not None  # set by setup()
        return self.data

    @property
    def num_features(self) -> int:
        return self._graph().num_features

    @property
    def multilabel(self) -> bool:
        r"""Whether the labels are ``[N, T]``: ``T`` binary tasks per node
        (ogbn-proteins)."""
        return self._graph().y.dim() == 2

    @property
    def num_classes(self) -> int:
        r"""Number of classes, or of binary tasks of multi-label data."""
        y = self._graph().y
        if self.multilabel:
            return y.size(1)
        return int(y.max()) + 1

    def net_kwargs(self) -> dict[str, int]:
        r"""What the network needs to know of the data (given by ``train``)."""
        return {"in_channels": self.num_features, "out_channels": self.num_classes}

    def task_kwargs(self) -> dict[str, Any]:
        r"""What the LightningModule needs to know of the data."""
        self.setup()
        if self.multilabel:  # T binary tasks: BCE, metrics averaged over the tasks
            return {"num_classes": self.num_classes, "metric": self.metric, "multilabel": True}
        if self.metric == "auroc" and self.num_classes != 2:
            raise ValueError(f"{self.name}: metric 'auroc' needs a binary task "
                             f"(got {self.num_classes} classes)")
        return {"num_classes": self.num_classes, "metric": self.metric}

    def _loader(self, split: str, shuffle: bool = False):
        data = self._graph()
        if self.batch_size is None:
            # any sized, indexable dataset works; torch annotates `Dataset` only
            return DataLoader([data], batch_size=None,  # type: ignore[arg-type]
                              collate_fn=lambda d: d)
        from torch_geometric.typing import WITH_PYG_LIB, WITH_TORCH_SPARSE
        mask = data[f"{split}_mask"]
        if not (WITH_PYG_LIB or WITH_TORCH_SPARSE):  # NeighborLoader needs one of them
            kwargs: dict[str, Any] = {}
            world_size, rank = self._distributed()
            if split != "train" and world_size > 1:
                # Evaluation: every node once (no padding), and at least one
                # (maybe empty) batch per process, so that all of them log and
                # sync the same metrics.
                kwargs = {"sampler": ShardSampler(range(int(mask.sum())), world_size, rank),
                          "min_batches": 1}
            if self._sampler is None:  # one CSR of the graph for every loader
                self._sampler = NeighborSampler(data.edge_index, data.num_nodes,
                                                self.num_neighbors)
            return TorchNeighborLoader(data, self.num_neighbors, input_nodes=mask,
                                       batch_size=self.batch_size, shuffle=shuffle,
                                       num_workers=self.num_workers,
                                       neighbor_sampler=self._sampler, **kwargs)
        from torch_geometric.loader import NeighborLoader
        return NeighborLoader(data, num_neighbors=self.num_neighbors,
                              input_nodes=mask, batch_size=self.batch_size, shuffle=shuffle,
                              num_workers=self.num_workers)

    def _distributed(self) -> tuple[int, int]:
        r"""World size and rank of the trainer this data module serves (1, 0 alone)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")
