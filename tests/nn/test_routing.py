r"""Tests of moegraph.nn.routing against naive references written here.

Every reference below is plain Python over lists of floats (loops, ``sorted``,
``math.exp``), so it shares no code with the routers it checks.
"""
import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from naive_reference import (
    naive_expert_choice,
    naive_logits,
    naive_softmax,
    naive_topk,
    naive_topp,
    ranked,
    to_dense,
)

from moegraph.nn import (
    AUX_LOSS_NAMES,
    ExpertChoiceRouter,
    Routing,
    TopKRouter,
    TopPRouter,
    sum_aux_losses,
)
from moegraph.nn.routing import (
    drop_overflow,
    expert_capacity,
    grouped_importance_loss,
    grouped_load_balancing_loss,
    z_loss,
)

# Naive references #############################################################


def naive_logsumexp(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def naive_cv_squared(values):
    return statistics.variance(values) / statistics.mean(values) ** 2  # unbiased variance


def pairs_of(routing):
    return sorted(zip(routing.row.tolist(), routing.expert.tolist(), strict=True))


def pairs_of_naive(assignments):
    return sorted((n, e) for n, pairs in enumerate(assignments) for e, _ in pairs)


def make_x(N=50, F=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, F, generator=g)


# Top-k ########################################################################


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (4, 3), (4, 4), (6, 2), (6, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_matches_naive(E, k, normalize):
    torch.manual_seed(E * 10 + k)
    router = TopKRouter(8, E, k=k, normalize=normalize)
    x = make_x(N=50, seed=k)
    routing = router(x)
    probs = naive_softmax(naive_logits(x, router.weight))
    ref = naive_topk(probs, k, E, normalize)

    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.probs.double(), torch.tensor(probs, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)
    # Layout: row-major with exactly k per row, best choice first.
    assert routing.fixed_k == k
    assert routing.row.tolist() == [n for n in range(50) for _ in range(k)]
    w = routing.weight.view(50, k)
    assert bool((w[:, :-1] >= w[:, 1:]).all())
    if normalize:
        torch.testing.assert_close(w.sum(dim=1), torch.ones(50))
    # Fields.
    assert routing.weight.dtype == routing.probs.dtype == routing.load.dtype == torch.float32
    assert routing.row.dtype == routing.expert.dtype == torch.long
    assert routing.probs.shape == (50, E)
    load = [sum(1 for pairs in ref for e, _ in pairs if e == i) for i in range(E)]
    assert routing.load.tolist() == load
    assert routing.experts_per_row().tolist() == [k] * 50
    assert routing.num_rows == 50 and routing.num_experts == E
    assert routing.dropped is None


@pytest.mark.parametrize("E,num_null,k", [(4, 2, 2), (4, 4, 3), (3, 1, 4), (2, 3, 1)])
def test_topk_null_experts_match_naive(E, num_null, k):
    torch.manual_seed(E + num_null + k)
    router = TopKRouter(8, E, k=k, num_null_experts=num_null)
    with torch.no_grad():  # make the null experts win often enough to matter
        router.weight[E:] *= 3.0
    x = make_x(N=60, seed=1)
    routing = router(x)
    probs = naive_softmax(naive_logits(x, router.weight))
    ref = naive_topk(probs, k, E)

    assert routing.probs.shape == (60, E + num_null)
    assert routing.load.shape == (E,)
    assert bool((routing.expert < E).all())
    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    per_row = routing.experts_per_row()
    assert int(per_row.min()) >= 0 and int(per_row.max()) <= k
    assert int(per_row.min()) < k  # some row did use a null expert
    assert bool((routing.dense_weight().sum(dim=1) <= 1 + 1e-6).all())
    assert routing.fixed_k is None
    assert routing.load.tolist() == torch.bincount(routing.expert, minlength=E).float().tolist()


# Top-p ########################################################################


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("max_k", [None, 2])
def test_topp_matches_naive(p, normalize, max_k):
    torch.manual_seed(3)
    E = 5
    router = TopPRouter(8, E, p=p, max_k=max_k, normalize=normalize)
    x = make_x(N=60, seed=2)
    routing = router(x)
    probs = naive_softmax(naive_logits(x, router.weight))
    ref = naive_topp(probs, p, E, max_k, normalize)

    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    assert routing.fixed_k is None
    assert routing.experts_per_row().tolist() == [len(pairs) for pairs in ref]
    # Rows listed in ascending order, each row's experts best first.
    assert routing.row.tolist() == sorted(routing.row.tolist())
    for n in range(60):
        w = routing.weight[routing.row == n]
        assert bool((w[:-1] >= w[1:]).all())
    if p == 1.0 and max_k is None:
        assert routing.experts_per_row().tolist() == [E] * 60
    if normalize:
        torch.testing.assert_close(routing.dense_weight().sum(dim=1), torch.ones(60))
    sizes = {len(pairs) for pairs in ref}
    if 0.2 < p < 1.0 and max_k is None:
        assert len(sizes) > 1  # the number of experts does vary per row


def test_topp_null_experts_match_naive():
    torch.manual_seed(4)
    E, num_null = 4, 2
    router = TopPRouter(8, E, p=0.6, num_null_experts=num_null)
    with torch.no_grad():
        router.weight[E:] *= 3.0
    x = make_x(N=60, seed=3)
    routing = router(x)
    probs = naive_softmax(naive_logits(x, router.weight))
    ref = naive_topp(probs, 0.6, E)
    assert routing.probs.shape == (60, E + num_null)
    assert bool((routing.expert < E).all())
    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    assert int(routing.experts_per_row().min()) == 0  # some row went to null experts only


@settings(max_examples=40, deadline=None, database=None)
@given(logits=st.lists(st.floats(-4, 4), min_size=2, max_size=6),
       p=st.floats(0.05, 1.0))
def test_topp_prefix_property(logits, p):
    E = len(logits)
    router = TopPRouter(E, E, p=p)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    probs = naive_softmax([logits])[0]
    order = ranked(probs)
    prefix = [sum(probs[i] for i in order[:m + 1]) for m in range(E)]
    assume(all(abs(mass - p) > 1e-5 for mass in prefix))  # away from float ties
    assume(all(abs(probs[a] - probs[b]) > 1e-6 for a in range(E) for b in range(a)))
    routing = router(torch.tensor([logits]))
    kept = routing.expert.tolist()
    t = len(kept)
    # The kept set is a prefix of the ranking ...
    assert kept == order[:t]
    # ... whose mass reaches p, and no shorter prefix does (the crossing one is kept).
    assert prefix[t - 1] >= p or t == E
    assert t == 1 or prefix[t - 2] < p
    torch.testing.assert_close(routing.weight.double(),
                               torch.tensor([probs[i] for i in order[:t]], dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)


# Expert choice ################################################################


@pytest.mark.parametrize("N", [7, 50])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 8.0])
def test_expert_choice_matches_naive(N, capacity_factor):
    torch.manual_seed(5)
    E = 4
    router = ExpertChoiceRouter(8, E, capacity_factor=capacity_factor)
    x = make_x(N=N, seed=4)
    routing = router(x)
    probs = naive_softmax(naive_logits(x, router.weight))
    ref, c = naive_expert_choice(probs, capacity_factor, E)

    assert router.capacity(N) == c
    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)
    assert routing.load.tolist() == [float(c)] * E
    assert torch.bincount(routing.expert, minlength=E).tolist() == [c] * E
    assert routing.expert.tolist() == sorted(routing.expert.tolist())  # grouped by expert
    assert routing.fixed_k is None
    assert set(routing.aux_loss) == {"z_loss"}


