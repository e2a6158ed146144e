r"""Tests of moegraph.tasks.NodeClassificationTask.

The step methods are called directly (no Trainer: Lightning then skips
``self.log`` with a warning, filtered below); the logged values are checked
through one ``fast_dev_run``.
"""
import copy
import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Data
from torch_geometric.nn.models import GCN

from moegraph.data import NodeDataModule, csbm_graph
from moegraph.nn import ModelOutput
from moegraph.nn.models import MoEGNN
from moegraph.tasks import NodeClassificationTask

pytestmark = pytest.mark.filterwarnings(
    r"ignore:You are trying to `self.log\(\)` but the `self.trainer` reference:UserWarning")

N, FEAT, C = 40, 5, 3
WEIGHTS = {"load_balance": 0.1, "z_loss": 0.01, "importance": 0.5}
ADAM = functools.partial(torch.optim.Adam, lr=0.05)


def make_data(**kwargs):
    return csbm_graph(**{"num_nodes": N, "num_classes": C, "num_features": FEAT, **kwargs})


def make_net(**kwargs):
    torch.manual_seed(0)
    return MoEGNN(FEAT, 8, C, num_experts=4, k=2, dropout=0.0, **kwargs)


def make_task(net=None, **kwargs):
    kwargs = {"num_classes": C, "optimizer": ADAM, "aux_loss_weights": WEIGHTS, **kwargs}
    return NodeClassificationTask(make_net() if net is None else net, **kwargs)


def test_training_step_loss_by_hand():
    data, task = make_data(), make_task().train()
    out = task.net(data.x, data.edge_index)
    mask = data.train_mask
    expected = F.cross_entropy(out.logits[mask], data.y[mask])
    for name, weight in WEIGHTS.items():
        expected = expected + weight * out.aux_loss[name]
    loss = task.training_step(data, 0)
    assert loss.dim() == 0 and loss.requires_grad
    assert torch.allclose(loss, expected)
    # The aux losses do change the loss: they are live in training.
    assert not torch.allclose(loss, F.cross_entropy(out.logits[mask], data.y[mask]))


def test_weights_of_losses_the_model_does_not_return_are_ignored():
    data = make_data()
    task = make_task(aux_loss_weights={"entropy": 3.0, "z_loss": 0.5}).train()
    out = task.net(data.x, data.edge_index)  # top-k: no entropy loss
    assert "entropy" not in out.aux_loss
    mask = data.train_mask
    expected = F.cross_entropy(out.logits[mask], data.y[mask]) + 0.5 * out.aux_loss["z_loss"]
    assert torch.allclose(task.training_step(data, 0), expected)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_steps_are_plain_cross_entropy(split):
    data, task = make_data(), make_task().eval()
    with torch.no_grad():
        logits = task.net(data.x, data.edge_index).logits
        mask = data[f"{split}_mask"]
        step = task.validation_step if split == "val" else task.test_step
        loss = step(data, 0)
    assert torch.allclose(loss, F.cross_entropy(logits[mask], data.y[mask]))


def test_zero_weights_are_dropped():
    task = make_task(aux_loss_weights={"load_balance": 0.0, "z_loss": 1})
    assert task.aux_loss_weights == {"z_loss": 1.0}
    assert make_task(aux_loss_weights=None).aux_loss_weights == {}


def test_unknown_aux_loss_name():
    with pytest.raises(ValueError, match=r"unknown auxiliary loss\(es\) \['balance'\] in "
                                         r"'aux_loss_weights'; known: \['load_balance', "):
        make_task(aux_loss_weights={"balance": 0.1, "z_loss": 0.1})


@pytest.mark.parametrize("num_classes", [1, 0])
def test_too_few_classes(num_classes):
    with pytest.raises(ValueError, match=rf"'num_classes' must be at least 2 \(got "
                                         rf"{num_classes}\)"):
        make_task(num_classes=num_classes)


@pytest.mark.parametrize("bad,expected", [(C, rf"\[0, {C}\]"), (-1, rf"\[-1, {C - 1}\]")])
def test_labels_out_of_range(bad, expected):
    data = make_data()
    node = int(data.train_mask.nonzero()[0])
    data.y[node] = bad
    task = make_task()
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C - 1}\] \(got {expected}\)"):
        task.training_step(data, 0)
    # A bad label outside the split being evaluated is not looked at.
    assert torch.isfinite(task.validation_step(data, 0))


def test_empty_mask_gives_a_finite_zero_loss():
    data = make_data()
    data.val_mask[:] = False
    task = make_task()
    loss = task.validation_step(data, 0)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0


