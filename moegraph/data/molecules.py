r"""Graph-level learning on many small graphs: molecules from SMILES, OGB's
featurisation and scaffold split, and a LightningDataModule over them.

``name="molhiv"`` builds ogbg-molhiv from MoleculeNet's ``HIV.csv`` offline
(OGB's own :func:`ogb.utils.smiles2graph` atom and bond features, the
Bemis-Murcko scaffold split of Hu et al. 2020); ``name="ogbg-molhiv"`` loads
the same set through OGB's :class:`~ogb.graphproppred.PygGraphPropPredDataset`
(a download for an online user). Both need ``rdkit`` (``pip install
moegraph[chem]``) to featurise.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import lightning as L
import torch
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.transforms import BaseTransform, Compose

try:  # optional: only featurisation and the scaffold split need it
    import rdkit  # noqa: F401
    WITH_RDKIT = True
except ImportError:  # pragma: no cover - exercised where rdkit is absent
    WITH_RDKIT = False


class MoleculeSpec(NamedTuple):
    r"""Where a MoleculeNet CSV lives and what it predicts."""

    folder: str                 # under the data dir, e.g. "MoleculeNet/hiv"
    filename: str               # raw file, e.g. "HIV.csv"
    smiles_column: str
    label_columns: tuple[str, ...]
    evaluator: str              # OGB's name of the same set (its Evaluator)


MOLECULE_DATASETS: dict[str, MoleculeSpec] = {
    "molhiv": MoleculeSpec("MoleculeNet/hiv", "HIV.csv", "smiles", ("HIV_active",),
                           "ogbg-molhiv"),
}
OGB_DATASETS = ("ogbg-molhiv",)
GRAPH_DATASETS = (*MOLECULE_DATASETS, *OGB_DATASETS)


def _require_rdkit(what: str) -> None:
    if not WITH_RDKIT:
        raise ImportError(f"{what} needs rdkit: `pip install rdkit` (or moegraph[chem])")


def parse_smiles(smiles: str, strict: bool = False):
    r"""An rdkit molecule from a SMILES string.

    rdkit's full sanitisation first; unless ``strict``, a SMILES it rejects
    (newer rdkit releases refuse some hypervalent metal complexes that the
    release OGB used accepted, e.g. six-coordinate aluminium) is parsed
    again without the valence check, so that every molecule of the set keeps
    a graph. Raises a :class:`ValueError` naming a SMILES that cannot be
    parsed at all.
    """
    _require_rdkit("parse_smiles")
    from rdkit import Chem
    from rdkit.rdBase import DisableLog, EnableLog  # RDLogger's (its stub omits them)

    DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None and not strict:
            mol = Chem.MolFromSmiles(smiles, sanitize=False)
            if mol is not None:
                mol.UpdatePropertyCache(strict=False)
                flags = Chem.SanitizeFlags
                Chem.SanitizeMol(mol, flags.SANITIZE_ALL ^ flags.SANITIZE_PROPERTIES,
                                 catchErrors=True)
    finally:
        EnableLog("rdApp.*")
    if mol is None:
        raise ValueError(f"rdkit cannot parse the SMILES {smiles!r}")
    return mol


def mol_to_data(mol, y: Optional[Sequence[float]] = None) -> Data:
    r"""An rdkit molecule as a PyG graph with OGB's features (the code of
    :func:`ogb.utils.smiles2graph`, from a molecule): ``x [N, 9]`` and
    ``edge_attr [M, 3]`` integer atom and bond features (each bond in both
    directions), ``edge_index [2, M]``, and ``y [1, T]`` float labels (NaN:
    missing)."""
    from ogb.utils.features import atom_to_feature_vector, bond_to_feature_vector

    x = torch.tensor([atom_to_feature_vector(a) for a in mol.GetAtoms()],
                     dtype=torch.long).view(-1, 9)
    edges, feats = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        feat = bond_to_feature_vector(bond)
        edges += [(i, j), (j, i)]
        feats += [feat, feat]
    edge_index = torch.tensor(edges, dtype=torch.long).view(-1, 2).t().contiguous()
    data = Data(x=x, edge_index=edge_index,
                edge_attr=torch.tensor(feats, dtype=torch.long).view(-1, 3),
                num_nodes=x.size(0))
    if y is not None:
        data.y = torch.tensor(list(y), dtype=torch.float).view(1, -1)
    return data


def smiles_to_data(smiles: str, y: Optional[Sequence[float]] = None) -> Data:
    r"""One molecule as a PyG graph with OGB's features (the output of
    :func:`ogb.utils.smiles2graph` for every SMILES rdkit sanitises; see
    :func:`parse_smiles` for the others)."""
    return mol_to_data(parse_smiles(smiles), y)


def scaffold(smiles_or_mol) -> str:
    r"""The Bemis-Murcko scaffold of a molecule (SMILES or rdkit molecule),
    chirality included, as OGB's split. A molecule that only lenient parsing
    accepts (:func:`parse_smiles`) has no computable scaffold: its own
    SMILES stands for it (a group of its own)."""
    _require_rdkit("scaffold")
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = parse_smiles(smiles_or_mol) if isinstance(smiles_or_mol, str) else smiles_or_mol
    try:
        return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=True)
    except (RuntimeError, ValueError):  # rdkit's valence errors (not sanitisable)
        return "!" + Chem.MolToSmiles(mol)


def scaffold_split(smiles: Sequence[str], frac_train: float = 0.8,
                   frac_valid: float = 0.1,
                   scaffolds: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    r"""The deterministic scaffold split of Hu et al. (2020), used by OGB for
    ogbg-mol*: molecules grouped by Bemis-Murcko scaffold, groups sorted by
    size, largest first (equal sizes: by first molecule index, as the
    reference code sorts on ``(size, first index)`` in reverse), and given in
    that order to train until it would pass ``frac_train`` of the molecules,
    then to valid up to ``frac_train + frac_valid``, the rest to test. No
    scaffold is in two splits.

    Args:
        smiles (sequence of str): the molecules.
        frac_train (float, optional): train fraction. (default: :obj:`0.8`)
        frac_valid (float, optional): valid fraction. (default: :obj:`0.1`)
        scaffolds (sequence of str, optional): the molecules' scaffolds, if
            already computed (:func:`scaffold`).

    Returns:
        dict: ``{"train", "valid", "test"}`` sorted molecule indices.
    """
    if not (0 < frac_train < 1 and 0 <= frac_valid < 1 and frac_train + frac_valid <= 1):
        raise ValueError(f"'frac_train' and 'frac_valid' must be fractions summing to at most 1 "
                         f"(got {frac_train}, {frac_valid})")
    if scaffolds is None:
        scaffolds = [scaffold(s) for s in smiles]
    elif len(scaffolds) != len(smiles):
        raise ValueError(f"'scaffolds' has {len(scaffolds)} entries for {len(smiles)} molecules")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(scaffolds):
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    n = len(smiles)
    train_cut, valid_cut = frac_train * n, (frac_train + frac_valid) * n
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for group in ordered:
        if len(train) + len(group) > train_cut:
            if len(train) + len(valid) + len(group) > valid_cut:
                test.extend(group)
            else:
                valid.extend(group)
        else:
            train.extend(group)
    return {k: torch.tensor(sorted(v), dtype=torch.long)
            for k, v in (("train", train), ("valid", valid), ("test", test))}


def read_molecule_csv(path: str | Path, smiles_column: str,
                      label_columns: Sequence[str]) -> tuple[list[str], Tensor]:
    r"""SMILES and float labels ``[G, T]`` of a MoleculeNet CSV (empty cells:
    NaN, a missing label)."""
    import csv

    smiles, labels = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (smiles_column, *label_columns) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; columns: {reader.fieldnames}")
        for row in reader:
            smiles.append(row[smiles_column])
            labels.append([float(row[c]) if row[c] != "" else float("nan")
                           for c in label_columns])
    return smiles, torch.tensor(labels, dtype=torch.float).view(len(smiles), len(label_columns))


class MoleculeCSVDataset(InMemoryDataset):
    r"""A MoleculeNet CSV featurised as OGB does, with OGB's scaffold split,
    processed once and cached in ``root/processed``.

    Every molecule of the CSV keeps its index (as in OGB's set); those that
    the installed rdkit does not sanitise are parsed leniently
    (:func:`parse_smiles`).

    Args:
        root (str): folder with ``raw/<spec.filename>``; ``processed/`` is
            written beside it.
        name (str): one of :data:`MOLECULE_DATASETS`.
    """

    def __init__(self, root: str, name: str = "molhiv", **kwargs: Any):
        if name not in MOLECULE_DATASETS:
            raise ValueError(f"unknown molecule dataset {name!r}; known: "
                             f"{', '.join(MOLECULE_DATASETS)}")
        self.name = name
        self.spec = MOLECULE_DATASETS[name]
        super().__init__(root, **kwargs)
        self.load(self.processed_paths[0])
        self.split_idx = torch.load(self.processed_paths[1])

    @property
    def raw_file_names(self) -> list[str]:
        return [self.spec.filename]

    @property
    def processed_file_names(self) -> list[str]:
        return ["data_ogb.pt", "split_scaffold.pt"]

    def download(self) -> None:
        raise FileNotFoundError(f"{self.name}: {self.raw_paths[0]} is missing (no download: copy "
                                f"MoleculeNet's {self.spec.filename} there)")

    def process(self) -> None:
        _require_rdkit(f"processing {self.name}")
        smiles, labels = read_molecule_csv(self.raw_paths[0], self.spec.smiles_column,
                                           self.spec.label_columns)
        graphs, scaffolds = [], []
        for s, y in zip(smiles, labels, strict=False):
            mol = parse_smiles(s)
            graphs.append(mol_to_data(mol, y.tolist()))
            scaffolds.append(scaffold(mol))
        self.save(graphs, self.processed_paths[0])
        torch.save(scaffold_split(smiles, scaffolds=scaffolds), self.processed_paths[1])

    def get_idx_split(self) -> dict[str, Tensor]:
        r"""OGB's interface: ``{"train", "valid", "test"}`` index tensors."""
        return self.split_idx


def load_graph_dataset(name: str, root: Optional[str] = None,
                       cache_dir: Optional[str] = None) -> tuple[InMemoryDataset, dict]:
    r"""A graph-level dataset and its split (``{"train", "valid", "test"}``).

    ``molhiv``: ``root/MoleculeNet/hiv/raw/HIV.csv`` is copied to
    ``cache_dir`` (``root`` may be read-only) and processed there once.
    ``ogbg-molhiv``: OGB's class under ``cache_dir`` (or ``root``), which
    downloads the set when it is absent.
    """
    if name not in GRAPH_DATASETS:
        raise ValueError(f"unknown graph dataset {name!r}; known: {', '.join(GRAPH_DATASETS)}")
    base = cache_dir or root
    if base is None:
        raise ValueError(f"{name}: give 'root' (the data folder) or 'cache_dir'")
    if name in OGB_DATASETS:
        from ogb.graphproppred import PygGraphPropPredDataset

        dataset = PygGraphPropPredDataset(name=name, root=str(Path(base).expanduser()))
        return dataset, dataset.get_idx_split()
    spec = MOLECULE_DATASETS[name]
    target = Path(base).expanduser() / spec.folder
    if root is not None and cache_dir is not None:
        raw_source = Path(root).expanduser() / spec.folder / "raw" / spec.filename
        raw_target = target / "raw" / spec.filename
        if raw_source.is_file() and raw_source != raw_target and not raw_target.is_file():
            raw_target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw_source, raw_target)
    dataset = MoleculeCSVDataset(str(target), name)
    return dataset, dataset.get_idx_split()