# Noisy gating #################################################################


def noisy_reference(router, x, eps):
    r"""Shazeer et al. (2017): h = x W_g + eps * (softplus(x W_n) + noise_epsilon)."""
    clean = naive_logits(x, router.weight)
    raw = naive_logits(x, router.noise_weight)
    std = [[math.log1p(math.exp(v)) + router.noise_epsilon for v in row] for row in raw]
    eps = eps.double().tolist()
    noisy = [[c + e * s for c, e, s in zip(*rows, strict=True)]
             for rows in zip(clean, eps, std, strict=True)]
    return clean, noisy, std


def naive_smooth_load(clean, noisy, std, k):
    r"""Per expert, sum over rows of P(expert stays in the top-k when only its own
    noise is re-drawn) = Phi((clean_i - kth best of the other noisy logits) / std_i)."""
    E = len(clean[0])
    load = [0.0] * E
    for n in range(len(clean)):
        for i in range(E):
            others = sorted((noisy[n][j] for j in range(E) if j != i), reverse=True)
            z = (clean[n][i] - others[k - 1]) / std[n][i]
            load[i] += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    return load


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_matches_naive(k):
    torch.manual_seed(6)
    E, N = 5, 40
    router = TopKRouter(8, E, k=k, noisy=True)
    assert torch.count_nonzero(router.noise_weight) == 0  # zero init, as in the paper
    with torch.no_grad():
        router.noise_weight.normal_(0, 0.3)
    x = make_x(N=N, seed=5)

    torch.manual_seed(123)
    routing = router(x)
    torch.manual_seed(123)
    eps = torch.randn(N, E)  # the draw the router makes
    clean, noisy, std = noisy_reference(router, x, eps)
    probs = naive_softmax(noisy)
    ref = naive_topk(probs, k, E)
    assert pairs_of(routing) == pairs_of_naive(ref)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-5, rtol=1e-4)
    # Noise changed the decision somewhere (otherwise the test proves little).
    assert pairs_of_naive(ref) != pairs_of_naive(naive_topk(naive_softmax(clean), k, E))

    # Shazeer's importance loss with the smooth load estimate.
    gates = to_dense(ref, E)
    importance = gates.sum(dim=0).tolist()
    load = naive_smooth_load(clean, noisy, std, k)
    expected = naive_cv_squared(importance) + naive_cv_squared(load)
    assert routing.aux_loss["importance"].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Switch loss and z-loss are computed on the noisy logits.
    top1 = [ranked(row)[0] for row in probs]
    f = [top1.count(i) / N for i in range(E)]
    P = [sum(row[i] for row in probs) / N for i in range(E)]
    assert routing.aux_loss["load_balance"].item() == pytest.approx(
        E * sum(a * b for a, b in zip(f, P, strict=True)), rel=1e-5)
    assert routing.aux_loss["z_loss"].item() == pytest.approx(
        sum(naive_logsumexp(row) ** 2 for row in noisy) / N, rel=1e-5)

    # No noise in eval mode.
    router.eval()
    routing = router(x)
    ref = naive_topk(naive_softmax(clean), k, E)
    torch.testing.assert_close(routing.dense_weight().double(), to_dense(ref, E),
                               atol=1e-6, rtol=1e-5)


