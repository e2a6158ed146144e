r"""Molecules from SMILES (OGB's featurisation), the scaffold split and the
graph-level data module."""
import csv
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("rdkit", reason="molecule featurisation needs rdkit (moegraph[chem])")

from moegraph.data.molecules import (  # noqa: E402
    GraphDataModule,
    MoleculeCSVDataset,
    load_graph_dataset,
    parse_smiles,
    read_molecule_csv,
    scaffold,
    scaffold_split,
    smiles_to_data,
)

# Drug-like molecules with varied ring systems, plus acyclic ones (empty scaffold).
SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1O", "Cc1ccccc1", "CCOc1ccccc1", "c1ccc2ccccc2c1",
    "Oc1ccc2ccccc2c1", "C1CCNCC1", "CN1CCCCC1", "c1ccncc1", "Nc1ccncc1",
    "c1ccc(-c2ccccc2)cc1", "O=C(O)c1ccc(-c2ccccc2)cc1", "C1CCOC1", "CCO", "CCN", "CCCC(=O)O",
    "c1ccc2[nH]ccc2c1", "Cc1ccc2[nH]ccc2c1", "O=C1NC(=O)c2ccccc21", "C1CC1", "OC1CC1",
    "c1ncc2nc[nH]c2n1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "CN1C(=O)N(C)c2c(ncn2C)C1=O",
]


def write_csv(path: Path, smiles, labels) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["smiles", "activity", "HIV_active"])
        for s, y in zip(smiles, labels, strict=False):
            writer.writerow([s, "CI", "" if y is None else y])
    return path


def test_smiles_to_data_matches_ogb():
    from ogb.utils import smiles2graph

    for s in SMILES:
        data, ref = smiles_to_data(s, [1.0]), smiles2graph(s)
        assert torch.equal(data.x, torch.from_numpy(ref["node_feat"]))
        assert torch.equal(data.edge_index, torch.from_numpy(ref["edge_index"]))
        assert torch.equal(data.edge_attr, torch.from_numpy(ref["edge_feat"]))
        assert data.num_nodes == ref["num_nodes"] and data.y.tolist() == [[1.0]]
    # A single atom: no bonds, empty but well-shaped edge tensors.
    atom = smiles_to_data("C")
    assert atom.x.shape == (1, 9) and atom.edge_index.shape == (2, 0)
    assert atom.edge_attr.shape == (0, 3)


def test_lenient_parse_keeps_hypervalent_molecules():
    # Six-coordinate aluminium (HIV.csv line 139): current rdkit rejects it on
    # valence; OGB's set has a graph for it.
    s = "O=C1O[Al]23(OC1=O)(OC(=O)C(=O)O2)OC(=O)C(=O)O3"
    with pytest.raises(ValueError, match="cannot parse"):
        parse_smiles(s, strict=True)
    data = smiles_to_data(s)
    assert data.num_nodes == 19 and data.edge_index.size(1) == 2 * 21
    assert scaffold(s).startswith("!")  # no Murcko scaffold: a group of its own
    with pytest.raises(ValueError, match="'not a smiles'"):
        smiles_to_data("not a smiles")


def test_scaffold_split_order_hand_computed():
    # Scaffolds: benzene x4 (0, 1, 2, 3), pyridine x2 (4, 5), naphthalene x2
    # (6, 7), none x1 (8), cyclopropane x1 (9). Sorted by (size, first index)
    # in reverse: benzene(4), naphthalene(2, first 6), pyridine(2, first 4),
    # cyclopropane(1, first 9), none(1, first 8). Cuts 6 / 8 of 10 molecules:
    # train benzene (4) + naphthalene (2) = 6; pyridine would pass 6 -> valid
    # (8); cyclopropane and none -> test.
    smiles = ["c1ccccc1O", "Cc1ccccc1", "c1ccccc1N", "c1ccccc1Cl", "c1ccncc1", "Nc1ccncc1",
              "c1ccc2ccccc2c1", "Oc1ccc2ccccc2c1", "CCO", "C1CC1"]
    split = scaffold_split(smiles, 0.6, 0.2)
    assert split["train"].tolist() == [0, 1, 2, 3, 6, 7]
    assert split["valid"].tolist() == [4, 5]
    assert split["test"].tolist() == [8, 9]


