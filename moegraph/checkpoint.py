r"""Self-contained, exactly resumable checkpoints.

A checkpoint written by :func:`moegraph.train.train` holds, beside Lightning's
own weights, optimizer and loop states:

* the task's constructor arguments, the network and optimizer as Hydra configs
  (``hyper_parameters``), so that ``Task.load_from_checkpoint(path)`` needs no
  other argument (:func:`record_init_configs`, :func:`from_config`);
* the run's resolved config (``checkpoint["moegraph"]["config"]``), which
  ``moegraph-eval`` rebuilds the data from;
* every random state (Python, NumPy, torch, CUDA) at the time of saving,
  restored by :class:`RunCheckpoint` where the uninterrupted run would have
  drawn its next number: a killed-and-resumed run with dropout equals the
  uninterrupted one.
"""
from __future__ import annotations

import functools
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

CHECKPOINT_KEY = "moegraph"


def from_config(value: Any) -> Any:
    r"""``value`` itself, or, for a Hydra config (a mapping with ``_target_``),
    the object it describes (a ``_partial_`` network factory is called).

    The tasks pass their ``net``, ``optimizer`` and ``scheduler`` through it, so
    that a checkpoint's ``hyper_parameters`` (configs, not pickled objects)
    rebuild them in ``Task.load_from_checkpoint(path)``."""
    if isinstance(value, Mapping) and "_target_" in value:
        import hydra

        value = hydra.utils.instantiate(dict(value), _convert_="partial")
    return value


def net_from_config(value: Any) -> Any:
    r""":func:`from_config` for a network: a partial (factory) config is called."""
    value = from_config(value)
    if isinstance(value, functools.partial):
        value = value()
    return value


def record_init_configs(task: L.LightningModule, **configs: Any) -> None:
    r"""Store the configs of constructor arguments that are objects (``net``,
    ``optimizer``, ``scheduler``) in ``task.hparams``: saved in every checkpoint,
    and given back to the constructor by ``load_from_checkpoint``."""
    from omegaconf import OmegaConf

    for name, value in configs.items():
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        task.hparams[name] = value


def random_states() -> dict[str, Any]:
    r"""The state of every random generator a run draws from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers: a checkpoint stays loadable with weights_only=True
    states = {"python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Mapping[str, Any]) -> None:
    r"""Put back what :func:`random_states` returned."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RunCheckpoint(L.Callback):
    r"""Adds the run's config and the random states to every checkpoint, and
    restores the random states on resume.

    The states are taken when the checkpoint is written. A checkpoint written
    in the middle of an epoch (after a training batch) is restored right
    before the next training batch; one written at the end of an epoch when
    training starts again, before the next epoch's loader is iterated (a
    ``DataLoader`` draws its base seed from torch's generator): in both cases
    at the point where the uninterrupted run drew its next random number.
    Under DDP each process's states are saved, and each process gets its own
    back when resumed with the same number of processes (else rank 0's).

    Args:
        config (dict, optional): the resolved run config, stored under
            ``checkpoint["moegraph"]["config"]``.
    """

    def __init__(self, config: Optional[dict[str, Any]] = None):
        self.config = config
        self._pending: Optional[dict[str, Any]] = None

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        batch_progress = trainer.fit_loop.epoch_loop.batch_progress
        mid_epoch = (trainer.training and not batch_progress.is_last_batch
                     and batch_progress.current.completed > 0)
        states = random_states()
        saved = {"config": self.config, "random_states": states, "mid_epoch": bool(mid_epoch)}
        if trainer.world_size > 1:  # every process saves (rank 0 writes): each its own states
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, states)
                saved["random_states_per_rank"] = gathered
        checkpoint[CHECKPOINT_KEY] = saved

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = dict(checkpoint.get(CHECKPOINT_KEY) or {})
        per_rank = saved.get("random_states_per_rank")
        if per_rank and len(per_rank) == trainer.world_size:  # the same number of processes
            saved["random_states"] = per_rank[trainer.global_rank]
        self._pending = saved if "random_states" in saved else None

    def on_fit_start(self, trainer, pl_module) -> None:
        # Before the loop makes the epoch's loader iterator (Lightning's sanity
        # check in between runs under isolated random states).
        if self._pending is not None and not self._pending["mid_epoch"]:
            set_random_states(self._pending["random_states"])
            self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_random_states(self._pending["random_states"])
            self._pending = None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    r"""Read a Lightning checkpoint, with an error that names the file and
    what is wrong when it is missing, truncated or not a Lightning checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (ckpt_path)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, OSError) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated or not a file written "
            f"by torch.save ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint: it has no "
                         f"'state_dict' (found {found})")
    return checkpoint


def check_resumable(path: str | Path) -> dict[str, Any]:
    r""":func:`load_checkpoint`, and check that it holds the training state
    a resumed run needs (not a weights-only checkpoint)."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("optimizer_states", "loops") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} cannot resume training: it lacks {missing} "
                         f"(saved with save_weights_only?); evaluate it with moegraph-eval")
    return checkpoint
