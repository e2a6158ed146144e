r"""Tests of moegraph.tasks.mowst_schedule: the schedule of Mowst as a plain
state machine (no Lightning), driven by hand-made validation scores."""
import math

import pytest

from moegraph.tasks.mowst_schedule import PHASES, MowstSchedule, ScheduleConfig, Step


def config(*args, **kwargs):
    r"""A schedule of the paper (no gate turn, up to 10 rounds) unless told."""
    return ScheduleConfig(*args, **{"max_rounds": 10, "gate_turn": False, **kwargs})


def run(schedule, scores):
    r"""Feed scores until the schedule ends; return (phase, step) per epoch."""
    trace = []
    for score in scores:
        phase = schedule.phase
        trace.append((phase, schedule.step(score)))
        if schedule.done:
            break
    return trace


def test_first_phase_follows_the_pretraining_budgets():
    assert MowstSchedule(config(2, 3)).phase == "pretrain_weak"
    assert MowstSchedule(config(0, 3)).phase == "pretrain_strong"
    assert MowstSchedule(config(0, 0)).phase == "weak"
    assert MowstSchedule(config(0, 0, joint=True)).phase == "joint"


def test_pretraining_runs_its_budget_then_keeps_its_best_epoch():
    s = MowstSchedule(config(pretrain_weak_epochs=3, pretrain_strong_epochs=2,
                                     turn_patience=10))
    trace = run(s, [0.1, 0.3, 0.2, 0.5, 0.4])
    assert [p for p, _ in trace] == ["pretrain_weak"] * 3 + ["pretrain_strong"] * 2
    assert [st.improved for _, st in trace] == [True, True, False, True, False]
    assert trace[2][1][:4] == (False, True, "best", True)  # weak pre-training over
    assert trace[4][1][:4] == (False, True, "best", True)
    assert s.phase == "weak" and not s.mixture_trained
    assert s.best == -math.inf  # pre-training sets no bar for the mixture


def test_a_turn_that_does_not_beat_the_best_is_rolled_back():
    s = MowstSchedule(config(0, 0, turn_patience=2, max_rounds=5, round_patience=1,
                                     min_delta=0.0))
    # weak turn: best 0.6 -> kept; strong turn: best 0.5 < 0.6 -> rolled back.
    trace = run(s, [0.6, 0.5, 0.5, 0.5, 0.4, 0.3])
    assert [p for p, _ in trace] == ["weak"] * 3 + ["strong"] * 3
    assert trace[2][1][:4] == (False, True, "best", True)
    assert trace[5][1][:4] == (False, True, "start", False)
    assert s.best == 0.6 and s.mixture_trained
    # The round had a kept turn: a second round starts.
    assert not s.done and s.phase == "weak" and s.round == 2


def test_rounds_without_gain_end_training():
    s = MowstSchedule(config(0, 0, turn_patience=1, max_rounds=10, round_patience=2,
                                     min_delta=0.0))
    s.set_baseline(0.9)  # nothing below 0.9 is kept
    trace = run(s, [0.5] * 20)
    assert s.done and s.round == 2 and s.rounds_without_gain == 2
    assert len(trace) == 8  # two rounds of two turns of two epochs (best, then stale)
    assert [st.restore for _, st in trace] == [None, "start"] * 4
    with pytest.raises(RuntimeError, match="over"):
        s.step(0.5)


def test_pretraining_counts_any_rise_as_early_stopping_does():
    # Lightning's EarlyStopping (min_delta 0): a rise of 1e-4 is a gain and
    # resets the patience; a tie is not. The turns keep their own min_delta.
    s = MowstSchedule(config(0, 6, turn_patience=2, pretrain_patience=2, min_delta=0.1))
    trace = run(s, [0.5, 0.5001, 0.5001, 0.5002, 0.5, 0.5])
    assert [st.improved for _, st in trace] == [True, True, False, True, False, False]
    assert trace[-1][1].turn_over and trace[-1][1].turn_best == 0.5002
    assert s.phase == "weak"
    trace = run(s, [0.6, 0.65])  # below the turns' min_delta of 0.1
    assert [st.improved for _, st in trace] == [True, False]
    # with a pre-training min_delta, small rises do not count
    s = MowstSchedule(config(0, 6, pretrain_patience=2, pretrain_min_delta=0.01))
    trace = run(s, [0.5, 0.505, 0.509])
    assert [st.improved for _, st in trace] == [True, False, False]
    assert trace[-1][1].turn_over


def test_min_delta_and_max_turn_epochs():
    s = MowstSchedule(config(0, 0, max_turn_epochs=3, turn_patience=5, min_delta=0.1))
    trace = run(s, [0.5, 0.55, 0.58])  # the rises are below min_delta
    assert [st.improved for _, st in trace] == [True, False, False]
    assert trace[-1][1].turn_over and s.phase == "strong"  # ended on max_turn_epochs


def test_joint_turn_ends_training():
    s = MowstSchedule(config(0, 0, turn_patience=2, joint=True))
    trace = run(s, [0.5, 0.7, 0.6, 0.6])
    assert s.done and s.mixture_trained and len(trace) == 4
    assert trace[-1][1][:4] == (False, True, "best", True)


