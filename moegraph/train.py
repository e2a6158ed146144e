r"""The one training entry point: ``train(cfg)`` and the ``moegraph-train`` CLI.

``moegraph-train`` composes the config tree in ``conf/`` with Hydra and calls
:func:`train`, a plain function that tests and scripts call directly::

    moegraph-train                                   # default experiment
    moegraph-train model.net.num_experts=16 trainer.max_epochs=50
    moegraph-train -m seed=0,1,2 model=moe_gnn,gnn    # multirun sweep
    moegraph-train trainer=ddp                       # 2 processes (gloo on CPU)
    moegraph-train ckpt_path=outputs/.../last.ckpt   # resume (exactly, random states too)
    moegraph-train --config-dir my_conf data=mygraph # your own configs beside the built-in ones
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from moegraph.checkpoint import RunCheckpoint, check_resumable, record_init_configs

log = logging.getLogger(__name__)


def _config_dir() -> str:
    r"""The config tree: ``moegraph/conf`` of an installed wheel (the top-level
    ``conf/`` shipped as package data), else ``conf/`` of the source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"moegraph's config tree (train.yaml) is neither in {package / 'conf'} "
                            f"nor in {package.parent / 'conf'}: reinstall moegraph")


CONFIG_DIR = _config_dir()


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
    net_kwargs, task_kwargs = datamodule.net_kwargs(), datamodule.task_kwargs()
    check_model_fits_data(cfg, net_kwargs, task_kwargs)
    net = hydra.utils.instantiate(cfg.model.net, _convert_="partial", **net_kwargs)
    if isinstance(net, functools.partial):  # a net config may be a factory (`_partial_`)
        net = net()
    task = hydra.utils.instantiate(cfg.model, _convert_="partial", net=net, **task_kwargs)
    # the constructor's objects as configs: Task.load_from_checkpoint(path) alone rebuilds it
    net_config = OmegaConf.to_container(cfg.model.net, resolve=True)
    if isinstance(net_config, dict):
        net_config.update(net_kwargs)
    record_init_configs(task, net=net_config, **{
        key: value for key, value in cfg.model.items()
        if key not in ("net", "_target_") and OmegaConf.is_dict(value) and "_target_" in value})
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks.append(RunCheckpoint(_run_config(cfg)))
    loggers = _instantiate_all(cfg.get("logger"))
    run = dict(datamodule=datamodule, net=net, task=task, callbacks=callbacks, loggers=loggers)
    if trainer:
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        devices = trainer_cfg.get("devices")
        processes = devices if trainer_cfg.get("accelerator") == "cpu" and isinstance(
            devices, int) and devices > 1 else 1  # DDP on CPU: the cores are shared
        set_num_threads(trainer_cfg.pop("num_threads", None), processes)
        run["trainer"] = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks,
                                                 logger=loggers or False)
    return run


def _accepts(target: str, names) -> list[str]:
    r"""The names among ``names`` that the callable ``target`` does not take."""
    try:
        fn = hydra.utils.get_method(target) if not inspect.isclass(target) else target
        params = inspect.signature(fn).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(set(names) - set(params))


def _choice(group: str, cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices.get(group))
    except ValueError:  # outside a Hydra run
        return str(cfg.get(group, {}).get("_target_", "?"))


def check_model_fits_data(cfg: DictConfig, net_kwargs: dict[str, Any],
                          task_kwargs: dict[str, Any]) -> None:
    r"""Raise a clear error when the model's network or task does not take what
    the data gives (e.g. a node-classification model on the MovieLens rating
    table), instead of an ``unexpected keyword argument`` deep in Hydra."""
    problems = []
    net_target = cfg.model.net.get("_target_") if OmegaConf.is_dict(cfg.model.net) else None
    for target, kwargs, what in ((net_target, net_kwargs, "network"),
                                 (cfg.model.get("_target_"), task_kwargs, "task")):
        if target:
            bad = _accepts(target, kwargs)
            if bad:
                problems.append(f"its {what} {target} takes no {bad}")
    if problems:
        raise ValueError(
            f"model={_choice('model', cfg)} does not fit data={_choice('data', cfg)}: the data "
            f"gives {sorted(net_kwargs)} to the network and {sorted(task_kwargs)} to the task, "
            f"but {'; '.join(problems)}. Node-classification models (mlp, gnn, moe_gnn, "
            f"dense_gnn, gmoe, mowst) take node data (synthetic, cora, ogbn_*, pyg_file, ...); "
            f"multi-task models (mmoe, ple, home, shared_bottom) take data=movielens; "
            f"model=patch_moe takes data=clusters")


