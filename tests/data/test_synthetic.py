r"""Tests of moegraph.data.synthetic: the CSBM generator and the random split.

Homophily, degree and split sizes are measured here from the returned tensors
(plain counting), never through the generator's own code.
"""
import pytest
import torch
from torch_geometric.utils import contains_self_loops, is_undirected

from moegraph.data import csbm_graph, random_split_masks

SMALL = dict(num_nodes=600, num_classes=4, num_features=8, avg_degree=6.0)


def edge_homophily(edge_index, y):
    r"""Fraction of (directed) edges whose endpoints share a label."""
    src, dst = edge_index.tolist()
    labels = y.tolist()
    return sum(labels[s] == labels[t] for s, t in zip(src, dst, strict=True)) / len(src)


def test_shapes_and_fields():
    data = csbm_graph(num_nodes=203, num_classes=3, num_features=7, num_modes=3, seed=1)
    assert data.num_nodes == 203
    assert data.x.shape == (203, 7) and data.x.dtype == torch.float32
    assert data.y.shape == (203,) and data.y.dtype == torch.long
    assert data.mode.shape == (203,) and int(data.mode.min()) >= 0 and int(data.mode.max()) < 3
    assert data.edge_index.dim() == 2 and data.edge_index.size(0) == 2
    assert data.edge_index.dtype == torch.long
    assert int(data.edge_index.min()) >= 0 and int(data.edge_index.max()) < 203
    for name in ("train_mask", "val_mask", "test_mask"):
        assert data[name].shape == (203,) and data[name].dtype == torch.bool
    assert torch.isfinite(data.x).all()


@pytest.mark.parametrize("num_nodes,num_classes", [(600, 4), (203, 3), (11, 2), (7, 7)])
def test_balanced_labels(num_nodes, num_classes):
    data = csbm_graph(num_nodes=num_nodes, num_classes=num_classes, num_features=4)
    count = torch.bincount(data.y, minlength=num_classes)
    assert count.numel() == num_classes
    assert int(count.sum()) == num_nodes
    assert int(count.max() - count.min()) <= 1


@pytest.mark.parametrize("homophily", [0.0, 0.5, 1.0])
def test_undirected_without_self_loops(homophily):
    data = csbm_graph(**SMALL, homophily=homophily)
    assert is_undirected(data.edge_index, num_nodes=data.num_nodes)
    assert not contains_self_loops(data.edge_index)
    # No duplicate edges (coalesced).
    pairs = set(map(tuple, data.edge_index.t().tolist()))
    assert len(pairs) == data.edge_index.size(1)


