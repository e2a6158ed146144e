r"""Tests of moegraph.tasks.metrics: Mowst's expected scores against hand-computed
values and an enumeration of every draw, MowstMetrics' own update count."""
import pytest
import torch

from moegraph.nn import MowstOutput
from moegraph.tasks.metrics import MowstMetrics, expected_accuracy, expected_binary_auroc


def test_expected_accuracy_by_hand():
    weak = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    strong = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    c = torch.tensor([0.9, 0.2, 0.5])
    # node 0: weak right (0.9); node 1: strong right (0.8); node 2: both right (1)
    assert expected_accuracy(weak, strong, c, y).item() == pytest.approx((0.9 + 0.8 + 1) / 3)


def test_expected_auroc_equals_enumeration():
    from itertools import product

    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(3)
    n = 7
    s_w = torch.rand(n, generator=g).round(decimals=1)  # ties on purpose
    s_s = torch.rand(n, generator=g).round(decimals=1)
    c = torch.rand(n, generator=g)
    y = torch.tensor([1, 0, 1, 0, 0, 1, 0])
    expected = 0.0
    for choice in product([0, 1], repeat=n):  # every draw of weak/strong per node
        pick = torch.tensor(choice, dtype=torch.bool)
        prob = torch.where(pick, c, 1 - c).prod()
        expected += prob * binary_auroc(torch.where(pick, s_w, s_s), y)
    got = expected_binary_auroc(s_w, s_s, c, y)
    assert got.item() == pytest.approx(float(expected), abs=1e-5)


def test_expected_auroc_without_a_class_is_nan():
    s = torch.rand(4)
    assert torch.isnan(expected_binary_auroc(s, s, torch.rand(4), torch.ones(4, dtype=torch.long)))


def test_mowst_metrics_counts_its_updates_and_resets():
    metric = MowstMetrics("acc")
    assert int(metric.num_updates) == 0
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = MowstOutput(logits, logits, torch.zeros(2), torch.full((2,), 0.5))
    metric.update(out, torch.tensor([0, 1]))
    metric.update(out, torch.tensor([1, 1]))
    assert int(metric.num_updates) == 2
    assert metric.compute()["weak"].item() == pytest.approx(3 / 4)
    metric.reset()
    assert int(metric.num_updates) == 0


def test_mowst_metrics_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="'metric' must be one of"):
        MowstMetrics("f1")
