r"""Tests of moegraph.nn.SparseMoE against a naive dense reference.

The reference routes each row with plain Python (softmax of ``x W_g^T``,
sorting, the capacity rule replayed assignment by assignment), then applies
*every* expert to *every* row with the stacked weights and mixes the results
with the dense ``[N, E]`` routing weights. It shares no code with the block.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from naive_reference import (
    naive_expert_choice,
    naive_logits,
    naive_softmax,
    naive_topk,
    naive_topp,
    ranked,
    to_dense,
)
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch_geometric.datasets import Planetoid

from moegraph.nn import (
    ExpertChoiceRouter,
    MLPExperts,
    MoEOutput,
    SparseMoE,
    TopKRouter,
    TopPRouter,
)

N, FEAT, HID, OUT, E = 40, 8, 16, 12, 4

# Naive reference ##############################################################


def naive_route(m, x):
    r"""Per row, the list of ``(expert, weight)`` best first, null experts dropped."""
    router = m.router
    probs = naive_softmax(naive_logits(x, router.weight))
    if isinstance(router, ExpertChoiceRouter):
        return naive_expert_choice(probs, router.capacity_factor, router.num_experts)[0]
    if isinstance(router, TopKRouter):
        return naive_topk(probs, router.k, router.num_experts, router.normalize)
    return naive_topp(probs, router.p, router.num_experts, router.max_k, router.normalize)


def naive_capacity(assignments, num_experts, capacity_factor):
    r"""GShard / Switch drop rule: all first choices, then all second choices,
    ..., each rank in row order; an expert takes at most
    ``ceil(cf * A / E)`` assignments; a dropped one contributes nothing."""
    A = sum(len(pairs) for pairs in assignments)
    capacity = math.ceil(capacity_factor * A / num_experts)
    taken = [0] * num_experts
    kept = [[] for _ in assignments]
    dropped = 0
    for rank in range(max((len(p) for p in assignments), default=0)):
        for n, pairs in enumerate(assignments):
            if rank < len(pairs):
                e, w = pairs[rank]
                if taken[e] < capacity:
                    taken[e] += 1
                    kept[n].append((e, w))
                else:
                    dropped += 1
    return kept, dropped, taken, capacity


def every_expert_on_every_row(m, x):
    r"""``[E, N, O]``: each expert on all rows, from the stacked weights (or the
    expert modules), in double precision."""
    x = x.double()
    experts = m.experts
    if isinstance(experts, MLPExperts):
        W1, W2 = experts.weight1.double(), experts.weight2.double()
        ys = []
        for e in range(experts.num_experts):
            h = x @ W1[e] + (experts.bias1[e].double() if experts.bias1 is not None else 0)
            y = F.gelu(h) @ W2[e] + (experts.bias2[e].double() if experts.bias2 is not None else 0)
            ys.append(y)
        return torch.stack(ys)
    return torch.stack([copy.deepcopy(module).double()(x) for module in experts.experts])


def naive_moe(m, x, assignments):
    dense = to_dense(assignments, m.num_experts)  # [N, E]
    Y = every_expert_on_every_row(m, x)  # [E, N, O]
    out = (dense.t().unsqueeze(-1) * Y).sum(dim=0)
    if m.shared is not None:
        out = out + copy.deepcopy(m.shared).double()(x.double())
    return out


def make_x(n=N, seed=0, f=FEAT):
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed))


def check_against_naive(m, x, capacity_factor=None):
    out, routing = m(x)
    assert out.shape == (x.size(0), m.out_channels) and out.dtype == torch.float32
    ref = naive_route(m, x)
    if capacity_factor is not None:
        ref, dropped, taken, capacity = naive_capacity(ref, m.num_experts, capacity_factor)
        assert int(routing.dropped) == dropped
        assert routing.load.tolist() == [float(t) for t in taken]
        assert max(taken) <= capacity
    else:
        assert routing.dropped is None
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, m.num_experts),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), naive_moe(m, x, ref), atol=2e-5, rtol=1e-4)
    return routing


# Equivalence with the naive reference #########################################


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_topk_moe_matches_naive(k, shared, capacity_factor, deterministic, backend):
    torch.manual_seed(k)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=k, num_shared_experts=shared,
                  capacity_factor=capacity_factor, deterministic=deterministic, backend=backend)
    routing = check_against_naive(m, make_x(seed=k), capacity_factor)
    if capacity_factor is None:
        assert routing.fixed_k == k
    else:
        assert float(routing.load.max()) <= math.ceil(capacity_factor * N * k / E)
        if capacity_factor < 1 or k < E:
            assert int(routing.dropped) > 0  # the capacity did bite


@pytest.mark.parametrize("p", [0.3, 0.7])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_topp_moe_matches_naive(p, normalize, shared, capacity_factor, backend):
    torch.manual_seed(1)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, router="topp",
                  router_kwargs=dict(p=p, normalize=normalize), num_shared_experts=shared,
                  capacity_factor=capacity_factor, backend=backend)
    check_against_naive(m, make_x(seed=2), capacity_factor)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_expert_choice_moe_matches_naive(capacity_factor, shared, backend):
    torch.manual_seed(2)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, router="expert_choice",
                  router_kwargs=dict(capacity_factor=capacity_factor),
                  num_shared_experts=shared, backend=backend)
    routing = check_against_naive(m, make_x(seed=3))
    c = math.ceil(N * capacity_factor / E)
    assert torch.bincount(routing.expert, minlength=E).tolist() == [c] * E


@pytest.mark.parametrize("router,kwargs", [("topk", dict(num_null_experts=2)),
                                           ("topp", dict(num_null_experts=2, p=0.5))])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("deterministic", [False, True])
def test_null_experts_moe_matches_naive(router, kwargs, capacity_factor, deterministic):
    torch.manual_seed(3)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=3 if router == "topk" else None,
                  router=router, router_kwargs=kwargs, capacity_factor=capacity_factor,
                  deterministic=deterministic)
    with torch.no_grad():
        m.router.weight[E:] *= 3.0  # null experts win often
    routing = check_against_naive(m, make_x(seed=4), capacity_factor)
    assert routing.fixed_k is None
    assert int(routing.experts_per_row().min()) < (3 if router == "topk" else 1)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shared", [0, 1])
def test_k_equals_e_is_the_dense_softmax_mixture(backend, deterministic, shared):
    torch.manual_seed(4)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=E, backend=backend,
                  deterministic=deterministic, num_shared_experts=shared)
    x = make_x(seed=5)
    gate = torch.softmax(x.double() @ m.router.weight.double().t(), dim=-1)  # [N, E]
    Y = every_expert_on_every_row(m, x)  # [E, N, O]
    ref = sum(gate[:, e:e + 1] * Y[e] for e in range(E))
    if shared:
        ref = ref + copy.deepcopy(m.shared).double()(x.double())
    torch.testing.assert_close(m(x).out.double(), ref, atol=2e-5, rtol=1e-4)


def test_no_bias_and_out_channels_default():
    torch.manual_seed(5)
    m = SparseMoE(FEAT, HID, num_experts=E, k=2, bias=False, num_shared_experts=1)
    assert m.out_channels == FEAT and m.experts.bias1 is None and m.shared[0].bias is None
    check_against_naive(m, make_x(seed=6))


def make_module_experts():
    return [
        torch.nn.Sequential(torch.nn.Linear(FEAT, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)),
        torch.nn.Linear(FEAT, 6),
        torch.nn.Sequential(torch.nn.Linear(FEAT, 6, bias=False), torch.nn.Tanh()),
    ]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("shared", [0, 1])
def test_module_experts_moe_matches_naive(k, capacity_factor, shared):
    torch.manual_seed(6)
    m = SparseMoE(FEAT, HID, 6, num_experts=3, k=k, experts=make_module_experts(),
                  num_shared_experts=shared, capacity_factor=capacity_factor)
    check_against_naive(m, make_x(seed=7), capacity_factor)


# Gradients ####################################################################

GRAD_CONFIGS = {
    "topk": dict(k=2),
    "topk_deterministic": dict(k=2, deterministic=True),
    "topk1_unnormalized": dict(k=1, router_kwargs=dict(normalize=False)),
    "topp": dict(router="topp", router_kwargs=dict(p=0.6)),
    "topp_normalized": dict(router="topp", router_kwargs=dict(p=0.6, normalize=True)),
    "expert_choice": dict(router="expert_choice"),
}


@pytest.mark.parametrize("name", sorted(GRAD_CONFIGS))
def test_gradcheck_expert_parameters(name):
    # Routing does not depend on the expert weights: a strict float64 check.
    torch.manual_seed(7)
    m = SparseMoE(4, 4, 4, num_experts=3, num_shared_experts=1, **GRAD_CONFIGS[name]).double()
    x = make_x(n=9, f=4, seed=8).double()
    names = [n for n, p in m.named_parameters() if not n.startswith("router.")]
    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def f(*params):
        return functional_call(m, dict(zip(names, params, strict=True)), (x,)).out

    assert torch.autograd.gradcheck(f, tuple(params))


def clear_margins(m, x, margin):
    r"""Keep the rows whose routing cannot flip under a perturbation of the
    input: consecutive sorted logits and top-p prefix masses far apart."""
    logits = x.double() @ m.router.weight.double().t()
    keep = []
    for row in logits.tolist():
        s = sorted(row, reverse=True)
        ok = all(a - b > margin for a, b in zip(s, s[1:], strict=False))
        if isinstance(m.router, TopPRouter):
            probs = torch.tensor(s).softmax(0).cumsum(0).tolist()
            ok = ok and all(abs(c - m.router.p) > margin for c in probs)
        keep.append(ok)
    return x[torch.tensor(keep)]


@pytest.mark.parametrize("name", ["topk", "topk1_unnormalized", "topp", "topp_normalized"])
def test_gradcheck_input(name):
    # The router runs in float32 by design, so the check on x uses a larger
    # step and tolerance; rows are chosen so that no step flips the routing.
    torch.manual_seed(9)
    m = SparseMoE(4, 4, 4, num_experts=3, num_shared_experts=1, **GRAD_CONFIGS[name]).double()
    x = clear_margins(m, make_x(n=40, f=4, seed=10).double(), margin=0.05)[:8]
    assert x.size(0) >= 4
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x).out, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


def naive_differentiable_moe(m, x, assignments):
    r"""The naive reference with differentiable combine weights: the selection
    is fixed by ``assignments`` but the weights are recomputed from
    ``softmax(x W_g^T)`` with autograd."""
    router = m.router
    probs = torch.softmax(x.double() @ router.weight.double().t(), dim=-1)  # [N, Et]
    Y = every_expert_on_every_row(m, x)  # [E, N, O]
    rows = []
    for n, pairs in enumerate(assignments):
        row = torch.zeros(Y.size(-1), dtype=torch.float64)
        if isinstance(router, TopKRouter):
            chosen = ranked(probs[n].tolist())[:router.k]  # null ones included
            norm = probs[n, chosen].sum() if router.normalize else 1.0
        elif isinstance(router, TopPRouter):
            chosen = ranked(probs[n].tolist())[:len(pairs)]
            norm = probs[n, chosen].sum() if router.normalize else 1.0
        else:
            norm = 1.0
        for e, _ in pairs:
            row = row + probs[n, e] / norm * Y[e, n]
        rows.append(row)
    out = torch.stack(rows)
    if m.shared is not None:
        out = out + shared_double(m, x)
    return out


def shared_double(m, x):
    params = {n: p.double() for n, p in m.shared.named_parameters()}
    return functional_call(m.shared, params, (x.double(),))


@pytest.mark.parametrize("name", sorted(GRAD_CONFIGS))
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_gradients_match_naive(name, backend):
    torch.manual_seed(10)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, num_shared_experts=1, backend=backend,
                  **GRAD_CONFIGS[name])
    x = make_x(seed=11).requires_grad_()
    g = torch.randn(N, OUT, generator=torch.Generator().manual_seed(12))
    (m(x).out * g).sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    got_x = x.grad.clone()

    m.zero_grad()
    x.grad = None
    ref = naive_differentiable_moe(m, x, naive_route(m, x))
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # The router learns through the combine weights alone (no aux loss here).
    assert float(got["router.weight"].abs().sum()) > 0


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_top1_fast_path_matches_naive(backend):
    r"""Top-1 with normalised weights: the weight is the constant one (the
    softmax over a single choice), the rows are a permutation and each output
    and input gradient is copied into place. Outputs and gradients equal the
    float64 reference, whose router gradient through the weights is zero."""
    torch.manual_seed(13)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=1, backend=backend)
    x = make_x(seed=14).requires_grad_()
    g = torch.randn(N, OUT, generator=torch.Generator().manual_seed(15))
    out, routing = m(x)
    assert routing.fixed_k == 1 and not routing.weight.requires_grad
    assert torch.equal(routing.weight, torch.ones(N))
    assert torch.equal(routing.row.sort().values, torch.arange(N))
    (out * g).sum().backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    got_x = x.grad.clone()
    assert got["router.weight"] is None  # only the aux losses reach it

    m.zero_grad()
    x.grad = None
    ref = naive_differentiable_moe(m, x, naive_route(m, x))
    torch.testing.assert_close(out, ref.float().detach(), atol=1e-5, rtol=1e-4)
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-4)
    for n, p in m.named_parameters():
        if n != "router.weight":
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(m.router.weight.grad, torch.zeros_like(m.router.weight))


@pytest.mark.parametrize("name", sorted(GRAD_CONFIGS))
@pytest.mark.parametrize("experts", ["mlp", "modules"])
def test_every_parameter_learns(name, experts):
    torch.manual_seed(11)
    kwargs = dict(GRAD_CONFIGS[name])
    if experts == "modules":
        kwargs.update(num_experts=3, experts=make_module_experts(), out_channels=6)
    else:
        kwargs.update(num_experts=E, out_channels=OUT)
    m = SparseMoE(FEAT, HID, num_shared_experts=2, **kwargs)
    out, routing = m(make_x(n=60, seed=12))
    out.square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
    # The aux losses alone reach the router too.
    m.zero_grad()
    out, routing = m(make_x(n=60, seed=12))
    sum(routing.aux_loss.values()).backward()
    assert float(m.router.weight.grad.abs().sum()) > 0


def test_noisy_gating_parameters_learn():
    torch.manual_seed(12)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=2, router_kwargs=dict(noisy=True))
    out, routing = m(make_x(seed=13))
    (out.square().sum() + routing.aux_loss["importance"]).backward()
    assert float(m.router.noise_weight.grad.abs().sum()) > 0
    assert float(m.router.weight.grad.abs().sum()) > 0


# Precision, symmetry, determinism #############################################

ROUTER_CONFIGS = {
    "topk": dict(k=2),
    "topk_null": dict(k=2, router_kwargs=dict(num_null_experts=2)),
    "topk_noisy": dict(k=2, router_kwargs=dict(noisy=True)),
    "topk_capacity": dict(k=2, capacity_factor=1.0),
    "topp": dict(router="topp"),
    "topp_capacity": dict(router="topp", capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice"),
}


@pytest.mark.parametrize("name", ["topk", "topp", "expert_choice"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_autocast_bf16(name, backend):
    torch.manual_seed(13)
    # bf16 grouped_mm needs 16-byte rows: channels that are multiples of 8.
    feat, out_channels = (FEAT, 16) if backend == "grouped_mm" else (FEAT, OUT)
    m = SparseMoE(feat, HID, out_channels, num_experts=E, num_shared_experts=1,
                  backend=backend, **ROUTER_CONFIGS[name])
    x = make_x(seed=14, f=feat)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = m(x)
    assert routing.probs.dtype == routing.weight.dtype == torch.float32
    assert torch.equal(routing.probs, ref.routing.probs)
    assert torch.equal(routing.dense_weight(), ref.routing.dense_weight())
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), ref.out, atol=5e-2, rtol=5e-2)


def test_grouped_mm_unaligned_sizes_raise():
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, backend="grouped_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="grouped_mm.*multiples of 8"):
            m(make_x(seed=1))


@pytest.mark.parametrize("name", ["topk", "topk_null", "topp", "expert_choice"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_permutation_equivariance(name, deterministic):
    torch.manual_seed(14)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, num_shared_experts=1,
                  deterministic=deterministic, **ROUTER_CONFIGS[name])
    x = make_x(seed=15)
    perm = torch.randperm(N)
    torch.testing.assert_close(m(x[perm]).out, m(x).out[perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ROUTER_CONFIGS))
def test_same_seed_same_output(name):
    x = make_x(seed=16)
    outs = []
    for _ in range(2):
        torch.manual_seed(15)  # same initialisation and, in training, same noise
        m = SparseMoE(FEAT, HID, OUT, num_experts=E, **ROUTER_CONFIGS[name])
        outs.append(m(x))
    assert torch.equal(outs[0].out, outs[1].out)
    for key, value in outs[0].routing.aux_loss.items():
        assert torch.equal(value, outs[1].routing.aux_loss[key])


def test_deterministic_combine_equals_scatter():
    torch.manual_seed(16)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=3)
    x = make_x(seed=17)
    a = m(x).out
    m.deterministic = True
    torch.testing.assert_close(m(x).out, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ROUTER_CONFIGS))
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_input(name, backend, deterministic):
    torch.manual_seed(17)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, num_shared_experts=1, backend=backend,
                  deterministic=deterministic, **ROUTER_CONFIGS[name])
    x = torch.empty(0, FEAT, requires_grad=True)
    out, routing = m(x)
    assert out.shape == (0, OUT)
    assert routing.row.numel() == 0
    out.sum().backward()
    assert x.grad.shape == (0, FEAT)


def test_eval_aux_losses_are_zero():
    torch.manual_seed(18)
    for config in ROUTER_CONFIGS.values():
        m = SparseMoE(FEAT, HID, OUT, num_experts=E, **config).eval()
        out = m(make_x(seed=19))
        assert isinstance(out, MoEOutput)
        assert all(float(v) == 0.0 for v in out.routing.aux_loss.values())


# Bad input ####################################################################


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0), ValueError, "'k'"),
    (dict(k=5), ValueError, "'k'"),
    (dict(router="topp", router_kwargs=dict(p=1.5)), ValueError, "'p'"),
    (dict(router="topp", router_kwargs=dict(p=0.0)), ValueError, "'p'"),
    (dict(router="switch"), ValueError, "'router' must be one of"),
    (dict(router=torch.nn.Linear(8, 4)), TypeError, "'router'"),
    (dict(router=TopKRouter(8, 3)), ValueError, "num_experts=4"),
    (dict(router=TopKRouter(6, 4)), ValueError, "in_channels=8"),
    (dict(router="topp", k=2), ValueError, "'k' applies to the 'topk' router only"),
    (dict(router="expert_choice", k=1), ValueError, "'k'"),
    (dict(router="expert_choice", capacity_factor=1.0), ValueError, "'capacity_factor'"),
    (dict(capacity_factor=0.0), ValueError, "'capacity_factor'"),
    (dict(backend="triton"), ValueError, "'backend'"),
    (dict(experts=[torch.nn.Linear(8, 8)] * 3), ValueError, "num_experts=4"),
    (dict(experts=MLPExperts(8, 16, 8, num_experts=2)), ValueError, "num_experts=4"),
    (dict(num_shared_experts=-1), ValueError, "'num_shared_experts'"),
    (dict(experts=[torch.nn.Linear(8, 8)] * 4, spectral_norm=True), ValueError,
     "'spectral_norm' applies to the built-in MLP experts"),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {"num_experts": 4, **kwargs}
    with pytest.raises(error, match=match):
        SparseMoE(8, 16, **kwargs)


@pytest.mark.parametrize("name", ["topk", "topp", "expert_choice"])
def test_bad_input(name):
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, **ROUTER_CONFIGS[name])
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        m(torch.randn(FEAT))
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        m(torch.randn(2, 3, FEAT))
    with pytest.raises(ValueError, match=f"in_channels={FEAT}"):
        m(torch.randn(5, FEAT + 1))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(5, FEAT)
        x[1, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            m(x)


def test_k_in_router_kwargs():
    # k may come in router_kwargs (as from a config); it must not be dropped.
    assert SparseMoE(8, 16, num_experts=4, router_kwargs=dict(k=3)).router.k == 3
    assert SparseMoE(8, 16, num_experts=4, k=3, router_kwargs=dict(k=3)).router.k == 3
    assert SparseMoE(8, 16, num_experts=4, k=1).router.k == 1
    assert SparseMoE(8, 16, num_experts=4).router.k == 2
    with pytest.raises(ValueError, match="'k' given twice"):
        SparseMoE(8, 16, num_experts=4, k=1, router_kwargs=dict(k=3))


def test_router_module_accepted():
    torch.manual_seed(19)
    router = TopPRouter(FEAT, E, p=0.4)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, router=router)
    assert m.router is router
    check_against_naive(m, make_x(seed=20))


def test_repr():
    assert repr(SparseMoE(16, 32, 16, num_experts=4, k=2)) == \
        "SparseMoE(16, 32, 16, num_experts=4, k=2)"
    assert repr(SparseMoE(16, 32, num_experts=4)) == "SparseMoE(16, 32, 16, num_experts=4, k=2)"
    assert repr(SparseMoE(16, 32, 8, num_experts=4, k=1, num_shared_experts=2)) == \
        "SparseMoE(16, 32, 8, num_experts=4, k=1, num_shared_experts=2)"
    assert repr(SparseMoE(16, 32, 16, num_experts=4, router="topp")) == \
        "SparseMoE(16, 32, 16, num_experts=4, router=TopPRouter)"
    assert repr(SparseMoE(16, 32, 16, num_experts=4, router="expert_choice")) == \
        "SparseMoE(16, 32, 16, num_experts=4, router=ExpertChoiceRouter)"


# Issue 14: bad argument types, input dtypes, huge router logits ###############


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=2.0), r"'num_experts' must be a positive integer \(got 2.0\)"),
    (dict(num_experts="8"), r"'num_experts' must be a positive integer \(got '8'\)"),
    (dict(k=True), r"'k' must be an integer in \[1, 4\]"),
    (dict(capacity_factor=float("inf")), "'capacity_factor' must be a finite positive number"),
    (dict(capacity_factor=float("nan")), "'capacity_factor'"),
    (dict(capacity_factor="1.0"), "'capacity_factor'"),
    (dict(num_shared_experts=1.5), "'num_shared_experts' must be a non-negative integer"),
    (dict(num_shared_experts=1, shared_hidden_channels=0), "'shared_hidden_channels'"),
    (dict(out_channels="8"), "'out_channels'"),
])
def test_bad_argument_types(kwargs, match):
    kwargs = {"num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SparseMoE(8, 16, **kwargs)
    with pytest.raises(ValueError, match="'hidden_channels'"):
        SparseMoE(8, 16.0, num_experts=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shared", [0, 1])
def test_other_input_dtype_runs_every_expert_in_it(dtype, shared):
    # Before: the shared experts failed in 'mat1 and mat2' while the routed
    # experts accepted the input. Now both run in the input's dtype.
    torch.manual_seed(21)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=2, num_shared_experts=shared).eval()
    x = make_x(seed=22)
    out = m(x.to(dtype)).out
    assert out.dtype == dtype
    reference = copy.deepcopy(m)  # every expert cast to dtype, routing in float32
    reference.experts.to(dtype)
    if reference.shared is not None:
        reference.shared.to(dtype)
    torch.testing.assert_close(out, reference(x.to(dtype)).out)
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.float(), m(x).out, **tol)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_integer_or_bool_input_is_rejected(dtype):
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, num_shared_experts=1)
    with pytest.raises(TypeError, match=f"'x' must be a floating-point tensor.*{dtype}"):
        m(torch.ones(5, FEAT, dtype=dtype))


@pytest.mark.parametrize("name", ["topk", "topp", "expert_choice"])
def test_huge_finite_input_gives_finite_loss_and_gradients(name):
    torch.manual_seed(23)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, **ROUTER_CONFIGS[name]).train()
    x = (make_x(seed=24) * 1e19).requires_grad_()
    out, routing = m(x)
    loss = 1e-3 * sum(routing.aux_loss.values())
    assert torch.isfinite(loss)
    (loss + out.sum() * 1e-30).backward()
    assert torch.isfinite(x.grad).all()


# Host synchronisations (issue 17) #############################################

aten = torch.ops.aten
# Ops that make the host wait for the device on CUDA: a scalar read (item,
# bool, int), an output whose size depends on the data, or bincount (which
# reads the maximum index to size its output).
SYNC_OPS = {aten._local_scalar_dense.default: "scalar read", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten.bincount.default: "bincount"}


class SyncCounter(TorchDispatchMode):
    r"""Records, on any device, the ops of a call that synchronise on CUDA;
    ``Tensor.tolist`` (a copy to the host) is counted by a patch."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.syncs.append(SYNC_OPS[func])
        elif func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.syncs.append("boolean mask")
        elif (func is aten.repeat_interleave.Tensor
              and kwargs.get("output_size") is None):
            self.syncs.append("repeat_interleave")
        return func(*args, **kwargs)


