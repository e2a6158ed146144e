r"""Evaluate a checkpoint and write per-node predictions: ``moegraph-eval`` and
``moegraph-predict``.

::

    moegraph-eval ckpt_path=outputs/train/runs/.../checkpoints/epoch_057.ckpt
    moegraph-eval ckpt_path=... data=cora            # another data config
    moegraph-eval ckpt_path=... +predict=true        # and predictions.csv
    moegraph-predict ckpt_path=...                   # predictions.csv only

The checkpoint is self-contained (:mod:`moegraph.checkpoint`): the task is
rebuilt by ``Task.load_from_checkpoint(path)`` alone, and the data from the
run's own config stored in it, unless ``data=...`` is given. Metrics go to
``metrics.json`` in the output directory.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from moegraph.checkpoint import CHECKPOINT_KEY, load_checkpoint
from moegraph.train import CONFIG_DIR, _run_config, ogb_metrics, set_num_threads

log = logging.getLogger(__name__)


def load_task(ckpt_path: str, checkpoint: Optional[dict[str, Any]] = None) -> L.LightningModule:
    r"""The LightningModule of a checkpoint written by ``moegraph-train``."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(ckpt_path)
    config = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config") or {}
    target = (config.get("model") or {}).get("_target_")
    if target is None:
        raise ValueError(f"checkpoint {ckpt_path!r} holds no moegraph run config: it was not "
                         f"written by moegraph-train (load it with YourTask.load_from_checkpoint)")
    task_class = hydra.utils.get_class(target)
    return task_class.load_from_checkpoint(ckpt_path, map_location="cpu")


def _data_config(cfg: DictConfig, checkpoint: dict[str, Any]) -> Any:
    if cfg.get("data") is not None:
        return cfg.data
    config = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config") or {}
    if "data" not in config:
        raise ValueError(f"checkpoint {cfg.ckpt_path!r} holds no data config: give data=...")
    return OmegaConf.create(config["data"])


def _trainer(cfg: DictConfig) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    set_num_threads(trainer_cfg.pop("num_threads", None))
    return hydra.utils.instantiate(trainer_cfg, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)


def predictions(task: L.LightningModule, data) -> dict[str, torch.Tensor]:
    r"""Per node of the full graph: the predicted class, the class
    probabilities, the split, and, for a MoE network, each routed layer's top
    expert and its router probability; for Mowst, the weak expert's
    confidence. Columns by name, each ``[N]`` (``prob`` is ``[N, C]``)."""
    task.eval()
    with torch.no_grad():
        out = task(data.to(task.device))
    probs = out.logits.float().softmax(-1).cpu()
    columns = {"node": torch.arange(data.num_nodes), "pred": probs.argmax(-1), "prob": probs}
    if getattr(data, "y", None) is not None:
        columns["y"] = data.y.cpu()
    split = torch.full((data.num_nodes,), -1)
    for code, name in enumerate(("train", "val", "test")):
        mask = data.get(f"{name}_mask")
        if mask is not None:
            split[mask.cpu()] = code
    columns["split"] = split
    for layer, routing in enumerate(out.routing):
        p, expert = routing.probs.float().cpu().max(-1)
        columns[f"layer{layer}_expert"] = expert
        columns[f"layer{layer}_expert_prob"] = p
    if out.confidence is not None:
        columns["confidence"] = out.confidence.float().cpu()
    return columns


SPLIT_NAMES = {-1: "", 0: "train", 1: "val", 2: "test"}


def write_predictions(columns: dict[str, torch.Tensor], path: Path) -> Path:
    r"""``predictions.csv``: one row per node (see :func:`predictions`)."""
    names = [n for n in columns if n != "prob"]
    num_classes = columns["prob"].size(1)
    header = names + [f"prob_{c}" for c in range(num_classes)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        table = [columns[n].tolist() for n in names]
        probs = columns["prob"].tolist()
        for i in range(len(probs)):
            row = [table[j][i] for j in range(len(names))]
            row[names.index("split")] = SPLIT_NAMES[row[names.index("split")]]
            writer.writerow(row + [f"{p:.6g}" for p in probs[i]])
    return path


def evaluate(cfg: DictConfig) -> dict[str, float]:
    r"""Validate and test the checkpoint ``cfg.ckpt_path`` on ``cfg.data`` (the
    run's own data config by default), write ``metrics.json`` and, with
    ``cfg.predict``, ``predictions.csv`` to ``cfg.paths.output_dir``; return the
    metrics (empty with ``cfg.evaluate=false``)."""
    if not cfg.get("ckpt_path"):
        raise ValueError("give the checkpoint to evaluate: ckpt_path=PATH")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = _data_config(cfg, checkpoint)
    datamodule = hydra.utils.instantiate(data_cfg, _convert_="partial")
    datamodule.setup("test")
    task = load_task(cfg.ckpt_path, checkpoint)
    metrics: dict[str, float] = {}
    if cfg.get("evaluate", True):
        trainer = _trainer(cfg)
        for result in trainer.validate(task, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
        for result in trainer.test(task, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
        metrics.update(ogb_metrics(task, datamodule))
        with open(output_dir / "metrics.json", "w") as f:
            json.dump({"metrics": metrics, "ckpt_path": str(cfg.ckpt_path),
                       "config": _run_config(cfg)}, f, indent=2)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                          if k.startswith("test/"))
        print(f"[moegraph] {shown}")
    if cfg.get("predict", False):
        data = getattr(datamodule, "data", None)
        if data is None:
            raise ValueError(f"predictions are written for node data; {type(datamodule).__name__} "
                             f"has no single graph")
        path = write_predictions(predictions(task, data), output_dir / "predictions.csv")
        print(f"[moegraph] predictions of {data.num_nodes} nodes: {path}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


def predict_main() -> None:
    r"""``moegraph-predict``: ``moegraph-eval`` with ``+predict=true evaluate=false``."""
    import sys

    given = {arg.lstrip("+~").split("=", 1)[0] for arg in sys.argv[1:]}
    sys.argv += [a for key, a in (("predict", "+predict=true"), ("evaluate", "evaluate=false"))
                 if key not in given]
    main()


if __name__ == "__main__":
    main()