def test_empty_training_mask_raises():
    data = make_data()
    data.train_mask[:] = False
    with pytest.raises(ValueError, match="'train_mask' of the graph selects no node"):
        make_task().training_step(data, 0)


def test_plain_tensor_net():
    torch.manual_seed(0)
    net = GCN(FEAT, 8, num_layers=2, out_channels=C)
    data, task = make_data(), make_task(net)
    out = task(data)
    assert isinstance(out, ModelOutput)
    assert out.aux_loss == {} and out.routing == ()
    expected = F.cross_entropy(out.logits[data.train_mask], data.y[data.train_mask])
    assert torch.allclose(task.training_step(data, 0), expected)


def test_net_with_a_bad_return_type():
    class Bad(torch.nn.Module):
        def forward(self, x, edge_index):
            return x, edge_index

    with pytest.raises(TypeError, match="must return a Tensor or a ModelOutput"):
        make_task(Bad()).training_step(make_data(), 0)


def test_predict_step():
    data, task = make_data(), make_task().eval()
    out = task.predict_step(data, 0)
    assert isinstance(out, ModelOutput) and out.logits.shape == (N, C)
    assert len(out.routing) == 2


def test_configure_optimizers():
    task = make_task()
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.05
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len(list(task.parameters())) > 0
    assert {id(p) for p in params} == {id(p) for p in task.net.parameters()}


def test_configure_optimizers_with_scheduler():
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5, gamma=0.5)
    conf = make_task(scheduler=scheduler).configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.Adam)
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["lr_scheduler"]["scheduler"].optimizer is conf["optimizer"]
    assert conf["lr_scheduler"]["monitor"] == "val/loss"


def test_hyperparameters_exclude_the_net():
    task = make_task()
    assert task.hparams["num_classes"] == C
    assert dict(task.hparams["aux_loss_weights"]) == WEIGHTS
    assert "net" not in task.hparams and "optimizer" not in task.hparams


def fast_dev_run(task, data):
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    dm = NodeDataModule()
    dm.data = data
    trainer.fit(task, datamodule=dm)
    return trainer, dm


def test_logged_values_in_a_trainer():
    data = make_data()
    task = make_task()
    before = copy.deepcopy(task.net).train()  # the net of the one training step
    out = before(data.x, data.edge_index)
    trainer, dm = fast_dev_run(task, data)
    metrics = trainer.callback_metrics
    mask = data.train_mask
    ce = F.cross_entropy(out.logits[mask], data.y[mask])
    aux = sum(w * out.aux_loss[name] for name, w in WEIGHTS.items())
    assert torch.allclose(metrics["train/loss"], ce.detach())
    assert torch.allclose(metrics["train/aux_loss"], aux.detach())
    for name, value in out.aux_loss.items():
        assert torch.allclose(metrics[f"train/aux/{name}"], value.detach()), name
    acc = (out.logits[mask].argmax(-1) == data.y[mask]).float().mean()
    assert torch.allclose(metrics["train/acc"], acc)
    assert {"val/loss", "val/acc"} <= set(metrics)
    result = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert set(result) == {"test/loss", "test/acc"} and 0.0 <= result["test/acc"] <= 1.0


def test_empty_val_mask_in_a_trainer():
    data = make_data()
    data.val_mask[:] = False
    trainer, _ = fast_dev_run(make_task(), data)
    assert float(trainer.callback_metrics["val/loss"]) == 0.0
    assert "val/acc" not in trainer.callback_metrics


def test_training_reduces_the_loss():
    data = Data(**dict(make_data(num_nodes=200)))
    task = make_task()
    optimizer = task.configure_optimizers()
    first = float(task.training_step(data, 0).detach())
    for _ in range(30):
        optimizer.zero_grad()
        task.training_step(data, 0).backward()
        optimizer.step()
    assert float(task.training_step(data, 0).detach()) < 0.7 * first


