r"""The one training entry point: ``train(cfg)`` and the ``moegraph-train`` CLI.

``moegraph-train`` composes the config tree in ``conf/`` with Hydra and calls
:func:`train`, a plain function that tests and scripts call directly::

    moegraph-train                                   # default experiment
    moegraph-train model.net.num_experts=16 trainer.max_epochs=50
    moegraph-train -m seed=0,1,2 model=moe_gnn,gnn    # multirun sweep
    moegraph-train trainer=ddp                       # 2 processes (gloo on CPU)
"""
from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: Sequence[str] = (),
                   output_dir: str | Path | None = None) -> DictConfig:
    r"""Compose ``conf/train.yaml`` with command-line ``overrides`` as
    ``moegraph-train`` would, for tests and scripts that call :func:`train`.

    The ``hydra`` node is kept and registered with ``HydraConfig`` (so
    ``${hydra:...}`` interpolations resolve, as in a real run); the run writes
    to ``output_dir`` when given. The caller that is done with the config may
    clear it with ``HydraConfig.instance().cfg = None``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def instantiate_run(cfg: DictConfig, trainer: bool = True) -> dict[str, Any]:
    r"""Build what a run needs from ``cfg``: ``datamodule`` (set up), ``net``
    (given ``datamodule.net_kwargs()``, e.g. the feature and class counts; a
    partial net config is called), ``task`` (the LightningModule around it,
    given ``datamodule.task_kwargs()``), ``callbacks``, ``loggers`` and,
    unless ``trainer=False``, the ``trainer``."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="partial")
    datamodule.setup("fit")
    net = hydra.utils.instantiate(cfg.model.net, _convert_="partial", **datamodule.net_kwargs())
    if isinstance(net, functools.partial):  # a net config may be a factory (`_partial_`)
        net = net()
    task = hydra.utils.instantiate(cfg.model, _convert_="partial", net=net,
                                   **datamodule.task_kwargs())
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    run = dict(datamodule=datamodule, net=net, task=task, callbacks=callbacks, loggers=loggers)
    if trainer:
        run["trainer"] = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks,
                                                 logger=loggers or False)
    return run


def train(cfg: DictConfig) -> dict[str, float]:
    r"""Fit and test the model that ``cfg`` describes; return its metrics.

    Instantiates ``cfg.data`` (a LightningDataModule), ``cfg.model.net`` (a
    network, given what the data says it needs), ``cfg.model`` (the
    LightningModule around it), ``cfg.callbacks``, ``cfg.logger`` and
    ``cfg.trainer``; fits, tests the best checkpoint, lets the task write its
    diagnostics (``task.write_diagnostics(datamodule, output_dir)``, e.g. the
    per-expert load) and writes ``metrics.json`` to ``cfg.paths.output_dir``.

    Under DDP (``trainer=ddp``) every process runs this function; the metrics
    are synced across them, and only the first writes the diagnostics and
    ``metrics.json``.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    run = instantiate_run(cfg)
    datamodule, model, trainer = run["datamodule"], run["task"], run["trainer"]

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.get("test", True):
        ckpt = trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        for result in trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path):
            metrics.update({k: float(v) for k, v in result.items()})

    metrics["time/fit_seconds"] = fit_seconds
    metrics["time/epochs"] = float(trainer.current_epoch)
    write_diagnostics = getattr(model, "write_diagnostics", None)
    # With sharded experts the diagnostic forward pass is a collective: every
    # process runs it (only rank 0 writes); otherwise rank 0 alone.
    if write_diagnostics is not None and (trainer.is_global_zero
                                          or getattr(model, "expert_parallel", False)):
        metrics.update(write_diagnostics(datamodule, output_dir) or {})
    if not trainer.is_global_zero:  # DDP: the other processes hold the same metrics
        return metrics
    with open(output_dir / "metrics.json", "w") as f:
        json.dump({"metrics": metrics, "config": _run_config(cfg)}, f, indent=2)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                        if k.startswith(("test/", "val/")))
    log.info("metrics: %s", summary)
    print(f"[moegraph] {summary}")
    return metrics


def _run_config(cfg: DictConfig) -> dict[str, Any]:
    r"""The resolved run config, without the ``hydra`` node that a config composed
    with ``return_hydra_config=True`` carries (some of its values exist only in a
    real Hydra run or multirun, and the CLI does not pass it to :func:`train`)."""
    return {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value)
            else value for key, value in cfg.items() if key != "hydra"}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