def count_syncs(monkeypatch, fn):
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.syncs.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with counter:
        fn()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return sorted(counter.syncs)


@pytest.mark.parametrize("backend,expected", [
    ("loop", ["scalar read", "tolist"]),  # the NaN check; the block sizes
    ("grouped_mm", ["scalar read"]),  # the NaN check only
])
@pytest.mark.parametrize("training", [False, True])
def test_host_syncs_per_call(monkeypatch, backend, expected, training):
    # Forward and backward of a dropless top-k layer: the routing, the
    # counts per expert, the aux losses and the combine need no host sync.
    torch.manual_seed(25)
    m = SparseMoE(16, 16, 16, num_experts=4, k=2, backend=backend,
                  num_shared_experts=1).train(training)
    x = make_x(f=16, seed=26).requires_grad_()

    def step():
        out, routing = m(x)
        (out.sum() + sum(routing.aux_loss.values())).backward()

    assert count_syncs(monkeypatch, step) == expected


def test_host_syncs_noisy_router_with_balance_groups(monkeypatch):
    # HopMoEConv(balance="per_hop")'s router: the grouped Switch and importance
    # losses mask the rows of each group by multiplication, never select them,
    # and the noisy gate's smooth load uses the normal CDF without
    # torch.distributions' argument checks. What is left: the finite checks of
    # the clean and the noise logits.
    from moegraph.nn.routing import TopKRouter

    torch.manual_seed(31)
    router = TopKRouter(16, 4, k=1, noisy=True, straight_through=True,
                        balance_groups=[2, 2]).train()
    x = make_x(f=16, seed=32).requires_grad_()

    def step():
        routing = router(x)
        sum(routing.aux_loss.values()).backward()

    assert count_syncs(monkeypatch, step) == ["scalar read", "scalar read"]


