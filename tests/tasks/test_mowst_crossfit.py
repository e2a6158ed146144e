r"""Tests of moegraph.tasks.mowst_crossfit: the fold split and the out-of-fold
logits from which Mowst's gate learns."""
import functools

import pytest
import torch
from torch_geometric.nn.models import GCN, MLP

from moegraph.data import csbm_graph
from moegraph.tasks.mowst_crossfit import crossfit_logits, fold_assignment

N, FEAT, C = 80, 6, 3


def test_folds_are_disjoint_cover_the_mask_and_are_balanced():
    mask = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.4
    for folds in (2, 3, 5):
        fold = fold_assignment(mask, folds, seed=7)
        assert torch.equal(fold >= 0, mask)  # every selected node, no other
        assert bool((fold < folds).all())
        sizes = torch.bincount(fold[mask], minlength=folds)
        assert int(sizes.sum()) == int(mask.sum())  # one fold per node: disjoint
        assert int(sizes.max() - sizes.min()) <= 1


def test_folds_are_deterministic_per_seed():
    mask = torch.ones(50, dtype=torch.bool)
    assert torch.equal(fold_assignment(mask, 2, 3), fold_assignment(mask, 2, 3))
    assert not torch.equal(fold_assignment(mask, 2, 3), fold_assignment(mask, 2, 4))


@pytest.mark.parametrize("folds, mask, match", [
    (1, torch.ones(4, dtype=torch.bool), "'folds' must be an integer of at least 2"),
    (True, torch.ones(4, dtype=torch.bool), "'folds' must be an integer of at least 2"),
    (2, torch.ones(4), "'mask' must be a one-dimensional bool tensor"),
    (3, torch.tensor([True, True, False]), "needs at least 3 training nodes")])
def test_bad_folds(folds, mask, match):
    with pytest.raises(ValueError, match=match):
        fold_assignment(mask, folds, 0)


def run(y, data, fold):
    torch.manual_seed(0)
    weak, strong = MLP([FEAT, 16, C], dropout=0.0), GCN(FEAT, 16, 2, C, dropout=0.0)
    return crossfit_logits(
        weak, strong, lambda m: m(data.x), lambda m: m(data.x, data.edge_index), y,
        data.train_mask, data.val_mask, 2, 0,
        functools.partial(torch.optim.Adam, lr=0.05), (15, 15), 5, fold=fold)


def test_a_node_is_predicted_by_experts_that_never_saw_its_label():
    r"""Changing the labels of fold 0 changes nothing in the out-of-fold
    logits of fold 0 (their experts trained on fold 1), and changes those of
    fold 1 (their experts trained on fold 0)."""
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    fold = fold_assignment(data.train_mask, 2, seed=0)
    base = run(data.y, data, fold)
    y = data.y.clone()
    y[fold == 0] = (y[fold == 0] + 1) % C
    changed = run(y, data, fold)
    in0, in1 = fold == 0, fold == 1
    for a, b in ((base.weak_logits, changed.weak_logits),
                 (base.strong_logits, changed.strong_logits)):
        torch.testing.assert_close(a[in0], b[in0], rtol=0, atol=0)
        assert not torch.allclose(a[in1], b[in1])
        assert bool((a[~data.train_mask] == 0).all())  # only training nodes


def test_the_experts_given_are_not_trained():
    data = csbm_graph(num_nodes=N, num_classes=C, num_features=FEAT)
    weak, strong = MLP([FEAT, 16, C]), GCN(FEAT, 16, 2, C)
    before = [p.detach().clone() for p in [*weak.parameters(), *strong.parameters()]]
    out = crossfit_logits(weak, strong, lambda m: m(data.x),
                          lambda m: m(data.x, data.edge_index), data.y, data.train_mask,
                          data.val_mask, 3, 1, functools.partial(torch.optim.Adam, lr=0.05),
                          (4, 4), 2)
    after = [*weak.parameters(), *strong.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert out.weak_logits.shape == out.strong_logits.shape == (N, C)
    assert len(out.epochs) == 6 and all(1 <= e[2] <= 4 for e in out.epochs)
