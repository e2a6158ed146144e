r"""Checkpoints of ``moegraph-train``: exact resume (random states included),
self-contained loading, ``moegraph-eval`` / predictions, the metrics of the
tested checkpoint, and clear errors for bad checkpoints and settings."""
import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import open_dict

from moegraph.checkpoint import RunCheckpoint, load_checkpoint
from moegraph.data import NodeDataModule
from moegraph.eval import evaluate, load_task
from moegraph.nn.models import MoEGNN
from moegraph.tasks import MowstTask, NodeClassificationTask
from moegraph.train import CONFIG_DIR, train

# pytest-xdist (make test): one worker runs this module, its module-scoped
# fixture is built once.
pytestmark = pytest.mark.xdist_group("trained_runs")

TINY = "data.dataset_kwargs.num_nodes=200"
QUIET = ["~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false",
         "+trainer.enable_model_summary=false", "logger=none"]


def compose_eval(output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# -- resume ------------------------------------------------------------------------------
def every_epoch(compose_cfg, *overrides):
    return compose_cfg(TINY, "model=gnn", "backbone.dropout=0.5", "trainer.max_epochs=4",
                       "++callbacks.model_checkpoint.save_top_k=-1",
                       *QUIET, *overrides)


def test_resume_with_dropout_equals_the_uninterrupted_run(compose_cfg, tmp_path):
    full = every_epoch(compose_cfg)
    train(full)
    first = tmp_path / "checkpoints"
    uninterrupted = state(first / "last.ckpt")
    (first / "last.ckpt").rename(tmp_path / "uninterrupted.ckpt")
    resume_from = first / "epoch_001.ckpt"
    saved = torch.load(resume_from, weights_only=True)
    assert saved["epoch"] == 1 and saved["moegraph"]["mid_epoch"] is False

    train(every_epoch(compose_cfg, f"ckpt_path={resume_from}"))
    assert_same_weights(state(first / "last.ckpt"), uninterrupted)

    # Without the random states the resumed run draws other dropout masks:
    # what makes the equality above a test of their restoring.
    del saved["moegraph"]["random_states"]
    torch.save(saved, tmp_path / "no_rng.ckpt")
    train(every_epoch(compose_cfg, f"ckpt_path={tmp_path / 'no_rng.ckpt'}"))
    differs = state(first / "last.ckpt")
    assert any(not torch.equal(differs[k], uninterrupted[k]) for k in uninterrupted)


def fit_minibatch(tmp_path, ckpt_path=None):
    L.seed_everything(0)
    dm = NodeDataModule("synthetic", batch_size=16, num_neighbors=[4, -1], dataset_kwargs=dict(
        num_nodes=200, num_classes=3, num_features=8, seed=1))  # 100 seeds: 7 batches
    net = MoEGNN(8, 16, 3, num_layers=2, conv="sage", num_experts=4, k=2,
                 ffn_hidden_channels=16, dropout=0.5)
    task = NodeClassificationTask(net, num_classes=3,
                                  optimizer=functools.partial(torch.optim.Adam, lr=0.02))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}",
                                  every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints, RunCheckpoint()])
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task.state_dict()


