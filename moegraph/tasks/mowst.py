r"""Training Mowst inside Lightning: the paper's schedule of pre-training and
alternating turns, each with early stopping and roll-back (Algorithm 2 of
`Zeng et al. <https://arxiv.org/abs/2311.05185>`_), or joint training for
Mowst*."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.data import Data

from moegraph.checkpoint import from_config, net_from_config
from moegraph.nn.mowst import (
    SIDE_STREAM_TRAIN,
    Mowst,
    MowstOutput,
    check_experts_agree,
    side_stream_seed,
)
from moegraph.nn.output import as_model_output
from moegraph.tasks.common import load_metric_states, metric_states, split_mask
from moegraph.tasks.metrics import MowstMetrics
from moegraph.tasks.mowst_crossfit import CrossFit, crossfit_logits
from moegraph.tasks.mowst_schedule import PHASES, MowstSchedule, ScheduleConfig, Step
from moegraph.tasks.node_classification import NodeClassificationTask

log = logging.getLogger(__name__)
__all__ = ["PHASES", "SELECT_ON", "MowstTask", "holdout_mask"]
SELECT_ON = ("deterministic", "expected")
MIXTURE_PHASES = ("weak", "strong", "joint", "gate")
# Full-batch steps of the gate on the out-of-fold logits before its turn's epochs
# (one step each): a fresh gate moves too little within the turn's patience.
GATE_FIT_STEPS = 300
# The gate's logit that a gate turn which does not beat the GNN is rolled back to:
# C = sigmoid(-30) = 9e-14 on every node, so that Mowst is then its GNN in every
# inference: the deterministic one (C < tau), the sampled one's expectation, and
# Mowst*'s mixture C p_weak + (1 - C) p_strong, whose argmax is the GNN's (in
# float32 1 - C rounds to 1). It was -4 (C = 0.018), which mixed 1.8% of the MLP
# into Mowst*'s prediction: where the GNN's softmax is flat (GAT early-stopped at
# epoch 8 on Cora, loss 1.91 for 7 classes) that moved 4.2% of the test nodes.
GATE_OFF_LOGIT = -30.0


def holdout_mask(node_id: Tensor, share: float, salt: int = 0) -> Tensor:
    r"""Whether each node (by its id in the whole graph) is held out, for a
    fixed share of the nodes: a multiplicative hash of ``node_id + salt``
    below ``share`` of :math:`2^{32}`. The same node is held out in every
    step and mini-batch.

    Shapes:
        - **input:** ``node_id [N]``
        - **output:** ``[N]`` bool
    """
    h = ((node_id.long() + salt) * 2654435761) % (1 << 32)
    return h < int(share * (1 << 32))


class MowstTask(NodeClassificationTask):
    r"""Node classification with a :class:`~moegraph.nn.Mowst` network and
    the paper's training schedule, run by Lightning with manual optimisation.

    ``variant="mowst"`` (the network's): optional pre-training of the weak
    and/or strong expert alone; then rounds of two turns, (a) the weak expert
    and the gate with the strong expert frozen, (b) the strong expert with
    the weak expert and gate frozen. A turn trains until its validation score
    has not improved for ``turn_patience`` epochs (or ``max_turn_epochs``;
    pre-training: ``pretrain_patience``),
    then rolls the trained part back to its best epoch, or to where it began
    when the turn did not beat the best score so far. Training stops after
    ``round_patience`` rounds without a gain, after ``max_rounds`` rounds or
    at the trainer's ``max_epochs``. ``variant="mowst_star"`` trains all three
    jointly (after the same optional pre-training) with early stopping after
    ``turn_patience`` epochs without gain.

    The schedule replaces early stopping: an ``EarlyStopping`` callback of the
    trainer is removed (with a warning) when fitting starts. Frozen parts are
    in eval mode with gradients off; in full-batch training
    their outputs are computed once per turn (they do not change).

    The reported ``{split}/{metric}`` (the headline, and what the checkpoint
    callback selects on) is the score of deterministic inference, what
    :meth:`~moegraph.nn.Mowst.predict` computes: the weak expert where
    :math:`C_v \ge \tau`, else the strong one, for Mowst; the argmax of the
    mixture for Mowst*. It is ``NaN`` while an expert pre-trains alone (no
    Mowst exists yet, so no such epoch is selected as the Mowst checkpoint)
    and, at the end of a turn that is rolled back, since the weights are then
    those of the turn's start. ``{split}/{metric}_expected`` (the paper's
    sampled inference), ``_tau``, ``_weak``, ``_strong``, ``_mixture``,
    ``{split}/confidence`` and ``{split}/confident`` are logged too, and
    ``schedule/round``, ``schedule/phase`` (an index into :data:`PHASES`);
    ``test/checkpoint_phase`` says in which phase the tested weights were
    validated, ``test/checkpoint_mixture`` whether the gate had trained.

    **The strong expert's pre-training is the GNN trained alone.** For a
    given seed, it reproduces bit for bit what ``moegraph-train
    model=gnn model/strong=<same> seed=<same>`` trains (on CPU; GPU kernels
    with atomic adds are not bit-reproducible even between two GNN runs),
    full batch or with :class:`~moegraph.data.NeighborLoader` mini-batches:
    the same initial weights (:class:`~moegraph.nn.Mowst` builds the strong
    expert first, from the caller's random state, and the weak expert and
    the gate from a side stream), the same random numbers (dropout, the
    loaders' seeds: the pre-training draws from the run's own stream, every
    other phase, the weak expert's pre-training, the cross-fitting and the
    gate, from a side stream, see :meth:`_switch_stream`; a mini-batch
    loader gets the pre-training's epoch, see :meth:`_set_loader_epoch`),
    the same optimizer (a fresh one on the strong expert's parameters), the
    same early stopping (``pretrain_strong_epochs`` and
    ``pretrain_patience`` as ``trainer.max_epochs`` and the
    ``EarlyStopping`` patience of the GNN's run, ``pretrain_min_delta=0``
    as its ``min_delta``: a gain is any rise) and the same selection (the
    first epoch of the best validation score, as ``ModelCheckpoint``
    keeps). With ``max_rounds=0`` (the default) the strong expert does not
    train after it, so when the gate's turn is rolled back Mowst's scores
    are exactly the GNN run's (tested in
    ``tests/tasks/test_mowst_paired_gnn.py``). The defaults of pre-training
    match the study's GNN protocol (``conf/experiment/_nc.yaml``: 300
    epochs, patience 50).

    The defaults depart from the paper's formulation (``crossfit_folds=0``,
    ``gate_holdout=0``, ``select_on="expected"``, see
    ``conf/model/mowst_paper.yaml``), for a reason found in
    ``experiments/results/mowst_diagnosis.md``: both experts fit the training
    nodes, so the gate, trained on them, learns no confidence (the gradient
    of :math:`C_v` is :math:`\mathrm{CE}^w_v - \mathrm{CE}^s_v \approx 0`) or
    learns one that holds only on what the weak expert memorised.

    With ``crossfit_folds=K`` (cross-fitting, stacking; see
    :mod:`~moegraph.tasks.mowst_crossfit`), the training nodes are split into
    :math:`K` folds and, for each, fresh copies of both experts train on the
    other folds (early-stopped on validation) and predict it: every training
    node gets out-of-fold logits of both experts, as a test node does. After
    the pre-training of the final experts on all training nodes, the gate
    alone learns (phase ``"gate"``) from those out-of-fold logits on every
    training node (its input: the dispersion of the weak expert's
    out-of-fold prediction): :data:`GATE_FIT_STEPS` full-batch steps first,
    then the turn's epochs, early-stopped on validation with the final
    experts. It must beat the GNN's own validation score to be kept, else it
    is rolled back to :math:`C \approx 0` (:data:`GATE_OFF_LOGIT`) on every node
    (Mowst = its GNN, Mowst* too).
    By default (``max_rounds=0``) training ends there; with ``max_rounds > 0``
    rounds of alternating turns follow (the gate turn is round 1's weak
    turn). The cross-fitting trains
    :math:`2K` expert copies outside the trainer's epochs (full batch on the
    whole graph, also when the data module samples mini-batches).

    With ``gate_holdout=h`` a fixed share :math:`h` of the training nodes is
    held out from the weak expert (its pre-training and its part of each
    loss) and is where the gate learns in a weak turn (the experts' outputs
    detached there). ``select_on`` is the score each turn early-stops on and
    must beat to be kept.

    A budget ``trainer.max_epochs`` too short for the schedule (pre-training
    plus one turn of each part) scales the pre-training budgets and the
    patience down to fit it, with a warning, so that a short run still trains
    both experts and the gate; below three epochs it raises.

    Args:
        net (Mowst): the network.
        num_classes (int): number of classes.
        optimizer (callable): partial optimizer; called once for the weak
            expert and gate and once for the strong expert.
        metric (str, optional): ``"acc"`` or ``"auroc"``. (default: :obj:`"acc"`)
        pretrain_weak_epochs (int, optional): maximum epochs of weak-expert
            pre-training (early-stopped); :obj:`0` skips it. The defaults
            of pre-training are those of the study's baselines (300 epochs,
            patience 50), so that Mowst's GNN is trained as the GNN alone.
            (default: :obj:`300`)
        pretrain_strong_epochs (int, optional): the same for the strong expert.
            (default: :obj:`300`)
        pretrain_patience (int, optional): epochs without gain that end a
            pre-training. (default: :obj:`50`)
        max_turn_epochs (int, optional): epochs per turn at most.
            (default: :obj:`100`)
        turn_patience (int, optional): epochs without gain that end a turn.
            (default: :obj:`20`)
        max_rounds (int, optional): rounds at most; with cross-fitting,
            :obj:`0` ends training after the gate turn (the alternating turns
            after it did not change the result in
            ``experiments/results/mowst_crossfit.md`` and doubled the time);
            without, it must be positive. (default: :obj:`0`)
        round_patience (int, optional): rounds without gain that end
            training. (default: :obj:`2`)
        min_delta (float, optional): the least rise of the validation score
            that counts as a gain in the turns (the expected score of Mowst
            rises by tiny steps as the gate sharpens). (default: :obj:`1e-3`)
        pretrain_min_delta (float, optional): the same in pre-training:
            :obj:`0` (any rise), as Lightning's ``EarlyStopping`` of the
            experts' runs alone. (default: :obj:`0.0`)
        crossfit_folds (int, optional): folds :math:`K \ge 2` of the
            cross-fitting from which the gate learns in its own turn;
            :obj:`0` is the paper's formulation (no gate turn). The fold
            copies train for the pre-training budgets (``max_turn_epochs``
            when one is :obj:`0`) with ``pretrain_patience``. (default: :obj:`2`)
        gate_holdout (float, optional): share of the training nodes held out
            from the weak expert, on which alone the gate learns in the weak
            turns; :obj:`0` is the paper's formulation. (default: :obj:`0.0`)
        select_on (str, optional): the validation score of the turns,
            ``"deterministic"`` (the headline) or ``"expected"`` (the paper's
            sampled inference); Mowst* always uses its mixture.
            (default: :obj:`"deterministic"`)
        multilabel (bool, optional): must be :obj:`False`: multi-label data
            (ogbn-proteins) is refused with a clear error.
    """

    def __init__(self, net: Mowst, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Optional[Callable[..., Any]] = None,
                 aux_loss_weights: Optional[dict[str, float]] = None,
                 metric: str = "acc", pretrain_weak_epochs: int = 300,
                 pretrain_strong_epochs: int = 300, pretrain_patience: int = 50,
                 max_turn_epochs: int = 100,
                 turn_patience: int = 20, max_rounds: int = 0, round_patience: int = 2,
                 min_delta: float = 1e-3, crossfit_folds: int = 2, gate_holdout: float = 0.0,
                 select_on: str = "deterministic", multilabel: bool = False,
                 pretrain_min_delta: float = 0.0):
        if multilabel:
            raise ValueError("MowstTask takes one class per node (its confidence and "
                             "mixture are per node over classes); multi-label data "
                             "(multilabel=True, e.g. ogbn_proteins) needs a "
                             "NodeClassificationTask model (mlp, gnn, moe_gnn, gmoe, ...)")
        net, optimizer = net_from_config(net), from_config(optimizer)  # see moegraph.checkpoint
        if not isinstance(net, Mowst):
            raise TypeError(f"MowstTask needs a moegraph.nn.Mowst network (got "
                            f"{type(net).__name__})")
        if scheduler is not None:
            raise ValueError("MowstTask does not take a scheduler: its turns restart and "
                             "roll back training")
        if not (isinstance(gate_holdout, (int, float)) and 0.0 <= gate_holdout < 1.0):
            raise ValueError(f"'gate_holdout' must lie in [0, 1) (got {gate_holdout!r})")
        if select_on not in SELECT_ON:
            raise ValueError(f"'select_on' must be one of {SELECT_ON} (got {select_on!r})")
        if isinstance(crossfit_folds, bool) or not isinstance(crossfit_folds, int) \
                or crossfit_folds == 1 or crossfit_folds < 0:
            raise ValueError(f"'crossfit_folds' must be 0 (no cross-fitting) or an integer "
                             f"of at least 2 (got {crossfit_folds!r})")
        if crossfit_folds and net.gate.mlp is None:
            raise ValueError(f"cross-fitting trains the gate: 'crossfit_folds' needs "
                             f"gate_type='mlp' (got {net.gate.gate_type!r}); set "
                             f"crossfit_folds=0 for a fixed gate")
        config = ScheduleConfig(pretrain_weak_epochs, pretrain_strong_epochs, max_turn_epochs,
                                turn_patience, max_rounds, round_patience, min_delta,
                                joint=net.variant == "mowst_star",
                                gate_turn=crossfit_folds > 0,
                                pretrain_patience=pretrain_patience,
                                pretrain_min_delta=pretrain_min_delta)
        c = net.out_channels
        if isinstance(c, int) and c != num_classes:
            raise ValueError(f"the network predicts {c} classes, the data has {num_classes}")
        super().__init__(net, num_classes, optimizer, None, aux_loss_weights, metric)
        self.automatic_optimization = False
        self.net: Mowst = net
        self.schedule_config = config
        self.pretrain_weak_epochs = pretrain_weak_epochs
        self.pretrain_strong_epochs = pretrain_strong_epochs
        self.max_turn_epochs = max_turn_epochs
        self.turn_patience = turn_patience
        self.pretrain_patience = pretrain_patience
        self.max_rounds = max_rounds
        self.round_patience = round_patience
        self.min_delta = min_delta
        self.pretrain_min_delta = pretrain_min_delta
        self.crossfit_folds = crossfit_folds
        self.gate_holdout = float(gate_holdout)
        self.select_on = select_on
        self.crossfit: Optional[CrossFit] = None
        self.mowst_metrics = torch.nn.ModuleDict(
            {f"{split}_": MowstMetrics(metric, net.threshold)
             for split in ("train", "val", "test")})
        self._cache: Optional[tuple[tuple, Any]] = None
        self._caching = False
        self._turn_id = 0
        self._turn_start_state: Optional[dict[str, Tensor]] = None
        self._turn_best_state: Optional[dict[str, Tensor]] = None
        self._resumed_turn = False
        self.schedule = MowstSchedule(config)
        self._holdout_salt = 0
        # the random streams (see _switch_stream): which one is torch's global
        # one now, and the saved state of the other
        self._stream: Optional[str] = None
        self._stream_states: dict[str, Any] = {}
        self._validated_phase: Optional[str] = None
        self.checkpoint_phase: Optional[str] = None
        self.turn_log: list[dict[str, Any]] = []

    # -- schedule state ----------------------------------------------------------
    @property
    def phase(self) -> str:
        r"""The current phase, one of :data:`PHASES`."""
        return self.schedule.phase

    def trained_modules(self, phase: Optional[str] = None) -> list[Module]:
        r"""The parts of the network a phase trains."""
        phase = phase or self.phase
        net = self.net
        parts: dict[str, list[Module]] = {
            "pretrain_weak": [net.weak], "pretrain_strong": [net.strong],
            "weak": [net.weak, net.gate], "strong": [net.strong],
            "joint": [net.weak, net.gate, net.strong], "gate": [net.gate]}
        return parts[phase]

    def _metrics(self, split: str) -> MowstMetrics:
        metrics = self.mowst_metrics[f"{split}_"]
        assert isinstance(metrics, MowstMetrics)
        return metrics

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
    def _mowst_forward(self, data: Data, out_of_fold: bool = False) -> MowstOutput:
        r"""The experts and the gate on ``data``; the frozen part is computed
        without gradients, and once per turn on a full graph. With
        ``out_of_fold`` in the gate's turn, the experts' logits are those of
        the cross-fitting (rows of the training nodes only are meaningful)."""
        net = self.net
        x, edge_index = data.x, data.edge_index
        net.check_inputs(x, edge_index)
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
        elif phase == "gate":
            if out_of_fold:
                crossfit = self._crossfit_for(data)
                node_id = getattr(data, "n_id", None)
                node_id = (torch.arange(x.size(0), device=x.device) if node_id is None
                           else node_id)
                weak = crossfit.weak_logits[node_id].to(x.dtype)
                strong = crossfit.strong_logits[node_id].to(x.dtype)
            else:
                weak, strong = self._cached(key, full_graph, lambda: (
                    net.weak_forward(x, edge_index), net.strong_forward(x, edge_index)))
            gate = net.gate_forward(weak, x)
        else:
            return net.forward_experts(x, edge_index)
        check_experts_agree(weak, strong)
        return MowstOutput(weak, strong, gate, torch.sigmoid(gate))

    def _crossfit_for(self, data: Data) -> CrossFit:
        r"""The out-of-fold logits of the experts (see
        :func:`~moegraph.tasks.mowst_crossfit.crossfit_logits`), computed the
        first time they are needed, on ``data`` when it is the whole graph,
        else on the data module's graph."""
        if self.crossfit is not None:
            return self.crossfit
        graph = data
        if isinstance(getattr(data, "batch_size", None), int):  # a mini-batch
            module = getattr(self._trainer, "datamodule", None) if self._trainer else None
            graph = getattr(module, "data", None)
            if graph is None:
                raise ValueError("cross-fitting (crossfit_folds > 0) with mini-batches needs "
                                 "a data module with the whole graph as `.data`")
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"Mowst cross-fitting trains its expert copies full-batch on the "
                           f"whole graph ({graph.num_nodes:,} nodes, {graph.num_edges:,} "
                           f"edges) although training uses mini-batches; set "
                           f"model.crossfit_folds=0 if that does not fit in memory")
            graph = graph.to(self.device)
        net, c = self.net, self.schedule_config
        x, edge_index = graph.x, graph.edge_index
        weak_graph = net._weak_takes_graph

        def weak_forward(model: Module) -> Tensor:
            return as_model_output(model(x, edge_index) if weak_graph else model(x)).logits

        def strong_forward(model: Module) -> Tensor:
            return as_model_output(model(x, edge_index)).logits

        with torch.enable_grad(), torch.inference_mode(False):
            self.crossfit = crossfit_logits(
                net.weak, net.strong, weak_forward, strong_forward, graph.y, graph.train_mask,
                graph.val_mask, self.crossfit_folds, self._holdout_salt,
                self.optimizer_factory,
                (c.pretrain_weak_epochs or c.max_turn_epochs,
                 c.pretrain_strong_epochs or c.max_turn_epochs),
                c.pretrain_patience, self.metric)
            self._fit_gate(self.crossfit, graph)
        log.info("mowst: cross-fitting (%d folds): %s", self.crossfit_folds,
                 ", ".join(f"{n} fold {k}: {e} epochs, val {b:.4f}"
                           for n, k, e, b in self.crossfit.epochs))
        return self.crossfit

    def _fit_gate(self, crossfit: CrossFit, graph: Data) -> None:
        r"""Fit the gate to the out-of-fold logits of the training nodes
        (:data:`GATE_FIT_STEPS` full-batch steps of its own optimizer); the
        turn's epochs go on from there, early-stopped on validation."""
        net, mask = self.net, graph.train_mask
        weak, strong = crossfit.weak_logits[mask], crossfit.strong_logits[mask]
        x, y = graph.x[mask], graph.y[mask]
        optimizer = self.optimizer_factory(params=list(net.gate.parameters()))
        net.gate.train()
        for _ in range(GATE_FIT_STEPS):
            optimizer.zero_grad()
            logit = net.gate_forward(weak, x)
            net.loss(MowstOutput(weak, strong, logit, torch.sigmoid(logit)), y).backward()
            optimizer.step()

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

    def _loss(self, out: MowstOutput, y: Tensor, held: Optional[Tensor] = None) -> Tensor:
        r"""The loss of the phase; with ``held`` (the held-out nodes of
        ``gate_holdout``), the weak expert learns on the other nodes only and
        the gate on the held-out ones only."""
        if self.phase == "pretrain_strong":
            return F.cross_entropy(out.strong_logits, y)
        if self.phase == "gate":  # out-of-fold logits, only the gate learns
            return self.net.loss(out, y)
        if held is None or not bool(held.any()):
            if self.phase == "pretrain_weak":
                return F.cross_entropy(out.weak_logits, y)
            return self.net.loss(out, y)
        fit = ~held
        if self.phase == "pretrain_weak":
            if not bool(fit.any()):
                return out.weak_logits.sum() * 0.0
            return F.cross_entropy(out.weak_logits[fit], y[fit])
        total = out.weak_logits.new_zeros(())
        if bool(fit.any()):  # the experts learn, the gate does not
            a = MowstOutput(out.weak_logits[fit], out.strong_logits[fit],
                            out.gate_logit[fit].detach(), out.confidence[fit].detach())
            total = total + self.net.loss(a, y[fit]) * int(fit.sum())
        # the gate (and the strong expert) learn where the weak expert did not
        b = MowstOutput(out.weak_logits[held].detach(), out.strong_logits[held],
                        out.gate_logit[held], out.confidence[held])
        total = total + self.net.loss(b, y[held]) * int(held.sum())
        return total / y.numel()

    def _held_out(self, data: Data, mask: Tensor) -> Optional[Tensor]:
        r"""The held-out nodes among ``mask`` (for :attr:`gate_holdout`)."""
        if not self.gate_holdout:
            return None
        node_id = getattr(data, "n_id", None)
        if node_id is None:
            node_id = torch.arange(data.num_nodes, device=mask.device)
        return holdout_mask(node_id[mask], self.gate_holdout, self._holdout_salt)

    # -- steps -------------------------------------------------------------------
    def _split_outputs(self, data: Data, split: str) -> tuple[MowstOutput, Tensor, Tensor]:
        r"""The Mowst outputs and labels of the nodes a step is scored on, and
        a zero that keeps the graph when there are none."""
        out = self._mowst_forward(data, out_of_fold=split == "train")
        mask = split_mask(data, split)
        if split in ("train", "val"):  # the schedule early-stops on validation nodes
            self.check_split_not_empty(data, mask, split)
        y = data.y[mask]
        self._check_labels(y)
        # A zero that depends on every output: in each phase it reaches the
        # trained parameters, so that a process without nodes still runs the
        # backward pass (and DDP's gradient all-reduce) with the others.
        zero = torch.stack([t.sum() for t in out]).sum() * 0.0
        return MowstOutput(*(t[mask] for t in out)), y, zero

    def training_step(self, data: Data, batch_idx: int) -> Tensor:
        self._apply_freeze()
        sub, y, zero = self._split_outputs(data, "train")
        held = self._held_out(data, split_mask(data, "train"))
        loss = self._loss(sub, y, held) if y.numel() else zero
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
            self._metrics("train").update(sub, y)
        return loss.detach()

    def _eval_step(self, data: Data, split: str) -> Tensor:
        sub, y, zero = self._split_outputs(data, split)
        loss = self.net.loss(sub, y) if y.numel() else zero
        self.log_loss(split, loss, y.numel() if self.distributed else max(y.numel(), 1))
        if y.numel() or self.distributed:
            self._metrics(split).update(sub, y)
        return loss

    def validation_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._eval_step(data, "val")

    def test_step(self, data: Data, batch_idx: int) -> Tensor:
        return self._eval_step(data, "test")

    def _scores(self, split: str) -> Optional[dict[str, Tensor]]:
        r"""The split's Mowst scores of the epoch (and reset), or :obj:`None`
        without an update."""
        metrics = self._metrics(split)
        if not int(metrics.num_updates):
            return None
        values = metrics.compute()
        metrics.reset()
        return values

    def _headline_key(self) -> str:
        return "tau" if self.net.variant == "mowst" else "mixture"

    def _log_split(self, split: str, values: Optional[dict[str, Tensor]],
                   headline: Optional[float] = None) -> None:
        r"""Log the split's scores; ``headline`` overrides the logged
        ``{split}/{metric}`` (``NaN`` when the weights have no Mowst score)."""
        if values is None:
            return
        logged = {}
        for key in ("expected", "tau", "mixture", "weak", "strong"):
            logged[f"{split}/{self.metric}_{key}"] = values[key]
        logged[f"{split}/confidence"] = values["confidence"]
        logged[f"{split}/confident"] = values["confident"]
        # The values are synced already (the metric gathers every process's nodes).
        self.log_dict(logged, sync_dist=True)
        main = values[self._headline_key()] if headline is None else torch.tensor(headline)
        self.log(f"{split}/{self.metric}", main, prog_bar=split == "val", sync_dist=True)

    def _phase_score(self, values: dict[str, Tensor]) -> tuple[float, float]:
        r"""The score the current phase early-stops on, and the score that
        breaks its ties (see :meth:`MowstSchedule.step`)."""
        if self.phase == "pretrain_weak":
            return float(values["weak"]), -math.inf
        if self.phase == "pretrain_strong":
            return float(values["strong"]), -math.inf
        if self.net.variant == "mowst_star":
            return float(values["mixture"]), -math.inf
        if self.select_on == "deterministic":
            return float(values["tau"]), float(values["expected"])
        return float(values["expected"]), -math.inf

    def on_train_epoch_start(self) -> None:
        self._switch_stream()
        if self.phase == "pretrain_strong":
            self._set_loader_epoch(self.schedule.epoch_in_turn)
        self._apply_freeze()

    def _set_loader_epoch(self, epoch: int) -> None:
        r"""Give the training loader's samplers (which draw a mini-batch
        order and neighbourhoods per epoch, see
        :class:`~moegraph.data.NeighborLoader`) the epoch of the strong
        expert's pre-training instead of the trainer's: its ``k``-th epoch
        sees the mini-batches of the GNN alone's ``k``-th. Lightning set the
        trainer's epoch before this hook; the loader reads it when iterated,
        after it."""
        if self._trainer is None:
            return
        loaders = self.trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            batch_sampler = getattr(loader, "batch_sampler", None)
            for sampler in (getattr(loader, "sampler", None),
                            getattr(batch_sampler, "sampler", None)):
                set_epoch = getattr(sampler, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(epoch)

    def _switch_stream(self) -> None:
        r"""Make torch's global random stream (and Python's and NumPy's) the
        one of the phase about to train: the run's own stream in the strong
        expert's pre-training, a side stream in every other phase.

        When fitting starts, the random state is the one that a
        ``model=gnn`` run of the same seed has there (the
        network's constructor leaves it so, see :class:`~moegraph.nn.Mowst`);
        it is kept for the strong expert's pre-training, and the other
        phases (the weak expert's pre-training, the cross-fitting, the gate)
        draw from a side stream seeded from it (without consuming it, see
        :func:`~moegraph.nn.mowst.side_stream_seed`). So the strong expert
        pre-trains on the very random numbers (dropout, loader seeds,
        neighbour sampling) of the GNN trained alone. Called when fitting
        starts and at each epoch's start, before the epoch's loader draws its
        seed."""
        from moegraph.checkpoint import random_states, set_random_states

        want = "strong" if self.phase == "pretrain_strong" else "side"
        if self._stream is None:  # a fit starts
            seed = side_stream_seed(SIDE_STREAM_TRAIN)
            self._holdout_salt = seed % (1 << 30)
            self._stream_states = {"side_seed": seed}
            self._stream = "strong"
        if want == self._stream:
            return
        self._stream_states[self._stream] = random_states()
        if want in self._stream_states:
            set_random_states(self._stream_states.pop(want))
        else:  # the side stream's first use
            seed = int(self._stream_states["side_seed"])
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
        self._stream = want

    def on_train_epoch_end(self) -> None:
        self._log_split("train", self._scores("train"))

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self._scores("test"))
        phase = self.checkpoint_phase or self._validated_phase or self.phase
        self.log("test/checkpoint_phase", float(PHASES.index(phase)))
        self.log("test/checkpoint_mixture", float(phase in MIXTURE_PHASES))

    def on_validation_epoch_end(self) -> None:
        values = self._scores("val")
        self.log("schedule/round", float(self.schedule.round))
        self.log("schedule/phase", float(PHASES.index(self.phase)))
        if self.trainer.sanity_checking or values is None or self.schedule.done \
                or self.trainer.state.fn != "fit":
            self._log_split("val", values)
            return
        self._validated_phase = self.phase
        headline = float(values[self._headline_key()])
        step = self._advance(*self._phase_score(values))
        # The logged (and checkpoint-selected) headline is that of the weights
        # now in the network: none while an expert pre-trains alone; at the end
        # of a turn, the turn's best if it was kept and selected on the
        # headline, else unknown (rolled back).
        # The gate's turn: only the state it ends with (its best epoch, or
        # rolled back to Mowst = its GNN, whose score is the GNN's, the score
        # it had to beat) may be the checkpoint; its other epochs lost to it.
        phase = self._validated_phase
        if phase not in MIXTURE_PHASES:
            headline = math.nan
        elif step is not None and step.turn_over:
            same = self.net.variant == "mowst_star" or self.select_on == "deterministic"
            known = step.kept or (phase == "gate" and math.isfinite(self.schedule.best))
            headline = self.schedule.best if known and same else math.nan
        elif phase == "gate":
            headline = math.nan
        self._log_split("val", values, headline)

    # -- the schedule ------------------------------------------------------------
    def on_fit_start(self) -> None:
        from lightning.pytorch.callbacks import EarlyStopping
        from lightning.pytorch.utilities import rank_zero_warn

        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set in Trainer
        stoppers = [c for c in callbacks if isinstance(c, EarlyStopping)]
        if stoppers:
            rank_zero_warn("MowstTask early-stops each turn itself; the EarlyStopping callback "
                           "would end training in the middle of a round and is removed")
            self.trainer.callbacks = [  # type: ignore[attr-defined]
                c for c in callbacks if not isinstance(c, EarlyStopping)]
        self._caching = True
        if self._resumed_turn:  # the checkpoint's turn goes on
            self._resumed_turn, self._cache = False, None
            self._apply_freeze()
        else:
            self._fit_schedule_to_budget(self.trainer.max_epochs)
            self._stream, self._stream_states = None, {}
            self._begin_turn()
        # before the loader of the first epoch draws its seed (in Lightning's
        # fit loop, ahead of on_train_epoch_start)
        self._switch_stream()
        # The frozen parts' eval mode is set again at every epoch and step
        # (on_train_epoch_start, training_step); until then every part is in
        # train mode, so that Lightning's fit loop, which warns of modules in
        # eval mode when it starts, does not warn of an intended freeze.
        self.net.train()

    def _fit_schedule_to_budget(self, max_epochs: Optional[int]) -> None:
        r"""Scale the pre-training budgets and the patience down (with a
        warning) when ``max_epochs`` is shorter than the schedule's minimum
        (:meth:`~moegraph.tasks.mowst_schedule.ScheduleConfig.min_epochs`), so
        that both experts and the gate train; raise below three epochs."""
        from lightning.pytorch.utilities import rank_zero_warn

        c = self.schedule_config
        # a smoke run (fast_dev_run): one batch of each phase it reaches
        if self._trainer is not None and bool(getattr(self._trainer, "fast_dev_run", False)):
            return
        if max_epochs is None or max_epochs < 0 or max_epochs >= c.min_epochs():
            return
        turns = (1 + int(c.max_rounds > 0)) if c.gate_turn else 1 if c.joint else 2
        if max_epochs < turns + (c.pretrain_weak_epochs > 0) + (c.pretrain_strong_epochs > 0):
            raise ValueError(f"trainer.max_epochs={max_epochs} is too short for Mowst's "
                             f"schedule: it needs an epoch per pre-training and per turn "
                             f"(at least {c.min_epochs()} epochs for its settings)")
        factor = max_epochs / c.min_epochs()
        scaled = ScheduleConfig(
            pretrain_weak_epochs=max(int(c.pretrain_weak_epochs * factor),
                                     int(c.pretrain_weak_epochs > 0)),
            pretrain_strong_epochs=max(int(c.pretrain_strong_epochs * factor),
                                       int(c.pretrain_strong_epochs > 0)),
            max_turn_epochs=c.max_turn_epochs,
            turn_patience=max(int(c.turn_patience * factor), 1),
            max_rounds=c.max_rounds, round_patience=c.round_patience,
            min_delta=c.min_delta, joint=c.joint, gate_turn=c.gate_turn,
            pretrain_patience=max(int(c.pretrain_patience * factor), 1),
            pretrain_min_delta=c.pretrain_min_delta)
        rank_zero_warn(
            f"MowstTask: trainer.max_epochs={max_epochs} is shorter than the schedule "
            f"({c.min_epochs()} epochs: pre-training {c.pretrain_weak_epochs} + "
            f"{c.pretrain_strong_epochs}, turn patience {c.turn_patience}); scaled to "
            f"pre-training {scaled.pretrain_weak_epochs} + {scaled.pretrain_strong_epochs}, "
            f"turn patience {scaled.turn_patience}, so that both experts and the gate train")
        self.schedule_config = scaled
        self.schedule = MowstSchedule(scaled)

    def on_fit_end(self) -> None:
        self._caching, self._cache = False, None

    def _begin_turn(self) -> None:
        self.schedule.begin_turn()
        self._cache = None
        self._turn_id += 1
        gate = self.net.gate
        if self.phase == "gate":  # rolled back, Mowst is its GNN
            gate.reset_parameters()
            assert gate.mlp is not None  # the constructor checks it
            last: Any = gate.mlp.lins[-1]  # type: ignore[index]  # PyG's MLP: a Linear
            with torch.no_grad():  # a constant C on every node
                last.weight.zero_()
                last.bias.fill_(GATE_OFF_LOGIT)
        self._turn_start_state = self._trained_state()
        if self.phase == "gate":
            # The gate learns from a fresh initialisation (C about 0.5): from the
            # roll-back state, the deterministic score stays flat (C far below
            # tau) for more epochs than the turn's patience.
            gate.reset_parameters()
        self._turn_best_state = None
        self._apply_freeze()

    def _advance(self, score: float, tiebreak: float = -math.inf) -> Step:
        r"""After each validation: keep the turn's best state; at the end of
        a turn, keep its best epoch or roll back, as the schedule says; move
        to the next phase or stop.

        ``score`` is what the phase early-stops on (the selected Mowst score,
        or the pre-trained expert's own)."""
        s = self.schedule
        phase, round_, best_before = s.phase, s.round, s.best
        step = s.step(score, tiebreak)
        if step.improved:
            self._turn_best_state = self._trained_state()
        if not step.turn_over:
            return step
        if phase == "pretrain_strong" and self.crossfit_folds:
            # the gate's turn must beat the GNN alone to be kept
            s.set_baseline(step.turn_best)
        self.turn_log.append({"phase": phase, "round": round_, "epochs": step.epochs,
                              "turn_best": step.turn_best, "best_before": best_before,
                              "kept": step.kept})
        state = self._turn_best_state if step.restore == "best" else self._turn_start_state
        if state is not None:
            self._load_trained_state(state)
        log.info("mowst: %s turn of round %d ended after %d epochs, best %.4f (%s)",
                 phase, round_, step.epochs, step.turn_best,
                 "kept" if step.kept else "rolled back")
        if s.done:
            self.trainer.should_stop = True
        else:
            self._begin_turn()
        return step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mowst_schedule"] = self.schedule.state_dict()
        # The turn in progress (its start and best states, for the roll-back)
        # and the training metrics of the epoch so far: a run resumed in the
        # middle of a turn or of an epoch goes on as if never stopped.
        checkpoint["mowst_turn"] = {"turn_id": self._turn_id,
                                    "start_state": self._turn_start_state,
                                    "best_state": self._turn_best_state}
        checkpoint["train_metric_states"] = metric_states(self.mowst_metrics["train_"])
        if self.crossfit is not None:
            checkpoint["mowst_crossfit"] = self.crossfit._asdict()
        checkpoint["mowst_streams"] = {"stream": self._stream,
                                       "states": dict(self._stream_states)}
        checkpoint["mowst_run"] = {"validated_phase": self._validated_phase,
                                   "turn_log": list(self.turn_log),
                                   "holdout_salt": self._holdout_salt,
                                   "schedule_config": dataclasses.asdict(self.schedule_config)}

    # -- optimisers ----------------------------------------------------------------
    def _optimizer_parts(self) -> list[list[torch.nn.Parameter]]:
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
        run = checkpoint.get("mowst_run", {})
        self.checkpoint_phase = run.get("validated_phase")
        fitting = self._trainer is None or self.trainer.state.fn == "fit"
        if run and fitting:
            self.turn_log = list(run["turn_log"])
            self._holdout_salt = run["holdout_salt"]
            self.schedule_config = ScheduleConfig(**run["schedule_config"])
        if "mowst_schedule" in checkpoint:
            self.schedule = MowstSchedule(self.schedule_config)
            self.schedule.load_state_dict(checkpoint["mowst_schedule"])
        if "mowst_turn" in checkpoint:
            turn = checkpoint["mowst_turn"]
            self._turn_id = turn["turn_id"]
            self._turn_start_state, self._turn_best_state = turn["start_state"], turn["best_state"]
            self._resumed_turn = True
        if "mowst_crossfit" in checkpoint:
            self.crossfit = CrossFit(**checkpoint["mowst_crossfit"])
        if "mowst_streams" in checkpoint and fitting:
            streams = checkpoint["mowst_streams"]
            self._stream, self._stream_states = streams["stream"], dict(streams["states"])
        if "train_metric_states" in checkpoint:
            load_metric_states(self.mowst_metrics["train_"], checkpoint["train_metric_states"])

    # -- after training ------------------------------------------------------------
    @torch.no_grad()
    def diagnose(self, data: Data, out: Optional[MowstOutput] = None) -> dict[str, Any]:
        r"""What the trained Mowst does on each split of a full graph, for
        ``mowst_diagnosis.json``: each expert's accuracy, the deterministic
        and expected accuracy, the spread of the confidence and how it
        relates to the weak expert being right (ROC-AUC of :math:`C` as a
        predictor of it), the accuracy of both experts on the nodes kept by
        the weak expert (:math:`C \ge \tau`); on the training nodes also
        apart for those held out from the weak expert (``gate_holdout``).
        Plus the turns of the schedule (kept or rolled back) and the phase in
        which the tested weights were validated."""
        from torchmetrics.functional.classification import binary_auroc

        if out is None:
            out = self.net.forward_experts(data.x, data.edge_index)
        tau = self.net.threshold

        def summary(mask: Tensor, out: MowstOutput = out) -> dict[str, float]:
            y = data.y[mask]
            c = out.confidence[mask].float()
            weak_ok = (out.weak_logits[mask].argmax(-1) == y).float()
            strong_ok = (out.strong_logits[mask].argmax(-1) == y).float()
            keep = c >= tau
            q = torch.quantile(c, torch.tensor([0.05, 0.5, 0.95])) if c.numel() else None
            both = bool(weak_ok.min() < 1) and bool(weak_ok.max() > 0) if c.numel() else False

            def mean(t: Tensor) -> float:
                return float(t.mean()) if t.numel() else math.nan

            return {
                "nodes": int(mask.sum()), "weak_acc": mean(weak_ok),
                "strong_acc": mean(strong_ok),
                "tau_acc": mean(torch.where(keep, weak_ok, strong_ok)),
                "expected_acc": mean(c * weak_ok + (1 - c) * strong_ok),
                "confidence_mean": mean(c),
                "confidence_std": float(c.std()) if c.numel() > 1 else math.nan,
                "confidence_q05": float(q[0]) if q is not None else math.nan,
                "confidence_q50": float(q[1]) if q is not None else math.nan,
                "confidence_q95": float(q[2]) if q is not None else math.nan,
                "kept_share": mean(keep.float()),
                "weak_acc_on_kept": mean(weak_ok[keep]),
                "strong_acc_on_kept": mean(strong_ok[keep]),
                "confidence_if_weak_right": mean(c[weak_ok.bool()]),
                "confidence_if_weak_wrong": mean(c[~weak_ok.bool()]),
                "confidence_auroc_weak_right": float(binary_auroc(c, weak_ok.long()))
                if both else math.nan,
            }

        splits = {split: summary(data[f"{split}_mask"]) for split in ("train", "val", "test")}
        if self.gate_holdout:
            train = data.train_mask
            held = holdout_mask(torch.arange(data.num_nodes, device=train.device),
                                self.gate_holdout, self._holdout_salt)
            splits["train_fitted"] = summary(train & ~held)
            splits["train_held_out"] = summary(train & held)
        crossfit = None
        if self.crossfit is not None:  # what the gate learnt from
            cw = self.crossfit.weak_logits.to(out.weak_logits)
            cs = self.crossfit.strong_logits.to(out.strong_logits)
            gate = self.net.gate_forward(cw, data.x)
            splits["train_out_of_fold"] = summary(
                data.train_mask, MowstOutput(cw, cs, gate, torch.sigmoid(gate)))
            crossfit = [list(e) for e in self.crossfit.epochs]
        return {"splits": splits, "turns": list(self.turn_log), "crossfit": crossfit,
                "checkpoint_phase": self.checkpoint_phase or self._validated_phase,
                "threshold": tau, "gate_holdout": self.gate_holdout,
                "crossfit_folds": self.crossfit_folds,
                "select_on": self.select_on, "variant": self.net.variant}


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
        diagnosis = self.diagnose(data, out)
        with open(output_dir / "mowst_diagnosis.json", "w") as f:
            json.dump(diagnosis, f, indent=1)
        N = data.num_nodes
        return {"diag/strong_fraction": float(prediction.strong_mask.float().mean()),
                "diag/subgraph_fraction": prediction.num_subgraph_nodes / max(N, 1)}
