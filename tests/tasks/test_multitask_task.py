r"""The multi-task LightningModule: GAUC, masked losses, weighting, errors."""
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moegraph.data import MovieLensDataModule
from moegraph.diagnostics import multitask_diagnostics, multitask_summary
from moegraph.nn import HoME, MMoE
from moegraph.nn.models import MultiTaskRecommender
from moegraph.tasks import GroupAUROC, MultiTaskLearning, grouped_auc

TYPES = {"watch": "binary", "like": "binary", "rating": "regression"}


def naive_gauc(preds, target, group):
    r"""Pairwise counting per group (ties 1/2), mean over groups with both classes."""
    aucs = []
    for g in sorted(set(group)):
        pos = [p for p, t, q in zip(preds, target, group, strict=True) if q == g and t == 1]
        neg = [p for p, t, q in zip(preds, target, group, strict=True) if q == g and t == 0]
        if pos and neg:
            wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
            aucs.append(wins / (len(pos) * len(neg)))
    return sum(aucs) / len(aucs), len(aucs)


def test_grouped_auc_matches_pairwise_reference():
    torch.manual_seed(0)
    preds = torch.randint(0, 5, (200,)).float() / 4  # many ties
    target = torch.randint(0, 2, (200,))
    group = torch.randint(0, 12, (200,)) * 7
    group[group == 0] = 1000  # a group that may be one-class is fine too
    target[group == 7] = 1  # one class only: left out
    value, count = grouped_auc(preds, target, group)
    ref, ref_count = naive_gauc(preds.tolist(), target.tolist(), group.tolist())
    assert count == ref_count and value.item() == pytest.approx(ref, abs=1e-6)
    metric = GroupAUROC()
    metric.update(preds[:90], target[:90], group[:90])
    metric.update(preds[90:], target[90:], group[90:])
    assert metric.compute().item() == pytest.approx(ref, abs=1e-6)
    # By hand: one user, positives 0.9 and 0.4 against negatives 0.5 and 0.4.
    v, n = grouped_auc(torch.tensor([0.9, 0.4, 0.5, 0.4]), torch.tensor([1, 1, 0, 0]),
                       torch.zeros(4))
    assert n == 1 and v.item() == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert torch.isnan(grouped_auc(torch.rand(3), torch.ones(3), torch.zeros(3))[0])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    dm = MovieLensDataModule(name="synthetic", batch_size=64)
    dm.setup()
    net = MultiTaskRecommender(**dm.net_kwargs(), head=partial(
        HoME, hidden_channels=8, groups={"e": ["watch"], "q": ["like", "rating"]}),
        embedding_channels=4)
    return dm, net


def make_task(net, **kwargs):
    return MultiTaskLearning(net, TYPES, optimizer=partial(torch.optim.Adam, lr=0.01), **kwargs)