def test_noisy_smooth_load_is_differentiable():
    torch.manual_seed(7)
    router = TopKRouter(8, 4, k=2, noisy=True)
    routing = router(make_x(N=30))
    routing.aux_loss["importance"].backward()
    assert router.noise_weight.grad is not None
    assert float(router.noise_weight.grad.abs().sum()) > 0
    assert float(router.weight.grad.abs().sum()) > 0


def test_noisy_same_seed_same_routing():
    torch.manual_seed(8)
    router = TopKRouter(8, 4, k=2, noisy=True)
    with torch.no_grad():
        router.noise_weight.normal_()
    x = make_x(N=30)
    torch.manual_seed(1)
    a = router(x)
    torch.manual_seed(1)
    b = router(x)
    c = router(x)  # another draw
    assert torch.equal(a.dense_weight(), b.dense_weight())
    assert torch.equal(a.aux_loss["importance"], b.aux_loss["importance"])
    assert not torch.equal(a.probs, c.probs)


# Auxiliary losses on hand-computed examples ###################################

X_HAND = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.5, 4.0], [0.5, 0.2, 0.1]]


def identity_router(cls, E, **kwargs):
    router = cls(E, E, **kwargs)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # logits == x
    return router


def test_switch_load_balance_hand_computed():
    router = identity_router(TopKRouter, 3, k=2)
    routing = router(torch.tensor(X_HAND))
    probs = naive_softmax(X_HAND)
    # First choices: 0, 1, 0, 2, 0 -> f = (3/5, 1/5, 1/5).
    f = [3 / 5, 1 / 5, 1 / 5]
    P = [sum(row[i] for row in probs) / 5 for i in range(3)]
    expected = 3 * sum(a * b for a, b in zip(f, P, strict=True))
    assert routing.aux_loss["load_balance"].item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_hand_computed():
    router = identity_router(TopKRouter, 3, k=1)
    routing = router(torch.tensor(X_HAND))
    expected = sum(naive_logsumexp(row) ** 2 for row in X_HAND) / len(X_HAND)
    assert routing.aux_loss["z_loss"].item() == pytest.approx(expected, rel=1e-6)
    # All-zero logits over 4 experts: (log 4)^2.
    routing = identity_router(TopKRouter, 4, k=1)(torch.zeros(3, 4))
    assert routing.aux_loss["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    routing = identity_router(ExpertChoiceRouter, 4)(torch.zeros(3, 4))
    assert routing.aux_loss["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_importance_loss_hand_computed():
    router = identity_router(TopKRouter, 3, k=2)
    routing = router(torch.tensor(X_HAND))
    probs = naive_softmax(X_HAND)
    gates = to_dense(naive_topk(probs, 2, 3), 3)
    importance = gates.sum(dim=0).tolist()
    # Chosen pairs: {0,1}, {1,2}, {0,2}, {2,1}, {0,1} -> load (3, 4, 3).
    load = [3.0, 4.0, 3.0]
    assert routing.load.tolist() == load
    expected = naive_cv_squared(importance) + naive_cv_squared(load)
    assert routing.aux_loss["importance"].item() == pytest.approx(expected, rel=1e-5)
    # Unbiased variance: CV^2 of the load (3, 4, 3) is (1/3) / (10/3)^2 = 0.03.
    assert naive_cv_squared(load) == pytest.approx(0.03)


def test_topp_aux_losses_hand_computed():
    router = identity_router(TopPRouter, 3, p=0.7)
    routing = router(torch.tensor(X_HAND))
    probs = naive_softmax(X_HAND)
    ref = naive_topp(probs, 0.7, 3)
    importance = to_dense(ref, 3).sum(dim=0).tolist()
    load = [float(sum(1 for pairs in ref for e, _ in pairs if e == i)) for i in range(3)]
    entropy = -sum(p * math.log(p) for row in probs for p in row) / len(probs)
    top1 = [ranked(row)[0] for row in probs]
    f = [top1.count(i) / 5 for i in range(3)]
    P = [sum(row[i] for row in probs) / 5 for i in range(3)]
    aux = routing.aux_loss
    assert set(aux) == {"load_balance", "z_loss", "importance", "entropy"}
    assert aux["entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert aux["importance"].item() == pytest.approx(
        naive_cv_squared(importance) + naive_cv_squared(load), rel=1e-5)
    assert aux["load_balance"].item() == pytest.approx(
        3 * sum(a * b for a, b in zip(f, P, strict=True)), rel=1e-6)
    # Uniform router: entropy log E.
    routing = identity_router(TopPRouter, 4)(torch.zeros(2, 4))
    assert routing.aux_loss["entropy"].item() == pytest.approx(math.log(4), rel=1e-6)


@pytest.mark.parametrize("cls", [TopKRouter, TopPRouter])
def test_load_balance_is_one_under_uniform_routing(cls):
    E = 4
    # Uniform probabilities: P_i = 1/E whatever the first choices.
    routing = identity_router(cls, E)(torch.zeros(8, E))
    assert routing.aux_loss["load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    # Cyclic shifts of one logit vector: f_i = P_i = 1/E by symmetry.
    base = [3.0, 1.0, 0.5, 0.0]
    x = torch.tensor([base[-s:] + base[:-s] for s in range(E)])
    routing = identity_router(cls, E)(x)
    assert routing.aux_loss["load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    # Maximal imbalance: every row sure of expert 0 -> close to E.
    x = torch.tensor([[30.0, 0.0, 0.0, 0.0]] * 6)
    routing = identity_router(cls, E)(x)
    assert routing.aux_loss["load_balance"].item() == pytest.approx(E, rel=1e-4)


@pytest.mark.parametrize("make", [
    lambda: TopKRouter(8, 4, k=2),
    lambda: TopKRouter(8, 4, k=2, noisy=True),
    lambda: TopKRouter(8, 4, k=2, num_null_experts=2),
    lambda: TopPRouter(8, 4, p=0.5),
    lambda: ExpertChoiceRouter(8, 4),
])
def test_aux_losses_zero_in_eval(make):
    torch.manual_seed(9)
    router = make()
    x = make_x(N=20)
    train = router(x).aux_loss
    assert set(train) <= set(AUX_LOSS_NAMES)
    assert any(float(v.detach()) != 0 for v in train.values())
    router.eval()
    aux = router(x).aux_loss
    assert set(aux) == set(train)
    for value in aux.values():
        assert value.dim() == 0 and float(value) == 0.0


def test_sum_aux_losses():
    torch.manual_seed(10)
    a = TopKRouter(8, 4)(make_x(seed=1))
    b = TopPRouter(8, 4)(make_x(seed=2))
    total = sum_aux_losses([a, b])
    assert set(total) == set(a.aux_loss) | set(b.aux_loss)
    for name in a.aux_loss:
        torch.testing.assert_close(total[name], a.aux_loss[name] + b.aux_loss[name])
    torch.testing.assert_close(total["entropy"], b.aux_loss["entropy"])
    assert sum_aux_losses([]) == {}


# Routing record ###############################################################


def test_dense_weight_naive():
    routing = Routing(row=torch.tensor([0, 0, 2, 1, 2]), expert=torch.tensor([1, 2, 0, 2, 0]),
                      weight=torch.tensor([0.5, 0.25, 0.125, 1.0, 0.375]),
                      probs=torch.zeros(4, 3), load=torch.zeros(3), aux_loss={})
    expected = [[0.0] * 3 for _ in range(4)]
    rows, experts, weights = [0, 0, 2, 1, 2], [1, 2, 0, 2, 0], [0.5, 0.25, 0.125, 1.0, 0.375]
    for n, e, w in zip(rows, experts, weights, strict=True):
        expected[n][e] += w  # repeated pairs accumulate
    assert routing.dense_weight().tolist() == expected
    assert routing.experts_per_row().tolist() == [2, 1, 2, 0]


def test_drop_overflow_hand_computed():
    # k = 2 choices per row, best first; E = 2 experts, capacity 2.
    row = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expert = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    weight = torch.arange(1, 9, dtype=torch.float32)
    routing = Routing(row, expert, weight, torch.zeros(4, 2), torch.tensor([4.0, 4.0]), {}, 2)
    out = drop_overflow(routing, capacity=2)
    # First choices in row order: r0->e0, r1->e0, r2->e1 kept; r3->e0 dropped.
    # Second choices: r0->e1 kept (e1 now full); r1->e1, r2->e0, r3->e1 dropped.
    kept = zip(out.row.tolist(), out.expert.tolist(), out.weight.tolist(), strict=True)
    assert sorted(kept) == [(0, 0, 1.0), (0, 1, 2.0), (1, 0, 3.0), (2, 1, 5.0)]
    assert int(out.dropped) == 4
    assert out.load.tolist() == [2.0, 2.0]
    assert out.fixed_k is None
    assert int(drop_overflow(routing, capacity=4).dropped) == 0
    with pytest.raises(ValueError, match="'capacity'"):
        drop_overflow(routing, capacity=-1)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data(), N=st.integers(1, 8), E=st.integers(1, 4), capacity=st.integers(0, 6))
def test_drop_overflow_matches_naive(data, N, E, capacity):
    # Each row: a variable number of distinct experts, best first.
    choices = []
    for _ in range(N):
        perm = data.draw(st.permutations(range(E)))
        choices.append(perm[:data.draw(st.integers(0, E))])
    row = torch.tensor([n for n, c in enumerate(choices) for _ in c], dtype=torch.long)
    expert = torch.tensor([e for c in choices for e in c], dtype=torch.long)
    weight = torch.rand(row.numel())
    routing = Routing(row, expert, weight, torch.zeros(N, E), torch.zeros(E), {})
    out = drop_overflow(routing, capacity)
    # Naive: replay all first choices in row order, then all second choices, ...
    taken, kept, a_of = [0] * E, [], {}
    for n, c in enumerate(choices):
        for r in range(len(c)):
            a_of[(n, r)] = len(a_of)  # assignment index in the flat layout
    for r in range(E):
        for n, c in enumerate(choices):
            if r < len(c):
                if taken[c[r]] < capacity:
                    taken[c[r]] += 1
                    kept.append(a_of[(n, r)])
    kept.sort()
    assert out.row.tolist() == row[kept].tolist()
    assert out.expert.tolist() == expert[kept].tolist()
    assert out.weight.tolist() == weight[kept].tolist()
    assert out.load.tolist() == [float(t) for t in taken]
    assert int(out.dropped) == row.numel() - len(kept)


def test_expert_capacity():
    assert expert_capacity(10, 4, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(8, 4, 1.0) == 2
    assert expert_capacity(0, 4, 1.0) == 0


# Precision, symmetry, edge cases ##############################################


ROUTER_MAKERS = {
    "topk": lambda: TopKRouter(8, 4, k=2),
    "topk_null": lambda: TopKRouter(8, 4, k=2, num_null_experts=2),
    "noisy": lambda: TopKRouter(8, 4, k=2, noisy=True),
    "topp": lambda: TopPRouter(8, 4, p=0.6),
    "expert_choice": lambda: ExpertChoiceRouter(8, 4, capacity_factor=1.5),
}


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_is_float32_under_autocast(name, dtype):
    torch.manual_seed(11)
    router = ROUTER_MAKERS[name]().eval()
    x = make_x(N=30).to(dtype)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    assert routing.probs.dtype == routing.weight.dtype == torch.float32
    assert torch.equal(routing.probs, ref.probs)
    assert torch.equal(routing.dense_weight(), ref.dense_weight())


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
def test_permutation_equivariance(name):
    torch.manual_seed(12)
    router = ROUTER_MAKERS[name]().eval()
    x = make_x(N=40)
    perm = torch.randperm(40)
    a, b = router(x), router(x[perm])
    torch.testing.assert_close(b.probs, a.probs[perm])
    torch.testing.assert_close(b.dense_weight(), a.dense_weight()[perm])
    torch.testing.assert_close(b.load, a.load)


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
def test_empty_input(name):
    router = ROUTER_MAKERS[name]()
    routing = router(torch.empty(0, 8))
    assert routing.row.numel() == routing.expert.numel() == routing.weight.numel() == 0
    assert routing.probs.shape == (0, router.num_total_experts)
    assert routing.load.tolist() == [0.0] * 4
    assert routing.dense_weight().shape == (0, 4)
    for value in routing.aux_loss.values():
        assert float(value.detach()) == 0.0


# Bad input ####################################################################


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "'k'"),
    (dict(k=5), "'k'"),
    (dict(k=7, num_null_experts=2), "'k'"),
    (dict(k=1.5), "'k'"),
    (dict(num_null_experts=-1), "'num_null_experts'"),
])
def test_topk_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(8, 4, **kwargs)


def test_topk_straight_through_gate_is_one_with_the_gradient_of_the_probability():
    r"""``straight_through=True`` at k=1: every weight is 1 (as the
    renormalised gate), and the router's gradient is that of the Switch gate,
    the full-softmax probability of the chosen expert, computed here by hand
    from the router's weight."""
    torch.manual_seed(0)
    x, c = make_x(N=20, F=8), torch.randn(20)
    router = TopKRouter(8, 4, k=1, straight_through=True)
    routing = router(x)
    assert routing.weight.tolist() == [1.0] * 20
    (routing.weight * c[routing.row]).sum().backward()
    grad = router.weight.grad.clone()

    weight = router.weight.detach().clone().requires_grad_()
    logits = x @ weight.t()
    probs = logits.softmax(-1)
    chosen = probs[torch.arange(20), logits.argmax(-1)]
    (chosen * c).sum().backward()
    torch.testing.assert_close(grad, weight.grad)
    # the plain renormalised gate is a constant: the router gets no gradient
    plain = TopKRouter(8, 4, k=1)
    plain.load_state_dict(router.state_dict())
    out = plain(x)
    assert not out.weight.requires_grad or out.weight.grad_fn is None


@pytest.mark.parametrize("kwargs", [dict(k=2), dict(k=1, normalize=False)])
def test_topk_straight_through_needs_k1_and_normalize(kwargs):
    with pytest.raises(ValueError, match="'straight_through' applies to k=1"):
        TopKRouter(8, 4, straight_through=True, **kwargs)


def test_topk_k_may_count_null_experts():
    assert TopKRouter(8, 4, k=6, num_null_experts=2).k == 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=0.0), r"'p' must be in \(0, 1\]"),
    (dict(p=-0.1), "'p'"),
    (dict(p=1.01), "'p'"),
    (dict(max_k=0), "'max_k'"),
    (dict(max_k=5), "'max_k'"),
])
def test_topp_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopPRouter(8, 4, **kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: ExpertChoiceRouter(8, 4, capacity_factor=0), "'capacity_factor'"),
    (lambda: TopKRouter(0, 4), "'in_channels'"),
    (lambda: TopPRouter(8, 0), "'num_experts'"),
])
def test_router_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
def test_router_bad_input(name):
    router = ROUTER_MAKERS[name]()
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        router(torch.randn(8))
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        router(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="in_channels=8"):
        router(torch.randn(5, 7))
    with pytest.raises(TypeError, match="'x'"):
        router([[0.0] * 8])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 8)
        x[3, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            router(x)


def test_router_repr():
    assert repr(TopKRouter(64, num_experts=8, k=2)) == "TopKRouter(64, num_experts=8, k=2)"
    assert (repr(TopKRouter(16, 4, k=3, noisy=True, num_null_experts=2))
            == "TopKRouter(16, num_experts=4, k=3, noisy=True, num_null_experts=2)")
    assert repr(TopPRouter(16, 4, p=0.5)) == "TopPRouter(16, num_experts=4, p=0.5)"
    assert (repr(ExpertChoiceRouter(16, 4, capacity_factor=2))
            == "ExpertChoiceRouter(16, num_experts=4, capacity_factor=2.0)")


# Huge logits and bad arguments (issue 14) #####################################


def naive_z_penalty(lse, T=1e4):
    r"""The z-loss of one row: ``lse^2`` up to ``T``, then ``T^2 (1 + 2 log(|lse| / T))``."""
    lse = abs(lse)
    return lse ** 2 if lse <= T else T * T * (1 + 2 * math.log(lse / T))


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5, 1e19, 1e30, 1e36])
def test_z_loss_against_naive_at_every_scale(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64) * scale
    expected = sum(naive_z_penalty(naive_logsumexp(row)) for row in logits.tolist()) / 6
    got = z_loss(logits)
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_z_loss_is_smooth_at_the_switch():
    # same value and slope on both sides of T = 1e4 (logits [l, -inf-like]: lse = l)
    lse = torch.tensor([1e4 - 1e-3, 1e4 + 1e-3], dtype=torch.float64, requires_grad=True)
    logits = torch.stack([lse, torch.full_like(lse, -1e9)], dim=-1)
    values = [z_loss(logits[i:i + 1]) for i in range(2)]
    grads = [torch.autograd.grad(v, lse)[0][i].item() for i, v in enumerate(values)]
    # continuous: the gap across [T - 1e-3, T + 1e-3] is the slope 2T times the width
    assert values[1].item() - values[0].item() == pytest.approx(2e4 * 2e-3, rel=1e-4)
    assert grads[0] == pytest.approx(2e4, rel=1e-6) and grads[1] == pytest.approx(2e4, rel=1e-6)


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_huge_finite_logits_give_finite_losses_and_gradients(name, scale):
    # Before: z_loss = inf from |logits| ~ 1e19 and a non-finite input gradient.
    torch.manual_seed(12)
    router = ROUTER_MAKERS[name]().train()
    x = (torch.randn(10, 8) * scale).requires_grad_()
    routing = router(x)
    total = sum(routing.aux_loss.values()) + routing.weight.sum()
    assert all(math.isfinite(v.item()) for v in routing.aux_loss.values())
    assert routing.aux_loss["z_loss"].item() > 0
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in router.parameters() if p.grad is not None)


