r"""Tests of moegraph.nn.models.patch_moe: Chen et al.'s patch-wise MoE.

The reference computes every expert on every sample with plain Python loops
over floats, picks the routed expert from the router's own logits and weights
it by the softmax probability: no code in common with the sorted dispatch.
"""
import math

import pytest
import torch

from moegraph.nn import Routing, TopKRouter
from moegraph.nn.models import PatchExperts, PatchMoE
from moegraph.nn.output import ModelOutput


def naive_scores(model: PatchMoE, x: torch.Tensor) -> list[float]:
    r"""``F(x_i)`` per sample: all experts computed, the argmax one kept."""
    W = model.experts.weight.detach().double().tolist()  # [E][d][J]
    X = x.detach().double().tolist()  # [N][P][d]
    power = 3 if model.act == "cubic" else 1
    theta = model.router.weight.detach().double().tolist() if model.router else None
    out = []
    for sample in X:
        f = []
        for We in W:
            total = 0.0
            for patch in sample:
                for j in range(len(We[0])):
                    total += sum(patch[i] * We[i][j] for i in range(len(patch))) ** power
            f.append(total)
        if theta is None:
            out.append(f[0])
            continue
        summed = [sum(p[i] for p in sample) for i in range(len(sample[0]))]
        h = [sum(a * b for a, b in zip(row, summed, strict=True)) for row in theta]
        m = max(range(len(h)), key=lambda i: h[i])
        z = sum(math.exp(v - h[m]) for v in h)
        out.append(f[m] / z)  # softmax probability of the chosen expert, exp(0)/z
    return out


def small(N=12, P=4, d=8, seed=0):
    return torch.randn(N, P, d, generator=torch.Generator().manual_seed(seed))


def test_repr_and_parts():
    model = PatchMoE(50, 16, num_experts=8)
    assert repr(model) == "PatchMoE(50, 16, 2, num_experts=8, act=cubic)"
    assert repr(model.experts) == "PatchExperts(50, 16, num_experts=8, act=cubic)"
    assert isinstance(model.router, TopKRouter) and model.router.k == 1
    assert model.router.noisy and not model.router.normalize
    assert model.experts.weight.shape == (8, 50, 16)
    single = PatchMoE(50, 16, num_experts=1)
    assert single.router is None


@pytest.mark.parametrize("act", ["cubic", "linear"])
@pytest.mark.parametrize("num_experts", [1, 3])
def test_matches_naive_reference(act, num_experts):
    torch.manual_seed(0)
    model = PatchMoE(8, 3, num_experts=num_experts, noisy=False, act=act, init_std=0.5,
                     input_norm=False).eval()
    x = small()
    out = model(x)
    assert isinstance(out, ModelOutput) and out.logits.shape == (12, 2)
    ref = torch.tensor(naive_scores(model, x), dtype=torch.float)
    assert torch.allclose(out.logits[:, 1] - out.logits[:, 0], ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.logits[:, 0], -out.logits[:, 1])
    if num_experts == 1:
        assert out.routing == () and out.aux_loss == {}
    else:
        (routing,) = out.routing
        assert isinstance(routing, Routing) and routing.row.numel() == 12
        assert set(out.aux_loss) == {"load_balance", "z_loss", "importance"}


def test_each_sample_runs_one_expert_only(monkeypatch):
    seen = []
    original = PatchExperts.forward

    def spy(self, x_sorted, counts, weight=None):
        seen.append((x_sorted.size(0), counts.tolist()))
        return original(self, x_sorted, counts, weight)

    monkeypatch.setattr(PatchExperts, "forward", spy)
    torch.manual_seed(0)
    model = PatchMoE(8, 3, num_experts=4, noisy=False, init_std=0.5)
    model(small(N=40))
    ((rows, counts),) = seen
    assert rows == 40 and sum(counts) == 40 and len(counts) == 4  # not 4 * 40


