r"""Tests of moegraph.diagnostics on hand-made routing records."""
import math

import pytest
import torch

from moegraph.diagnostics import expert_load, format_expert_load, plot_expert_load
from moegraph.nn import Routing


def make_routing(row, expert, num_rows, num_experts):
    r"""A routing record built by hand; ``load`` is counted here in Python."""
    row, expert = torch.tensor(row, dtype=torch.long), torch.tensor(expert, dtype=torch.long)
    counts = [expert.tolist().count(e) for e in range(num_experts)]
    return Routing(row=row, expert=expert, weight=torch.full((row.numel(),), 0.5),
                   probs=torch.full((num_rows, num_experts), 1.0 / num_experts),
                   load=torch.tensor(counts, dtype=torch.float), aux_loss={})


def routings():
    # Layer 0: 4 rows, top-2 over 4 experts: loads 3, 1, 2, 2 of 8.
    a = make_routing([0, 0, 1, 1, 2, 2, 3, 3], [0, 2, 0, 3, 1, 2, 0, 3], 4, 4)
    # Layer 1: balanced, 1 assignment per expert.
    b = make_routing([0, 1, 2, 3], [3, 2, 1, 0], 4, 4)
    return [a, b]


def test_expert_load():
    load = expert_load(routings())
    assert load.shape == (2, 4) and load.dtype == torch.float32
    expected = torch.tensor([[3 / 8, 1 / 8, 2 / 8, 2 / 8], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(load, expected)
    assert torch.allclose(load.sum(dim=1), torch.ones(2))


def test_expert_load_is_detached():
    r = make_routing([0, 1], [0, 1], 2, 2)
    r = r._replace(load=r.load.clone().requires_grad_())
    assert not expert_load([r]).requires_grad


def test_expert_load_empty_layer_and_no_layer():
    empty = make_routing([], [], 3, 2)
    load = expert_load([empty, make_routing([0, 1, 2], [1, 1, 0], 3, 2)])
    assert torch.equal(load[0], torch.zeros(2))
    assert torch.allclose(load[1], torch.tensor([1 / 3, 2 / 3]))
    assert expert_load([]).shape == (0, 0)


def test_expert_load_from_a_model():
    from moegraph.nn import SparseMoE

    torch.manual_seed(0)
    moe = SparseMoE(6, 8, num_experts=5, k=2)
    _, routing = moe(torch.randn(50, 6))
    load = expert_load([routing])
    counts = torch.bincount(routing.expert, minlength=5).float()
    assert torch.allclose(load[0], counts / 100)


def test_format_expert_load():
    text = format_expert_load(expert_load(routings()))
    lines = text.splitlines()
    assert lines[0] == "| layer | e0 | e1 | e2 | e3 | max/mean |"
    assert lines[1] == "|---|---|---|---|---|---|"
    # max/mean of layer 0: (3/8) / (1/4) = 1.5
    assert lines[2] == "| 0 | 37.5 | 12.5 | 25.0 | 25.0 | 1.50 |"
    assert lines[3] == "| 1 | 25.0 | 25.0 | 25.0 | 25.0 | 1.00 |"
    assert len(lines) == 4


def test_format_expert_load_edge_cases():
    assert format_expert_load(torch.zeros(0, 0)) == "(no MoE layer)"
    text = format_expert_load(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert text.splitlines()[2] == "| 0 | 0.0 | 0.0 | nan |"
    assert text.splitlines()[3] == "| 1 | 100.0 | 0.0 | 2.00 |"
    assert math.isnan(float(text.splitlines()[2].split("|")[-2]))


@pytest.mark.parametrize("shape", [(2, 4), (1, 1), (3, 16)])
def test_plot_expert_load(tmp_path, shape):
    load = torch.rand(shape)
    load = load / load.sum(dim=1, keepdim=True)
    path = plot_expert_load(load, tmp_path / "sub" / "load.png", title="t")
    assert path == tmp_path / "sub" / "load.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_expert_load_accepts_a_string_path(tmp_path):
    path = plot_expert_load(expert_load(routings()), str(tmp_path / "load.png"))
    assert path.is_file() and path.stat().st_size > 0


def test_routing_by_group():
    from moegraph.diagnostics import routing_by_group

    z = torch.zeros(())
    # 5 rows, 3 experts: rows 0-2 in group 0, rows 3-4 in group 1.
    routing = Routing(row=torch.arange(5), expert=torch.tensor([0, 0, 2, 1, 1]),
                      weight=torch.ones(5), probs=torch.zeros(5, 3),
                      load=torch.tensor([2.0, 2.0, 1.0]), aux_loss={"z_loss": z}, fixed_k=1)
    group = torch.tensor([0, 0, 0, 1, 1])
    share = routing_by_group(routing, group, num_groups=3)
    expected = torch.tensor([[2 / 3, 0, 1 / 3], [0, 1, 0], [0, 0, 0]])
    assert torch.allclose(share, expected)
    only = routing_by_group(routing, group, rows=torch.tensor([True, False, True, False, True]))
    assert torch.allclose(only, torch.tensor([[0.5, 0, 0.5], [0, 1, 0]]))
    with pytest.raises(ValueError, match="must label the 5 routed rows"):
        routing_by_group(routing, group[:4])
    with pytest.raises(ValueError, match="must be non-negative"):
        routing_by_group(routing, -group)


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from moegraph.diagnostics import plot_confidence_histogram, plot_expert_load

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice, not the Agg the plots render with
    try:
        plot_expert_load(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), tmp_path / "load.png")
        plot_confidence_histogram(torch.rand(20), torch.rand(20) > 0.5, tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)