def test_state_dict_round_trip_and_old_checkpoints():
    cfg = config(0, 0, turn_patience=2)
    s = MowstSchedule(cfg)
    run(s, [0.6, 0.5, 0.4])
    restored = MowstSchedule(cfg)
    restored.load_state_dict(s.state_dict())
    assert restored == s
    # A checkpoint written before `mixture_trained` existed still loads.
    old = {k: v for k, v in s.state_dict().items() if k != "mixture_trained"}
    MowstSchedule(cfg).load_state_dict(old)
    with pytest.raises(KeyError, match="unknown Mowst schedule state"):
        MowstSchedule(cfg).load_state_dict({"phaze": "weak"})
    with pytest.raises(ValueError, match="'phase' must be one of"):
        MowstSchedule(cfg).load_state_dict({"phase": "warmup"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(pretrain_weak_epochs=-1), "'pretrain_weak_epochs' must be a non-negative"),
    (dict(turn_patience=0), "'turn_patience' must be a positive"),
    (dict(max_rounds=2.5), "'max_rounds' must be a positive"),
    (dict(min_delta=-0.1), "'min_delta' must be non-negative"),
    (dict(pretrain_min_delta=-1e-3), "'pretrain_min_delta' must be non-negative"),
    (dict(pretrain_min_delta=True), "'pretrain_min_delta' must be non-negative"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_min_epochs():
    assert config(100, 100, turn_patience=20).min_epochs() == 240
    assert config(0, 0, turn_patience=20, joint=True).min_epochs() == 20
    assert set(PHASES) == {"pretrain_weak", "pretrain_strong", "weak", "strong", "joint", "gate"}


def test_step_reports_the_turn_it_ended():
    s = MowstSchedule(config(0, 0, turn_patience=2, min_delta=0.0))
    *_, (_, last) = run(s, [0.4, 0.7, 0.6, 0.5])
    assert isinstance(last, Step) and last.turn_over
    assert last.epochs == 4 and last.turn_best == 0.7  # two stale epochs after 0.7
    assert s.epoch_in_turn == 0 and s.turn_best == -math.inf  # the next turn's counters


def test_tiebreak_keeps_a_flat_score_turn_going_and_decides_between_equals():
    s = MowstSchedule(config(0, 0, turn_patience=2, min_delta=0.0))
    # The main score is flat while the second one rises: no patience runs out.
    trace = run(s, [0.5] * 3)  # without a tiebreak: best, stale, stale -> over
    assert trace[-1][1].turn_over
    s = MowstSchedule(config(0, 0, turn_patience=2, min_delta=0.0))
    steps = [s.step(0.5, t) for t in (0.1, 0.2, 0.3, 0.4)]
    assert all(st.improved for st in steps) and not any(st.turn_over for st in steps)
    assert s.turn_best == 0.5 and s.turn_best_tiebreak == 0.4
    # A lower main score never wins on its tiebreak.
    assert not s.step(0.45, 0.9).improved


def test_tiebreak_decides_whether_an_equal_turn_is_kept():
    s = MowstSchedule(config(0, 0, turn_patience=1, min_delta=0.0, max_rounds=3))
    s.step(0.5, 0.2)
    assert s.step(0.5, 0.1).kept  # weak turn kept: best (0.5, 0.2)
    s.step(0.5, 0.3)
    assert s.step(0.4, 0.9).kept  # strong turn: equal main score, better tiebreak
    assert s.best == 0.5 and s.best_tiebreak == 0.3
    s.step(0.5, 0.25)
    assert not s.step(0.5, 0.2).kept  # equal main score, lower tiebreak: rolled back


def test_gate_turn_follows_the_pretraining_and_takes_the_first_weak_turn():
    s = MowstSchedule(config(1, 1, turn_patience=1, max_rounds=2, round_patience=5,
                                     min_delta=0.0, gate_turn=True))
    trace = run(s, [0.5, 0.7] + [0.6, 0.6] + [0.8, 0.8] * 2 + [0.9, 0.9] * 10)
    phases = [p for p, _ in trace]
    assert phases[:2] == ["pretrain_weak", "pretrain_strong"]
    # round 1: the gate's turn, then the strong one; round 2 as the paper's
    assert phases[2:] == ["gate"] * 2 + ["strong"] * 2 + ["weak"] * 2 + ["strong"] * 2
    assert s.done and s.mixture_trained


def test_gate_turn_alone_with_max_rounds_0_and_before_the_joint_turn():
    s = MowstSchedule(config(0, 0, turn_patience=2, max_rounds=0, gate_turn=True))
    trace = run(s, [0.5, 0.4, 0.4, 0.9])
    assert [p for p, _ in trace] == ["gate"] * 3 and s.done
    assert trace[-1][1].kept and s.best == 0.5
    s = MowstSchedule(config(0, 0, turn_patience=1, gate_turn=True, joint=True))
    assert [p for p, _ in run(s, [0.5, 0.5, 0.6, 0.6])] == ["gate"] * 2 + ["joint"] * 2
    with pytest.raises(ValueError, match="'max_rounds' must be a positive integer"):
        ScheduleConfig(max_rounds=0, gate_turn=False)


def test_gate_turn_below_the_baseline_is_rolled_back():
    s = MowstSchedule(config(0, 0, turn_patience=1, max_rounds=0, gate_turn=True,
                                     min_delta=0.0))
    s.set_baseline(0.8)  # the GNN's own validation score
    trace = run(s, [0.7, 0.7])
    assert trace[-1][1].turn_over and trace[-1][1].restore == "start"
    assert not trace[-1][1].kept and s.best == 0.8


def test_min_epochs_with_a_gate_turn():
    assert config(100, 100, turn_patience=20, gate_turn=True,
                          max_rounds=0).min_epochs() == 220
    assert config(100, 100, turn_patience=20, gate_turn=True).min_epochs() == 240