class DropNodes(BaseTransform):
    r"""Training-time augmentation for graph-level tasks: drops each node of a
    graph with probability ``p``, with the edges (and edge attributes) that
    touch it, and relabels the rest (:meth:`torch_geometric.data.Data.subgraph`);
    graph-level attributes such as ``y`` are kept. A graph with fewer than
    ``min_nodes`` nodes, or one that would lose every node, is returned as it
    is. This is the random node drop that GMoE's released graph-level code
    applies to every training molecule (``p = 0.2``, ``min_nodes = 5``).

    Draws from torch's global generator (seeded by ``seed_everything``; with
    loader workers, from each worker's seeded generator).

    Args:
        p (float): probability of dropping a node, in ``[0, 1)``.
        min_nodes (int, optional): graphs smaller than this are left whole.
            (default: :obj:`5`)
    """

    def __init__(self, p: float, min_nodes: int = 5):
        if not 0 <= p < 1:
            raise ValueError(f"'p' must lie in [0, 1) (got {p})")
        if min_nodes < 1:
            raise ValueError(f"'min_nodes' must be at least 1 (got {min_nodes})")
        self.p = float(p)
        self.min_nodes = int(min_nodes)

    def forward(self, data: Data) -> Data:
        num_nodes = data.num_nodes
        if self.p == 0 or num_nodes is None or num_nodes < self.min_nodes:
            return data
        keep = torch.rand(num_nodes) >= self.p
        if not keep.any():
            return data
        return data.subgraph(keep)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, min_nodes={self.min_nodes})"


