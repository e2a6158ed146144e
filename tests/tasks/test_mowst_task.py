r"""Tests of moegraph.tasks.MowstTask: the schedule, freezing, roll-back,
metrics, checkpoints and a real-data run on Cora."""
import dataclasses
import functools
import math
import types
import warnings

import lightning as L
import pytest
import torch
from torch_geometric.nn.models import GCN, MLP

from moegraph.data import NodeDataModule, csbm_graph
from moegraph.nn import Mowst, MowstOutput
from moegraph.nn.mowst import mixture_log_probs
from moegraph.tasks import MowstMetrics, MowstTask, NodeClassificationTask
from moegraph.tasks.metrics import expected_accuracy
from moegraph.tasks.mowst_schedule import ScheduleConfig

pytestmark = pytest.mark.filterwarnings(
    r"ignore:You are trying to `self.log\(\)` but the `self.trainer` reference:UserWarning",
    "ignore:MowstTask early-stops each turn itself:UserWarning")

N, FEAT, C = 60, 6, 3
ADAM = functools.partial(torch.optim.Adam, lr=0.05)


def make_net(variant="mowst"):
    torch.manual_seed(0)
    return Mowst(MLP([FEAT, 8, C], dropout=0.2), GCN(FEAT, 8, 2, C, dropout=0.2),
                 variant=variant)


# The schedule of these tests: no pre-training, no cross-fitting, up to 10 rounds of
# alternating turns of 10 epochs of patience (MowstTask's defaults pre-train,
# cross-fit and end after the gate's turn).
SHORT = {"pretrain_weak_epochs": 0, "pretrain_strong_epochs": 0, "turn_patience": 10,
         "pretrain_patience": 10, "crossfit_folds": 0, "max_rounds": 10}


def make_task(variant="mowst", **kwargs):
    kwargs = {"num_classes": C, "optimizer": ADAM, **SHORT, **kwargs}
    return MowstTask(make_net(variant), **kwargs)


def make_dm(**kwargs):
    return NodeDataModule("synthetic", dataset_kwargs={
        "num_nodes": N, "num_classes": C, "num_features": FEAT, **kwargs})


def trainer(**kwargs):
    return L.Trainer(**{"max_epochs": 40, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False,
                        "num_sanity_val_steps": 0, **kwargs})


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class Recorder(L.Callback):
    r"""Per training epoch: the phase, and whether each part's parameters
    changed in its (one, full-batch) training step (checked before validation,
    which may roll a turn back); per step: the train/eval mode of each part."""

    def __init__(self):
        self.epochs = []
        self.modes = []

    def on_train_epoch_start(self, trainer, task):
        net = task.net
        self._before = {n: params(getattr(net, n)) for n in ("weak", "gate", "strong")}
        self._phase = task.phase

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        net = task.net
        self.modes.append((task.phase, net.weak.training, net.gate.training,
                           net.strong.training))
        after = {n: params(getattr(net, n)) for n in ("weak", "gate", "strong")}
        self.epochs.append((self._phase, {n: same(self._before[n], after[n])
                                          for n in after}))


def test_alternating_schedule_trains_only_what_it_should():
    task = make_task(pretrain_weak_epochs=3, pretrain_strong_epochs=3, max_turn_epochs=3,
                     turn_patience=2, max_rounds=2, round_patience=5)
    recorder = Recorder()
    trainer(callbacks=[recorder]).fit(task, datamodule=make_dm())
    phases = [phase for phase, _ in recorder.epochs]
    assert phases[0] == "pretrain_weak" and "pretrain_strong" in phases
    assert "weak" in phases and "strong" in phases
    assert phases.index("pretrain_strong") < phases.index("weak") < phases.index("strong")
    for phase, unchanged in recorder.epochs:
        if phase == "pretrain_weak":
            assert unchanged["strong"] and unchanged["gate"] and not unchanged["weak"]
        elif phase == "pretrain_strong":
            assert unchanged["weak"] and unchanged["gate"] and not unchanged["strong"]
        elif phase == "weak":
            assert unchanged["strong"] and not unchanged["weak"] and not unchanged["gate"]
        else:
            assert unchanged["weak"] and unchanged["gate"] and not unchanged["strong"]
    # Frozen parts are in eval mode during training steps (dropout off).
    for phase, weak, gate, strong in recorder.modes:
        if phase in ("weak", "pretrain_weak"):
            assert weak and not strong
        if phase in ("strong", "pretrain_strong"):
            assert strong and not weak and not gate
    # Two rounds at most.
    assert task.schedule.round <= 2 and task.schedule.done