def test_masked_tasks_give_no_nan(setup):
    dm, net = setup
    task = make_task(net)
    batch = next(iter(dm.train_dataloader()))
    batch["mask"]["like"][:] = False  # no label for like and rating in this batch
    batch["mask"]["rating"][:] = False
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    # The loss is the watch loss alone, by hand.
    out = task(batch)
    ref = F.binary_cross_entropy_with_logits(out.outputs["watch"], batch["y"]["watch"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_weighted_and_uncertainty_losses(setup):
    dm, net = setup
    batch = next(iter(dm.train_dataloader()))
    task = make_task(net, task_weights={"like": 2.0, "rating": 0.5})
    out = task(batch)
    per = {}
    for t in TYPES:
        m = batch["mask"][t]
        p, y = out.outputs[t][m], batch["y"][t][m]
        per[t] = (F.binary_cross_entropy_with_logits(p, y) if TYPES[t] == "binary"
                  else F.mse_loss(p, y))
    ref = per["watch"] + 2.0 * per["like"] + 0.5 * per["rating"]
    assert task.training_step(batch, 0).item() == pytest.approx(ref.item(), rel=1e-5)
    task = make_task(net, uncertainty_weighting=True)
    with torch.no_grad():
        task.log_vars.copy_(torch.tensor([0.5, -0.2, 1.0]))
    s = [0.5, -0.2, 1.0]
    ref = sum(torch.exp(torch.tensor(-si)) * per[t] + si for si, t in zip(s, TYPES, strict=True))
    assert task.training_step(batch, 0).item() == pytest.approx(ref.item(), rel=1e-5)
    assert task.log_vars in list(task.parameters())


def test_task_mismatch_errors(setup):
    dm, net = setup
    with pytest.raises(ValueError, match="task mismatch: the network predicts .* \\(3 tasks\\) "
                                         "but the data labels \\['watch', 'like'\\] \\(2 tasks\\)"):
        MultiTaskLearning(net, {"watch": "binary", "like": "binary"}, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="'task_weights' names \\['click'\\]"):
        make_task(net, task_weights={"click": 1.0})
    with pytest.raises(ValueError, match="type must be one of"):
        MultiTaskLearning(net, {"watch": "binary", "like": "ranking", "rating": "regression"},
                          optimizer=torch.optim.Adam)
    task = make_task(net)
    batch = next(iter(dm.train_dataloader()))
    del batch["y"]["rating"], batch["mask"]["rating"]
    with pytest.raises(ValueError, match="task mismatch: the batch labels"):
        task.training_step(batch, 0)


def test_multiclass_task():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        tasks = ["genre"]

        def __init__(self):
            super().__init__()
            self.head = MMoE(3, 4, {"genre": 5})

        def forward(self, item_x, item):
            return self.head(item_x[item])

    task = MultiTaskLearning(Net(), {"genre": {"type": "multiclass", "num_classes": 5}},
                             optimizer=torch.optim.Adam)
    batch = dict(inputs=dict(item_x=torch.randn(6, 3), item=torch.tensor([0, 2, 4, 5])),
                 y={"genre": torch.tensor([0, 4, 2, 1])}, mask={"genre": torch.ones(4).bool()})
    out = task(batch)
    ref = F.cross_entropy(out.outputs["genre"], batch["y"]["genre"])
    assert task.training_step(batch, 0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_diagnostics_by_hand():
    gates = {"0/a": torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0]]),
             "0/b": torch.tensor([[0.1, 0.0, 0.9], [0.1, 0.0, 0.9]])}
    h = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [0.0, 0.0]],
                      [[0.0, 2.0], [3.0, 1.0], [0.0, 4.0]]])  # [N=2, E=3, H=2]
    diag = multitask_diagnostics(gates, [h], [["shared", "task:a", "task:b"]], ["a", "b"])
    lv = diag["levels"][0]
    assert lv["zero_share"] == pytest.approx([0.5, 0.0, 0.75])
    assert lv["scale"] == pytest.approx([1.0, 1.5, 1.0]) and lv["scale_spread"] == 1.5
    (d,) = diag["degradation"]
    # Shared expert 0: a puts 0.6 on it (>= 0.5 / 2 experts), b 0.1 (< 0.5 / 2): one user.
    assert d["weight"] == pytest.approx({"a": 0.6, "b": 0.1}) and d["users"] == ["a"]
    assert d["flagged"] and d["share"]["a"] == pytest.approx(0.6 / 0.7)
    assert diag["underfitting"]["a"] == pytest.approx({"own": 0.4, "shared": 0.6, "other": 0.0})
    assert diag["underfitting"]["b"]["own"] == pytest.approx(0.9)
    summary = multitask_summary(diag)
    assert summary["diag/flagged_shared_experts"] == 1.0
    assert summary["diag/max_zero_share"] == 0.75


# -- a model-agnostic task: a bare head on a tensor input ----------------------------------
MIXED = {"a": "binary", "b": "regression", "c": {"type": "multiclass", "num_classes": 3}}


def mixed_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(inputs=torch.randn(n, 5, generator=g),
                y={"a": torch.randint(0, 2, (n,), generator=g).float(),
                   "b": torch.randn(n, generator=g), "c": torch.randint(0, 3, (n,), generator=g)},
                mask={t: torch.rand(n, generator=g) > 0.3 for t in MIXED})


def mixed_task(**kwargs):
    torch.manual_seed(0)
    net = MMoE(5, 4, {"a": 1, "b": 1, "c": 3}, num_experts=3)
    return MultiTaskLearning(net, MIXED, optimizer=torch.optim.Adam, **kwargs)