# -- multi-label (ogbn-proteins) ----------------------------------------------------------
def test_multilabel_loss_is_bce_over_the_labelled_entries():
    from moegraph.tasks.common import multilabel_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, 4.0]])
    y = torch.tensor([[1, 0, -1], [0, -1, 1]])  # -1: unlabelled
    by_hand = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))
                + math.log(1 - 1 / (1 + math.exp(0.3))) + math.log(1 / (1 + math.exp(-4.0)))) / 4
    assert float(multilabel_loss(logits, y)) == pytest.approx(by_hand, rel=1e-6)
    nan_y = y.float().masked_fill(y < 0, float("nan"))  # ogb's float labels with NaN
    assert float(multilabel_loss(logits, nan_y)) == pytest.approx(by_hand, rel=1e-6)
    none = multilabel_loss(logits.requires_grad_(), torch.full_like(y, -1))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_multilabel_task_step_and_metrics():
    from moegraph.tasks.metrics import make_metrics

    T = 4
    g = torch.Generator().manual_seed(0)
    data = Data(x=torch.randn(20, 4, generator=g), edge_index=torch.zeros(2, 0).long(),
                y=torch.randint(0, 2, (20, T), generator=g))
    data.y[:, 3] = 0  # a task without positives: left out of the mean (as ogb does)
    data.train_mask = torch.ones(20, dtype=torch.bool)
    task = NodeClassificationTask(GCN(4, 8, 1, T), T, ADAM, metric="auroc", multilabel=True)
    loss = task.training_step(data, 0)
    logits = task.net(data.x, data.edge_index)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.y.float())
    assert float(loss) == pytest.approx(float(bce), rel=1e-6)
    # the task's mean ROC-AUC: each task's by pairs, averaged over those with both classes
    auroc = float(task.train_metrics["auroc"].compute())
    per_task = []
    for t in range(T - 1):
        s, y = logits[:, t].detach(), data.y[:, t]
        diff = s[y == 1][:, None] - s[y == 0][None, :]
        per_task.append(float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()))
    assert auroc == pytest.approx(sum(per_task) / (T - 1), abs=1e-6)
    with pytest.raises(ValueError, match=r"multilabel: labels must be \[N, 4\]"):
        task._check_labels(data.y[:, :2])
    with pytest.raises(ValueError, match="multilabel: labels must be 0 or 1"):
        task._check_labels(data.y * 2)
    single = NodeClassificationTask(GCN(4, 8, 1, T), T, ADAM)
    with pytest.raises(ValueError, match="multi-label data: multilabel=True"):
        single._check_labels(data.y)
    assert list(make_metrics("acc", T, multilabel=True)) == ["acc"]


def test_param_groups_give_a_submodule_its_own_optimizer_options():
    task = make_task(param_groups=[{"params": "net.convs.0", "lr": 0.5}])
    opt = task.configure_optimizers()
    first = list(task.net.convs[0].parameters())
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.5]  # ADAM's, then the group's
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in first}
    assert (sum(len(g["params"]) for g in opt.param_groups)
            == len(list(task.parameters())))  # every parameter once
    assert task.hparams.param_groups == [{"params": "net.convs.0", "lr": 0.5}]
    with pytest.raises(ValueError, match="'net.gate' takes no parameter"):
        make_task(param_groups=[{"params": "net.gate", "lr": 0.5}])


# expert_weight_decay ##########################################################


def make_gmoe(**kwargs):
    from moegraph.nn.models import GMoE

    torch.manual_seed(0)
    return GMoE(FEAT, 8, C, num_experts=4, k=1, dropout=0.0, expert_init="shared",
                router_kwargs={"noisy": True, "straight_through": True}, **kwargs)


@pytest.mark.parametrize("opt_cls,kwargs,scaled", [
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.2), True),
    (torch.optim.Adam, dict(lr=0.1, weight_decay=0.2), True),
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.2), False),
    (torch.optim.Adam, dict(lr=0.1, weight_decay=0.2, decoupled_weight_decay=True), False),
])
def test_expert_weight_decay_load_share_groups(opt_cls, kwargs, scaled):
    r"""``load_share``: the experts of each hop-expert layer in their own
    group, decay 0.2 x k / E = 0.05 under a coupled decay, 0.2 under a
    decoupled one; every other parameter (routers) at 0.2; each parameter in
    exactly one group."""
    net = make_gmoe()
    task = make_task(net, optimizer=functools.partial(opt_cls, **kwargs),
                     expert_weight_decay="load_share")
    opt = task.configure_optimizers()
    groups = opt.param_groups
    assert len(groups) == 1 + len(net.convs)
    assert groups[0]["weight_decay"] == 0.2
    for group, conv in zip(groups[1:], net.convs, strict=True):
        assert {id(p) for p in group["params"]} == {id(p) for p in conv.experts.parameters()}
        assert group["weight_decay"] == pytest.approx(0.05 if scaled else 0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    # off: one group, as before
    plain = make_task(make_gmoe(), optimizer=functools.partial(opt_cls, **kwargs))
    assert len(plain.configure_optimizers().param_groups) == 1


def test_expert_weight_decay_load_share_sgd_step_by_hand():
    r"""One SGD step (lr 0.5, coupled decay 0.2) with no data gradient:
    ``w <- w - lr * wd * w`` for routers, ``w - lr * wd * k / E * w`` for the
    experts (k=2, E=4 here), computed by hand from the old values."""
    from moegraph.nn.models import GMoE

    torch.manual_seed(0)
    net = GMoE(FEAT, 8, C, num_experts=4, k=2, dropout=0.0)
    task = make_task(net, optimizer=functools.partial(torch.optim.SGD, lr=0.5, weight_decay=0.2),
                     expert_weight_decay="load_share")
    opt = task.configure_optimizers()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        wd = 0.2 * (2 / 4 if ".experts." in name else 1.0)
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * wd))


