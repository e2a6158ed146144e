r"""End-to-end runs of :func:`moegraph.train.train` and of the CLI on tiny graphs."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moegraph.train import train

TINY = "data.dataset_kwargs.num_nodes=200"


def check_outputs(metrics, output_dir: Path, moe: bool):
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["test/loss"] > 0
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    assert "hydra" not in saved["config"]
    assert saved["config"]["paths"]["output_dir"] == str(output_dir)
    assert (output_dir / "expert_load.png").is_file() == moe
    return saved


@pytest.mark.parametrize("overrides,moe", [
    (["model=moe_gnn"], True),
    (["model=dense_gnn"], False),
    (["+model.net.moe_kwargs.router=topp", "model.net.k=null"], True),
    (["+model.net.moe_kwargs.router=expert_choice", "model.net.k=null"], True),
    (["model.net.conv=gat", "+model.net.conv_kwargs.heads=4", "model.net.num_layers=3"], True),
    (["experiment=synthetic_gnn"], False),
], ids=["moe_gnn", "gnn", "topp", "expert_choice", "gat", "experiment_gnn"])
def test_fast_dev_run(compose_cfg, tmp_path, capsys, overrides, moe):
    cfg = compose_cfg("debug=fdr", TINY, *overrides)
    metrics = train(cfg)
    check_outputs(metrics, tmp_path, moe)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    out = capsys.readouterr().out
    assert f"[moegraph] test/acc={metrics['test/acc']:.4f}" in out
    assert ("| layer | e0 | e1 |" in out) == moe


@pytest.mark.parametrize("strong", ["gcn", "sage", "gat", "gin"])
@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
def test_fast_dev_run_mowst(compose_cfg, tmp_path, strong, variant):
    cfg = compose_cfg("debug=fdr", TINY, "model=mowst", f"model/strong={strong}",
                      f"model.net.variant={variant}")
    metrics = train(cfg)
    for key in ("test/acc", "test/acc_tau", "test/acc_weak", "test/acc_strong",
                "test/confidence", "diag/strong_fraction", "diag/subgraph_fraction"):
        assert key in metrics, key
    assert 0 <= metrics["diag/strong_fraction"] <= metrics["diag/subgraph_fraction"] <= 1
    record = json.loads((tmp_path / "confidence.json").read_text())
    assert len(record["confidence"]) == len(record["weak_correct"]) > 0
    assert (tmp_path / "confidence.png").is_file()


@pytest.mark.parametrize("model", ["mlp", "gnn"])
def test_fast_dev_run_baselines(compose_cfg, tmp_path, model):
    metrics = train(compose_cfg("debug=fdr", TINY, f"model={model}"))
    check_outputs(metrics, tmp_path, moe=False)


def test_without_test(compose_cfg, tmp_path):
    metrics = train(compose_cfg("debug=fdr", TINY, "test=false"))
    assert not any(k.startswith("test/") for k in metrics)
    assert (tmp_path / "metrics.json").is_file()


def test_same_seed_same_metrics(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=fdr", TINY, "seed=3")
    first = train(cfg)
    second = train(cfg)
    for key in ("val/loss", "test/loss", "test/acc"):
        assert first[key] == second[key], key


@pytest.mark.slow  # 30 epochs: about 9 s on a loaded 2-core machine
def test_short_training_learns(compose_cfg, tmp_path):
    cfg = compose_cfg("data.dataset_kwargs.num_nodes=1000", "trainer.max_epochs=30",
                      "~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false",
                      "+trainer.enable_model_summary=false")
    metrics = train(cfg)
    check_outputs(metrics, tmp_path, moe=True)
    # Chance is 0.25 and the features alone give about 0.5.
    assert metrics["test/acc"] > 0.6
    assert metrics["time/epochs"] == 30
    assert metrics["train/aux_loss"] > 0
    # The weighted aux loss, by hand from the logged unweighted ones.
    assert metrics["train/aux_loss"] == pytest.approx(
        0.01 * metrics["train/aux/load_balance"] + 0.001 * metrics["train/aux/z_loss"],
        rel=1e-4)
    # The best checkpoint was kept and tested; the CSV logger recorded the aux loss.
    assert list((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    (csv_file,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    aux = [float(r["train/aux_loss"]) for r in rows if r.get("train/aux_loss")]
    assert len(aux) == 30 and all(v > 0 for v in aux)
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/acc") for r in rows)


def test_cli(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moegraph.train", "debug=fdr", TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[moegraph] test/acc=" in proc.stdout
    assert "[moegraph] per-expert load on the full graph" in proc.stdout
    assert "| layer | e0 | e1 | e2 | e3 | e4 | e5 | e6 | e7 | max/mean |" in proc.stdout
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    assert saved["config"]["data"]["dataset_kwargs"]["num_nodes"] == 200
    assert (run_dir / "expert_load.png").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("experiment,gated", [("movielens_mmoe", True), ("movielens_ple", True),
                                              ("movielens_home", True),
                                              ("movielens_shared_bottom", False)])
def test_fast_dev_run_multitask(compose_cfg, tmp_path, capsys, experiment, gated):
    cfg = compose_cfg("debug=fdr", f"experiment={experiment}", "data.name=synthetic")
    metrics = train(cfg)
    for t in ("watch", "like"):
        assert 0.0 <= metrics[f"test/{t}/auc"] <= 1.0
        assert 0.0 <= metrics[f"val/{t}/gauc"] <= 1.0
    assert metrics["test/rating/rmse"] > 0 and metrics["test/loss"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics, nan_ok=True)
    assert (tmp_path / "gate_usage.png").is_file() == gated
    assert (tmp_path / "expert_collapse.png").is_file() == gated
    assert ("multi-task expert diagnostics" in capsys.readouterr().out) == gated
    if gated:
        assert "val/diag/max_zero_share" in metrics and "test/diag/scale_spread" in metrics


@pytest.mark.slow
def test_fast_dev_run_movielens_real(compose_cfg, real_data, tmp_path):
    root = real_data("MovieLens100K")
    cfg = compose_cfg("debug=fdr", "experiment=movielens_home", f"paths.data_dir={root.parent}",
                      f"paths.cache_dir={tmp_path / 'cache'}")
    metrics = train(cfg)
    assert 0.0 <= metrics["test/watch/gauc"] <= 1.0 and metrics["test/rating/rmse"] > 0
    diag = json.loads((tmp_path / "multitask_diagnostics.json").read_text())
    assert [len(lv["labels"]) for lv in diag["levels"]] == [4, 7]
    assert set(diag["underfitting"]) == {"watch", "like", "rating"}


@pytest.mark.slow
def test_short_multitask_training_learns(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=movielens_mmoe", "data.name=synthetic", "data.batch_size=512",
                      "trainer.max_epochs=15", "~callbacks.rich_progress_bar", "logger=none",
                      "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
                      "callbacks.early_stopping.patience=15")
    metrics = train(cfg)
    # Ratings follow a user x item factor (see synthetic_ratings): all three tasks learn.
    assert metrics["test/like/auc"] > 0.6 and metrics["test/watch/auc"] > 0.55
    assert metrics["test/rating/rmse"] < 1.2
    assert list((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
