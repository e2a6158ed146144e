r"""The training schedule of Mowst (Algorithm 2 of `Zeng et al.
<https://arxiv.org/abs/2311.05185>`_) as a small state machine, free of
Lightning: optional pre-training of each expert alone, then rounds of two
alternating turns (weak expert + gate, then strong expert) or one joint turn
(Mowst*), each turn early-stopped on a validation score and rolled back when
it did not beat the best score so far. With cross-fitting (``gate_turn``), a
turn in which the gate alone learns (from out-of-fold predictions of both
experts) comes first and takes the place of the first weak turn.

:class:`~moegraph.tasks.MowstTask` feeds it one validation score per epoch
(:meth:`MowstSchedule.step`) and does what the returned :class:`Step` says.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, Optional

PHASES = ("pretrain_weak", "pretrain_strong", "weak", "strong", "joint", "gate")
PRETRAIN_PHASES = ("pretrain_weak", "pretrain_strong")


class Step(NamedTuple):
    r"""What the task must do after a validation epoch.

    Attributes:
        improved (bool): the epoch is the turn's best so far: snapshot the
            trained parts.
        turn_over (bool): the turn ended.
        restore (str or None): at the end of a turn, ``"best"`` (load the
            turn's best snapshot) or ``"start"`` (roll back to where the turn
            began); :obj:`None` otherwise.
        kept (bool): the ended turn was kept (beat the best score so far; a
            pre-training turn always keeps its expert's best epoch).
        epochs (int): epochs of the turn so far.
        turn_best (float): the turn's best score so far.
    """

    improved: bool
    turn_over: bool
    restore: Optional[str]
    kept: bool
    epochs: int = 0
    turn_best: float = -math.inf


@dataclass
class ScheduleConfig:
    r"""The fixed settings of a :class:`MowstSchedule` (see
    :class:`~moegraph.tasks.MowstTask` for their meaning; its defaults are
    these, and ``conf/model/mowst.yaml`` lists the same values: the tests check
    that the three agree).

    ``gate_turn``: the gate alone trains in the first turn after the
    pre-training (from the cross-fitted predictions of the experts); it is
    round 1's weak turn (Mowst: round 1 goes on with the strong turn) or
    precedes the joint turn (Mowst*). With it, ``max_rounds=0`` ends
    training after the gate turn."""

    pretrain_weak_epochs: int = 300
    pretrain_strong_epochs: int = 300
    max_turn_epochs: int = 100
    turn_patience: int = 20
    max_rounds: int = 0
    round_patience: int = 2
    min_delta: float = 1e-3
    joint: bool = False
    gate_turn: bool = True
    pretrain_patience: int = 50
    pretrain_min_delta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pretrain_weak_epochs", "pretrain_strong_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"'{name}' must be a non-negative integer (got {value!r})")
        for name in ("max_turn_epochs", "turn_patience", "max_rounds", "round_patience",
                     "pretrain_patience"):
            value = getattr(self, name)
            if name == "max_rounds" and self.gate_turn and value == 0:
                continue  # the gate turn alone
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"'{name}' must be a positive integer (got {value!r})"
                                 + (" (0 is allowed with a gate turn: cross-fitting)"
                                    if name == "max_rounds" else ""))
        for name in ("min_delta", "pretrain_min_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float))
                                               and value >= 0):
                raise ValueError(f"'{name}' must be non-negative (got {value!r})")

    @property
    def first_trained_phase(self) -> str:
        r"""The first phase in which the gate trains."""
        if self.gate_turn:
            return "gate"
        return "joint" if self.joint else "weak"

    @property
    def first_phase(self) -> str:
        if self.pretrain_weak_epochs:
            return "pretrain_weak"
        if self.pretrain_strong_epochs:
            return "pretrain_strong"
        return self.first_trained_phase

    def min_epochs(self) -> int:
        r"""The fewest epochs after which both experts and the gate have each
        trained one epoch at least once the pre-training is over: the
        pre-training budgets, plus one epoch of each turn of the first round
        (the turns may end sooner only on patience, which needs
        ``turn_patience`` epochs)."""
        if self.gate_turn:
            first_round = 1 + int(self.max_rounds > 0)
        else:
            first_round = 1 if self.joint else 2
        return (self.pretrain_weak_epochs + self.pretrain_strong_epochs
                + first_round * min(self.turn_patience, self.max_turn_epochs))


@dataclass
class MowstSchedule:
    r"""Where training is in the schedule.

    Args:
        config (ScheduleConfig): the settings.

    Attributes:
        phase (str): one of :data:`PHASES`.
        round (int): the round of alternating turns, from 1.
        epoch_in_turn (int): validation epochs seen in this turn.
        stale_epochs (int): epochs since the turn's best.
        turn_best (float): the turn's best score.
        best (float): the best score of a kept turn (the score a new turn
            must beat to be kept); ``-inf`` until one is kept, or the score
            given to :meth:`set_baseline`.
        turn_best_tiebreak, best_tiebreak (float): the second scores (see
            :meth:`step`) of those epochs.
        round_gain (bool): a turn of this round was kept.
        rounds_without_gain (int): rounds in a row without a kept turn.
        mixture_trained (bool): a turn in which the gate trains has ended
            (and with it both experts trained, by pre-training or a turn).
        done (bool): training is over.
    """

    config: ScheduleConfig = field(default_factory=ScheduleConfig)
    phase: str = ""
    round: int = 1
    epoch_in_turn: int = 0
    stale_epochs: int = 0
    turn_best: float = -math.inf
    best: float = -math.inf
    turn_best_tiebreak: float = -math.inf
    best_tiebreak: float = -math.inf
    round_gain: bool = False
    rounds_without_gain: int = 0
    mixture_trained: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        if not self.phase:
            self.phase = self.config.first_phase
        if self.phase not in PHASES:
            raise ValueError(f"'phase' must be one of {PHASES} (got {self.phase!r})")

    @property
    def pretraining(self) -> bool:
        return self.phase in PRETRAIN_PHASES

    def begin_turn(self) -> None:
        r"""Reset the counters of the turn."""
        self.epoch_in_turn, self.stale_epochs, self.turn_best = 0, 0, -math.inf
        self.turn_best_tiebreak = -math.inf

    def set_baseline(self, score: float) -> None:
        r"""A score that the first kept turn must beat (e.g. the strong
        expert's own validation score after its pre-training: a mixture below
        the GNN alone is then never kept)."""
        self.best = max(self.best, float(score))

    def turn_limit(self) -> int:
        c = self.config
        if self.phase == "pretrain_weak":
            return c.pretrain_weak_epochs
        if self.phase == "pretrain_strong":
            return c.pretrain_strong_epochs
        return c.max_turn_epochs if self.phase != "joint" else 10**9

    def _better(self, score: float, tiebreak: float, best: float, best_tiebreak: float) -> bool:
        r"""``score`` beats ``best`` by ``min_delta`` (``pretrain_min_delta``
        in pre-training), or equals it at least and ``tiebreak`` beats
        ``best_tiebreak`` by it."""
        d = self.config.pretrain_min_delta if self.pretraining else self.config.min_delta
        return score > best + d or (score >= best and tiebreak > best_tiebreak + d)

    def step(self, score: float, tiebreak: float = -math.inf) -> Step:
        r"""Record one validation epoch with the score the phase early-stops
        on; at the end of a turn, move to the next phase (or finish).

        ``tiebreak`` is a second score that decides between epochs (and
        turns) of the same ``score``: a step-valued score such as the accuracy
        of deterministic inference stays flat while the gate moves towards a
        threshold, and the expected score, continuous in the gate, tells the
        progress (without it, patience would end the turn first)."""
        if self.done:
            raise RuntimeError("the schedule is over")
        c = self.config
        if math.isnan(tiebreak):
            tiebreak = -math.inf
        self.epoch_in_turn += 1
        improved = self._better(score, tiebreak, self.turn_best, self.turn_best_tiebreak)
        if improved:
            self.turn_best, self.stale_epochs = float(score), 0
            self.turn_best_tiebreak = float(tiebreak)
        else:
            self.stale_epochs += 1
        epochs, turn_best = self.epoch_in_turn, self.turn_best
        patience = c.pretrain_patience if self.pretraining else c.turn_patience
        if self.stale_epochs < patience and self.epoch_in_turn < self.turn_limit():
            return Step(improved, False, None, False, epochs, turn_best)
        if self.pretraining:  # pre-training keeps its expert's best epoch
            self._next_phase()
            return Step(improved, True, "best", True, epochs, turn_best)
        kept = self._better(self.turn_best, self.turn_best_tiebreak, self.best,
                            self.best_tiebreak)
        if kept:
            self.best, self.best_tiebreak = self.turn_best, self.turn_best_tiebreak
            if self.phase in ("weak", "strong", "gate"):
                self.round_gain = True
        self.mixture_trained = self.mixture_trained or self.phase in ("weak", "joint", "gate")
        self._next_phase()
        return Step(improved, True, "best" if kept else "start", kept, epochs, turn_best)

    def _next_phase(self) -> None:
        c = self.config
        if self.phase == "joint":
            self.done = True
        elif self.phase == "gate":  # round 1's weak turn (Mowst) or before the joint one
            if c.max_rounds == 0:
                self.done = True
            else:
                self.phase = "joint" if c.joint else "strong"
        elif self.phase == "pretrain_weak":
            self.phase = "pretrain_strong" if c.pretrain_strong_epochs else c.first_trained_phase
        elif self.phase == "pretrain_strong":
            self.phase = c.first_trained_phase
        elif self.phase == "weak":
            self.phase = "strong"
        else:  # a round ends after its strong turn
            self.rounds_without_gain = 0 if self.round_gain else self.rounds_without_gain + 1
            self.round_gain = False
            if self.rounds_without_gain >= c.round_patience or self.round >= c.max_rounds:
                self.done = True
            else:
                self.round += 1
                self.phase = "weak"
        if not self.done:
            self.begin_turn()

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        r"""The state (not the config), as plain values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r"""Put back a :meth:`state_dict` (unknown keys raise; keys missing
        from an older checkpoint keep their value)."""
        names = {f.name for f in fields(self)} - {"config"}
        unknown = sorted(set(state) - names)
        if unknown:
            raise KeyError(f"unknown Mowst schedule state {unknown}; known: {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)
        if self.phase not in PHASES:
            raise ValueError(f"'phase' must be one of {PHASES} (got {self.phase!r})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
