r"""Tests of moegraph.optim.NormalizedGD and of the tasks' parameter groups
(moegraph.tasks.common.parameter_groups), against steps computed by hand."""
import math

import pytest
import torch
from torch import nn

from moegraph.optim import NormalizedGD
from moegraph.tasks.common import parameter_groups


def one_step(param: torch.Tensor, grad: torch.Tensor, **options) -> torch.Tensor:
    p = nn.Parameter(param.clone())
    p.grad = grad.clone()
    NormalizedGD([p], **options).step()
    return p.detach()


def test_slice_normalisation_against_hand_values():
    # two "experts" [2, 1, 2]: gradients (3, 4) (norm 5) and (0, 2) (norm 2)
    w = torch.zeros(2, 1, 2)
    g = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    out = one_step(w, g, lr=0.5, normalize="slice")
    assert torch.allclose(out, torch.tensor([[[-0.3, -0.4]], [[0.0, -0.5]]]))
    # each slice moved by exactly lr
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.tensor([0.5, 0.5]))


def test_tensor_and_none_against_hand_values():
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # Frobenius norm 5
    out = one_step(torch.ones(2, 2), g, lr=1.0, normalize="tensor")
    assert torch.allclose(out, torch.tensor([[0.4, 1.0], [1.0, 0.2]]))
    out = one_step(torch.ones(2, 2), g, lr=0.1, normalize="none")  # plain gradient descent
    assert torch.allclose(out, torch.tensor([[0.7, 1.0], [1.0, 0.6]]))
    # a vector: its own norm whatever the mode
    out = one_step(torch.zeros(2), torch.tensor([0.0, -2.0]), lr=0.25, normalize="slice")
    assert torch.allclose(out, torch.tensor([0.0, 0.25]))


def test_zero_gradient_slice_stays_and_groups_keep_their_options():
    w = torch.ones(2, 3)
    out = one_step(w, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), lr=0.1)
    assert torch.equal(out[0], torch.ones(3))  # an expert given no sample does not move
    assert math.isclose(float(out[1, 0]), 0.9, rel_tol=1e-6)
    a, b = nn.Parameter(torch.zeros(1, 2)), nn.Parameter(torch.zeros(1, 2))
    a.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([[0.0, 10.0]])
    NormalizedGD([{"params": [a]}, {"params": [b], "lr": 0.1, "normalize": "none"}],
                 lr=0.01).step()
    assert torch.allclose(a, torch.tensor([[0.0, -0.01]]))
    assert torch.allclose(b, torch.tensor([[0.0, -1.0]]))


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "'lr' must be a positive"), ({"lr": float("nan")}, "'lr' must be"),
    ({"lr": 0.1, "normalize": "frobenius"}, "'normalize' must be one of")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormalizedGD([nn.Parameter(torch.zeros(2))], **kwargs)
    with pytest.raises(ValueError, match="'normalize' must be one of"):
        NormalizedGD([{"params": [nn.Parameter(torch.zeros(2))], "normalize": "x"}], lr=0.1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(3, 2)
        self.experts = nn.Linear(3, 3)
        self.router_head = nn.Linear(2, 1)  # a name that starts like "router"


def test_parameter_groups_take_submodules_by_path():
    net = Net()
    groups = parameter_groups(net, [{"params": "router", "lr": 0.1, "normalize": "none"}])
    assert [len(g["params"]) for g in groups] == [4, 2]
    rest, router = groups
    assert {id(p) for p in router["params"]} == {id(p) for p in net.router.parameters()}
    assert router["lr"] == 0.1 and router["normalize"] == "none" and "lr" not in rest
    opt = NormalizedGD(groups, lr=0.001)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.1]
    # one parameter by its full name; without groups: all parameters as they are
    assert parameter_groups(net, [{"params": "experts.bias"}])[1]["params"] == [net.experts.bias]
    assert len(list(parameter_groups(net, None))) == 6


@pytest.mark.parametrize("groups,match", [
    ([{"params": "gate"}], "takes no parameter"),
    ([{"lr": 0.1}], "needs 'params'"),
    ([{"params": "router"}, {"params": "router.weight"}], "is in two groups")])
def test_parameter_groups_bad_paths(groups, match):
    with pytest.raises(ValueError, match=match):
        parameter_groups(Net(), groups)