@pytest.mark.parametrize("make,match", [
    (lambda: TopKRouter(8, 2.0), r"'num_experts' must be a positive integer \(got 2.0\)"),
    (lambda: TopKRouter(8, "4"), r"'num_experts' must be a positive integer \(got '4'\)"),
    (lambda: TopKRouter(8, True), "'num_experts'"),
    (lambda: TopKRouter(8.0, 4), "'in_channels'"),
    (lambda: TopKRouter(8, 4, k=True), r"'k' must be an integer in \[1, 4\]"),
    (lambda: TopKRouter(8, 4, k="2"), "'k'"),
    (lambda: TopKRouter(8, 4, num_null_experts=1.5), "'num_null_experts' must be a non-neg"),
    (lambda: TopPRouter(8, 4, p=True), "'p'"),
    (lambda: TopPRouter(8, 4, max_k=2.0), r"'max_k' must be an integer in \[1, 4\]"),
    (lambda: ExpertChoiceRouter(8, 4, capacity_factor=float("inf")),
     "'capacity_factor' must be a finite positive number"),
    (lambda: ExpertChoiceRouter(8, 4, capacity_factor=float("nan")), "'capacity_factor'"),
    (lambda: ExpertChoiceRouter(8, 4, capacity_factor="1"), "'capacity_factor'"),
])
def test_router_bad_argument_types(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", sorted(ROUTER_MAKERS))
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_router_rejects_non_float_input(name, dtype):
    with pytest.raises(TypeError, match=f"'x' must be a floating-point tensor.*{dtype}"):
        ROUTER_MAKERS[name]()(torch.ones(5, 8, dtype=dtype))


def test_uniform_noise_is_added_in_training_only():
    r"""``noise="uniform"`` (Chen et al. 2022): the training logits are the clean
    ones plus r ~ U[0, 1) drawn per row and expert: with the same draws, the
    chosen expert is the argmax of clean + r; in eval, of the clean logits."""
    torch.manual_seed(0)
    router = TopKRouter(4, 5, k=1, noisy=True, noise="uniform", normalize=False)
    assert router.noise_weight is None  # nothing learned for the noise
    x = torch.randn(64, 4)
    clean = x @ router.weight.detach().T
    torch.manual_seed(1)
    r = torch.rand(64, 5)
    torch.manual_seed(1)
    routing = router.train()(x)
    expected = (clean + r).argmax(dim=1)
    assert torch.equal(routing.expert[routing.row.argsort()], expected)
    # weight: the full softmax of the noisy logits at the chosen expert
    weight = (clean + r).softmax(dim=1).gather(1, expected[:, None])[:, 0]
    assert torch.allclose(routing.weight[routing.row.argsort()], weight, atol=1e-6)
    routing = router.eval()(x)
    assert torch.equal(routing.expert[routing.row.argsort()], clean.argmax(dim=1))
    # a zero router: the first dispatch is the noise's alone, spread over the experts
    torch.nn.init.zeros_(router.weight)
    counts = torch.bincount(router.train()(torch.randn(5000, 4)).expert, minlength=5)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each, sd about 28
    assert "noise='uniform'" in repr(router)
    with pytest.raises(ValueError, match="'noise' must be one of"):
        TopKRouter(4, 5, noisy=True, noise="gumbel")


@pytest.mark.parametrize("k", [1, 2])
def test_constant_noise_matches_naive(k):
    r"""``noise="constant"``: Gaussian noise of the fixed std ln 2 +
    noise_epsilon (the learned noise's value at init), nothing learned for it;
    the smooth load estimate uses that std; no noise in eval."""
    torch.manual_seed(6)
    E, N = 5, 40
    router = TopKRouter(8, E, k=k, noisy=True, noise="constant", noise_epsilon=0.05)
    assert router.noise_weight is None
    x = make_x(N=N, seed=5)
    torch.manual_seed(123)
    routing = router(x)
    torch.manual_seed(123)
    eps = torch.randn(N, E).double().tolist()
    clean = naive_logits(x, router.weight)
    s = math.log(2.0) + 0.05
    std = [[s] * E for _ in range(N)]
    noisy = [[c + e * s for c, e in zip(cr, er, strict=True)]
             for cr, er in zip(clean, eps, strict=True)]
    ref = naive_topk(naive_softmax(noisy), k, E)
    assert pairs_of(routing) == pairs_of_naive(ref)
    assert pairs_of_naive(ref) != pairs_of_naive(naive_topk(naive_softmax(clean), k, E))
    gates = to_dense(ref, E)
    expected = (naive_cv_squared(gates.sum(dim=0).tolist())
                + naive_cv_squared(naive_smooth_load(clean, noisy, std, k)))
    assert routing.aux_loss["importance"].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    routing = router.eval()(x)
    ref = naive_topk(naive_softmax(clean), k, E)
    assert pairs_of(routing) == pairs_of_naive(ref)
    assert "noise='constant'" in repr(router)


# Balance groups (HopMoEConv(balance="per_hop")) ###############################

# Six rows, first choices 0, 1, 0, 1 (group {0, 1}) and 2, 3 (group {2, 3}): balanced
# within each group, not across (4 rows against 2).
PROBS_GROUPS = [[0.6, 0.4, 0.0, 0.0], [0.4, 0.6, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0],
                [0.4, 0.6, 0.0, 0.0], [0.0, 0.0, 0.6, 0.4], [0.0, 0.0, 0.4, 0.6]]
TOP1_GROUPS = [0, 1, 0, 1, 2, 3]


def test_grouped_losses_hand_computed():
    probs, top1 = torch.tensor(PROBS_GROUPS), torch.tensor(TOP1_GROUPS)
    gates = torch.zeros(6, 4).scatter_(1, top1.unsqueeze(1), 1.0)
    load = gates.sum(0)  # (2, 2, 1, 1)
    # One group: Switch's f = (2, 2, 1, 1) / 6, P = (1/3, 1/3, 1/6, 1/6):
    # 4 * (1/9 + 1/9 + 1/36 + 1/36) = 10/9; CV^2 of (2, 2, 1, 1) twice.
    assert grouped_load_balancing_loss(probs, top1).item() == pytest.approx(10 / 9)
    assert grouped_load_balancing_loss(probs, top1, [4]).item() == pytest.approx(10 / 9)
    cv2 = naive_cv_squared([2.0, 2.0, 1.0, 1.0])
    assert grouped_importance_loss(gates, load, top1).item() == pytest.approx(2 * cv2)
    assert grouped_importance_loss(gates, load, top1, [4]).item() == pytest.approx(2 * cv2)
    # Groups {0, 1} and {2, 3}: uniform within each, so Switch's loss is 1 in
    # each (weights 4/6 and 2/6) and the CV^2 are 0, whatever the groups' shares.
    assert grouped_load_balancing_loss(probs, top1, [2, 2]).item() == pytest.approx(1.0)
    assert grouped_importance_loss(gates, load, top1, [2, 2]).item() == pytest.approx(0.0)
    # Imbalance within a group: first choices 0, 0, 0, 1, nothing in {2, 3}.
    top1 = torch.tensor([0, 0, 0, 1])
    gates = torch.zeros(4, 4).scatter_(1, top1.unsqueeze(1), 1.0)
    expected = 2 * naive_cv_squared([3.0, 1.0])  # group {0, 1} has every row
    assert grouped_importance_loss(gates, gates.sum(0), top1, [2, 2]).item() == \
        pytest.approx(expected)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4)  # renormalised over {0, 1}: the same
    assert grouped_load_balancing_loss(probs, top1, [2, 2]).item() == \
        pytest.approx(2 * (3 / 4 * 0.5 + 1 / 4 * 0.5))