def test_equivariant_to_samples_invariant_to_patches():
    torch.manual_seed(0)
    model = PatchMoE(8, 3, num_experts=4, init_std=0.5).eval()
    x = small(N=20)
    out = model(x).logits
    perm = torch.randperm(20)
    assert torch.allclose(model(x[perm]).logits, out[perm], atol=1e-5)
    assert torch.allclose(model(x[:, [2, 0, 3, 1]]).logits, out, atol=1e-5)


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    model = PatchMoE(8, 3, num_experts=4, noisy=True, init_std=0.5).train()
    out = model(small(N=64))
    loss = torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 2, (64,)))
    (loss + out.aux_loss["importance"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Only experts that received samples get a gradient.
    used = out.routing[0].load > 0
    grad = model.experts.weight.grad.abs().sum(dim=(1, 2))
    assert ((grad > 0) == used).all()


def test_single_expert_baseline():
    torch.manual_seed(0)
    model = PatchMoE(8, 3, num_experts=1, init_std=0.5)
    out = model(small())
    out.logits[:, 1].sum().backward()
    assert model.experts.weight.grad.abs().sum() > 0
    assert [n for n, _ in model.named_parameters()] == ["experts.weight"]


def test_seeded_init_is_deterministic():
    torch.manual_seed(5)
    a = PatchMoE(8, 3, num_experts=4)
    torch.manual_seed(5)
    b = PatchMoE(8, 3, num_experts=4)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    model = PatchMoE(8, 3, num_experts=4, init_std=0.01)
    assert 0.005 < float(model.experts.weight.std()) < 0.015


def test_bad_input():
    model = PatchMoE(8, 3, num_experts=4)
    with pytest.raises(ValueError, match="'x' must be \\[num_samples, num_patches, 8\\]"):
        model(torch.randn(5, 8))
    with pytest.raises(ValueError, match="got shape \\(5, 4, 7\\)"):
        model(torch.randn(5, 4, 7))
    with pytest.raises(TypeError, match="'x' must be a tensor"):
        model([[0.0] * 8])
    with pytest.raises(ValueError, match="'out_channels' must be 2"):
        PatchMoE(8, 3, out_channels=3)
    with pytest.raises(ValueError, match="'act' must be one of"):
        PatchMoE(8, 3, act="relu")
    with pytest.raises(ValueError, match="'hidden_channels' must be a positive integer"):
        PatchMoE(8, 0)
    with pytest.raises(ValueError, match="'num_experts' must be a positive integer"):
        PatchMoE(8, 3, num_experts=0)
    with pytest.raises(ValueError, match="non-finite router logits"):
        model(torch.full((2, 4, 8), float("nan")))


@pytest.mark.slow  # 2 x 30 epochs: about 12 s on a loaded 2-core machine
def test_moe_learns_the_cluster_task_a_single_expert_does_not(compose_cfg):
    r"""Through the one entry point, on a small draw of the task: the MoE is
    far above chance and above the single expert, whose ceiling on this data
    is 75% (it sees each cluster's signal and another's noise alike)."""
    from moegraph.train import train

    data = ["data.num_train=1500", "data.num_val=500", "data.num_test=1500",
            "trainer.max_epochs=30", "logger=none", "callbacks=none",
            "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    moe = train(compose_cfg("experiment=cluster_moe", *data))
    single = train(compose_cfg("experiment=cluster_single", *data))
    assert moe["test/acc"] > 0.9
    assert single["test/acc"] < 0.77
    assert moe["test/acc"] - single["test/acc"] > 0.15


def test_router_init_zeros_and_uniform_noise():
    model = PatchMoE(8, 3, num_experts=4, noise="uniform", router_init="zeros",
                     input_norm=False)
    assert torch.count_nonzero(model.router.weight) == 0 and model.router.noise == "uniform"
    model.router.weight.data.fill_(1.0)
    model.reset_parameters()  # the reset starts it at zero again
    assert torch.count_nonzero(model.router.weight) == 0
    # equal probabilities: each sample's output is its expert's scaled by 1/E
    x = torch.randn(6, 4, 8)
    out = model.eval()(x)
    routing = out.routing[0]
    expert = routing.expert[routing.row.argsort()]
    naive = torch.stack([(x[i] @ model.experts.weight[e]).pow(3).sum() / 4
                         for i, e in enumerate(expert.tolist())])
    assert torch.allclose(out.logits[:, 1] - out.logits[:, 0], naive, atol=1e-5)
    with pytest.raises(ValueError, match="'router_init' must be one of"):
        PatchMoE(8, 3, router_init="ones")


@pytest.mark.slow  # 2 runs of 200 full-batch epochs on 2,000 samples: about 2 min
def test_the_papers_procedure_reaches_the_papers_accuracy(compose_cfg):
    r"""``model=patch_moe_paper`` (normalised GD for the experts, GD at 0.1
    for a zero-started router, uniform noise) at the paper's input scale:
    the accuracy the paper reports for its MoE (99.5%) within a point."""
    from moegraph.train import train

    cfg = compose_cfg("experiment=cluster_moe", "model=patch_moe_paper", "data.scale=10",
                      "data.num_train=2000", "data.num_val=500", "data.num_test=2000",
                      "trainer.max_epochs=200", "callbacks.early_stopping.patience=200",
                      "logger=none", "+trainer.enable_progress_bar=false",
                      "+trainer.enable_model_summary=false", "callbacks.rich_progress_bar=null")
    out = train(cfg)
    assert out["test/acc"] > 0.985