def test_bare_head_on_a_tensor_input_matches_reference():
    task, batch = mixed_task(), mixed_batch()
    out = task.net(batch["inputs"])
    m = batch["mask"]
    ref = (F.binary_cross_entropy_with_logits(out.outputs["a"][m["a"]], batch["y"]["a"][m["a"]])
           + F.mse_loss(out.outputs["b"][m["b"]], batch["y"]["b"][m["b"]])
           + F.cross_entropy(out.outputs["c"][m["c"]], batch["y"]["c"][m["c"]]))
    assert task.training_step(batch, 0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_integer_mask_is_rejected_not_used_as_row_indices():
    task, batch = mixed_task(), mixed_batch()
    bool_loss = task.training_step(batch, 0).item()
    # As row indices, an int64 0/1 mask would pick rows 0 and 1 again and again.
    out = task.net(batch["inputs"])
    as_index = F.binary_cross_entropy_with_logits(out.outputs["a"][batch["mask"]["a"].long()],
                                                  batch["y"]["a"][batch["mask"]["a"].long()])
    assert as_index.item() != pytest.approx(bool_loss)
    batch["mask"]["b"] = batch["mask"]["b"].long()
    with pytest.raises(TypeError, match="task 'b': the label mask must be a bool tensor of "
                                        "shape \\[8\\].*int64.*mask.bool\\(\\)"):
        task.training_step(batch, 0)


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(8), TypeError, "task 'a': the label mask must be a bool tensor.*float32"),
    (torch.ones(7, dtype=torch.bool), ValueError, "task 'a': the label mask must have shape \\[8\\]"
                                                  ".*got \\[7\\]"),
    (torch.ones(8, 1, dtype=torch.bool), ValueError, "task 'a': the label mask must have shape"),
    ([True] * 8, TypeError, "task 'a': the label mask must be a bool tensor.*list"),
])
def test_bad_masks_name_the_task(mask, error, match):
    task, batch = mixed_task(), mixed_batch()
    batch["mask"]["a"] = mask
    with pytest.raises(error, match=match):
        task.training_step(batch, 0)


def test_bad_labels_name_the_task():
    task = mixed_task()
    batch = mixed_batch()
    row = int(batch["mask"]["a"].nonzero()[0])
    batch["y"]["a"][row] = 2.0
    with pytest.raises(ValueError, match="task 'a' is binary: labels must be 0 or 1, got 2.0"):
        task.training_step(batch, 0)
    batch = mixed_batch()
    row = int(batch["mask"]["b"].nonzero()[0])
    batch["y"]["b"][row] = float("nan")
    with pytest.raises(ValueError, match="task 'b': 1 labels under the mask are NaN"):
        task.training_step(batch, 0)
    batch = mixed_batch()
    row = int(batch["mask"]["c"].nonzero()[0])
    batch["y"]["c"][row] = 5
    with pytest.raises(ValueError, match="task 'c' is multiclass with 3 classes: labels must be "
                                         "integers in \\[0, 2\\], got 5"):
        task.training_step(batch, 0)
    batch = mixed_batch()
    batch["y"]["b"] = batch["y"]["b"][:5]
    with pytest.raises(ValueError, match="task 'b': the labels must have 8 rows"):
        task.training_step(batch, 0)


def test_nan_and_bad_labels_outside_the_mask_are_ignored():
    task = mixed_task()
    batch = mixed_batch()
    ref = task.training_step(batch, 0).item()
    for t, bad in (("a", 7.0), ("b", float("nan")), ("c", 9)):
        hidden = ~batch["mask"][t]
        assert hidden.any()
        batch["y"][t][hidden] = bad
    assert task.training_step(batch, 0).item() == pytest.approx(ref, rel=1e-6)


def test_input_of_the_wrong_width_and_nan_features():
    task, batch = mixed_task(), mixed_batch()
    batch["inputs"] = torch.randn(8, 6)
    with pytest.raises(ValueError, match="MMoE: 'x' must have shape \\[N, 5\\] "
                                         "\\(in_channels=5\\); got \\[8, 6\\]"):
        task.training_step(batch, 0)
    batch["inputs"] = torch.randn(8, 5)
    batch["inputs"][3, 1] = float("nan")
    with pytest.raises(ValueError,
                       match="MMoE: 'x' holds NaN or infinite values \\(1 of 8 rows\\)"):
        task.training_step(batch, 0)
    with pytest.raises(KeyError, match="needs 'inputs'"):
        task.training_step({"y": batch["y"], "mask": batch["mask"]}, 0)


def test_home_on_a_one_row_training_batch():
    home = HoME(5, 4, ["a", "b"])
    with pytest.raises(ValueError, match="expert_norm='batch_norm' needs at least 2 rows per "
                                         "training batch \\(got 1\\)"):
        home(torch.randn(1, 5))
    home.eval()
    assert torch.isfinite(home(torch.randn(1, 5)).outputs["a"]).all()  # running statistics
    assert torch.isfinite(HoME(5, 4, ["a", "b"], expert_norm="layer_norm")(
        torch.randn(1, 5)).outputs["a"]).all()


def _fit(task, batches, epochs=1):
    import lightning as L
    from torch.utils.data import DataLoader

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)

        def val_dataloader(self):
            return DataLoader(batches, batch_size=None)

    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(task, datamodule=DM())
    return trainer.callback_metrics