def test_host_syncs_expert_choice_and_deterministic(monkeypatch):
    torch.manual_seed(27)
    m = SparseMoE(16, 16, 16, num_experts=4, router="expert_choice", deterministic=True).train()
    x = make_x(f=16, seed=28)
    assert count_syncs(monkeypatch, lambda: m(x)) == ["scalar read", "tolist"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_syncs_on_cuda():
    # The same count from CUDA itself: each synchronising call warns once.
    torch.manual_seed(29)
    m = SparseMoE(16, 16, 16, num_experts=4, k=2).cuda().train()
    x = make_x(f=16, seed=30).cuda().requires_grad_()
    m(x)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            out, routing = m(x)
            (out.sum() + sum(routing.aux_loss.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 2, [str(w.message) for w in syncs]  # NaN check, block sizes


# On a real graph (Cora, from MOEGRAPH_DATA_DIR; skipped when absent) #########

def test_cora_loads_from_a_copy_and_routes_every_node(real_data):
    root = real_data("Planetoid/Cora")
    data = Planetoid(str(root), "Cora")[0]
    assert data.num_nodes == 2708 and data.num_features == 1433
    assert (root / "Cora" / "processed").is_dir()  # written into the copy, not the source

    torch.manual_seed(0)
    moe = SparseMoE(data.num_features, 32, 7, num_experts=4, k=2).eval()
    out, routing = moe(data.x)
    assert out.shape == (2708, 7) and bool(torch.isfinite(out).all())
    # Every node is routed to exactly k = 2 distinct experts.
    assert torch.equal(routing.experts_per_row(), torch.full((2708,), 2))
    assert int(routing.load.sum()) == 2 * 2708
    dense = routing.dense_weight()
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(2708))


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_is_the_block_with_normalised_weights(shared, dtype):
    r"""``spectral_norm=True`` computes what the plain block computes with every
    expert (and shared-expert) weight matrix divided by its largest singular
    value, taken here from numpy's SVD; routing is untouched."""
    import numpy as np

    torch.manual_seed(11)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=2, num_shared_experts=shared,
                  spectral_norm=True)
    plain = copy.deepcopy(m)
    plain.experts.spectral_norm = False
    with torch.no_grad():
        for p in (plain.experts.weight1, plain.experts.weight2):
            s = np.linalg.svd(p.double().numpy(), compute_uv=False)[:, 0]
            p.div_(torch.from_numpy(s).float()[:, None, None])
    if shared:
        from moegraph.nn.experts import SpectralLinear

        assert all(isinstance(plain.shared[i], SpectralLinear) for i in (0, 2))
        lins = []
        for i in (0, 2):
            lin = torch.nn.Linear(plain.shared[i].in_features, plain.shared[i].out_features)
            w = plain.shared[i].weight.detach()
            s = np.linalg.svd(w.double().numpy(), compute_uv=False)[0]
            with torch.no_grad():
                lin.weight.copy_(w / float(s))
                lin.bias.copy_(plain.shared[i].bias)
            lins.append(lin)
        plain.shared = torch.nn.Sequential(lins[0], plain.shared[1], lins[1])
    x = make_x(seed=5).to(dtype)
    out, routing = m(x)
    ref, ref_routing = plain(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routing.dense_weight(), ref_routing.dense_weight())
    # the unnormalised block differs: the option is not a no-op
    m.experts.spectral_norm = False
    assert not torch.allclose(m(x)[0], out, atol=1e-3)


# router_input ##################################################################


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1])
def test_router_input_routes_on_it_and_computes_on_x(k, shared):
    r"""``router_input``: the naive routing of ``router_input`` (not of
    ``x``), the experts (and shared experts) applied to ``x``."""
    torch.manual_seed(0)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=k, num_shared_experts=shared)
    x, r = make_x(seed=0), make_x(seed=1)
    out, routing = m(x, router_input=r)
    ref = naive_route(m, r)
    assert ref != naive_route(m, x)  # the two inputs route differently: the test can fail
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), naive_moe(m, x, ref), atol=2e-5, rtol=1e-4)
    # router_input=x is the plain call
    torch.testing.assert_close(m(x, router_input=x).out, m(x).out)