@pytest.mark.parametrize("homophily", [0.2, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_edge_homophily_close_to_requested(homophily, seed):
    data = csbm_graph(num_nodes=2000, num_classes=4, num_features=4, avg_degree=6.0,
                      homophily=homophily, seed=seed)
    # ~6000 undirected edges: the standard error of the fraction is below 0.01.
    assert edge_homophily(data.edge_index, data.y) == pytest.approx(homophily, abs=0.03)


@pytest.mark.parametrize("homophily", [0.0, 1.0])
def test_edge_homophily_extremes_are_exact(homophily):
    data = csbm_graph(**SMALL, homophily=homophily)
    assert edge_homophily(data.edge_index, data.y) == homophily


@pytest.mark.parametrize("avg_degree", [2.0, 6.0, 12.0])
def test_average_degree_close_to_requested(avg_degree):
    data = csbm_graph(num_nodes=2000, num_classes=4, num_features=4, avg_degree=avg_degree)
    # Each undirected edge is stored in both directions; self loops and
    # duplicates are removed, so the measured degree is slightly lower.
    degree = data.edge_index.size(1) / data.num_nodes
    assert avg_degree * 0.95 <= degree <= avg_degree


def test_zero_degree_gives_no_edges():
    data = csbm_graph(**{**SMALL, "avg_degree": 0.0})
    assert data.edge_index.shape == (2, 0)


@pytest.mark.parametrize("train_ratio,val_ratio", [(0.5, 0.25), (0.6, 0.2), (0.1, 0.0)])
def test_masks_disjoint_cover_and_ratios(train_ratio, val_ratio):
    N = 400
    data = csbm_graph(num_nodes=N, num_classes=4, num_features=4, train_ratio=train_ratio,
                      val_ratio=val_ratio)
    train, val, test = data.train_mask, data.val_mask, data.test_mask
    total = train.long() + val.long() + test.long()
    assert bool((total == 1).all())  # disjoint and covering
    assert int(train.sum()) == round(train_ratio * N)
    assert int(val.sum()) == round(val_ratio * N)
    assert int(test.sum()) == N - round(train_ratio * N) - round(val_ratio * N)


def test_same_seed_same_graph():
    a, b = csbm_graph(**SMALL, seed=3), csbm_graph(**SMALL, seed=3)
    for key in ("x", "edge_index", "y", "mode", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(a[key], b[key]), key


def test_different_seed_different_graph():
    a, b = csbm_graph(**SMALL, seed=3), csbm_graph(**SMALL, seed=4)
    assert not torch.equal(a.y, b.y)
    assert not torch.equal(a.x, b.x)
    assert a.edge_index.shape != b.edge_index.shape or not torch.equal(a.edge_index,
                                                                      b.edge_index)
    assert not torch.equal(a.train_mask, b.train_mask)


def test_generator_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    csbm_graph(**SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_features_carry_the_class_signal():
    # With a strong signal and no noise, nodes of one (class, mode) share features.
    data = csbm_graph(num_nodes=100, num_classes=2, num_features=5, num_modes=1, signal=1.0,
                      noise=0.0)
    for c in range(2):
        rows = data.x[data.y == c]
        assert torch.allclose(rows, rows[:1].expand_as(rows))
        assert float(rows[0].norm()) == pytest.approx(5 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=1), r"'num_classes' must be at least 2 \(got 1\)"),
    (dict(num_classes=0), r"'num_classes' must be at least 2 \(got 0\)"),
    (dict(num_nodes=3, num_classes=4), r"'num_nodes' \(3\) must be at least num_classes \(4\)"),
    (dict(homophily=-0.1), r"'homophily' must be in \[0, 1\] \(got -0.1\)"),
    (dict(homophily=1.5), r"'homophily' must be in \[0, 1\] \(got 1.5\)"),
    (dict(homophily=float("nan")), r"'homophily' must be in \[0, 1\]"),
    (dict(num_features=0), "'num_features' and 'num_modes' must be positive"),
    (dict(num_modes=0), "'num_features' and 'num_modes' must be positive"),
    (dict(avg_degree=-1.0), "'avg_degree' non-negative"),
    (dict(train_ratio=0.0), r"need 0 < train_ratio.*\(got 0.0, 0.25\)"),
    (dict(train_ratio=1.0), r"need 0 < train_ratio.*\(got 1.0, 0.25\)"),
    (dict(val_ratio=-0.1), r"need 0 < train_ratio.*\(got 0.5, -0.1\)"),
    (dict(train_ratio=0.6, val_ratio=0.4), r"train_ratio \+ val_ratio < 1 \(got 0.6, 0.4\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        csbm_graph(**{**SMALL, "num_nodes": 40, **kwargs})


# random_split_masks ###########################################################


def test_random_split_all_nodes():
    g = torch.Generator().manual_seed(0)
    train, val, test = random_split_masks(10, 0.6, 0.2, g)
    assert (int(train.sum()), int(val.sum()), int(test.sum())) == (6, 2, 2)
    assert bool(((train.long() + val.long() + test.long()) == 1).all())


def test_random_split_with_candidates():
    g = torch.Generator().manual_seed(0)
    candidates = torch.tensor([1, 3, 4, 8, 9, 12, 15, 17, 18, 19])
    train, val, test = random_split_masks(20, 0.5, 0.2, g, candidates=candidates)
    for mask in (train, val, test):
        assert mask.shape == (20,) and mask.dtype == torch.bool
    assert (int(train.sum()), int(val.sum()), int(test.sum())) == (5, 2, 3)
    union = train | val | test
    assert union.nonzero().view(-1).tolist() == candidates.tolist()
    assert not bool((train & val).any() or (train & test).any() or (val & test).any())


def test_random_split_is_seeded():
    masks = [random_split_masks(50, 0.5, 0.25, torch.Generator().manual_seed(s)) for s in
             (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    assert not torch.equal(masks[0][0], masks[2][0])


@pytest.mark.parametrize("train_ratio,val_ratio", [(0.0, 0.1), (1.0, 0.0), (0.5, 0.5),
                                                   (0.5, -0.1), (0.5, 1.0)])
def test_random_split_bad_ratios(train_ratio, val_ratio):
    with pytest.raises(ValueError, match=rf"\(got {train_ratio}, {val_ratio}\)"):
        random_split_masks(10, train_ratio, val_ratio, torch.Generator())
