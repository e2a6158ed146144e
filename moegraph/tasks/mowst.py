r"""Training Mowst inside Lightning: the paper's schedule of pre-training and
alternating turns, each with early stopping and roll-back (Algorithm 2 of
`Zeng et al. <https://arxiv.org/abs/2311.05185>`_), or joint training for
Mowst*."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.data import Data

from moegraph.checkpoint import from_config, net_from_config
from moegraph.nn.mowst import Mowst, MowstOutput, check_experts_agree
from moegraph.tasks.common import load_metric_states, metric_states, split_mask
from moegraph.tasks.metrics import MowstMetrics
from moegraph.tasks.node_classification import NodeClassificationTask

log = logging.getLogger(__name__)
PHASES = ("pretrain_weak", "pretrain_strong", "weak", "strong", "joint")


class MowstTask(NodeClassificationTask):
    r"""Node classification with a :class:`~moegraph.nn.Mowst` network and
    the paper's training schedule, run by Lightning with manual optimisation.

    ``variant="mowst"`` (the network's): optional pre-training of the weak
    and/or strong expert alone; then rounds of two turns, (a) the weak expert
    and the gate with the strong expert frozen, (b) the strong expert with
    the weak expert and gate frozen. A turn trains until its validation score
    has not improved for ``turn_patience`` epochs (or ``max_turn_epochs``),
    then rolls the trained part back to its best epoch, or to where it began
    when the turn did not beat the best score so far. Training stops after
    ``round_patience`` rounds without a gain, after ``max_rounds`` rounds or
    at the trainer's ``max_epochs``. ``variant="mowst_star"`` trains all three
    jointly (after the same optional pre-training) with early stopping after
    ``turn_patience`` epochs without gain.

    The schedule replaces early stopping: an ``EarlyStopping`` callback of the
    trainer is removed (with a warning) when fitting starts. Frozen parts are
    in eval mode with gradients off; in full-batch training
    their outputs are computed once per turn (they do not change). The
    reported ``{split}/{metric}`` is the expected score of sampled inference
    for Mowst and the mixture's for Mowst*; ``{split}/{metric}_tau``,
    ``_weak``, ``_strong``, ``_mixture``, ``{split}/confidence`` and
    ``{split}/confident`` are logged too, and ``schedule/round``,
    ``schedule/phase`` (an index into :data:`PHASES`).

    Args:
        net (Mowst): the network.
        num_classes (int): number of classes.
        optimizer (callable): partial optimizer; called once for the weak
            expert and gate and once for the strong expert.
        metric (str, optional): ``"acc"`` or ``"auroc"``. (default: :obj:`"acc"`)
        pretrain_weak_epochs (int, optional): maximum epochs of weak-expert
            pre-training (early-stopped); :obj:`0` skips it. (default: :obj:`0`)
        pretrain_strong_epochs (int, optional): the same for the strong expert.
            (default: :obj:`0`)
        max_turn_epochs (int, optional): epochs per turn at most.
            (default: :obj:`100`)
        turn_patience (int, optional): epochs without gain that end a turn.
            (default: :obj:`10`)
        max_rounds (int, optional): rounds at most. (default: :obj:`10`)
        round_patience (int, optional): rounds without gain that end
            training. (default: :obj:`2`)
        min_delta (float, optional): the least rise of the validation score
            that counts as a gain (the expected score of Mowst rises by
            tiny steps as the gate sharpens). (default: :obj:`1e-3`)
    """

    def __init__(self, net: Mowst, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 aux_loss_weights: Optional[dict[str, float]] = None,
                 metric: str = "acc", pretrain_weak_epochs: int = 0,
                 pretrain_strong_epochs: int = 0, max_turn_epochs: int = 100,
                 turn_patience: int = 10, max_rounds: int = 10, round_patience: int = 2,
                 min_delta: float = 1e-3):
        net, optimizer = net_from_config(net), from_config(optimizer)  # see moegraph.checkpoint
        if not isinstance(net, Mowst):
            raise TypeError(f"MowstTask needs a moegraph.nn.Mowst network (got "
                            f"{type(net).__name__})")
        if scheduler is not None:
            raise ValueError("MowstTask does not take a scheduler: its turns restart and "
                             "roll back training")
        for name, value in (("pretrain_weak_epochs", pretrain_weak_epochs),
                            ("pretrain_strong_epochs", pretrain_strong_epochs)):
            if value < 0:
                raise ValueError(f"'{name}' must be non-negative (got {value})")
        for name, value in (("max_turn_epochs", max_turn_epochs),
                            ("turn_patience", turn_patience), ("max_rounds", max_rounds),
                            ("round_patience", round_patience)):
            if value < 1:
                raise ValueError(f"'{name}' must be positive (got {value})")
        c = net.out_channels
        if isinstance(c, int) and c != num_classes:
            raise ValueError(f"the network predicts {c} classes, the data has {num_classes}")
        super().__init__(net, num_classes, optimizer, None, aux_loss_weights, metric)
        self.automatic_optimization = False
        self.pretrain_weak_epochs = pretrain_weak_epochs
        self.pretrain_strong_epochs = pretrain_strong_epochs
        self.max_turn_epochs = max_turn_epochs
        self.turn_patience = turn_patience
        self.max_rounds = max_rounds
        self.round_patience = round_patience
        if min_delta < 0:
            raise ValueError(f"'min_delta' must be non-negative (got {min_delta})")
        self.min_delta = min_delta
        self.mowst_metrics = torch.nn.ModuleDict(
            {f"{split}_": MowstMetrics(metric, net.threshold)
             for split in ("train", "val", "test")})
        self._cache: Optional[tuple[tuple, Any]] = None
        self._caching = False
        self._turn_id = 0
        self._turn_start_state: Optional[dict[str, Tensor]] = None
        self._turn_best_state: Optional[dict[str, Tensor]] = None
        self._schedule = self._initial_schedule()

    # -- schedule state ----------------------------------------------------------
    def _initial_schedule(self) -> dict[str, Any]:
        if self.pretrain_weak_epochs:
            phase = "pretrain_weak"
        elif self.pretrain_strong_epochs:
            phase = "pretrain_strong"
        else:
            phase = self._first_trained_phase()
        return {"phase": phase, "round": 1, "epoch_in_turn": 0, "stale_epochs": 0,
                "turn_best": -float("inf"), "best": -float("inf"), "round_gain": False,
                "rounds_without_gain": 0, "done": False}

    def _first_trained_phase(self) -> str:
        return "joint" if self.net.variant == "mowst_star" else "weak"

    @property
    def phase(self) -> str:
        r"""The current phase, one of :data:`PHASES`."""
        return self._schedule["phase"]

    def trained_modules(self, phase: Optional[str] = None) -> list[Module]:
        r"""The parts of the network a phase trains."""
        phase = phase or self.phase
        net = self.net
        return {"pretrain_weak": [net.weak], "pretrain_strong": [net.strong],
                "weak": [net.weak, net.gate], "strong": [net.strong],
                "joint": [net.weak, net.gate, net.strong]}[phase]

    def _parts(self) -> dict[str, Module]:
        return {"weak": self.net.weak, "gate": self.net.gate, "strong": self.net.strong}

    def _frozen_modules(self) -> list[Module]:
        trained = {id(m) for m in self.trained_modules()}
        return [m for m in self._parts().values() if id(m) not in trained]

    def _apply_freeze(self) -> None:
        r"""Frozen parts: eval mode, no gradients; trained parts: gradients on,
        and in the task's mode (a part frozen in the last turn was in eval)."""
        for module in self.trained_modules():
            module.requires_grad_(True)
            module.train(self.training)
        for module in self._frozen_modules():
            module.eval()
            module.requires_grad_(False)

    def _trained_state(self) -> dict[str, Tensor]:
        trained = {id(m) for m in self.trained_modules()}
        return {f"{name}.{k}": v.detach().clone() for name, module in self._parts().items()
                if id(module) in trained for k, v in module.state_dict().items()}

    def _load_trained_state(self, state: dict[str, Tensor]) -> None:
        for name, module in self._parts().items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if part:
                module.load_state_dict(part)

    # -- forward -----------------------------------------------------------------
    def _mowst_forward(self, data: Data) -> MowstOutput:
        r"""The experts and the gate on ``data``; the frozen part is computed
        without gradients, and once per turn on a full graph."""
        net = self.net
        x, edge_index = data.x, data.edge_index
        # Frozen parts are in eval mode in training and evaluation alike: within
        # a turn of fit, their output on the full graph is one constant.
        full_graph = (self._caching and
                      not isinstance(getattr(data, "batch_size", None), int))
        phase = self.phase
        key = (phase, self._turn_id, x.data_ptr(), x.size(0))
        if phase in ("weak", "pretrain_weak"):
            strong = self._cached(key, full_graph, lambda: net.strong_forward(x, edge_index))
            weak = net.weak_forward(x, edge_index)
            gate = net.gate_forward(weak, x)
        elif phase in ("strong", "pretrain_strong"):
            weak, gate = self._cached(key, full_graph, lambda: self._weak_and_gate(x, edge_index))
            strong = net.strong_forward(x, edge_index)
        else:
            return net.forward_experts(x, edge_index)
        check_experts_agree(weak, strong)
        return MowstOutput(weak, strong, gate, torch.sigmoid(gate))

    def _weak_and_gate(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        weak = self.net.weak_forward(x, edge_index)
        return weak, self.net.gate_forward(weak, x)

    def _cached(self, key: tuple, full_graph: bool, compute: Callable[[], Any]) -> Any:
        if full_graph and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            value = compute()
        if full_graph:
            self._cache = (key, value)
        return value

    def _loss(self, out: MowstOutput, y: Tensor) -> Tensor:
        if self.phase == "pretrain_weak":
            return F.cross_entropy(out.weak_logits, y)
        if self.phase == "pretrain_strong":
            return F.cross_entropy(out.strong_logits, y)
        return self.net.loss(out, y)

    # -- steps -------------------------------------------------------------------
    def _split_outputs(self, data: Data, split: str) -> tuple[MowstOutput, Tensor, Tensor]:
        r"""The Mowst outputs and labels of the nodes a step is scored on, and
        a zero that keeps the graph when there are none."""
        out = self._mowst_forward(data)
        mask = split_mask(data, split)
        y = data.y[mask]
        self._check_labels(y)
        # A zero that depends on every output: in each phase it reaches the
        # trained parameters, so that a process without nodes still runs the
        # backward pass (and DDP's gradient all-reduce) with the others.
        zero = sum(t.sum() for t in out) * 0.0
        return MowstOutput(*(t[mask] for t in out)), y, zero

    def training_step(self, data: Data, batch_idx: int) -> Tensor:
        self._apply_freeze()
        sub, y, zero = self._split_outputs(data, "train")
        loss = self._loss(sub, y) if y.numel() else zero
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        trained = {id(p) for m in self.trained_modules() for p in m.parameters()}
        active = [opt for opt, params in zip(optimizers, self._optimizer_parts(), strict=True)
                  if trained & {id(p) for p in params}]
        for opt in active:
            opt.zero_grad()
        if loss.requires_grad:
            self.manual_backward(loss)
            for opt in active:
                opt.step()
        self.log_loss("train", loss, y.numel())
        if y.numel() or self.distributed:  # every process updates: all sync the states
            self.mowst_metrics["train_"].update(sub, y)
        return loss.detach()

    def _eval_step(self, data: Data, split: str) -> Tensor:
        sub, y, zero = self._split_outputs(data, split)
        loss = self.net.loss(sub, y) if y.numel() else zero
        self.log_loss(split, loss, y.numel() if self.distributed else max(y.numel(), 1))
        if y.numel() or self.distributed:
            self.mowst_metrics[f"{split}_"].update(sub, y)
        return loss

    def validation_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._eval_step(data, "val")

    def test_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._eval_step(data, "test")

    def _log_split(self, split: str) -> Optional[tuple[float, float]]:
        r"""Log the split's scores; return the main score and the score the
        current phase early-stops on (an expert's own when pre-training)."""
        metrics = self.mowst_metrics[f"{split}_"]
        if not int(metrics.num_updates):
            return None
        values = metrics.compute()
        metrics.reset()
        main = values["expected"] if self.net.variant == "mowst" else values["mixture"]
        logged = {}
        for key in ("tau", "mixture", "weak", "strong"):
            logged[f"{split}/{self.metric}_{key}"] = values[key]
        logged[f"{split}/confidence"] = values["confidence"]
        logged[f"{split}/confident"] = values["confident"]
        # The values are synced already (the metric gathers every process's nodes).
        self.log_dict(logged, sync_dist=True)
        self.log(f"{split}/{self.metric}", main, prog_bar=split == "val", sync_dist=True)
        return float(main), float(values[{"pretrain_weak": "weak", "pretrain_strong": "strong"}
                                          .get(self.phase, "expected" if self.net.variant ==
                                               "mowst" else "mixture")])

    def on_train_epoch_start(self) -> None:
        self._apply_freeze()

    def on_train_epoch_end(self) -> None:
        self._log_split("train")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def on_validation_epoch_end(self) -> None:
        scores = self._log_split("val")
        self.log("schedule/round", float(self._schedule["round"]))
        self.log("schedule/phase", float(PHASES.index(self.phase)))
        if self.trainer.sanity_checking or scores is None or self._schedule["done"]:
            return
        self._advance(*scores)

    # -- the schedule ------------------------------------------------------------
    def on_fit_start(self) -> None:
        from lightning.pytorch.callbacks import EarlyStopping
        from lightning.pytorch.utilities import rank_zero_warn

        stoppers = [c for c in self.trainer.callbacks if isinstance(c, EarlyStopping)]
        if stoppers:
            rank_zero_warn("MowstTask early-stops each turn itself; the EarlyStopping callback "
                           "would end training in the middle of a round and is removed")
            self.trainer.callbacks = [c for c in self.trainer.callbacks
                                      if not isinstance(c, EarlyStopping)]
        self._caching = True
        if getattr(self, "_resumed_turn", False):  # the checkpoint's turn goes on
            self._resumed_turn, self._cache = False, None
            self._apply_freeze()
        else:
            self._begin_turn()

    def on_fit_end(self) -> None:
        self._caching, self._cache = False, None

    def _begin_turn(self) -> None:
        s = self._schedule
        s["epoch_in_turn"], s["stale_epochs"], s["turn_best"] = 0, 0, -float("inf")
        self._cache = None
        self._turn_id += 1
        self._turn_start_state = self._trained_state()
        self._turn_best_state = None
        self._apply_freeze()

    def _advance(self, main_score: float, score: float) -> None:
        r"""After each validation: keep the turn's best state; end the turn on
        patience; roll back; move to the next phase or stop.

        ``score`` is what the phase early-stops on (the main score, or the
        pre-trained expert's own); ``main_score`` the Mowst score."""
        s = self._schedule
        s["epoch_in_turn"] += 1
        if score > s["turn_best"] + self.min_delta:
            s["turn_best"], s["stale_epochs"] = score, 0
            self._turn_best_state = self._trained_state()
        else:
            s["stale_epochs"] += 1
        patience = self.turn_patience
        if s["stale_epochs"] < patience and s["epoch_in_turn"] < self._turn_limit():
            return
        # End of the turn: keep its best epoch if it beat the best so far
        # (pre-training always keeps its expert's best epoch).
        if self.phase.startswith("pretrain"):
            self._load_trained_state(self._turn_best_state)
            log.info("mowst: %s ended after %d epochs, best %.4f", self.phase,
                     s["epoch_in_turn"], s["turn_best"])
            self._next_phase()
            return
        gained = s["turn_best"] > s["best"] + self.min_delta
        if gained:
            s["best"] = s["turn_best"]
            self._load_trained_state(self._turn_best_state)
            if self.phase in ("weak", "strong"):
                s["round_gain"] = True
        else:
            self._load_trained_state(self._turn_start_state)
        log.info("mowst: %s turn of round %d ended after %d epochs, best %.4f (%s)",
                 self.phase, s["round"], s["epoch_in_turn"], s["turn_best"],
                 "kept" if gained else "rolled back")
        self._next_phase()

    def _turn_limit(self) -> int:
        return {"pretrain_weak": self.pretrain_weak_epochs,
                "pretrain_strong": self.pretrain_strong_epochs}.get(
            self.phase, self.max_turn_epochs if self.phase != "joint" else 10**9)

    def _next_phase(self) -> None:
        s = self._schedule
        phase = self.phase
        if phase == "joint":
            s["done"] = True
        elif phase == "pretrain_weak":
            s["phase"] = ("pretrain_strong" if self.pretrain_strong_epochs
                          else self._first_trained_phase())
        elif phase == "pretrain_strong":
            s["phase"] = self._first_trained_phase()
        elif phase == "weak":
            s["phase"] = "strong"
        else:  # a round ends after its strong turn
            s["rounds_without_gain"] = 0 if s["round_gain"] else s["rounds_without_gain"] + 1
            s["round_gain"] = False
            if (s["rounds_without_gain"] >= self.round_patience
                    or s["round"] >= self.max_rounds):
                s["done"] = True
            else:
                s["round"] += 1
                s["phase"] = "weak"
        if s["done"]:
            self.trainer.should_stop = True
        else:
            self._begin_turn()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mowst_schedule"] = dict(self._schedule)
        # The turn in progress (its start and best states, for the roll-back)
        # and the training metrics of the epoch so far: a run resumed in the
        # middle of a turn or of an epoch goes on as if never stopped.
        checkpoint["mowst_turn"] = {"turn_id": self._turn_id,
                                    "start_state": self._turn_start_state,
                                    "best_state": self._turn_best_state}
        checkpoint["train_metric_states"] = metric_states(self.mowst_metrics["train_"])

    # -- optimisers ----------------------------------------------------------------
    def _optimizer_parts(self) -> list[list[Tensor]]:
        r"""Parameter groups with one optimizer each: weak expert + gate, and
        the strong expert."""
        net = self.net
        parts = [list(net.weak.parameters()) + list(net.gate.parameters()),
                 list(net.strong.parameters())]
        return [p for p in parts if p]

    def configure_optimizers(self):
        return [self.optimizer_factory(params=params) for params in self._optimizer_parts()]

    def on_test_start(self) -> None:
        self._cache = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._cache = None
        if "mowst_schedule" in checkpoint:
            self._schedule = dict(checkpoint["mowst_schedule"])
        if "mowst_turn" in checkpoint:
            turn = checkpoint["mowst_turn"]
            self._turn_id = turn["turn_id"]
            self._turn_start_state, self._turn_best_state = turn["start_state"], turn["best_state"]
            self._resumed_turn = True
        if "train_metric_states" in checkpoint:
            load_metric_states(self.mowst_metrics["train_"], checkpoint["train_metric_states"])

    # -- after training ------------------------------------------------------------
    @torch.no_grad()
    def write_diagnostics(self, datamodule, output_dir: Path) -> dict[str, float]:
        r"""Confidence of every test node, whether each expert got it right,
        and the cost of sparse inference at the network's threshold:
        ``confidence.json`` and ``confidence.png`` (histogram of :math:`C` for
        nodes the weak expert classifies rightly and wrongly) in
        ``output_dir``; returns ``diag/strong_fraction`` (nodes the GNN must
        decide) and ``diag/subgraph_fraction`` (nodes it must run on)."""
        from moegraph.diagnostics import plot_confidence_histogram

        self.eval()
        data = datamodule.data.to(self.device)
        out = self.net.forward_experts(data.x, data.edge_index)
        prediction = self.net.predict(data.x, data.edge_index, sparse=True)
        mask = data.test_mask
        y = data.y[mask]
        weak_ok = (out.weak_logits[mask].argmax(-1) == y)
        strong_ok = (out.strong_logits[mask].argmax(-1) == y)
        confidence = out.confidence[mask]
        record = {"confidence": confidence.tolist(), "weak_correct": weak_ok.tolist(),
                  "strong_correct": strong_ok.tolist(), "threshold": self.net.threshold}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "confidence.json", "w") as f:
            json.dump(record, f)
        plot_confidence_histogram(confidence, weak_ok, output_dir / "confidence.png",
                                  title=f"Mowst confidence on test nodes ({datamodule.name})")
        N = data.num_nodes
        return {"diag/strong_fraction": float(prediction.strong_mask.float().mean()),
                "diag/subgraph_fraction": prediction.num_subgraph_nodes / max(N, 1)}