def test_mowst_star_trains_everything_jointly():
    task = make_task("mowst_star", turn_patience=3)
    recorder = Recorder()
    trainer(callbacks=[recorder], max_epochs=5).fit(task, datamodule=make_dm())
    for phase, unchanged in recorder.epochs:
        assert phase == "joint" and not any(unchanged.values())


def attach(task):
    task._trainer = types.SimpleNamespace(should_stop=False, sanity_checking=False)
    task._begin_turn()
    return task


def test_schedule_rolls_back_a_turn_without_gain_and_keeps_a_better_one():
    task = attach(make_task(turn_patience=1, max_rounds=5, round_patience=1, min_delta=0.0))
    net = task.net
    # Weak turn: gains (0.5 > -inf); its best epoch is the first.
    assert task.phase == "weak"
    start = params(net.weak)
    with torch.no_grad():
        net.weak.lins[0].weight.add_(1.0)
    best = params(net.weak)
    task._advance(0.5)                # best epoch of the turn
    with torch.no_grad():
        net.weak.lins[0].weight.add_(1.0)  # a worse epoch
    task._advance(0.4)                # patience 1: the turn ends, best kept
    assert same(params(net.weak), best) and not same(params(net.weak), start)
    assert task.phase == "strong" and task.schedule.best == 0.5
    # Strong turn: no gain over 0.5 -> rolled back to where it began.
    start = params(net.strong)
    with torch.no_grad():
        net.strong.convs[0].lin.weight.add_(1.0)
    task._advance(0.45)
    task._advance(0.45)
    assert same(params(net.strong), start)
    # The round had a gain (the weak turn): training goes on.
    assert task.phase == "weak" and task.schedule.round == 2
    assert not task.trainer.should_stop
    # A round without gain ends training (round_patience=1).
    for _ in range(4):
        task._advance(0.1)
    assert task.schedule.done and task.trainer.should_stop


def test_pretraining_keeps_its_best_epoch_and_moves_on():
    task = attach(make_task(pretrain_weak_epochs=2, turn_patience=5))
    assert task.phase == "pretrain_weak"
    with torch.no_grad():
        task.net.weak.lins[0].weight.add_(1.0)
    best = params(task.net.weak)
    task._advance(0.9)
    with torch.no_grad():
        task.net.weak.lins[0].weight.add_(1.0)
    task._advance(0.5)   # limit of 2 epochs reached
    assert same(params(task.net.weak), best)
    assert task.phase == "weak"
    assert task.schedule.best == -float("inf")  # pre-training sets no Mowst best


def test_loss_of_each_phase():
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    for phase in ("pretrain_weak", "pretrain_strong", "weak", "strong"):
        task = make_task()
        task.schedule.phase = phase
        out = task.net.forward_experts(data.x, data.edge_index)
        y = data.y
        expected = {"pretrain_weak": torch.nn.functional.cross_entropy(out.weak_logits, y),
                    "pretrain_strong": torch.nn.functional.cross_entropy(out.strong_logits, y)
                    }.get(phase, task.net.loss(out, y))
        assert torch.allclose(task._loss(out, y), expected)


def test_metrics_by_formula():
    metric = MowstMetrics("acc", threshold=0.5)
    g = torch.Generator().manual_seed(0)
    out = MowstOutput(torch.randn(20, C, generator=g), torch.randn(20, C, generator=g),
                      torch.randn(20, generator=g), None)
    y = torch.randint(0, C, (20,), generator=g)
    metric.update(MowstOutput(*(t[:10] for t in out[:3]), None), y[:10])
    metric.update(MowstOutput(*(t[10:] for t in out[:3]), None), y[10:])
    values = metric.compute()
    c = torch.sigmoid(out.gate_logit)
    assert values["expected"].item() == pytest.approx(
        expected_accuracy(out.weak_logits, out.strong_logits, c, y).item())
    pick = torch.where((c >= 0.5)[:, None], out.weak_logits, out.strong_logits)
    assert values["tau"].item() == pytest.approx((pick.argmax(-1) == y).float().mean().item())
    assert values["confident"].item() == pytest.approx((c >= 0.5).float().mean().item())
    assert values["weak"].item() == pytest.approx(
        (out.weak_logits.argmax(-1) == y).float().mean().item())


