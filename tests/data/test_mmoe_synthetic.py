r"""The MMoE paper's synthetic benchmark against its formula (Ma et al., 2018, section 3)."""
import math

import pytest
import torch

from moegraph.data import mmoe_synthetic, mmoe_synthetic_frame


@pytest.mark.parametrize("p", [-0.3, 0.0, 0.5, 0.9, 1.0])
def test_cosine_of_the_task_weights_is_p(p):
    data = mmoe_synthetic(10, p, in_channels=50, scale=2.5, seed=3)
    w1, w2 = data["w1"].double(), data["w2"].double()
    cos = (w1 @ w2) / (w1.norm() * w2.norm())
    assert cos.item() == pytest.approx(p, abs=1e-6)
    assert w1.norm().item() == pytest.approx(2.5, rel=1e-6)
    assert w2.norm().item() == pytest.approx(2.5, rel=1e-6)


def test_labels_follow_the_formula():
    d = mmoe_synthetic(200, 0.7, in_channels=20, num_sinusoids=4, noise_std=0.0, seed=1)
    x, a, b = d["x"].double(), d["alpha"].double(), d["beta"].double()
    for w, y in ((d["w1"], d["y1"]), (d["w2"], d["y2"])):
        for n in range(0, 200, 37):  # row by row, as written in the paper
            z = float(x[n] @ w.double())
            ref = z + sum(math.sin(a[i].item() * z + b[i].item()) for i in range(4))
            assert y[n].item() == pytest.approx(ref, abs=1e-4)


def test_noise_variance_and_correlation_falls_with_p():
    clean = mmoe_synthetic(20000, 0.5, noise_std=0.0, seed=2)
    noisy = mmoe_synthetic(20000, 0.5, noise_std=0.1, seed=2)
    residual = (noisy["y1"] - clean["y1"]).double()
    # Var(eps) = 0.01; the sample variance of 20,000 draws is within ~1% (sd 0.0001).
    assert residual.var().item() == pytest.approx(0.01, rel=0.05)
    # The weights' cosine is p, and the labels' Pearson correlation falls with it.
    corr = {}
    for p in (1.0, 0.9, 0.5):
        d = mmoe_synthetic(20000, p, seed=0)
        corr[p] = torch.corrcoef(torch.stack([d["y1"], d["y2"]]))[0, 1].item()
    assert corr[1.0] > corr[0.9] > corr[0.5]
    assert corr[1.0] > 0.99  # the same task up to noise


def test_seed_and_frame():
    a, b = mmoe_synthetic(50, 0.9, seed=4), mmoe_synthetic(50, 0.9, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], mmoe_synthetic(50, 0.9, seed=5)["x"])
    frame = mmoe_synthetic_frame(50, 0.9, in_channels=8, seed=4)
    assert list(frame.columns) == [f"x{i}" for i in range(8)] + ["y1", "y2"]
    d = mmoe_synthetic(50, 0.9, in_channels=8, seed=4)
    assert torch.equal(torch.tensor(frame["y1"].to_numpy()), d["y1"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(correlation=1.5), "'correlation' must be in \\[-1, 1\\]"),
    (dict(correlation=float("nan")), "'correlation' must be in \\[-1, 1\\]"),
    (dict(in_channels=1), "'in_channels' must be at least 2"),
    (dict(scale=0.0), "'scale' must be positive"),
    (dict(num_rows=0), "need num_rows >= 1"),
    (dict(noise_std=-1.0), "noise_std >= 0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_rows=10, correlation=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        mmoe_synthetic(**args)


def test_binned_binary_frame():
    frame = mmoe_synthetic_frame(400, 0.9, in_channels=6, seed=2, num_bins=4, binary=True)
    d = mmoe_synthetic(400, 0.9, in_channels=6, seed=2)
    # Bins of N(0, 1) quartiles: edges -0.6745, 0, 0.6745 (standard normal table).
    edges = [-0.6744897501960817, 0.0, 0.6744897501960817]
    for n in range(0, 400, 53):
        for i in range(6):
            v = d["x"][n, i].item()
            assert frame[f"x{i}"].iloc[n] == f"b{sum(v > e for e in edges)}"
    for t in ("y1", "y2"):
        y = d[t]
        assert set(frame[t].unique()) == {0, 1}
        # torch.median of 400 values is the lower middle one: 200 rows lie above it
        assert int(frame[t].sum()) == int((y > y.median()).sum()) == 200
    with pytest.raises(ValueError, match="'num_bins' must be at least 2"):
        mmoe_synthetic_frame(10, 0.5, num_bins=1)
