r"""The harness around training: packaging, the Optuna search, loggers, the
run summary, and README snippets that run as printed."""
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from moegraph.train import format_summary, train

ROOT = Path(__file__).resolve().parents[1]
TINY = "data.dataset_kwargs.num_nodes=200"


def test_every_package_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts)
                for p in (ROOT / "moegraph").rglob("__init__.py")}
    groups = {".".join(("moegraph", *d.relative_to(ROOT).parts))
              for d in [ROOT / "conf", *(ROOT / "conf").rglob("*")]
              if d.is_dir() and d.name != "__pycache__"}
    assert packages | groups == set(config["packages"])
    assert config["package-dir"] == {"moegraph.conf": "conf"}
    assert (ROOT / "moegraph" / "py.typed").is_file()
    assert (ROOT / "conf" / "__init__.py").is_file()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"moegraph-train", "moegraph-eval", "moegraph-predict"}


def run_cli(tmp_path, *args, module="moegraph.train"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": str(ROOT), "MOEGRAPH_OPTUNA_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 3 trials in 2 CLI processes: about 1 min on a quiet 2-core machine
def test_optuna_search_runs_and_resumes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = ["hparams_search=gnn", "debug=fdr", TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_cli(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best value" in proc.stderr + proc.stdout
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    configs = [json.loads(r.read_text())["config"] for r in runs]
    assert configs[0]["model"]["optimizer"]["lr"] != configs[1]["model"]["optimizer"]["lr"]
    assert all(1e-3 <= c["model"]["optimizer"]["lr"] <= 5e-2 for c in configs)
    # the study is on disk: a second call goes on with it (2 + 1 trials)
    proc = run_cli(tmp_path, *args, "hydra.sweeper.n_trials=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        states = [s for (s,) in db.execute("SELECT state FROM trials")]
    assert states == ["COMPLETE"] * 3


@pytest.mark.parametrize("family,keys", [
    ("mlp", []), ("gnn", []),
    ("mowst", ["model.net.gate_features", "model.net.gate_hidden_channels"]),
    ("mowst_star", ["model.net.gate_features", "model.net.gate_hidden_channels"]),
    ("gmoe", ["model.net.num_experts", "model.net.hop2", "model.aux_loss_weights.importance"]),
    ("moe_gnn", ["model.net.num_experts", "model.aux_loss_weights.load_balance"]),
    ("dense_gnn", [])])
def test_search_spaces_name_real_config_keys(compose_cfg, family, keys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from omegaconf import OmegaConf

    cfg = compose_cfg(TINY, f"hparams_search={family}")
    params = cfg.hydra.sweeper.params
    for key in ("model.optimizer.lr", "model.optimizer.weight_decay", "backbone.dropout",
                "backbone.hidden_channels", "backbone.num_layers", *keys):
        assert key in params, key
    for key in params:  # each searched key exists in the composed config
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key
    assert cfg.hydra.sweeper.storage.startswith("sqlite:///")
    assert cfg.model.net.get("variant", "mowst") == ("mowst_star" if family == "mowst_star"
                                                     else "mowst")


@pytest.mark.parametrize("family", ["mlp", "gnn", "mowst", "mowst_star", "gmoe", "moe_gnn",
                                    "dense_gnn"])
def test_every_choice_of_a_search_space_builds(compose_cfg, family):
    r"""Each value a search may pick for a categorical parameter builds the
    model and task (a trial that fails to build ends the whole search):
    e.g. the fixed dispersion gates, which the default cross-fitted Mowst
    refuses, are not offered."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    from moegraph.train import instantiate_run

    params = compose_cfg(TINY, f"hparams_search={family}").hydra.sweeper.params
    parser = OverridesParser.create()
    picked = 0
    for key, space in params.items():
        sweep = parser.parse_override(f"{key}={space}").value()
        if not isinstance(sweep, ChoiceSweep):
            continue
        for choice in sweep.list:
            value = str(choice).lower() if isinstance(choice, bool) else choice
            cfg = compose_cfg(TINY, f"hparams_search={family}", f"{key}={value}")
            run = instantiate_run(cfg, trainer=False)
            assert run["task"] is not None
            picked += 1
    depths = 2 if family in ("moe_gnn", "dense_gnn") else 3  # plain stack: >= 2 layers
    assert picked >= 4 + depths  # hidden size (4 choices) and depth at least


def test_tensorboard_and_many_loggers(compose_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    train(compose_cfg("debug=fdr", TINY, "logger=many", "trainer.fast_dev_run=false",
                      "trainer.max_epochs=1"))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "csv").glob("version_*/metrics.csv"))


def test_wandb_logger_is_offline_by_default(compose_cfg):
    cfg = compose_cfg(TINY, "logger=wandb")
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"


def test_summary_puts_the_headline_first():
    metrics = {"val/auroc": 0.8, "test/auroc": 0.75, "test/acc": 0.6, "test/loss": 0.5,
               "best/epoch": 12.0, "train/loss": 0.1}
    assert format_summary(metrics, "val/auroc") == (
        "test/auroc=0.7500, val/auroc=0.8000, test/loss=0.5000, best/epoch=12")
    assert format_summary({"test/watch/auc": 0.7}, "val/like/auc") == "test/watch/auc=0.7000"


# -- README ---------------------------------------------------------------------------------
def readme_snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_snippets_run_as_printed(compose_cfg, tmp_path, monkeypatch):
    r"""Every ```python block of README.md, in order, in one namespace (as a
    reader runs them), in a folder holding one finished run under outputs/
    (the checkpoint snippet loads it); the DDP one as a 1-process gloo group."""
    import socket

    import torch.distributed as dist
    from omegaconf import open_dict

    from moegraph.tasks import NodeClassificationTask

    run_dir = tmp_path / "outputs" / "train" / "runs" / "2026-01-01_00-00-00"
    cfg = compose_cfg("trainer.max_epochs=1", TINY, "model=gnn", "logger=none",
                      "~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    snippets = readme_snippets()
    assert len(snippets) >= 5
    namespace = {"__name__": "__readme__"}
    try:
        for index, code in enumerate(snippets):
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert isinstance(namespace["task"], NodeClassificationTask)
    assert namespace["dm"].num_classes == 3 and (tmp_path / "graph.pt").is_file()
    assert namespace["res"].logits.shape == (100, 4)