def naive_grouped_switch(probs, top1, groups):
    # each group's Switch loss over the rows it owns, selected row by row
    total, start, N = 0.0, 0, len(top1)
    for size in groups:
        rows = [r for r in range(N) if start <= int(top1[r]) < start + size]
        if rows:
            q = torch.stack([probs[r, start:start + size] / probs[r, start:start + size].sum()
                             for r in rows])
            f = torch.tensor([sum(int(top1[r]) == start + i for r in rows) / len(rows)
                              for i in range(size)])
            total = total + len(rows) / N * size * (f * q.mean(0)).sum()
        start += size
    return total


@pytest.mark.parametrize("groups", [[2, 2], [1, 3], [3, 1, 1]])
def test_grouped_switch_loss_against_naive_rows(groups):
    torch.manual_seed(0)
    E = sum(groups)
    logits = torch.randn(30, E, requires_grad=True)
    top1 = torch.randint(0, E, (30,))
    top1[top1 == E - 1] = 0  # the last group of [3, 1, 1] owns no row
    ours = grouped_load_balancing_loss(logits.softmax(-1), top1, groups)
    (grad,) = torch.autograd.grad(ours, logits)
    ref = naive_grouped_switch(logits.softmax(-1), top1, groups)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_grad)
    empty = torch.zeros(0, E)
    assert grouped_load_balancing_loss(empty, top1[:0], groups).item() == 0.0


