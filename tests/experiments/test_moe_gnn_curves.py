r"""``experiments/moe_gnn_curves.py``: the early-stopping rule applied to a
recorded curve, and the per-run summary, against hand-computed values."""
import statistics

import pytest


def test_select_is_the_first_best_epoch_before_patience_runs_out(script):
    select = script("moe_gnn_curves").select
    scores = [0.1, 0.5, 0.5, 0.4, 0.6]
    assert select(scores, patience=2) == 1  # epochs 2-3 not strictly better: stopped
    assert select(scores, patience=3) == 4  # still running at epoch 4
    assert select([0.3, 0.2, 0.25, 0.1], patience=10, larger=False) == 3  # a loss
    assert select([0.7], patience=1) == 0


def test_summary_against_hand_computed_values(script):
    summary = script("moe_gnn_curves").summary
    n = 160
    val = [0.5 + 0.01 * (e % 2) for e in range(n)]  # alternates 0.50 / 0.51
    val[30] = 0.9  # the best validation epoch
    test = [0.6] * n
    test[30], test[100], test[-1] = 0.7, 0.8, 0.65
    loss = [1.0 - 0.001 * e for e in range(n)]  # lowest at the last epoch
    record = {"val_acc": val, "test_acc": test, "val_loss": loss, "patience": 200}
    out = summary(record)
    assert out["epoch"] == 30
    assert out["test_at_val_acc"] == pytest.approx(70.0)
    assert out["test_at_val_loss"] == pytest.approx(65.0)
    assert out["best_test"] == pytest.approx(80.0)
    assert out["last_test"] == pytest.approx(65.0)
    steps = [100 * (val[e + 1] - val[e]) for e in range(20, 150)]
    assert out["jitter"] == pytest.approx(statistics.pstdev(steps))
    assert out["jitter"] > 1.0  # the spike at epoch 30 and the alternation
