r"""Tests of moegraph.data.clusters: the cluster-structured patch data of
Chen et al. (2022) and its datamodule.

Which patch is which is recovered here from the returned tensors alone (a
patch lying exactly on one signal or centre direction), never through the
generator's own code.
"""
import pytest
import torch

from moegraph.data import (
    ClusterDataModule,
    cluster_dataset,
    cluster_patches,
    cluster_vectors,
)


def vectors(K=4, d=50, seed=0):
    return cluster_vectors(K, d, torch.Generator().manual_seed(seed))


def on_direction(x, u, tol=1e-5):
    r"""``(mask [N, P], coefficient [N, P])``: which patches are a multiple of
    the unit vector ``u`` (per sample ``[N, d]``), and the multiple."""
    coef = (x * u.unsqueeze(1)).sum(-1)  # [N, P]
    rest = x - coef.unsqueeze(-1) * u.unsqueeze(1)
    return rest.norm(dim=-1) < tol, coef


@pytest.mark.parametrize("K,d", [(4, 50), (2, 4), (5, 13)])
def test_vectors_are_orthonormal(K, d):
    v, c = vectors(K, d)
    assert v.shape == c.shape == (K, d)
    q = torch.cat([v, c]).double()
    assert torch.allclose(q @ q.t(), torch.eye(2 * K, dtype=torch.double), atol=1e-5)


def test_patch_roles_and_amplitudes():
    K, P, d, N = 4, 5, 20, 2000
    v, c = vectors(K, d)
    s = cluster_patches(N, v, c, num_patches=P, generator=torch.Generator().manual_seed(1))
    assert s.x.shape == (N, P, d) and s.x.dtype == torch.float32
    assert set(s.y.tolist()) == {-1, 1}
    # Exactly one signal patch, on v_k of the sample's own cluster, sign y, |alpha| in range.
    is_signal, coef = on_direction(s.x, v[s.cluster])
    assert (is_signal.sum(1) == 1).all()
    alpha_y = coef[is_signal]
    assert (torch.sign(alpha_y).long() == s.y).all()
    assert alpha_y.abs().min() >= 0.5 - 1e-5 and alpha_y.abs().max() <= 2 + 1e-5
    # Exactly one centre patch, beta * c_k with beta in [1, 2].
    is_centre, coef = on_direction(s.x, c[s.cluster])
    assert (is_centre.sum(1) == 1).all()
    beta = coef[is_centre]
    assert beta.min() >= 1 - 1e-5 and beta.max() <= 2 + 1e-5
    # Exactly one feature-noise patch, on v_k' of another cluster, both signs, gamma in range.
    assert (s.noise_cluster != s.cluster).all()
    is_noise, coef = on_direction(s.x, v[s.noise_cluster])
    assert (is_noise.sum(1) == 1).all()
    gamma = coef[is_noise]
    assert gamma.abs().min() >= 0.5 - 1e-5 and gamma.abs().max() <= 3 + 1e-5
    assert 0.4 < float((gamma > 0).float().mean()) < 0.6
    # The rest: Gaussian patches of variance 1/d per coordinate, in random positions.
    rest = ~(is_signal | is_centre | is_noise)
    assert (rest.sum(1) == P - 3).all()
    gauss = s.x[rest]
    assert abs(float(gauss.var()) * d - 1) < 0.05
    for role in (is_signal, is_centre, is_noise):
        position = role.float().argmax(1)
        assert torch.bincount(position, minlength=P).min() > N / P * 0.8


def test_labels_and_clusters_balanced():
    v, c = vectors()
    s = cluster_patches(1001, v, c, generator=torch.Generator().manual_seed(0))
    assert abs(int((s.y == 1).sum()) - int((s.y == -1).sum())) <= 1
    count = torch.bincount(s.cluster, minlength=4)
    assert int(count.max() - count.min()) <= 1
    # Each cluster has both labels in about equal shares (label independent of cluster).
    for k in range(4):
        share = float((s.y[s.cluster == k] == 1).float().mean())
        assert 0.4 < share < 0.6


def test_seeded_determinism():
    a, b = cluster_dataset(50, 10, 40, seed=3), cluster_dataset(50, 10, 40, seed=3)
    for key in ("x", "y", "cluster", "noise_cluster", "signal_vectors", "centres"):
        assert torch.equal(a[key], b[key]), key
    other = cluster_dataset(50, 10, 40, seed=4)
    assert not torch.equal(a.x, other.x)
    # No global state is touched or read.
    torch.manual_seed(0)
    first = torch.rand(3)
    torch.manual_seed(0)
    cluster_dataset(50, 10, 40, seed=3)
    assert torch.equal(torch.rand(3), first)


def test_dataset_fields_and_splits():
    data = cluster_dataset(30, 7, 20, num_clusters=3, num_patches=3, dim=8, seed=0)
    assert data.num_nodes == 57 and data.x.shape == (57, 3, 8)
    assert data.y.dtype == torch.long and set(data.y.unique().tolist()) == {0, 1}
    masks = torch.stack([data.train_mask, data.val_mask, data.test_mask])
    assert (masks.sum(0) == 1).all() and masks.sum(1).tolist() == [30, 7, 20]
    assert data.signal_vectors.shape == data.centres.shape == (3, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_clusters=4, dim=7), "'dim' must be at least 2 \\* num_clusters = 8"),
    (dict(num_clusters=1), "'num_clusters' must be an integer >= 2"),
    (dict(num_patches=2), "'num_patches' must be an integer >= 3"),
    (dict(num_train=0), "'num_train' must be an integer >= 1"),
    (dict(num_test=-5), "'num_test' must be an integer >= 1"),
    (dict(num_val=-1), "'num_val' must be an integer >= 0"),
    (dict(alpha=(2.0, 0.5)), "'alpha' must satisfy 0 < low <= high"),
    (dict(beta=(0.0, 1.0)), "'beta' must satisfy 0 < low <= high"),
    (dict(gamma=(1.0,)), "'gamma' must be a pair"),
    (dict(noise_std=-1.0), "'noise_std' must be non-negative"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_dataset(**{**dict(num_train=10, num_val=5, num_test=10), **kwargs})


def test_bad_vectors():
    v, c = vectors()
    with pytest.raises(ValueError, match="must both be \\[K, d\\]"):
        cluster_patches(10, v, c[:, :10])


def test_datamodule():
    dm = ClusterDataModule(num_train=40, num_val=10, num_test=30, dim=12, seed=1)
    assert repr(dm) == "ClusterDataModule(num_train=40, num_clusters=4, num_patches=4, dim=12)"
    assert dm.net_kwargs() == {"in_channels": 12, "out_channels": 2}
    assert dm.task_kwargs() == {"num_classes": 2, "metric": "acc"}
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        (batch,) = list(loader)
        assert batch is dm.data and batch.x.shape == (80, 4, 12)
    with pytest.raises(ValueError, match="'dim' must be at least"):
        ClusterDataModule(dim=5)
    with pytest.raises(ValueError, match="'num_val' must be positive"):
        ClusterDataModule(num_val=0)
