r"""Graph-level classification: masked loss, OGB evaluator parity, and runs
through the entry point on a handful of molecules."""
import json
import math

import pytest
import torch

from moegraph.tasks.graph_classification import GraphClassificationTask, masked_bce_with_logits


def make_task(num_tasks=1, evaluator="ogbg-molhiv"):
    return GraphClassificationTask(torch.nn.Linear(1, num_tasks), num_tasks,
                                   optimizer=torch.optim.Adam, evaluator=evaluator)


def test_masked_bce_skips_nan_labels():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]], requires_grad=True)
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    loss = masked_bce_with_logits(logits, y)

    def bce(z, t):  # by hand
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (bce(0.5, 1) + bce(2.0, 0) + bce(0.0, 1) + bce(1.5, 0)) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[2, 0] == 0  # masked: no gradient
    assert logits.grad[0, 0] != 0


def test_masked_bce_all_missing_and_bad_shapes():
    logits = torch.zeros(2, 1, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.full((2, 1), float("nan")))
    assert float(loss) == 0.0
    loss.backward()  # still differentiable
    with pytest.raises(ValueError, match="same shape"):
        masked_bce_with_logits(torch.zeros(2, 1), torch.zeros(2))


def test_evaluator_parity_with_hand_computed_auc():
    task = make_task()
    # Positives 0.35, 0.8; negatives 0.1, 0.4: of the 4 (pos, neg) pairs, 3 are
    # ordered correctly -> ROC-AUC 0.75.
    y = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    p = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    assert task.score(y, p) == pytest.approx(0.75)
    # NaN-labelled graphs are ignored, whatever their score.
    y_nan = torch.cat([y, torch.tensor([[float("nan")], [float("nan")]])])
    p_nan = torch.cat([p, torch.tensor([[0.0], [1.0]])])
    assert task.score(y_nan, p_nan) == pytest.approx(0.75)
    # Two tasks (ogbg-moltox21 has 12; a 2-task evaluator: ogbg-molbbbp has 1,
    # so check the averaging on OGB's function with our masking instead).
    with pytest.warns(UserWarning, match="ROC-AUC undefined"):
        assert math.isnan(task.score(torch.zeros(3, 1), torch.rand(3, 1)))


def test_evaluator_multitask_average():
    task = make_task(num_tasks=12, evaluator="ogbg-moltox21")
    y = torch.full((4, 12), float("nan"))
    p = torch.zeros(4, 12)
    y[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    p[:, 0] = torch.tensor([0.1, 0.4, 0.35, 0.8])  # 0.75
    y[:, 1] = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    p[:, 1] = torch.tensor([0.9, 0.2, 0.0, 0.1])  # pairs (0.9>0.2), (0.1<0.2): 0.5
    # The other tasks have no labelled pair of classes: OGB skips them.
    assert task.score(y, p) == pytest.approx((0.75 + 0.5) / 2)


def test_task_bad_arguments():
    with pytest.raises(ValueError, match="'num_tasks' must be a positive integer"):
        make_task(num_tasks=0)
    with pytest.raises(ValueError, match="scores 1 tasks"):
        make_task(num_tasks=3)


# Runs through the entry point ##################################################

SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1O", "Cc1ccccc1", "CCOc1ccccc1", "c1ccc2ccccc2c1",
    "Oc1ccc2ccccc2c1", "C1CCNCC1", "CN1CCCCC1", "c1ccncc1", "Nc1ccncc1",
    "c1ccc(-c2ccccc2)cc1", "O=C(O)c1ccc(-c2ccccc2)cc1", "C1CCOC1", "CCO", "CCN", "CCCC(=O)O",
    "c1ccc2[nH]ccc2c1", "Cc1ccc2[nH]ccc2c1", "O=C1NC(=O)c2ccccc21", "C1CC1", "OC1CC1",
    "c1ncc2nc[nH]c2n1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "CN1C(=O)N(C)c2c(ncn2C)C1=O",
]

@pytest.fixture
def tiny_molhiv(tmp_path):
    r"""Overrides pointing a molhiv run at a handful of molecules whose labels
    give every split both classes."""
    pytest.importorskip("rdkit", reason="molecule featurisation needs rdkit (moegraph[chem])")
    from moegraph.data.molecules import scaffold_split

    smiles = SMILES * 2  # 48 molecules, the same scaffold groups twice as large
    labels = [i % len(SMILES) % 2 for i in range(len(smiles))]  # a label per molecule
    split = scaffold_split(smiles)
    for part in split.values():  # every split has both classes (ROC-AUC defined)
        assert {labels[i] for i in part.tolist()} == {0, 1}
    path = tmp_path / "data/MoleculeNet/hiv/raw/HIV.csv"
    path.parent.mkdir(parents=True)
    path.write_text("smiles,activity,HIV_active\n"
                    + "".join(f"{s},CI,{y}\n" for s, y in zip(smiles, labels, strict=False)))
    return [f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "backbone.hidden_channels=16", "backbone.num_layers=2", "data.batch_size=64"]


@pytest.mark.parametrize("experiment,moe,drop", [
    ("molhiv_gcn", False, 0.0), ("molhiv_gmoe", True, 0.0), ("molhiv_gin", False, 0.0),
    ("molhiv_gin_gmoe", True, 0.0), ("molhiv_gin_gmoe", True, 0.2)])
def test_fast_dev_run(compose_cfg, tmp_path, tiny_molhiv, experiment, moe, drop):
    from moegraph.nn.models import GraphLevelGNN
    from moegraph.train import instantiate_run, train

    cfg = compose_cfg("debug=fdr", f"experiment={experiment}", f"data.drop_node={drop}",
                      *tiny_molhiv)
    built = instantiate_run(cfg, trainer=False)
    assert built["datamodule"].drop_node == drop
    net = built["net"]
    assert isinstance(net, GraphLevelGNN)
    assert net.conv_name == ("gin" if "gin" in experiment else "gcn")
    assert (net.num_experts is not None) == moe
    metrics = train(cfg)
    for split in ("val", "test"):
        assert 0.0 <= metrics[f"{split}/rocauc"] <= 1.0
    assert metrics["test/loss"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["task_name"] == experiment
    assert ("diag/hop2_share" in metrics) == moe
    if moe:
        assert 0.0 <= metrics["diag/hop2_share"] <= 1.0
        load = json.loads((tmp_path / "expert_load.json").read_text())
        assert len(load) == 2 and all(abs(sum(row) - 1) < 1e-5 for row in load)


def test_short_training_learns(compose_cfg, tiny_molhiv):
    r"""A few epochs on the tiny set lower the training loss (the path trains)."""
    from moegraph.train import train

    cfg = compose_cfg("experiment=molhiv_gcn", *tiny_molhiv, "callbacks=none", "logger=none",
                      "trainer.max_epochs=30", "+trainer.enable_progress_bar=false",
                      "backbone.dropout=0.0", "model.optimizer.lr=0.01", "test=false")
    metrics = train(cfg)
    # Labels alternate over the molecules: a model can only fit the training
    # graphs by telling the molecules apart; chance is log(2) = 0.693.
    assert metrics["train/loss_epoch"] < 0.5