def test_resume_mid_epoch_with_dropout_equals_the_uninterrupted_run(tmp_path):
    full = fit_minibatch(tmp_path / "full")
    ckpt = tmp_path / "full" / "epoch=1-step=9.ckpt"  # after batch 1 of epoch 1
    assert torch.load(ckpt, weights_only=True)["moegraph"]["mid_epoch"] is True
    resumed = fit_minibatch(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert_same_weights(resumed, full)


# -- self-contained checkpoints, eval, predict, metrics of the tested model --------------
@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    r"""Two short runs (MoE GNN, Mowst) whose checkpoints the tests below read."""
    from hydra.core.hydra_config import HydraConfig

    runs = {}
    for name, model in (("moe_gnn", ["model=moe_gnn"]),
                        ("mowst", ["model=mowst", "model.pretrain_weak_epochs=2",
                                   "model.pretrain_strong_epochs=2", "model.max_turn_epochs=2"])):
        out = tmp_path_factory.mktemp(name)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[TINY, "trainer.max_epochs=6", *QUIET[:3],
                                              "logger=csv", *model], return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        HydraConfig.instance().set_config(cfg)
        metrics = train(cfg)
        HydraConfig.instance().cfg = None
        (best,) = (out / "checkpoints").glob("epoch_*.ckpt")
        runs[name] = (out, metrics, best)
    return runs


def logged_val(out, epoch, key):
    (log,) = (out / "csv").glob("version_*/metrics.csv")
    with open(log) as f:
        rows = [r for r in csv.DictReader(f) if r.get(key) and r.get("epoch") == str(epoch)]
    return float(rows[0][key])


@pytest.mark.parametrize("name", ["moe_gnn", "mowst"])
def test_reported_val_metrics_are_those_of_the_tested_checkpoint(trained_runs, name):
    out, metrics, best = trained_runs[name]
    epoch = torch.load(best, weights_only=True)["epoch"]
    assert metrics["best/epoch"] == epoch
    # the val/acc logged during fit at the best checkpoint's epoch, not the last epoch's
    assert metrics["val/acc"] == pytest.approx(logged_val(out, epoch, "val/acc"), abs=1e-6)
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    assert saved["val/acc"] == metrics["val/acc"]


@pytest.mark.parametrize("name,task_class", [("moe_gnn", NodeClassificationTask),
                                             ("mowst", MowstTask)])
def test_load_from_checkpoint_needs_no_other_argument(trained_runs, name, task_class):
    out, _, best = trained_runs[name]
    task = task_class.load_from_checkpoint(best)
    assert type(task) is task_class
    assert_same_weights(task.state_dict(), state(best))
    # and it predicts: the same logits as the network loaded by hand
    dm = NodeDataModule("synthetic", dataset_kwargs=dict(num_nodes=200))
    dm.setup()
    task.eval()
    again = load_task(str(best))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(dm.data).logits, again(dm.data).logits)