def check_split(split, scaffolds, n, tolerance=0.01):
    parts = [set(split[k].tolist()) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == n and set.union(*parts) == set(range(n))
    seen = [{scaffolds[i] for i in p} for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for part, frac in zip(parts, (0.8, 0.1, 0.1), strict=False):
        assert abs(len(part) / n - frac) <= tolerance


def hiv_csv() -> Path:
    base = os.environ.get("MOEGRAPH_DATA_DIR")
    path = Path(base or "/nonexistent") / "MoleculeNet/hiv/raw/HIV.csv"
    if not path.is_file():
        pytest.skip(f"real data: {path} does not exist (set MOEGRAPH_DATA_DIR)")
    return path


def test_scaffold_split_on_hiv_sample():
    smiles, _ = read_molecule_csv(hiv_csv(), "smiles", ["HIV_active"])
    smiles = smiles[:1500]
    scaffolds = [scaffold(s) for s in smiles]
    split = scaffold_split(smiles, scaffolds=scaffolds)
    check_split(split, scaffolds, len(smiles))
    again = scaffold_split(smiles, scaffolds=scaffolds)  # deterministic
    assert all(torch.equal(split[k], again[k]) for k in split)
    with pytest.raises(ValueError, match="'scaffolds' has 2 entries"):
        scaffold_split(smiles, scaffolds=scaffolds[:2])
    with pytest.raises(ValueError, match="frac_train"):
        scaffold_split(smiles, 0.9, 0.2)


@pytest.mark.slow
def test_molhiv_full_set(tmp_path):
    r"""All of HIV.csv processed (a few minutes): OGB's sizes, labels and split."""
    source = hiv_csv()
    dataset, split = load_graph_dataset("molhiv", str(source.parents[3]), str(tmp_path))
    assert len(dataset) == 41127 and int(dataset.y.sum()) == 1443
    smiles, _ = read_molecule_csv(source, "smiles", ["HIV_active"])
    check_split(split, [scaffold(s) for s in smiles], len(smiles))


def test_read_csv_missing_labels_and_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["CCO", "CCN"], [1, None])
    smiles, y = read_molecule_csv(path, "smiles", ["HIV_active"])
    assert smiles == ["CCO", "CCN"] and y[0, 0] == 1 and torch.isnan(y[1, 0])
    with pytest.raises(ValueError, match="no column"):
        read_molecule_csv(path, "smiles", ["toxic"])


@pytest.fixture
def tiny_hiv(tmp_path):
    r"""A data folder with a handful of molecules as MoleculeNet/hiv/raw/HIV.csv."""
    labels = [i % 3 == 0 for i in range(len(SMILES))]
    write_csv(tmp_path / "data/MoleculeNet/hiv/raw/HIV.csv", SMILES, [int(y) for y in labels])
    return tmp_path / "data", tmp_path / "cache"


def test_datamodule_on_a_handful_of_smiles(tiny_hiv):
    root, cache = tiny_hiv
    dm = GraphDataModule("molhiv", str(root), str(cache), batch_size=4)
    dm.setup()
    assert (cache / "MoleculeNet/hiv/processed/data_ogb.pt").is_file()  # cached
    assert len(dm.dataset) == len(SMILES) and dm.num_tasks == 1
    assert dm.net_kwargs() == {"out_channels": 1}
    assert dm.task_kwargs() == {"num_tasks": 1, "evaluator": "ogbg-molhiv"}
    assert dm.metric == "rocauc"
    sizes = {k: v.numel() for k, v in dm.split_idx.items()}
    assert sum(sizes.values()) == len(SMILES) and sizes["train"] >= sizes["valid"]
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == 4 and batch.y.shape == (4, 1)
    assert batch.x.dtype == torch.long and batch.x.size(1) == 9
    assert batch.edge_attr.size(1) == 3 and batch.batch.max() == 3
    # Same molecules as smiles_to_data, in the CSV's order.
    first = dm.dataset[0]
    assert torch.equal(first.x, smiles_to_data(SMILES[0]).x)
    # A second module loads the cached set (no rdkit call needed) identically.
    again = MoleculeCSVDataset(str(cache / "MoleculeNet/hiv"))
    assert torch.equal(again.x, dm.dataset.x)
    # A subset keeps a fraction of the training graphs; evaluation stays whole.
    sub = GraphDataModule("molhiv", str(root), str(cache), subset=0.5)
    sub.setup()
    assert sub.split_idx["train"].numel() == round(0.5 * sizes["train"])
    assert set(sub.split_idx["train"].tolist()) <= set(dm.split_idx["train"].tolist())
    assert torch.equal(sub.split_idx["test"], dm.split_idx["test"])


def test_datamodule_drop_node_only_in_training(tiny_hiv):
    root, cache = tiny_hiv
    whole = GraphDataModule("molhiv", str(root), str(cache), batch_size=64)
    drop = GraphDataModule("molhiv", str(root), str(cache), batch_size=64, drop_node=0.5)
    whole.setup()
    drop.setup()
    torch.manual_seed(0)
    atoms = int(whole.train_dataloader().dataset.x.size(0))  # every training atom
    dropped = next(iter(drop.train_dataloader()))
    # Half the atoms of the graphs with >= 5 atoms go (Bernoulli draws, so a
    # margin), the small graphs stay whole; the labels stay.
    assert dropped.num_graphs == whole.split_idx["train"].numel()
    assert dropped.x.size(0) < 0.8 * atoms
    for split in ("valid", "test"):  # evaluation graphs are never thinned
        a, b = (next(iter(getattr(m, f"{'val' if split == 'valid' else split}_dataloader")()))
                for m in (whole, drop))
        assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)
    assert drop.dataset.transform is None  # the shared dataset keeps no transform
    assert "drop_node=0.5" in repr(drop)
    with pytest.raises(ValueError, match="'drop_node' must lie in"):
        GraphDataModule(drop_node=1.0)


