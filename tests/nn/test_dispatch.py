r"""Tests of moegraph.nn.dispatch against a naive per-assignment loop."""
import pytest
import torch

from moegraph.nn import LinearExperts, MLPExperts, ModuleExperts
from moegraph.nn.dispatch import (
    Bins,
    apply_capacity,
    combine,
    indices_and_bins,
    permute_and_compute,
)
from moegraph.nn.routing import Routing

N, FEAT, OUT, E = 13, 5, 3, 4


def make_routing(seed, fixed_k=None, num_rows=N, num_assignments=29):
    r"""A random routing: ``fixed_k`` distinct experts per row (row-major), or
    ``num_assignments`` random (row, expert) pairs."""
    g = torch.Generator().manual_seed(seed)
    if fixed_k is not None:
        expert = torch.stack([torch.randperm(E, generator=g)[:fixed_k] for _ in range(num_rows)])
        expert = expert.reshape(-1)
        row = torch.arange(num_rows).repeat_interleave(fixed_k)
    else:
        row = torch.randint(num_rows, (num_assignments,), generator=g).sort().values
        expert = torch.randint(E, (num_assignments,), generator=g)
    weight = torch.rand(row.numel(), generator=g)
    probs = torch.rand(num_rows, E, generator=g).softmax(-1)
    load = torch.bincount(expert, minlength=E).float()
    return Routing(row, expert, weight, probs, load, {}, fixed_k)


def naive_moe(x, routing, expert_fns):
    r"""``y_n = sum_a w_a e_{expert_a}(x_n)``, one assignment at a time."""
    out = torch.zeros(x.size(0), OUT, dtype=torch.float64)
    for r, e, w in zip(routing.row.tolist(), routing.expert.tolist(), routing.weight.tolist(),
                       strict=True):
        out[r] += w * expert_fns[e](x[r:r + 1].double())[0]
    return out


def test_indices_and_bins_against_loop():
    routing = make_routing(0)
    bins = indices_and_bins(routing, E)
    assert isinstance(bins, Bins)
    # naive: expert by expert, its assignments in their original order
    naive = [a for e in range(E) for a in range(routing.row.numel())
             if int(routing.expert[a]) == e]
    assert bins.order.tolist() == naive
    assert bins.rows.tolist() == [int(routing.row[a]) for a in naive]
    assert bins.experts.tolist() == [int(routing.expert[a]) for a in naive]
    assert bins.weight.tolist() == [float(routing.weight[a]) for a in naive]
    assert bins.counts.tolist() == [sum(int(v) == e for v in routing.expert) for e in range(E)]


def test_indices_and_bins_empty_expert_and_no_assignment():
    routing = make_routing(1)._replace(expert=torch.zeros(29, dtype=torch.long))
    assert indices_and_bins(routing, E).counts.tolist() == [29, 0, 0, 0]
    empty = make_routing(2, num_assignments=0)
    bins = indices_and_bins(empty, E)
    assert bins.counts.tolist() == [0] * E and bins.rows.numel() == 0


@pytest.mark.parametrize("fixed_k", [None, 1, 2])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bank", ["mlp", "linear", "module"])
def test_permute_and_compute_against_loop(fixed_k, deterministic, bank):
    torch.manual_seed(3)
    if bank == "mlp":
        experts = MLPExperts(FEAT, 7, OUT, E, act="relu").double()
        fns = [lambda v, e=e: torch.relu(v @ experts.weight1[e] + experts.bias1[e])
               @ experts.weight2[e] + experts.bias2[e] for e in range(E)]
    elif bank == "linear":
        experts = LinearExperts(FEAT, OUT, E).double()
        fns = [lambda v, e=e: v @ experts.weight[e] + experts.bias[e] for e in range(E)]
    else:
        modules = [torch.nn.Linear(FEAT, OUT).double() for _ in range(E)]
        experts = ModuleExperts(modules, FEAT, OUT)
        fns = modules
    routing = make_routing(4, fixed_k)
    x = torch.randn(N, FEAT, dtype=torch.float64)
    out = permute_and_compute(x, indices_and_bins(routing, E), experts, fixed_k, deterministic)
    torch.testing.assert_close(out, naive_moe(x, routing, fns).detach())


def test_combine_deterministic_equals_scatter():
    routing = make_routing(5, fixed_k=3)
    bins = indices_and_bins(routing, E)
    y = torch.randn(bins.rows.numel(), OUT, dtype=torch.float64)
    naive = torch.zeros(N, OUT, dtype=torch.float64)
    for a, r in enumerate(bins.rows.tolist()):
        naive[r] += y[a]
    torch.testing.assert_close(combine(y, bins.rows, N), naive)
    torch.testing.assert_close(combine(y, bins.rows, N, 3, deterministic=True), naive)


def test_apply_capacity():
    routing = make_routing(6, fixed_k=2)
    assert apply_capacity(routing, E, None) is routing
    capped = apply_capacity(routing, E, 0.5)  # ceil(0.5 * 26 / 4) = 4 per expert
    assert capped.dropped is not None
    counts = torch.bincount(capped.expert, minlength=E)
    assert int(counts.max()) <= 4
    assert int(capped.dropped) == routing.row.numel() - capped.row.numel()
    empty = make_routing(7, num_assignments=0)
    assert apply_capacity(empty, E, 1.0) is empty
