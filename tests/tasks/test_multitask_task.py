r"""The multi-task LightningModule: GAUC, masked losses, weighting, errors."""
from functools import partial

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

        def forward(self, user_x, item_x, edge_index, user, item):
            return self.head(item_x[item])

    task = MultiTaskLearning(Net(), {"genre": {"type": "multiclass", "num_classes": 5}},
                             optimizer=torch.optim.Adam)
    batch = dict(user_x=None, item_x=torch.randn(6, 3), edge_index=None,
                 user=torch.zeros(4, dtype=torch.long), item=torch.tensor([0, 2, 4, 5]),
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
