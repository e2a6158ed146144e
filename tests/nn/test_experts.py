r"""Tests of moegraph.nn.experts against a naive per-row reference.

The reference runs each row through its expert's own weights, one row at a
time, in double precision.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from moegraph.nn import MLPExperts, ModuleExperts
from moegraph.nn.experts import resolve_backend

ACTS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


def naive_mlp_experts(experts, x_sorted, counts, weight=None, act="gelu"):
    r"""Row ``a`` belongs to expert ``e`` when it falls in the e-th block of
    ``counts``; ``y_a = w_a * (act(x_a W1[e] + b1[e]) W2[e] + b2[e])``."""
    W1, W2 = experts.weight1.double(), experts.weight2.double()
    b1 = None if experts.bias1 is None else experts.bias1.double()
    b2 = None if experts.bias2 is None else experts.bias2.double()
    rows, a = [], 0
    for e, size in enumerate(counts.tolist()):
        for _ in range(size):
            h = x_sorted[a].double() @ W1[e]
            if b1 is not None:
                h = h + b1[e]
            y = (ACTS[act] if isinstance(act, str) else act)(h) @ W2[e]
            if b2 is not None:
                y = y + b2[e]
            if weight is not None:
                y = y * weight[a].double()
            rows.append(y)
            a += 1
    if not rows:
        return torch.zeros(0, experts.out_channels, dtype=torch.float64)
    return torch.stack(rows)


COUNTS = {
    "all": [3, 5, 2, 4],
    "some_empty": [0, 6, 0, 5],
    "one": [0, 0, 7, 0],
    "none": [0, 0, 0, 0],
}


def make_inputs(counts, F_in=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    A = int(counts.sum())
    x = torch.randn(A, F_in, generator=g).to(dtype)
    weight = torch.rand(A, generator=g).to(dtype) + 0.1
    return x, counts, weight


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("counts", sorted(COUNTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_mlp_experts_match_naive(backend, counts, bias, with_weight):
    torch.manual_seed(0)
    experts = MLPExperts(8, 16, 12, num_experts=4, bias=bias, backend=backend)
    x, counts, weight = make_inputs(COUNTS[counts])
    weight = weight if with_weight else None
    y = experts(x, counts, weight)
    assert y.shape == (x.size(0), 12) and y.dtype == torch.float32
    ref = naive_mlp_experts(experts, x, counts, weight)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_mlp_experts_activation(act):
    torch.manual_seed(1)
    experts = MLPExperts(8, 16, 8, num_experts=4, act=act)
    x, counts, weight = make_inputs(COUNTS["all"])
    ref = naive_mlp_experts(experts, x, counts, weight, act=act)
    torch.testing.assert_close(experts(x, counts, weight).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("counts", ["all", "some_empty"])
def test_mlp_experts_gradcheck(bias, counts):
    torch.manual_seed(2)
    experts = MLPExperts(3, 4, 2, num_experts=4, bias=bias, backend="loop").double()
    x, counts, weight = make_inputs(COUNTS[counts], F_in=3, dtype=torch.float64)
    names = [n for n, _ in experts.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in experts.parameters()]
    x.requires_grad_()
    weight.requires_grad_()

    def f(x, weight, *params):
        return functional_call(experts, dict(zip(names, params, strict=True)), (x, counts, weight))

    assert torch.autograd.gradcheck(f, (x, weight, *params))

    def f_unweighted(x, *params):
        return functional_call(experts, dict(zip(names, params, strict=True)), (x, counts))

    assert torch.autograd.gradcheck(f_unweighted, (x, *params))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_mlp_experts_gradients_match_naive(backend):
    torch.manual_seed(3)
    experts = MLPExperts(8, 16, 8, num_experts=4, backend=backend)
    x, counts, weight = make_inputs(COUNTS["some_empty"])
    x.requires_grad_()
    weight.requires_grad_()
    g = torch.randn(x.size(0), 8, generator=torch.Generator().manual_seed(4))
    (experts(x, counts, weight) * g).sum().backward()

    ref_x = x.detach().double().requires_grad_()
    ref_w = weight.detach().double().requires_grad_()
    ref_experts = MLPExperts(8, 16, 8, num_experts=4).double()
    ref_experts.load_state_dict(experts.state_dict())
    (naive_mlp_experts(ref_experts, ref_x, counts, ref_w) * g.double()).sum().backward()

    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(experts.named_parameters(), ref_experts.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # Experts that got no rows get a zero gradient.
    for p in (experts.weight1, experts.bias1, experts.weight2, experts.bias2):
        assert float(p.grad[0].abs().sum()) == 0 and float(p.grad[2].abs().sum()) == 0
        assert float(p.grad[1].abs().sum()) > 0 and float(p.grad[3].abs().sum()) > 0


def test_mlp_experts_activation_parameters_learn():
    # An activation with parameters of its own (PReLU) must learn too.
    torch.manual_seed(5)
    experts = MLPExperts(8, 16, 8, num_experts=4, act="prelu", backend="loop")
    assert [n for n, _ in experts.act.named_parameters()] == ["weight"]
    x, counts, weight = make_inputs(COUNTS["some_empty"])
    x.requires_grad_()
    out = experts(x, counts, weight)
    out.square().sum().backward()

    slope = experts.act.weight.detach().double().requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    ref = naive_mlp_experts(experts, ref_x, counts, weight,
                            act=lambda h: torch.where(h >= 0, h, slope * h))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    assert float(experts.act.weight.grad.abs().sum()) > 0
    torch.testing.assert_close(experts.act.weight.grad.double(), slope.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-4)
    for name, p in experts.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name

    # Strict check in float64, the slope included.
    torch.manual_seed(6)
    experts = MLPExperts(3, 4, 2, num_experts=4, act="prelu", backend="loop").double()
    x, counts, weight = make_inputs(COUNTS["some_empty"], F_in=3, dtype=torch.float64)
    names = [n for n, _ in experts.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in experts.parameters()]

    def f(x, *params):
        return functional_call(experts, dict(zip(names, params, strict=True)), (x, counts, weight))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params))


def test_mlp_experts_autocast():
    torch.manual_seed(6)
    experts = MLPExperts(8, 16, 8, num_experts=4, backend="loop")
    x, counts, weight = make_inputs(COUNTS["all"])
    ref = experts(x, counts, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts, weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def test_mlp_experts_reset_parameters():
    torch.manual_seed(7)
    experts = MLPExperts(9, 16, 8, num_experts=3).requires_grad_(False)
    # Each slice initialised like nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert float(experts.weight1.abs().max()) <= 1 / math.sqrt(9)
    assert float(experts.bias1.abs().max()) <= 1 / math.sqrt(9)
    assert float(experts.weight2.abs().max()) <= 1 / math.sqrt(16)
    assert float(experts.bias2.abs().max()) <= 1 / math.sqrt(16)
    assert float(experts.weight1.abs().max()) > 0.5 / math.sqrt(9)
    assert not torch.equal(experts.weight1[0], experts.weight1[1])
    before = experts.weight1.detach().clone()
    experts.reset_parameters()
    assert not torch.equal(before, experts.weight1)
    assert MLPExperts(4, 4, 4, 2, bias=False).bias1 is None


def test_mlp_experts_bad_arguments():
    with pytest.raises(ValueError, match="'in_channels'"):
        MLPExperts(0, 4, 4, 2)
    with pytest.raises(ValueError, match="'hidden_channels'"):
        MLPExperts(4, -1, 4, 2)
    with pytest.raises(ValueError, match="'num_experts'"):
        MLPExperts(4, 4, 4, 0)
    with pytest.raises(ValueError, match="'backend'"):
        MLPExperts(4, 4, 4, 2, backend="cutlass")


def test_resolve_backend():
    assert resolve_backend("auto") == "loop"
    assert resolve_backend("loop") == "loop"
    assert resolve_backend("grouped_mm") == "grouped_mm"
    with pytest.raises(ValueError, match="'backend' must be one of"):
        resolve_backend("triton")


# ModuleExperts ################################################################


class Counting(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


def make_module_experts(seed=8):
    torch.manual_seed(seed)
    return [
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)),
        torch.nn.Linear(8, 6),
        torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Tanh()),
    ]


@pytest.mark.parametrize("counts", [[3, 4, 5], [0, 5, 0], [0, 0, 0]])
@pytest.mark.parametrize("with_weight", [True, False])
def test_module_experts_match_naive(counts, with_weight):
    modules = [Counting(m) for m in make_module_experts()]
    experts = ModuleExperts(modules, 8, 6)
    x, counts, weight = make_inputs(counts, seed=9)
    weight = weight if with_weight else None
    y = experts(x, counts, weight)
    assert y.shape == (x.size(0), 6)
    # Naive: one row at a time through its own module.
    bounds = torch.cumsum(counts, 0).tolist()
    ref = []
    for a in range(x.size(0)):
        e = sum(1 for b in bounds if b <= a)
        row = modules[e].module(x[a:a + 1])[0]
        ref.append(row * weight[a] if weight is not None else row)
    ref = torch.stack(ref) if ref else torch.zeros(0, 6)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    # An expert is called once when it has rows, never when it has none.
    assert [m.calls for m in modules] == [1 if c > 0 else 0 for c in counts.tolist()]


def test_module_experts_gradients():
    experts = ModuleExperts(make_module_experts(), 8, 6)
    x, counts, weight = make_inputs([2, 3, 4], seed=10)
    x.requires_grad_()
    weight.requires_grad_()
    experts(x, counts, weight).square().sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(weight.grad.abs().min()) > 0


def test_module_experts_errors_and_repr():
    with pytest.raises(ValueError, match="'experts'"):
        ModuleExperts([], 8, 6)
    experts = ModuleExperts([torch.nn.Linear(8, 5), torch.nn.Linear(8, 6)], 8, 6)
    x, counts, _ = make_inputs([2, 2])
    with pytest.raises(ValueError, match=r"expected \[2, 6\]"):
        experts(x, counts)
    assert repr(experts) == "ModuleExperts(num_experts=2)"
    assert experts.num_experts == 2


def test_module_experts_reset_parameters():
    modules = make_module_experts()
    experts = ModuleExperts(modules, 8, 6)
    before = modules[1].weight.detach().clone()
    torch.manual_seed(11)
    experts.reset_parameters()
    assert not torch.equal(before, modules[1].weight)


def test_mlp_experts_repr():
    assert repr(MLPExperts(8, 16, 4, num_experts=3)) == "MLPExperts(8, 16, 4, num_experts=3)"


class _AutogradGELU(torch.nn.GELU):
    r"""GELU that is not in the table of kernels: the autograd path."""


class _AutogradReLU(torch.nn.ReLU):
    r"""ReLU that is not in the table of kernels: the autograd path."""


@pytest.mark.parametrize("act,reference", [
    (torch.nn.GELU(), _AutogradGELU()),
    (torch.nn.GELU(approximate="tanh"), _AutogradGELU(approximate="tanh")),
    (torch.nn.ReLU(), _AutogradReLU()),
])
@pytest.mark.parametrize("gather", [False, True])
def test_activation_kernels_equal_the_autograd_path(act, reference, gather):
    r"""GELU and ReLU run their forward and backward kernels directly, without
    an autograd graph per block: outputs and every gradient equal, bit for bit,
    those of the same activation through autograd."""
    results = []
    for activation in (act, reference):
        torch.manual_seed(0)
        experts = MLPExperts(8, 16, 6, num_experts=4, backend="loop")
        experts.act = activation
        x = torch.randn(30, 8, requires_grad=True)
        weight = torch.rand(30, requires_grad=True)
        counts = torch.tensor([7, 0, 13, 10])
        if gather:
            rows = torch.randperm(30)
            out = experts.gather_and_combine(x, rows, counts, weight)
        else:
            out = experts(x, counts, weight)
        out.backward(torch.randn(30, 6, generator=torch.Generator().manual_seed(1)))
        results.append([out.detach(), x.grad, weight.grad]
                       + [p.grad for p in experts.parameters()])
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


# Spectral normalisation ########################################################


def numpy_spectral_norm(w: torch.Tensor) -> torch.Tensor:
    r"""Largest singular value of every matrix over the last two dims, by numpy's SVD."""
    import numpy as np

    s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)  # [..., min(M, K)]
    return torch.from_numpy(s[..., 0])


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (3, 5, 7), (2, 3, 8, 2)])
def test_spectral_normalize_against_numpy_svd(shape):
    from moegraph.nn.experts import spectral_normalize

    torch.manual_seed(0)
    w = torch.randn(*shape) * 3.0
    out = spectral_normalize(w)
    sigma = numpy_spectral_norm(w)
    torch.testing.assert_close(out.double(), w.double() / sigma[..., None, None],
                               rtol=1e-5, atol=1e-6)
    ones = torch.ones(shape[:-2], dtype=torch.float64)
    torch.testing.assert_close(numpy_spectral_norm(out), ones, rtol=1e-5, atol=1e-6)
    # scale-free: the optimiser cannot grow the map by growing the weight
    torch.testing.assert_close(spectral_normalize(10.0 * w), out, rtol=1e-5, atol=1e-6)