def test_mean_metrics_are_logged_and_match_the_per_task_metrics():
    from sklearn.metrics import r2_score, roc_auc_score

    task = mixed_task(task_weights={"a": 2.0, "b": 1.0, "c": 1.0})
    batches = [mixed_batch(64, seed=s) for s in range(3)]
    metrics = _fit(task, batches)
    task.eval()
    with torch.no_grad():
        outs = [task.net(b["inputs"]).outputs for b in batches]
    cat = lambda t, key: torch.cat([(o[t] if key == "p" else b[key][t])  # noqa: E731
                                    for o, b in zip(outs, batches, strict=True)])
    m = {t: cat(t, "mask") for t in MIXED}
    auc = roc_auc_score(cat("a", "y")[m["a"]].numpy(), cat("a", "p")[m["a"]].numpy())
    r2 = r2_score(cat("b", "y")[m["b"]].numpy(), cat("b", "p")[m["b"]].numpy())
    acc = (cat("c", "p")[m["c"]].argmax(1) == cat("c", "y")[m["c"]]).float().mean().item()
    assert metrics["val/a/auc"].item() == pytest.approx(auc, abs=1e-5)
    assert metrics["val/b/r2"].item() == pytest.approx(r2, abs=1e-4)
    assert metrics["val/c/acc"].item() == pytest.approx(acc, abs=1e-6)
    assert metrics["val/mean_auc"].item() == pytest.approx(auc, abs=1e-5)
    assert metrics["val/mean_score"].item() == pytest.approx((2 * auc + r2 + acc) / 4, abs=1e-4)
    assert "train/mean_score" in metrics


def test_gauc_with_single_row_groups_warns_once_and_is_not_logged():
    task = mixed_task()
    batches = []
    for s in range(2):
        b = mixed_batch(16, seed=s)
        b["group"] = torch.arange(16) + 16 * s  # every group a single row
        batches.append(b)
    with pytest.warns(UserWarning, match="val/a/gauc is undefined: no group holds both classes"
                      ) as record:
        metrics = _fit(task, batches, epochs=2)
    assert sum("val/a/gauc" in str(w.message) for w in record) == 1
    assert "val/a/gauc" not in metrics and "val/a/auc" in metrics
    assert all(torch.isfinite(v).all() for v in metrics.values())


# -- the config tree: tabular data and the MMoE synthetic benchmark -------------------------
@pytest.mark.parametrize("model,head", [("shared_bottom", "SharedBottom"), ("mmoe", "MMoE"),
                                        ("ple", "PLE"), ("home", "HoME")])
def test_mtl_synthetic_experiments_compose(compose_cfg, model, head):
    from moegraph.data import TabularMultiTaskDataModule
    from moegraph.nn.models import TabularMultiTaskNet
    from moegraph.train import instantiate_run

    cfg = compose_cfg(f"experiment=mtl_synthetic_{model}", "data.frames.num_rows=200",
                      "data.frames.correlation=0.5")
    assert cfg.optimized_metric == "val/mean_score"
    run = instantiate_run(cfg)
    dm, net = run["datamodule"], run["net"]
    assert isinstance(dm, TabularMultiTaskDataModule) and dm.metric == "mean_score"
    assert isinstance(net, TabularMultiTaskNet) and type(net.head).__name__ == head
    assert net.head.in_channels == 100 and net.tasks == ["y1", "y2"]
    by_name = {type(c).__name__: c for c in run["callbacks"]}
    assert by_name["ModelCheckpoint"].monitor == "val/mean_score"
    assert by_name["ModelCheckpoint"].mode == "max"


def test_tabular_data_config_with_a_csv(compose_cfg, tmp_path):
    from moegraph.train import instantiate_run, train

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=300), "c": rng.choice(["u", "v"], 300)})
    df["click"] = (df.a + rng.normal(size=300) > 0).astype(int)
    df["buy"] = (df.a > 0.5).astype(int)
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg = compose_cfg("data=tabular", "model=mmoe", f"data.path={tmp_path / 't.csv'}",
                      "data.tasks={click: binary, buy: binary}", "debug=fdr")
    assert cfg.optimized_metric == "val/mean_auc"
    run = instantiate_run(cfg, trainer=False)
    assert run["net"].head.in_channels == 1 + 2  # a, one-hot c
    metrics = train(cfg)
    assert 0.0 <= metrics["test/mean_auc"] <= 1.0
    assert metrics["test/mean_auc"] == pytest.approx(
        (metrics["test/click/auc"] + metrics["test/buy/auc"]) / 2)