def test_router_input_gradients():
    r"""The router's gradient comes through ``router_input``; ``x`` gets the
    experts' gradient only (a router input without a gradient path leaves
    ``x``'s gradient equal to that of a fixed routing)."""
    torch.manual_seed(0)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=2)
    x = make_x(seed=0).requires_grad_()
    r = make_x(seed=1).requires_grad_()
    m(x, router_input=r).out.sum().backward()
    assert r.grad is not None and float(r.grad.abs().sum()) > 0
    assert m.router.weight.grad is not None and float(m.router.weight.grad.abs().sum()) > 0
    # x's gradient: the naive mixture with the routing of r held fixed
    ref = to_dense(naive_route(m, r.detach()), E).float()  # [N, E]
    x2 = x.detach().clone().requires_grad_()
    W1, W2 = m.experts.weight1, m.experts.weight2
    ys = torch.stack([F.gelu(x2 @ W1[e] + m.experts.bias1[e]) @ W2[e] + m.experts.bias2[e]
                      for e in range(E)])  # [E, N, O]
    (ref.t().unsqueeze(-1) * ys).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_router_input_bad_input():
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=2)
    x = make_x()
    with pytest.raises(ValueError, match="must have the shape of 'x'"):
        m(x, router_input=x[:-1])
    with pytest.raises(ValueError, match="must have the shape of 'x'"):
        m(x, router_input=torch.randn(N, FEAT + 1))
    with pytest.raises(TypeError, match="must be tensors"):
        m(x, router_input=x.tolist())
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):  # the router checks what it reads
        m(x, router_input=bad)