@pytest.mark.parametrize("name", ["moe_gnn", "mowst"])
def test_eval_reproduces_the_test_metrics_of_the_run(trained_runs, tmp_path, name):
    _, metrics, best = trained_runs[name]
    got = evaluate(compose_eval(tmp_path, f"ckpt_path={best}", *QUIET[1:3]))
    for key in ("test/acc", "val/acc"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert got["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(got) and saved["ckpt_path"] == str(best)
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.parametrize("name", ["moe_gnn", "mowst"])
def test_predictions_one_row_per_node(trained_runs, tmp_path, name):
    _, metrics, best = trained_runs[name]
    evaluate(compose_eval(tmp_path, f"ckpt_path={best}", "+predict=true", "evaluate=false"))
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and [int(r["node"]) for r in rows] == list(range(200))
    classes = sorted(k for k in rows[0] if k.startswith("prob_"))
    assert len(classes) == 4  # the synthetic graph's default class count
    for r in rows:
        probs = [float(r[c]) for c in classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert int(r["pred"]) == max(range(len(probs)), key=probs.__getitem__)
    test_rows = [r for r in rows if r["split"] == "test"]
    acc = sum(r["pred"] == r["y"] for r in test_rows) / len(test_rows)
    if name == "moe_gnn":  # argmax of the logits is the accuracy's prediction
        assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)
        # one MoE block (between the two convolutions of the plain stack)
        assert {"layer0_expert", "layer0_expert_prob"} <= rows[0].keys()
        assert "layer1_expert" not in rows[0]
        assert all(0 <= int(r["layer0_expert"]) < 8 for r in rows)
    else:
        assert all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    assert not (tmp_path / "metrics.json").exists()


def test_moegraph_predict_entry_point(trained_runs, tmp_path, monkeypatch):
    from moegraph.eval import predict_main

    _, _, best = trained_runs["moe_gnn"]
    monkeypatch.setattr(sys, "argv", ["moegraph-predict", f"ckpt_path={best}",
                                      f"hydra.run.dir={tmp_path}"])
    predict_main()
    with open(tmp_path / "predictions.csv") as f:
        assert sum(1 for _ in f) == 201  # header + one row per node
    assert not (tmp_path / "metrics.json").exists()  # predict only


def test_eval_on_other_data(trained_runs, tmp_path):
    _, _, best = trained_runs["moe_gnn"]
    got = evaluate(compose_eval(tmp_path, f"ckpt_path={best}", "data=synthetic", TINY,
                                "data.dataset_kwargs.seed=7"))
    assert 0.0 <= got["test/acc"] <= 1.0


@pytest.mark.slow
def test_cli_train_eval_predict(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's moegraph
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    proc = run("moegraph.train", TINY, "trainer.max_epochs=2", "logger=none",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt")
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    proc = run("moegraph.eval", f"ckpt_path={best}", "+predict=true",
               f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    with open(tmp_path / "eval" / "predictions.csv") as f:
        assert sum(1 for _ in f) == 201


KILLER = """
import os, signal
import lightning as L


class KillAtEpoch(L.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_cli_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          str(tmp_path)])}
    common = [TINY, "model=gnn", "backbone.dropout=0.5", "trainer.max_epochs=5", "logger=none",
              "~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moegraph.train", *common, *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    proc = cli(f"hydra.run.dir={tmp_path / 'full'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli(f"hydra.run.dir={tmp_path / 'killed'}",
               "+callbacks.killer._target_=killer.KillAtEpoch", "+callbacks.killer.epoch=3")
    assert proc.returncode == -9  # SIGKILL, at the start of epoch 3
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    proc = cli(f"hydra.run.dir={tmp_path / 'killed'}", f"ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(state(last), state(tmp_path / "full" / "checkpoints" / "last.ckpt"))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["metrics"]
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())["metrics"]
    for key in ("test/acc", "test/loss", "val/acc", "best/epoch"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


# -- bad checkpoints and settings ------------------------------------------------------------
def test_bad_checkpoints_name_the_file_and_the_problem(trained_runs, tmp_path):
    _, _, best = trained_runs["moe_gnn"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(best.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*truncated or not a file"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt.*not a Lightning checkpoint.*'weights'"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.ckpt' does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"truncated\.ckpt"):
        evaluate(compose_eval(tmp_path, f"ckpt_path={truncated}"))


def test_resume_from_a_bad_checkpoint(compose_cfg, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)  # weights only: no optimizer, no loops
    with pytest.raises(ValueError, match=r"foreign\.ckpt.*cannot resume.*optimizer_states"):
        train(compose_cfg("debug=fdr", TINY, f"ckpt_path={foreign}"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.ckpt.*cannot be read"):
        train(compose_cfg("debug=fdr", TINY, f"ckpt_path={tmp_path / 'text.ckpt'}"))


@pytest.mark.parametrize("override,match", [
    ("trainer.max_epochs=0", "'trainer.max_epochs' must be a positive integer"),
    ("seed=abc", "'seed' must be an integer or null \\(got 'abc'\\)"),
    ("trainer.num_threads=0", "'trainer.num_threads' must be a positive int"),
])
def test_bad_settings(compose_cfg, override, match):
    with pytest.raises(ValueError, match=match):
        train(compose_cfg(TINY, override, *QUIET))


def test_node_model_on_rating_data_is_refused(compose_cfg):
    with pytest.raises(ValueError, match=r"model=gnn does not fit data=movielens.*num_users"):
        train(compose_cfg("model=gnn", "data=movielens", "data.name=synthetic", *QUIET))


def test_empty_validation_split_with_checkpointing(compose_cfg):
    cfg = compose_cfg(TINY, "model=mlp", "data.dataset_kwargs.val_ratio=0.0", *QUIET)
    with pytest.raises(ValueError, match="validation split of data 'synthetic' is empty.*"
                                         "monitor \\['val/acc'\\]"):
        train(cfg)


@pytest.mark.parametrize("cpus,load,processes,expected", [
    (16, 0.0, 1, 16), (16, 10.2, 1, 6), (2, 5.0, 1, 1), (16, 0.0, 2, 8), (16, 12.0, 2, 2)])
def test_num_threads_auto_leaves_busy_cores_alone(monkeypatch, cpus, load, processes, expected):
    from moegraph.train import set_num_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    threads = torch.get_num_threads()
    try:
        set_num_threads("auto", processes)
        assert torch.get_num_threads() == expected
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the environment decides
        torch.set_num_threads(3)
        set_num_threads("auto", processes)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_num_threads(compose_cfg):
    threads = torch.get_num_threads()
    try:
        train(compose_cfg("debug=fdr", TINY, "trainer.num_threads=2"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