def test_logged_values_and_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = make_task(turn_patience=2, max_rounds=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    tr = trainer(callbacks=[ckpt], enable_checkpointing=True)
    tr.fit(task, datamodule=make_dm())
    logged = tr.callback_metrics
    for key in ("train/loss", "val/acc", "val/acc_tau", "val/acc_weak", "val/acc_strong",
                "val/acc_mixture", "val/confidence", "val/confident", "schedule/round"):
        assert key in logged, key
    saved = torch.load(ckpt.best_model_path, weights_only=False)
    # The gate is checkpointed with the experts, and the schedule too.
    assert any(k.startswith("net.gate.") for k in saved["state_dict"])
    assert any(k.startswith("net.weak.") for k in saved["state_dict"])
    assert "mowst_schedule" in saved
    result = tr.test(task, datamodule=make_dm(), ckpt_path="best", verbose=False)[0]
    assert 0 <= result["test/acc"] <= 1


def test_early_stopping_callback_is_removed():
    from lightning.pytorch.callbacks import EarlyStopping

    tr = trainer(callbacks=[EarlyStopping("val/acc", patience=1)], max_epochs=2)
    with pytest.warns(UserWarning, match="is removed"):
        tr.fit(make_task(), datamodule=make_dm())
    assert not any(isinstance(c, EarlyStopping) for c in tr.callbacks)


def test_isolated_nodes_and_an_empty_val_mask():
    dm = make_dm(avg_degree=0.5)  # many isolated nodes
    tr = trainer(max_epochs=3)
    tr.fit(make_task(), datamodule=dm)
    assert torch.isfinite(tr.callback_metrics["train/loss"])
    dm = make_dm(avg_degree=0.5)
    dm.setup()
    dm.data.val_mask[:] = False  # the schedule has nothing to early-stop on
    with pytest.raises(ValueError, match="'val_mask' of the graph selects no node"):
        trainer(max_epochs=3).fit(make_task(), datamodule=dm)


def test_auroc_metric():
    dm = NodeDataModule("synthetic", metric="auroc", dataset_kwargs={
        "num_nodes": N, "num_classes": 2, "num_features": FEAT})
    torch.manual_seed(0)
    net = Mowst(MLP([FEAT, 8, 2]), GCN(FEAT, 8, 2, 2))
    task = MowstTask(net, **dm.task_kwargs(), optimizer=ADAM,
                     **{**SHORT, "turn_patience": 1, "max_rounds": 1})
    tr = trainer(max_epochs=4)
    tr.fit(task, datamodule=dm)
    for key in ("val/auroc_tau", "val/auroc_weak", "val/auroc_expected"):
        assert 0 <= float(tr.callback_metrics[key]) <= 1
    # the headline: the kept turn's best, or NaN after a roll-back (the
    # weights are then the turn's start, of no measured score)
    headline = float(tr.callback_metrics["val/auroc"])
    if task.turn_log[-1]["kept"]:
        assert 0 <= headline <= 1
    else:
        assert math.isnan(headline)


def test_mini_batches_with_a_neighbor_loader():
    dm = NodeDataModule("synthetic", batch_size=16, num_neighbors=[4, 4], dataset_kwargs={
        "num_nodes": N, "num_classes": C, "num_features": FEAT})
    tr = trainer(max_epochs=2)
    tr.fit(make_task(turn_patience=1), datamodule=dm)
    assert torch.isfinite(tr.callback_metrics["val/acc"])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)},
     ValueError, "does not take a scheduler"),
    ({"turn_patience": 0}, ValueError, "'turn_patience' must be a positive integer"),
    ({"pretrain_weak_epochs": -1}, ValueError, "'pretrain_weak_epochs' must be a non-negative"),
    ({"min_delta": -1.0}, ValueError, "'min_delta' must be non-negative"),
    ({"num_classes": 4}, ValueError, "predicts 3 classes, the data has 4"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_task(**kwargs)


def test_needs_a_mowst_network():
    with pytest.raises(TypeError, match="needs a moegraph.nn.Mowst"):
        MowstTask(GCN(FEAT, 8, 2, C), num_classes=C, optimizer=ADAM)


def test_labels_out_of_range():
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    data.y[data.train_mask.nonzero()[0]] = 7
    task = make_task()
    task._trainer = None
    with pytest.raises(ValueError, match="labels must lie in"):
        task._eval_step(data, "train")


def test_real_cora_beats_the_mlp(real_data, tmp_path):
    root = real_data("Planetoid/Cora")
    dm = NodeDataModule("cora", root=str(root.parent), cache_dir=str(tmp_path / "cache"))
    dm.setup()
    F_, K = dm.num_features, dm.num_classes
    scores = {}
    for name in ("mlp", "mowst_star"):
        L.seed_everything(0)
        if name == "mlp":
            task = NodeClassificationTask(MLP([F_, 64, K], dropout=0.5), K, ADAM)
        else:
            net = Mowst(MLP([F_, 64, K], dropout=0.5), GCN(F_, 64, 2, K, dropout=0.5),
                        variant="mowst_star")
            task = MowstTask(net, K, functools.partial(torch.optim.AdamW, lr=0.01,
                                                         weight_decay=5e-4),
                             **{**SHORT, "turn_patience": 20})
        tr = trainer(max_epochs=100)
        tr.fit(task, datamodule=dm)
        scores[name] = tr.test(task, datamodule=dm, verbose=False)[0]["test/acc"]
    assert scores["mowst_star"] > scores["mlp"] + 0.1, scores
    assert scores["mowst_star"] > 0.75, scores


def test_mowst_star_pretrains_then_trains_jointly():
    task = make_task("mowst_star", pretrain_weak_epochs=2, pretrain_strong_epochs=2,
                     turn_patience=2)
    recorder = Recorder()
    trainer(callbacks=[recorder], max_epochs=12).fit(task, datamodule=make_dm())
    phases = [phase for phase, _ in recorder.epochs]
    assert phases[:4] == ["pretrain_weak"] * 2 + ["pretrain_strong"] * 2
    assert set(phases[4:]) == {"joint"}


# -- the amherst41-style failure, on a small synthetic graph ---------------------------
MEMO_N, MEMO_F, MEMO_C = 300, 64, 3


def memorising_setup(seed):
    r"""A graph on which a node's own features hardly carry its class (signal
    0.15 in 64 noisy dimensions: the MLP fits its training nodes and is near
    chance elsewhere) while its neighbours' do (homophily 0.9, degree 10: a GCN
    is accurate); a gate whose bias starts at +1 (C = 0.73: it trusts the weak
    expert before it has learnt anything, as an unlucky initialisation does)."""
    dm = NodeDataModule("synthetic", dataset_kwargs=dict(
        num_nodes=MEMO_N, num_classes=MEMO_C, num_features=MEMO_F, avg_degree=10,
        homophily=0.9, signal=0.15, train_ratio=0.4, val_ratio=0.3, seed=seed))
    torch.manual_seed(seed)
    net = Mowst(MLP([MEMO_F, 64, MEMO_C], dropout=0.0), GCN(MEMO_F, 32, 2, MEMO_C, dropout=0.5))
    with torch.no_grad():
        net.gate.mlp.lins[-1].bias.fill_(1.0)
    return dm, net


def fit_mowst(seed, **kwargs):
    dm, net = memorising_setup(seed)
    opt = functools.partial(torch.optim.Adam, lr=0.01, weight_decay=5e-4)
    task = MowstTask(net, MEMO_C, opt, pretrain_weak_epochs=60, pretrain_strong_epochs=60,
                     max_turn_epochs=40, turn_patience=10, max_rounds=2, round_patience=1,
                     pretrain_patience=10,
                     **{"crossfit_folds": 0, **kwargs})
    t = trainer(max_epochs=400)
    t.fit(task, datamodule=dm)
    return task, t.test(task, datamodule=dm, verbose=False)[0], dm


def fit_gnn(seed):
    dm, net = memorising_setup(seed)
    opt = functools.partial(torch.optim.Adam, lr=0.01, weight_decay=5e-4)
    task = NodeClassificationTask(net.strong, MEMO_C, opt)
    t = trainer(max_epochs=120)
    t.fit(task, datamodule=dm)
    return t.test(task, datamodule=dm, verbose=False)[0]["test/acc"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_gate_ends_within_noise_of_the_gnn_when_the_weak_expert_memorises(seed):
    gnn = fit_gnn(seed)
    paper, paper_res, dm = fit_mowst(seed, gate_holdout=0.0, select_on="expected")
    fixed, fixed_res, _ = fit_mowst(seed, gate_holdout=0.5, select_on="deterministic")
    data = dm.data
    diag = paper.diagnose(data)["splits"]
    # The setting: the weak expert memorises its training nodes, is near chance elsewhere.
    assert diag["train"]["weak_acc"] > 0.95 and diag["test"]["weak_acc"] < 0.6 < gnn
    # The paper's formulation: both experts fit the training nodes, the gate gets no
    # signal and keeps trusting the useless weak expert on most test nodes.
    assert paper_res["test/confident"] > 0.5
    assert paper_res["test/acc"] < gnn - 0.15
    # Fitted on held-out nodes, the gate learns the weak expert is not to be trusted:
    # Mowst ends within noise of its GNN (binomial std on 90 test nodes: about 3 points).
    noise = (gnn * (1 - gnn) / int(data.test_mask.sum())) ** 0.5
    assert fixed_res["test/acc"] >= gnn - 2 * noise - 0.02
    assert fixed_res["test/checkpoint_mixture"] == 1.0
    held = fixed.diagnose(data)["splits"]
    assert held["train_fitted"]["weak_acc"] > held["train_held_out"]["weak_acc"] + 0.3


# -- bad input and budgets ------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_training_or_validation_mask_raises(split):
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    data[f"{split}_mask"][:] = False
    task = make_task()
    step = task.training_step if split == "train" else task.validation_step
    with pytest.raises(ValueError, match=f"'{split}_mask' of the graph selects no node"):
        step(data, 0)


def test_nan_features_raise_in_the_task():
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    data.x[4, 2] = float("nan")
    with pytest.raises(ValueError, match="'x' holds NaN or infinite features"):
        make_task().validation_step(data, 0)


def test_a_short_budget_scales_the_schedule_so_that_every_part_trains():
    task = make_task(pretrain_weak_epochs=100, pretrain_strong_epochs=100, turn_patience=20)
    assert task.schedule_config.min_epochs() == 240
    with pytest.warns(UserWarning, match="max_epochs=30 is shorter than the schedule"):
        task._fit_schedule_to_budget(30)
    c = task.schedule_config
    assert c.min_epochs() <= 30 and c.pretrain_weak_epochs >= 1 and c.pretrain_strong_epochs >= 1
    assert task.schedule.phase == "pretrain_weak"
    with pytest.raises(ValueError, match="too short for Mowst's schedule"):
        make_task(pretrain_weak_epochs=5, pretrain_strong_epochs=5)._fit_schedule_to_budget(3)
    task = make_task(turn_patience=5)
    task._fit_schedule_to_budget(1000)  # long enough: unchanged
    assert task.schedule_config.turn_patience == 5


def test_short_run_trains_both_experts_and_the_gate_and_tests_a_mixture_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = make_task(pretrain_weak_epochs=100, pretrain_strong_epochs=100, turn_patience=20,
                     gate_holdout=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    t = trainer(max_epochs=12, enable_checkpointing=True, callbacks=[ckpt])
    with pytest.warns(UserWarning, match="shorter than the schedule"):
        t.fit(task, datamodule=make_dm())
    phases = [turn["phase"] for turn in task.turn_log]
    assert phases[:3] == ["pretrain_weak", "pretrain_strong", "weak"]
    result = t.test(task, datamodule=make_dm(), ckpt_path="best", verbose=False)[0]
    assert result["test/checkpoint_mixture"] == 1.0
    assert result["test/checkpoint_phase"] in (2.0, 3.0)  # weak or strong turn
    assert result["test/acc"] == result["test/acc_tau"]  # the headline is deterministic


# -- cross-fitting: the gate learns from out-of-fold predictions ---------------------
def test_crossfit_schedule_pretrains_then_trains_the_gate_alone():
    task = make_task(pretrain_weak_epochs=2, pretrain_strong_epochs=2, max_turn_epochs=3,
                     turn_patience=2, crossfit_folds=2, max_rounds=0)
    rec = Recorder()
    trainer(callbacks=[rec]).fit(task, datamodule=make_dm())
    phases = [p for p, _ in rec.epochs]
    assert phases[:4] == ["pretrain_weak"] * 2 + ["pretrain_strong"] * 2
    assert set(phases[4:]) == {"gate"} and 1 <= len(phases[4:]) <= 3  # then done
    for _, unchanged in rec.epochs[4:]:  # the gate alone learns
        assert unchanged["weak"] and unchanged["strong"] and not unchanged["gate"]
    cf = task.crossfit
    assert cf is not None and [e[:2] for e in cf.epochs] == [
        ("weak", 0), ("weak", 1), ("strong", 0), ("strong", 1)]
    assert all(1 <= e[2] <= 2 for e in cf.epochs)  # the pre-training budgets
    # the gate's turn must beat the GNN alone: its score is the baseline
    assert task.turn_log[-1]["best_before"] == task.turn_log[1]["turn_best"]
    assert task.turn_log[-1]["phase"] == "gate"


def test_gate_turn_learns_only_from_the_out_of_fold_logits():
    r"""A spy: hand-made out-of-fold logits (the weak expert right and sure on
    every training node, the GNN wrong) unlike the final experts' outputs; the
    training loss of the gate's turn is the Mowst loss of those logits, and its
    gradient raises the confidence."""
    from moegraph.nn.mowst import mowst_loss
    from moegraph.tasks.mowst_crossfit import CrossFit

    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    task = make_task(pretrain_weak_epochs=0, pretrain_strong_epochs=0, crossfit_folds=2)
    task.optimizers = lambda: [torch.optim.SGD(task.net.gate.parameters(), lr=0.0)] * 2
    task.manual_backward = lambda loss: loss.backward()
    task.log_loss = lambda *a, **k: None
    assert task.phase == "gate"
    task._begin_turn()
    y = data.y
    weak = torch.nn.functional.one_hot(y, C).float() * 8.0  # right and sure
    strong = torch.nn.functional.one_hot((y + 1) % C, C).float() * 8.0  # wrong
    task.crossfit = CrossFit(weak, strong, torch.zeros(N, dtype=torch.long), [])
    loss = task.training_step(data, 0)
    m = data.train_mask
    gate = task.net.gate_forward(weak, data.x)
    expected = mowst_loss(weak[m], strong[m], torch.sigmoid(gate)[m], y[m])
    torch.testing.assert_close(loss, expected.detach())
    # the final experts' outputs give another loss: they are not what the gate sees
    out = task.net.forward_experts(data.x, data.edge_index)
    other = mowst_loss(out.weak_logits[m], out.strong_logits[m],
                       torch.sigmoid(task.net.gate_forward(out.weak_logits, data.x))[m], y[m])
    assert not torch.allclose(other, expected)
    # the weak expert is right where the GNN is wrong: descent raises C
    bias = task.net.gate.mlp.lins[-1].bias
    assert bias.grad is not None and float(bias.grad) < 0
    assert all(p.grad is None for p in task.net.weak.parameters())
    assert all(p.grad is None for p in task.net.strong.parameters())


def test_gate_turn_trains_a_fresh_gate_and_rolls_back_to_the_gnn():
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    task = make_task(crossfit_folds=2)
    assert task.phase == "gate"
    task._begin_turn()
    confidence = task.net.forward_experts(data.x, data.edge_index).confidence
    assert float((confidence - 0.5).abs().max()) < 0.3  # a fresh gate: about 0.5
    task._load_trained_state(task._turn_start_state)  # a turn rolled back
    confidence = task.net.forward_experts(data.x, data.edge_index).confidence
    assert float(confidence.max()) < 1e-12  # sigmoid(-30): every node to the GNN


def test_a_rolled_back_mowst_star_predicts_as_its_gnn_even_when_the_gnn_is_unsure():
    r"""Mowst* predicts the argmax of ``C p_weak + (1 - C) p_strong``: the
    rolled-back gate must make that the GNN's argmax, also where the GNN's
    softmax is nearly flat (an under-trained GAT on Cora: loss 1.91 for 7
    classes) and a confident MLP disagrees. With the former roll-back logit
    (-4, C = 0.018) the MLP decides such nodes."""
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    task = make_task("mowst_star", crossfit_folds=2)
    net = task.net
    task._begin_turn()
    task._load_trained_state(task._turn_start_state)  # the gate's turn rolled back
    net.eval()
    with torch.no_grad():
        for param in net.strong.convs[-1].parameters():  # unsure: its logits * 1e-3
            param.mul_(1e-3)
        out = net.forward_experts(data.x, data.edge_index)
        strong = out.strong_logits.argmax(-1)
        weak = out.weak_logits.argmax(-1)
        assert float(out.strong_logits.softmax(-1).max()) < 0.4  # flat
        assert bool((weak != strong).any())  # the MLP disagrees somewhere
        # Mowst*'s prediction (forward: the mixture's log-probabilities) and Mowst's
        mixed = net(data.x, data.edge_index).logits.argmax(-1)
        torch.testing.assert_close(mixed, strong, rtol=0, atol=0)
        torch.testing.assert_close(net.predict(data.x, data.edge_index).probs.argmax(-1),
                                   strong, rtol=0, atol=0)
        # the former roll-back state would have let the MLP decide some nodes
        old = mixture_log_probs(out.weak_logits, out.strong_logits,
                                torch.full_like(out.gate_logit, -4.0)).argmax(-1)
        assert bool((old != strong).any())


def test_crossfit_is_refused_with_a_fixed_gate_and_one_fold():
    net = Mowst(MLP([FEAT, 8, C]), GCN(FEAT, 8, 2, C), gate_type="entropy")
    with pytest.raises(ValueError, match="'crossfit_folds' needs gate_type='mlp'"):
        MowstTask(net, C, ADAM, crossfit_folds=2)
    with pytest.raises(ValueError, match="'crossfit_folds' must be 0 .* or an integer of "
                                         "at least 2"):
        make_task(crossfit_folds=1)
    with pytest.raises(ValueError, match="'max_rounds' must be a positive integer"):
        make_task(crossfit_folds=0, max_rounds=0)


def test_short_run_with_crossfit_trains_the_gate_and_tests_a_mixture(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = make_task(pretrain_weak_epochs=100, pretrain_strong_epochs=100, turn_patience=20,
                     crossfit_folds=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    t = trainer(max_epochs=12, enable_checkpointing=True, callbacks=[ckpt])
    with pytest.warns(UserWarning, match="shorter than the schedule"):
        t.fit(task, datamodule=make_dm())
    phases = [turn["phase"] for turn in task.turn_log]
    assert phases[:3] == ["pretrain_weak", "pretrain_strong", "gate"]
    assert task.crossfit is not None
    result = t.test(task, datamodule=make_dm(), ckpt_path="best", verbose=False)[0]
    assert result["test/checkpoint_mixture"] == 1.0
    assert result["test/acc"] == result["test/acc_tau"]


def test_config_restates_the_code_defaults():
    r"""The schedule's settings in ``conf/model/mowst.yaml`` are MowstTask's
    defaults (one place decides them; the config lists them for overrides)."""
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "model" / "mowst.yaml")
    defaults = {k: p.default for k, p in inspect.signature(MowstTask).parameters.items()
                if p.default is not inspect.Parameter.empty}
    listed = [k for k in conf if k in defaults]
    assert {"pretrain_weak_epochs", "turn_patience", "crossfit_folds", "max_rounds"} <= set(
        listed)
    for key in listed:
        assert conf[key] == defaults[key], key
    schedule = ScheduleConfig()  # the schedule's own defaults: the same
    for f in dataclasses.fields(schedule):
        if f.name == "gate_turn":
            assert schedule.gate_turn == (defaults["crossfit_folds"] > 0)
        elif f.name != "joint":
            assert getattr(schedule, f.name) == defaults[f.name], f.name


def fit_crossfit(seed, **kwargs):
    dm, net = memorising_setup(seed)
    opt = functools.partial(torch.optim.Adam, lr=0.01, weight_decay=5e-4)
    task = MowstTask(net, MEMO_C, opt, pretrain_weak_epochs=60, pretrain_strong_epochs=60,
                     max_turn_epochs=40, turn_patience=10, crossfit_folds=2, max_rounds=0,
                     pretrain_patience=10,
                     **kwargs)
    t = trainer(max_epochs=400)
    t.fit(task, datamodule=dm)
    return task, t.test(task, datamodule=dm, verbose=False)[0], dm


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_crossfit_ends_within_noise_of_the_gnn_when_the_weak_expert_memorises(seed):
    r"""The amherst41-style failure on a small graph: the weak expert fits its
    training nodes and is near chance elsewhere. With the gate fitted on
    out-of-fold predictions, Mowst ends within noise of its GNN, and the weak
    expert keeps few test nodes."""
    gnn = fit_gnn(seed)
    task, res, dm = fit_crossfit(seed)
    data = dm.data
    diag = task.diagnose(data)["splits"]
    assert diag["train"]["weak_acc"] > diag["test"]["weak_acc"] + 0.3
    assert diag["test"]["weak_acc"] < 0.6 < gnn
    # the out-of-fold weak expert is as poor as on test nodes: the gate sees it
    assert diag["train_out_of_fold"]["weak_acc"] < 0.6
    noise = (gnn * (1 - gnn) / int(data.test_mask.sum())) ** 0.5
    assert res["test/acc"] >= gnn - 2 * noise - 0.02
    assert res["test/confident"] < 0.2 and res["test/checkpoint_mixture"] == 1.0


def test_a_rolled_back_gate_turn_tests_mowst_as_its_gnn(tmp_path):
    r"""A gate turn that cannot beat the GNN (the baseline is set above any
    score) is rolled back; the tested checkpoint is the rolled-back state
    (every node to the GNN), not an epoch of the turn."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = make_task(pretrain_weak_epochs=2, pretrain_strong_epochs=2, max_turn_epochs=3,
                     turn_patience=2, crossfit_folds=2, max_rounds=0)
    advance = task._advance

    def spy(score, tiebreak=float("-inf")):  # the GNN alone "scored" 0.99
        if task.phase == "gate" and task.schedule.best < 0.99:
            task.schedule.set_baseline(0.99)
        return advance(score, tiebreak)

    task._advance = spy
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    t = trainer(enable_checkpointing=True, callbacks=[ckpt])
    t.fit(task, datamodule=make_dm())
    assert task.turn_log[-1]["phase"] == "gate" and not task.turn_log[-1]["kept"]
    assert float(ckpt.best_model_score) == pytest.approx(0.99)
    result = t.test(task, datamodule=make_dm(), ckpt_path="best", verbose=False)[0]
    assert result["test/confident"] == 0.0
    assert result["test/acc"] == result["test/acc_strong"]


@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
def test_fit_does_not_warn_of_frozen_parts_in_eval_mode(variant):
    # Lightning's fit loop warns of modules in eval mode when it starts; the
    # schedule's freeze (pre-training: the other expert and the gate frozen)
    # is intended, and applied from the first epoch on, not before.
    task = make_task(variant, pretrain_weak_epochs=2, pretrain_strong_epochs=2,
                     turn_patience=2, max_rounds=1)
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[recorder], max_epochs=6).fit(task, datamodule=make_dm())
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    # the freeze itself still holds in every step of pre-training
    assert ("pretrain_weak", True, False, False) in recorder.modes
    assert ("pretrain_strong", False, False, True) in recorder.modes