def test_spectral_normalize_gradient_and_edge_cases():
    from moegraph.nn.experts import spectral_normalize

    torch.manual_seed(1)
    w = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(spectral_normalize, (w,))
    # a zero matrix stays zero (no 0 / 0), per slice of a stack
    w = torch.randn(3, 4, 5)
    w[1] = 0.0
    out = spectral_normalize(w)
    assert torch.isfinite(out).all() and bool((out[1] == 0).all())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        spectral_normalize(torch.randn(4))


def test_spectral_linear_against_a_normalised_linear():
    from moegraph.nn.experts import SpectralLinear

    torch.manual_seed(2)
    lin = SpectralLinear(8, 5)
    with torch.no_grad():
        lin.weight.mul_(7.0)  # far from operator norm 1
    x = torch.randn(20, 8)
    sigma = numpy_spectral_norm(lin.weight)
    ref = x.double() @ (lin.weight.double() / sigma).t() + lin.bias.double()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-6)
    # 1-Lipschitz: no pair of inputs is pulled further apart
    a, b = torch.randn(200, 8), torch.randn(200, 8)
    assert bool(((lin(a) - lin(b)).norm(dim=1) <= (a - b).norm(dim=1) + 1e-5).all())
    # stored and reset as an nn.Linear
    assert set(dict(lin.named_parameters())) == {"weight", "bias"}
    lin.weight.sum().backward()
    assert lin.weight.grad is not None


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_mlp_experts_spectral_norm_match_naive(backend):
    torch.manual_seed(3)
    experts = MLPExperts(8, 16, 12, num_experts=4, backend=backend, spectral_norm=True)
    with torch.no_grad():
        experts.weight1.mul_(5.0)
    x, counts, weight = make_inputs(COUNTS["all"])
    # reference: plain experts whose weights are divided by numpy's spectral norms
    plain = MLPExperts(8, 16, 12, num_experts=4, backend=backend)
    with torch.no_grad():
        for name in ("weight1", "weight2"):
            w = getattr(experts, name)
            getattr(plain, name).copy_(w / numpy_spectral_norm(w)[:, None, None].float())
        plain.bias1.copy_(experts.bias1)
        plain.bias2.copy_(experts.bias2)
    y = experts(x, counts, weight)
    torch.testing.assert_close(y.double(), naive_mlp_experts(plain, x, counts, weight),
                               atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert experts.weight1.grad is not None and float(experts.weight1.grad.abs().sum()) > 0
    assert "spectral_norm=True" in repr(experts) and "spectral_norm" not in repr(plain)
