r"""Resuming from a checkpoint taken in the middle of an epoch: the run goes on
with the same batches, parameters and logged metrics as an uninterrupted one
(the mini-batch loader, the task's epoch metrics and Mowst's turn are
checkpointed)."""
import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch_geometric.nn.models import MLP, GraphSAGE

from moegraph.data import NodeDataModule
from moegraph.nn import Mowst
from moegraph.nn.models import MoEGNN
from moegraph.tasks import MowstTask, NodeClassificationTask

pytestmark = pytest.mark.filterwarnings("ignore:MowstTask early-stops each turn itself")
FEAT, C = 8, 3
ADAM = functools.partial(torch.optim.Adam, lr=0.02)


class EpochMetrics(L.Callback):
    r"""The logged metrics of each epoch (read when the next begins: the task's
    own epoch-end hooks run after the callbacks'), and the seeds of each
    training batch."""

    def __init__(self):
        self.epochs, self.seeds = {}, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seeds.append((trainer.current_epoch, batch_idx, batch.n_id[:batch.batch_size]))

    def _record(self, trainer, epoch):
        self.epochs[epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_epoch_start(self, trainer, module):
        self._record(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer, module):
        self._record(trainer, trainer.current_epoch - 1)


def make_task(model):
    torch.manual_seed(0)
    if model == "moe_gnn":
        net = MoEGNN(FEAT, 16, C, num_layers=2, conv="sage", num_experts=4, k=2,
                     ffn_hidden_channels=16, dropout=0.0)
        return NodeClassificationTask(net, num_classes=C, optimizer=ADAM,
                                      aux_loss_weights={"load_balance": 0.1})
    net = Mowst(MLP([FEAT, 16, C], dropout=0.0, norm=None), GraphSAGE(FEAT, 16, 2, C, dropout=0.0))
    # turns of 2 epochs: a checkpoint in the middle of the second epoch of a turn
    return MowstTask(net, num_classes=C, optimizer=ADAM, turn_patience=2, max_turn_epochs=2,
                     min_delta=0.0, pretrain_weak_epochs=0, pretrain_strong_epochs=0,
                     crossfit_folds=0, max_rounds=10)


def fit(tmp_path, model, ckpt_path=None, epochs=3):
    L.seed_everything(0)
    dm = NodeDataModule("synthetic", batch_size=16, num_neighbors=[4, -1], dataset_kwargs=dict(
        num_nodes=200, num_classes=C, num_features=FEAT, seed=1))  # 100 seeds: 7 batches
    task = make_task(model)
    record = EpochMetrics()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}",
                                  every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[record, checkpoints])
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task, record


@pytest.mark.parametrize("model", ["moe_gnn", "mowst"])
def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path, model):
    full, full_record = fit(tmp_path / "full", model)
    # step 9 = after batch 1 of epoch 1 (7 batches per epoch); Mowst is then
    # in the second epoch of its first turn
    ckpt = tmp_path / "full" / "epoch=1-step=9.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2
    resumed, record = fit(tmp_path / "resumed", model, ckpt_path=str(ckpt))

    # the resumed run saw the rest of epoch 1 (batches 2..6), in the same order
    later = [s for s in full_record.seeds if (s[0], s[1]) >= (1, 2)]
    assert [(e, b) for e, b, _ in record.seeds] == [(e, b) for e, b, _ in later]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(record.seeds, later, strict=True))
    for key, value in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, msg=key)
    for epoch in (1, 2):
        expected, got = full_record.epochs[epoch], record.epochs[epoch]
        for key in ("train/acc", "val/acc", "val/loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (epoch, key)
    if model == "mowst":
        assert resumed.schedule == full.schedule