def set_num_threads(num_threads: Any, processes: int = 1) -> None:
    r"""Intra-op threads of torch (``trainer.num_threads``): an int, or
    ``"auto"``: the CPUs this process may use less the machine's load (1-minute
    load average), shared by the run's ``processes`` (DDP on CPU), at least 1,
    so that a run on a busy machine does not oversubscribe it; unless
    ``OMP_NUM_THREADS`` is set, which then decides. :obj:`None` leaves torch's
    default."""
    import torch

    if num_threads is None:
        return
    if isinstance(num_threads, str) and num_threads.strip().isdigit():  # from the environment
        num_threads = int(num_threads)
    if num_threads == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        num_threads = max(1, min(cpus, round(cpus - load)) // max(processes, 1))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"'trainer.num_threads' must be a positive int, 'auto' or null "
                         f"(got {num_threads!r})")
    torch.set_num_threads(num_threads)


def check_run_config(cfg: DictConfig) -> None:
    r"""Clear errors for settings that would otherwise fail deep inside a run
    or, worse, pass silently."""
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"'seed' must be an integer or null (got {seed!r})")
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer.get(key)
        if key == "max_epochs" and value is not None and value != -1 and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"'trainer.max_epochs' must be a positive integer, or -1 for no "
                             f"limit (got {value!r}): a run with no epoch trains nothing")
        if key == "max_steps" and value == 0:
            raise ValueError("'trainer.max_steps' must be positive, or -1 for no limit (got 0)")


def _monitored(callbacks: list[Any]) -> list[str]:
    return [c.monitor for c in callbacks if getattr(c, "monitor", None)]


def check_validation_split(datamodule: Any, callbacks: list[Any]) -> None:
    r"""An empty validation split gives no ``val/*`` metric: callbacks that
    monitor one (checkpointing, early stopping) would fail with Lightning's
    ``could not find the monitored key``."""
    data = getattr(datamodule, "data", None)
    mask = data.get("val_mask") if data is not None and hasattr(data, "get") else None
    monitored = [m for m in _monitored(callbacks) if m.startswith("val/")]
    if mask is not None and monitored and int(mask.sum()) == 0:
        raise ValueError(
            f"the validation split of data '{getattr(datamodule, 'name', '?')}' is empty "
            f"(val_mask has no node), but callbacks monitor {sorted(set(monitored))}: give "
            f"the data validation nodes, or run without them (callbacks=none)")


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
    check_run_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume = cfg.get("ckpt_path")
    if resume:
        check_resumable(resume)

    run = instantiate_run(cfg)
    datamodule, model, trainer = run["datamodule"], run["task"], run["trainer"]
    check_validation_split(datamodule, run["callbacks"])

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume or None)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    # The best checkpoint is the model that is tested: validate it again so that
    # val/* (in metrics.json, and the value a sweeper optimises) are its own,
    # not those of the last epoch.
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if best:
        metrics["best/epoch"] = float(_epoch_of(best))
        metrics = {k: v for k, v in metrics.items() if not k.startswith("val/")}
        for result in trainer.validate(model, datamodule=datamodule, ckpt_path=best,
                                       verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if cfg.get("test", True):
        for result in trainer.test(model, datamodule=datamodule, ckpt_path=best or None):
            metrics.update({k: float(v) for k, v in result.items()})

        metrics.update(ogb_metrics(model, datamodule))
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
    summary = format_summary(metrics, cfg.get("optimized_metric"))
    log.info("metrics: %s", summary)
    print(f"[moegraph] {summary}")
    print(f"[moegraph] all metrics: {output_dir / 'metrics.json'}")
    return metrics


def ogb_metrics(task: Any, datamodule: Any) -> dict[str, float]:
    r"""For an OGB graph, the scores of ``ogb``'s own ``Evaluator`` of the
    tested model on the full graph (``val/ogb_acc``, ``test/ogb_acc``)."""
    import torch

    from moegraph.data.datamodule import ogb_scores

    data = getattr(datamodule, "data", None)
    if data is None or getattr(data, "ogb_name", None) is None:
        return {}
    task.eval()
    with torch.no_grad():
        logits = task(data.to(task.device)).logits
    return ogb_scores(data, logits)


def _epoch_of(checkpoint_path: str) -> int:
    import torch

    return int(torch.load(checkpoint_path, map_location="cpu", weights_only=True)["epoch"])


def format_summary(metrics: dict[str, float], optimized: Optional[str] = None) -> str:
    r"""One short line: the headline test metric first (the test counterpart of
    ``optimized``, e.g. ``test/acc``), then the validation one, the test loss,
    and the best epoch; the rest is in ``metrics.json``."""
    headline = optimized.split("/", 1)[1] if optimized and "/" in optimized else "acc"
    # Mowst: the deterministic score (the headline) beside the expected score of
    # sampled inference, and the phase of the tested checkpoint.
    keys = [f"test/{headline}", f"test/{headline}_expected", f"val/{headline}", "test/loss",
            "best/epoch", "test/checkpoint_phase"]
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            whole = key in ("best/epoch", "test/checkpoint_phase")
            parts.append(f"{key}={int(value)}" if whole else f"{key}={value:.4f}")
    if not parts:  # e.g. multi-task: every test metric
        parts = [f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("test/")]
    return ", ".join(parts)


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