def test_topk_balance_groups_in_the_router():
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    plain = TopKRouter(8, 4, k=1)
    one = TopKRouter(8, 4, k=1, balance_groups=[4])
    two = TopKRouter(8, 4, k=1, balance_groups=[2, 2])
    one.load_state_dict(plain.state_dict())
    two.load_state_dict(plain.state_dict())
    a, b, c = plain(x), one(x), two(x)
    for name in ("load_balance", "importance"):
        torch.testing.assert_close(a.aux_loss[name], b.aux_loss[name])
    # the routing itself does not change, only what the losses balance
    assert torch.equal(a.expert, c.expert)
    gates = torch.zeros(40, 4).scatter_(1, c.expert.unsqueeze(1), 1.0)
    torch.testing.assert_close(c.aux_loss["importance"],
                               grouped_importance_loss(gates, gates.sum(0), c.expert, [2, 2]))
    torch.testing.assert_close(c.aux_loss["load_balance"],
                               grouped_load_balancing_loss(c.probs, c.expert, [2, 2]))
    assert "balance_groups=[2, 2]" in repr(two)


@pytest.mark.parametrize("kwargs,match", [
    (dict(balance_groups=[2, 1]), "must sum to num_experts=4"),
    (dict(balance_groups=[]), "non-empty list of positive ints"),
    (dict(balance_groups=[2, 0, 2]), "positive ints"),
    (dict(balance_groups=[2.0, 2.0]), "positive ints"),
    (dict(balance_groups=[2, 2], num_null_experts=1), "null experts"),
])
def test_topk_bad_balance_groups(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(8, 4, k=1, **kwargs)