class GraphDataModule(L.LightningDataModule):
    r"""Graph-level prediction over a dataset of many small graphs, in PyG
    :class:`~torch_geometric.loader.DataLoader` mini-batches.

    Each batch is a :class:`~torch_geometric.data.Batch` with ``x``,
    ``edge_index``, ``edge_attr`` (integer atom and bond features for
    molecules), ``batch`` and ``y [B, T]`` (NaN: missing label).

    Args:
        name (str): one of :data:`GRAPH_DATASETS`. (default: :obj:`"molhiv"`)
        root (str, optional): data folder (e.g. ``../shared/data``).
        cache_dir (str, optional): where the set is processed and cached.
        batch_size (int, optional): graphs per batch. (default: :obj:`32`)
        num_workers (int, optional): loader workers. (default: :obj:`0`)
        subset (float, optional): train on this fraction of the training
            split (a seeded random draw), for quick runs; validation and test
            stay whole. (default: :obj:`None`)
        subset_seed (int, optional): seed of that order. (default: :obj:`0`)
        drop_node (float, optional): drop each atom of a training graph with
            this probability, anew at every epoch (:class:`DropNodes`, graphs of
            5 or more nodes); validation and test graphs stay whole.
            (default: :obj:`0.0`: no augmentation)
        metric (str, optional): the metric of the set's OGB evaluator
            (``"rocauc"`` for ogbg-molhiv), for configs that monitor
            ``val/<metric>``; checked against the evaluator.
    """

    def __init__(self, name: str = "molhiv", root: Optional[str] = None,
                 cache_dir: Optional[str] = None, batch_size: int = 32, num_workers: int = 0,
                 subset: Optional[float] = None, subset_seed: int = 0,
                 drop_node: float = 0.0, metric: Optional[str] = None):
        super().__init__()
        if name not in GRAPH_DATASETS:
            raise ValueError(f"unknown graph dataset {name!r}; known: "
                             f"{', '.join(GRAPH_DATASETS)}")
        if batch_size < 1:
            raise ValueError(f"'batch_size' must be positive (got {batch_size})")
        if subset is not None and not 0 < subset <= 1:
            raise ValueError(f"'subset' must lie in (0, 1] (got {subset})")
        if not 0 <= drop_node < 1:
            raise ValueError(f"'drop_node' must lie in [0, 1) (got {drop_node})")
        self.name: str = name
        from ogb.graphproppred import Evaluator

        own = Evaluator(self.evaluator_name).eval_metric
        if metric is not None and metric != own:
            raise ValueError(f"{name} is scored by {own!r} (OGB's evaluator); "
                             f"got metric={metric!r}")
        self.metric = own
        self.root = root
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.subset = subset
        self.subset_seed = subset_seed
        self.drop_node = float(drop_node)
        self.dataset: Optional[InMemoryDataset] = None
        self.split_idx: dict[str, Tensor] = {}

    @property
    def evaluator_name(self) -> str:
        return (MOLECULE_DATASETS[self.name].evaluator if self.name in MOLECULE_DATASETS
                else self.name)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is not None:
            return
        dataset, split = load_graph_dataset(self.name, self.root, self.cache_dir)
        if self.subset is not None:
            generator = torch.Generator().manual_seed(self.subset_seed)
            train = split["train"]
            keep = torch.randperm(train.numel(), generator=generator)
            keep = keep[:max(1, round(self.subset * train.numel()))]
            split = {**split, "train": train[keep].sort().values}
        self.dataset, self.split_idx = dataset, split

    def _loaded(self) -> InMemoryDataset:
        r"""The dataset, loaded on first use."""
        self.setup()
        assert self.dataset is not None  # set by setup()
        return self.dataset

    @property
    def num_tasks(self) -> int:
        return int(self._loaded()[0].y.size(-1))

    def net_kwargs(self) -> dict[str, int]:
        r"""What the network needs to know of the data (given by ``train``)."""
        return {"out_channels": self.num_tasks}

    def task_kwargs(self) -> dict[str, Any]:
        r"""What the LightningModule needs to know of the data."""
        return {"num_tasks": self.num_tasks, "evaluator": self.evaluator_name}

    def _loader(self, split: str, shuffle: bool = False):
        from torch_geometric.loader import DataLoader

        graphs = self._loaded()[self.split_idx[split]]  # a copy: its transform is its own
        if split == "train" and self.drop_node > 0:
            graphs.transform = (DropNodes(self.drop_node) if graphs.transform is None else
                                Compose([graphs.transform, DropNodes(self.drop_node)]))
        return DataLoader(graphs, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("valid")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.name!r}, batch_size={self.batch_size}"
                f"{f', subset={self.subset}' if self.subset else ''}"
                f"{f', drop_node={self.drop_node}' if self.drop_node else ''})")
