r"""The MoE layers, HopMoEConv, Mowst's sparse inference and DDP on a device
(CPU in the default suite, CUDA under ``-m gpu``), each against a float64 CPU
reference computed by a copy of the module in double precision, or against a
second run (determinism).

Routing decisions are discrete: a row whose k-th and (k+1)-th router logits
differ by less than float32's rounding may pick other experts on another
device. The inputs keep only rows with a clear margin (1e-3 in float64), so
that every comparison is between the same routing decisions.
"""
import copy

import pytest
import torch
from torch_geometric.nn.models import GCN, MLP

from moegraph.nn import HopMoEConv, Mowst, SparseMoE
from moegraph.nn.experts import _has_grouped_mm

F_IN, HIDDEN, E = 16, 32, 8


def clear_margin_rows(x: torch.Tensor, router_weight: torch.Tensor, k: int,
                      margin: float = 1e-3) -> torch.Tensor:
    r"""Rows of ``x`` whose top-``k`` experts are decided by more than ``margin``
    (float64 logits ``x W^T``)."""
    logits = x.double() @ router_weight.detach().double().t()
    top = logits.sort(dim=-1, descending=True).values
    return x[(top[:, k - 1] - top[:, k]) > margin]


def moe_and_input(k: int, backend: str, rows: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    moe = SparseMoE(F_IN, HIDDEN, num_experts=E, k=k, backend=backend)
    x = clear_margin_rows(torch.randn(rows, F_IN), moe.router.weight, k)
    assert x.size(0) > rows // 2
    return moe, x


def forward_backward(moe, x, upstream, autocast_dtype=None):
    r"""Output and gradients (input, then every parameter by name) of
    ``(moe(x).out * upstream).sum()``."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out, routing = moe(x)
    (out.float() * upstream).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in moe.named_parameters()})
    return out, routing, grads


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 2])
def test_sparse_moe_matches_float64_reference(device, backend, precision, k):
    if backend == "grouped_mm" and not _has_grouped_mm():
        pytest.skip("torch._grouped_mm needs PyTorch >= 2.8")
    moe, x = moe_and_input(k, backend)
    upstream = torch.randn(x.size(0), F_IN)
    reference = copy.deepcopy(moe).double()
    reference.experts.backend = "loop"  # grouped_mm has no float64
    ref_out, ref_routing, ref_grads = forward_backward(reference, x.double(), upstream.double())
    dtype = torch.bfloat16 if precision == "bf16" else None
    out, routing, grads = forward_backward(moe.to(device), x.to(device), upstream.to(device),
                                           dtype)
    assert torch.equal(routing.expert.cpu(), ref_routing.expert)  # same decisions
    # fp32 against float64: rounding only; bf16 (8-bit mantissa): about 1% of the scale
    rtol = 2e-2 if dtype is not None else 1e-4
    for name, ref in [("out", ref_out), *ref_grads.items()]:
        got = (out if name == "out" else grads[name])
        if ref is None:  # top-1: the router's weight is the constant one, no gradient
            assert k == 1 and name == "router.weight" and got is None, name
            continue
        assert got is not None, name
        got = got.detach().double().cpu()
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        assert err <= rtol * scale + 1e-6, f"{name}: max error {err:.3g}, scale {scale:.3g}"


def test_routing_stays_float32_under_autocast(device):
    moe, x = moe_and_input(2, "loop")
    moe, x = moe.to(device), x.to(device)
    _, plain, _ = forward_backward(moe, x, torch.ones(x.size(0), F_IN, device=device))
    out, routing, grads = forward_backward(moe, x, torch.ones(x.size(0), F_IN, device=device),
                                           torch.bfloat16)
    assert out.dtype == torch.bfloat16  # the experts ran in bf16 ...
    assert routing.weight.dtype == routing.probs.dtype == torch.float32  # ... the router not
    # and it routed exactly as without autocast
    assert torch.equal(routing.expert, plain.expert)
    assert torch.equal(routing.weight, plain.weight)
    assert torch.equal(routing.probs, plain.probs)
    assert grads["router.weight"].dtype == torch.float32


@pytest.mark.parametrize("k", [1, 2])
def test_deterministic_combine_is_bit_identical_on_repeat(device, k):
    torch.manual_seed(0)
    moe = SparseMoE(F_IN, HIDDEN, num_experts=E, k=k, deterministic=True).to(device)
    # many rows per expert, so that a scatter-add would race on CUDA
    x = torch.randn(4096, F_IN, device=device)
    upstream = torch.randn(4096, F_IN, device=device)
    runs = [forward_backward(moe, x, upstream) for _ in range(3)]
    out0, _, grads0 = runs[0]
    for out, _, grads in runs[1:]:
        assert torch.equal(out, out0)
        for name, g in grads0.items():
            if g is None:  # top-1: no gradient reaches the router's weight
                assert k == 1 and name == "router.weight" and grads[name] is None, name
                continue
            assert torch.equal(grads[name], g), name


@pytest.mark.parametrize("conv", ["gcn", "sage"])
@pytest.mark.parametrize("aggregate_first", [True, False])
def test_hop_moe_conv_matches_cpu_in_the_other_order(device, conv, aggregate_first):
    r"""Output and gradients on the device equal the CPU's, computed in the
    other order (transform-then-aggregate against aggregate-then-transform;
    the layer has no float64 path: its sparse adjacency is float32)."""
    torch.manual_seed(0)
    N = 120
    layer = HopMoEConv(F_IN, F_IN, num_experts=4, num_hop2_experts=2, k=1, conv=conv,
                       aggregate_first=aggregate_first).eval()  # eval: no routing noise
    x = clear_margin_rows(torch.randn(3 * N, F_IN), layer.router.weight, 1)[:N]
    assert x.size(0) == N
    edge_index = torch.randint(0, N, (2, 4 * N))
    upstream = torch.randn(N, F_IN)
    reference = copy.deepcopy(layer)
    reference.aggregate_first = not aggregate_first

    def run(module, dev):
        module = module.to(dev)
        out, routing = module(x.to(dev), edge_index.to(dev))
        (out * upstream.to(dev)).sum().backward()
        return out, routing, {n: p.grad for n, p in module.named_parameters()}

    ref, ref_routing, ref_grads = run(reference, "cpu")
    out, routing, grads = run(layer, device)
    assert torch.equal(routing.expert.cpu(), ref_routing.expert)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
    assert any(g is not None for g in ref_grads.values())
    for name, g in ref_grads.items():
        if g is None:  # unused in eval (the routing noise)
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(grads[name].cpu(), g, rtol=1e-4, atol=1e-5, msg=name)


def test_mowst_sparse_predict_matches_cpu_full_graph(device):
    r"""Sparse inference on the device (strong expert on the subgraph of the
    unconfident nodes) equals full-graph inference on the CPU (float32:
    Mowst's gate has no float64 path)."""
    torch.manual_seed(0)
    N, C = 200, 3
    model = Mowst(MLP([F_IN, 16, C]), GCN(F_IN, 16, 2, C)).eval()
    x, edge_index = torch.randn(N, F_IN), torch.randint(0, N, (2, 3 * N))
    reference = copy.deepcopy(model)
    confidence = reference.predict(x, edge_index, threshold=0.5, sparse=False).confidence
    # a threshold in the widest gap between the 30% and 70% quantiles of the
    # confidence: no node near it, so both devices split the nodes alike
    c = confidence.sort().values[int(0.3 * N):int(0.7 * N)]
    i = int((c[1:] - c[:-1]).argmax())
    tau = float(c[i] + c[i + 1]) / 2
    ref = reference.predict(x, edge_index, threshold=tau, sparse=False)
    got = model.to(device).predict(x.to(device), edge_index.to(device), threshold=tau)
    assert 0 < int(ref.strong_mask.sum()) < N
    assert torch.equal(got.strong_mask.cpu(), ref.strong_mask)
    assert got.num_subgraph_nodes < N  # it ran on a subgraph
    torch.testing.assert_close(got.probs.cpu(), ref.probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.confidence.cpu(), ref.confidence, rtol=1e-4, atol=1e-5)


class MoENet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(F_IN, F_IN)
        self.moe = SparseMoE(F_IN, HIDDEN, num_experts=E, k=2)
        self.head = torch.nn.Linear(F_IN, 3)

    def forward(self, x):
        h = self.lin(x).relu()
        out, routing = self.moe(h)
        return self.head(h + out), routing.aux_loss["load_balance"]


def test_ddp_two_steps_on_one_device(device, tmp_path):
    r"""Two optimizer steps of a MoE model under DistributedDataParallel (nccl
    on CUDA, gloo on CPU; one process) equal the same steps without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_backend_available(backend):
        pytest.skip(f"torch.distributed has no {backend}")
    torch.manual_seed(0)
    ref = MoENet().to(device)
    model = copy.deepcopy(ref)
    start = copy.deepcopy(ref.state_dict())
    batches = [(torch.randn(64, F_IN, device=device), torch.randint(0, 3, (64,), device=device))
               for _ in range(2)]

    def train(params, forward):
        opt = torch.optim.SGD(params, lr=0.1)
        for x, y in batches:
            opt.zero_grad()
            logits, aux = forward(x)
            (torch.nn.functional.cross_entropy(logits, y) + 0.01 * aux).backward()
            opt.step()

    train(ref.parameters(), ref)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None,
            find_unused_parameters=True)
        train(ddp.parameters(), ddp)
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ref.head.weight, start["head.weight"])  # it did train