def test_datamodule_bad_arguments(tiny_hiv):
    with pytest.raises(ValueError, match="unknown graph dataset 'tox'"):
        GraphDataModule("tox")
    with pytest.raises(ValueError, match="'batch_size' must be positive"):
        GraphDataModule(batch_size=0)
    with pytest.raises(ValueError, match="'subset' must lie in"):
        GraphDataModule(subset=1.5)
    with pytest.raises(ValueError, match="scored by 'rocauc'"):
        GraphDataModule(metric="acc")
    root, cache = tiny_hiv
    with pytest.raises(FileNotFoundError, match="HIV.csv is missing"):
        GraphDataModule("molhiv", str(cache / "nowhere"), str(cache / "other")).setup()


def test_ogbg_molhiv_goes_through_ogb(compose_cfg, monkeypatch, tmp_path):
    r"""``data=ogbg_molhiv`` loads OGB's own class (mocked: no download here)."""
    import ogb.graphproppred

    calls = []

    class FakeOGB(list):
        def __init__(self, name, root):
            calls.append((name, root))
            super().__init__([smiles_to_data("CCO", [0.0]), smiles_to_data("CCN", [1.0])])

        def get_idx_split(self):
            return {"train": torch.tensor([0]), "valid": torch.tensor([1]),
                    "test": torch.tensor([1])}

    monkeypatch.setattr(ogb.graphproppred, "PygGraphPropPredDataset", FakeOGB)
    cfg = compose_cfg("experiment=molhiv_gcn", "data=ogbg_molhiv",
                      f"paths.cache_dir={tmp_path / 'cache'}")
    assert cfg.data.name == "ogbg-molhiv" and cfg.optimized_metric == "val/rocauc"
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_tasks == 1
    assert calls == [("ogbg-molhiv", str(tmp_path / "cache"))]