# expert_init ####################################################################


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_shared_expert_init_starts_as_one_mlp(spectral_norm, k):
    r"""``expert_init="shared"``: every expert holds expert 0's weights, so
    the renormalised top-k mix at the start is that one MLP, computed by
    hand (spectrally normalised with numpy's SVD where asked); after a reset
    too. The experts' slices differ with the default independent init."""
    import numpy as np

    torch.manual_seed(0)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=k, bias=not spectral_norm,
                  spectral_norm=spectral_norm, expert_init="shared")
    ex = m.experts
    for _ in range(2):
        for p in ex.parameters():
            assert all(torch.equal(p[e], p[0]) for e in range(E))
        x = make_x()
        W1, W2 = ex.weight1[0].detach().double(), ex.weight2[0].detach().double()
        if spectral_norm:
            W1 = W1 / float(np.linalg.svd(W1.numpy(), compute_uv=False)[0])
            W2 = W2 / float(np.linalg.svd(W2.numpy(), compute_uv=False)[0])
        b1 = ex.bias1[0].detach().double() if ex.bias1 is not None else 0
        b2 = ex.bias2[0].detach().double() if ex.bias2 is not None else 0
        ref = F.gelu(x.double() @ W1 + b1) @ W2 + b2
        torch.testing.assert_close(m(x).out.double(), ref, atol=1e-5, rtol=1e-4)
        m.reset_parameters()
    torch.manual_seed(0)
    indep = SparseMoE(FEAT, HID, OUT, num_experts=E, k=k)
    assert not torch.equal(indep.experts.weight1[0], indep.experts.weight1[1])


def test_shared_expert_init_experts_diverge_with_their_rows():
    r"""One SGD step from a shared start: experts routed different rows get
    different gradients and are no longer equal."""
    torch.manual_seed(0)
    m = SparseMoE(FEAT, HID, OUT, num_experts=E, k=1, expert_init="shared")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    out, routing = m(make_x())
    out.pow(2).sum().backward()
    opt.step()
    w = m.experts.weight1.detach()
    used = sorted(set(routing.expert.tolist()))
    assert len(used) > 1
    assert not torch.equal(w[used[0]], w[used[1]])


def test_expert_init_bad_input():
    from moegraph.nn import MLPExperts

    with pytest.raises(ValueError, match="'init' must be one of"):
        MLPExperts(FEAT, HID, OUT, E, init="copy")
    with pytest.raises(ValueError, match="'init' must be one of"):
        SparseMoE(FEAT, HID, OUT, num_experts=E, expert_init="same")
    with pytest.raises(ValueError, match="'expert_init' applies to the built-in MLP experts"):
        SparseMoE(8, 16, 8, num_experts=2, experts=[torch.nn.Linear(8, 8)] * 2,
                  expert_init="shared")