@pytest.mark.parametrize("opt_cls,kwargs,scaled", [
    (torch.optim.Adam, dict(lr=0.1, weight_decay=0.2), True),
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.2), False),
])
def test_expert_weight_decay_load_share_sparse_moe(opt_cls, kwargs, scaled):
    r"""``load_share`` on MoE-GNN's sparse MoE blocks: each block's routed
    experts in their own group at 0.2 x k / E (k=2, E=4: 0.1) under a
    coupled decay; routers, shared experts, convolutions at 0.2."""
    torch.manual_seed(0)
    net = MoEGNN(FEAT, 8, C, num_layers=3, num_experts=4, k=2, dropout=0.0,
                 moe_kwargs={"num_shared_experts": 1})
    opt = make_task(net, optimizer=functools.partial(opt_cls, **kwargs),
                    expert_weight_decay="load_share").configure_optimizers()
    groups = opt.param_groups
    assert len(groups) == 1 + 3
    assert groups[0]["weight_decay"] == 0.2
    for group, ffn in zip(groups[1:], net.ffns, strict=True):
        assert {id(p) for p in group["params"]} == {id(ffn.experts.weight1),
                                                    id(ffn.experts.weight2),
                                                    id(ffn.experts.bias1),
                                                    id(ffn.experts.bias2)}
        assert group["weight_decay"] == pytest.approx(0.1 if scaled else 0.2)
    rest = {id(p) for p in groups[0]["params"]}
    for ffn in net.ffns:
        assert id(ffn.router.weight) in rest
        assert {id(p) for p in ffn.shared.parameters()} <= rest
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(
        id(p) for p in net.parameters())


def test_expert_weight_decay_covers_gat_attention():
    from moegraph.nn.models import GMoE

    torch.manual_seed(0)
    net = GMoE(FEAT, 8, C, num_experts=4, k=1, conv="gat", dropout=0.0)
    opt = make_task(net, optimizer=functools.partial(torch.optim.Adam, weight_decay=0.1),
                    expert_weight_decay="load_share").configure_optimizers()
    expert_ids = {id(p) for g in opt.param_groups[1:] for p in g["params"]}
    for conv in net.convs:
        assert {id(conv.att_src), id(conv.att_dst)} <= expert_ids
        assert id(conv.router.weight) not in expert_ids


def test_expert_weight_decay_bad_input():
    from moegraph.nn.models import GMoE
    from moegraph.tasks.common import make_optimizer

    with pytest.raises(ValueError, match="'expert_weight_decay' must be None or one of"):
        make_task(make_gmoe(), expert_weight_decay="share")
    with pytest.raises(ValueError, match="has none"):  # no routed experts
        make_task(make_net(ffn="dense"), expert_weight_decay="load_share")
    torch.manual_seed(0)
    topp = MoEGNN(FEAT, 8, C, num_experts=4, dropout=0.0, moe_kwargs={"router": "topp"})
    with pytest.raises(ValueError, match="needs top-k routers"):
        make_task(topp, expert_weight_decay="load_share")
    torch.manual_seed(0)
    ec = GMoE(FEAT, 8, C, num_experts=4, router="expert_choice", dropout=0.0)
    with pytest.raises(ValueError, match="needs top-k routers"):
        make_task(ec, expert_weight_decay="load_share")
    task = make_task(make_gmoe(), optimizer=functools.partial(torch.optim.Rprop),
                     expert_weight_decay="load_share")
    with pytest.raises(ValueError, match="no weight decay to scale"):
        task.configure_optimizers()
    with pytest.raises(TypeError, match="needs the module"):
        make_optimizer(ADAM, list(make_gmoe().parameters()), "load_share")
    with pytest.raises(ValueError, match="'expert_weight_decay' must be None"):
        make_optimizer(ADAM, make_gmoe(), "all")
    with pytest.raises(ValueError, match="not both"):
        NodeClassificationTask(make_gmoe(), C, ADAM, expert_weight_decay="load_share",
                               param_groups=[{"params": "net.convs.0", "lr": 0.5}])
