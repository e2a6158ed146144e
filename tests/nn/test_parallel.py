r"""Tests of moegraph.nn.parallel: expert parallelism against the unsharded layer.

The multi-process scenarios run once, in two gloo processes started with
``spawn`` (rendezvous through a file, no port), each writing its results to a
file; the parent runs the single-process reference on all the rows and
compares. A scenario that raises in a child is recorded as its traceback and
fails only its own test; a child that dies or hangs fails them all.
"""
import copy
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moegraph.nn import LinearExperts, MLPExperts, SparseMoE
from moegraph.nn.experts import Experts
from moegraph.nn.parallel import ShardedExperts, ignore_sharded_in_ddp, shard_experts, sharded_names

# pytest-xdist (make test): one worker runs this module, its module-scoped
# fixture is built once.
pytestmark = pytest.mark.xdist_group("expert_parallel_session")

WORLD = 2
F_IN, HID, OUT = 6, 8, 5
TIMEOUT = 120  # seconds for the whole multi-process session


def build(E=4, k=2, capacity_factor=None, module_experts=False, linear_experts=False, seed=0):
    torch.manual_seed(seed)
    experts = None
    if linear_experts:
        experts = LinearExperts(F_IN, OUT, E)
    if module_experts:
        experts = [nn.Sequential(nn.Linear(F_IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
                   for _ in range(E)]
    return SparseMoE(F_IN, HID, OUT, num_experts=E, k=k, capacity_factor=capacity_factor,
                     experts=experts)


class Net(nn.Module):
    r"""A replicated layer, the MoE block and a replicated head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(F_IN, F_IN)
        self.moe = build(seed=seed + 1)
        self.head = nn.Linear(OUT, 3)

    def forward(self, x):
        return self.head(self.moe(self.lin(x).relu()).out)


# The scenarios: inputs made by the parent, run by every rank ####################


def make_inputs():
    torch.manual_seed(123)
    inputs = {}
    for name, cfg, sizes in (("uneven", {}, (15, 9)),
                             ("module_experts", dict(module_experts=True), (7, 12)),
                             ("linear_experts", dict(linear_experts=True), (9, 8)),
                             ("capacity", dict(capacity_factor=0.5), (14, 10)),
                             ("empty", {}, (10, 0))):
        model = build(**cfg)
        x = torch.randn(sum(sizes), F_IN)
        if name == "empty":  # expert 3 gets no row anywhere; rank 1 has no rows at all
            x = x.abs() + 0.5
            with torch.no_grad():
                model.router.weight[3] = -5.0
        inputs[name] = dict(cfg=cfg, state=model.state_dict(), x=x.split(sizes),
                            g=torch.randn(sum(sizes), OUT).split(sizes))
    inputs["ddp"] = dict(state=Net().state_dict(), x=torch.randn(16, F_IN).split(8),
                         g=torch.randn(16, 3).split(8))
    inputs["checkpoint"] = dict(state=build(seed=5).state_dict(), x=torch.randn(12, F_IN))
    return inputs


def run_block(inp, rank):
    model = build(**inp["cfg"], seed=99)
    model.load_state_dict(inp["state"])  # unsharded checkpoint, then shard
    shard_experts(model)
    assert isinstance(model.experts, ShardedExperts)
    x = inp["x"][rank].clone().requires_grad_()
    out = model(x).out
    (out * inp["g"][rank]).sum().backward()
    return dict(out=out.detach(), x_grad=x.grad,
                router_grad=model.router.weight.grad,
                expert_grads={n: p.grad for n, p in model.experts.local.named_parameters()},
                state=model.state_dict())


def run_ddp(inp, rank):
    net = Net(seed=99)
    net.load_state_dict(inp["state"])
    shard_experts(net)
    ddp = nn.parallel.DistributedDataParallel(net)
    loss = (ddp(inp["x"][rank]) * inp["g"][rank]).sum() / inp["x"][rank].size(0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    torch.optim.SGD(net.parameters(), lr=0.5).step()
    return dict(grads=grads, state=net.state_dict(),
                ignored=sorted(getattr(net, "_ddp_params_and_buffers_to_ignore", [])))


def run_checkpoint(inp, rank, tmp):
    model = build(seed=99)
    shard_experts(model)
    model.load_state_dict(torch.load(f"{tmp}/one_process.pt"))  # written by 1 process
    out_loaded = model(inp["x"]).out.detach()
    with torch.no_grad():  # make the full model exist only spread over the ranks
        for p in model.experts.local.parameters():
            p.add_(0.1 * (rank + 1))
    out_sharded = model(inp["x"]).out.detach()
    state = model.state_dict()  # collective
    if rank == 0:
        torch.save(state, f"{tmp}/two_processes.pt")
    return dict(out_loaded=out_loaded, out_sharded=out_sharded)


def run_not_divisible(inp, rank):
    try:
        shard_experts(SparseMoE(F_IN, HID, num_experts=3, k=1))
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    inputs = torch.load(f"{tmp}/inputs.pt")
    results = {}
    for name in ("uneven", "module_experts", "linear_experts", "capacity", "empty"):
        try:
            results[name] = run_block(inputs[name], rank)
        except Exception:
            results[name] = traceback.format_exc()
    for name, run in (("ddp", lambda: run_ddp(inputs["ddp"], rank)),
                      ("checkpoint", lambda: run_checkpoint(inputs["checkpoint"], rank, tmp)),
                      ("not_divisible", lambda: run_not_divisible(None, rank))):
        try:
            results[name] = run()
        except Exception:
            results[name] = traceback.format_exc()
    torch.save(results, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expert_parallel")
    inputs = make_inputs()
    torch.save(inputs, tmp / "inputs.pt")
    torch.save(inputs["checkpoint"]["state"], tmp / "one_process.pt")
    ctx = torch.multiprocessing.start_processes(worker, args=(str(tmp),), nprocs=WORLD,
                                                join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} expert-parallel processes did not finish in "
                            f"{TIMEOUT} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
            process.join()
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return inputs, ranks, tmp


def results(session, name):
    _, ranks, _ = session
    for r, res in enumerate(ranks):
        if isinstance(res[name], str) and "Traceback" in res[name]:
            pytest.fail(f"rank {r} failed in scenario {name!r}:\n{res[name]}")
    return [res[name] for res in ranks]


def assert_close(actual, expected, **kwargs):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, **kwargs)


# Outputs and gradients equal the single-process layer #############################


@pytest.mark.parametrize("name", ["uneven", "module_experts", "linear_experts", "capacity",
                                  "empty"])
def test_matches_single_process(session, name):
    inputs, _, _ = session
    inp = inputs[name]
    ranks = results(session, name)
    ref = build(**inp["cfg"])
    ref.load_state_dict(inp["state"])
    # The rows of all ranks in one batch; with a capacity factor, capacity is
    # per rank (per local batch), so the reference runs each rank's rows alone.
    chunks = [torch.cat(inp["x"])] if name != "capacity" else list(inp["x"])
    gs = [torch.cat(inp["g"])] if name != "capacity" else list(inp["g"])
    outs, x_grads = [], []
    for x, g in zip(chunks, gs, strict=True):
        x = x.clone().requires_grad_()
        out = ref(x).out
        (out * g).sum().backward()  # gradients accumulate over chunks
        outs.append(out.detach())
        x_grads.append(x.grad)
    out, x_grad = torch.cat(outs), torch.cat(x_grads)
    sizes = [x.size(0) for x in inp["x"]]

    assert_close(torch.cat([r["out"] for r in ranks]), out)
    assert_close(torch.cat([r["x_grad"] for r in ranks]), x_grad)
    # The rule: every gradient is (1 / W) * sum over ranks of d L_r / d theta.
    # The router is replicated (DDP would average it): sum = reference.
    assert_close(sum(r["router_grad"] for r in ranks), ref.router.weight.grad)
    # The sharded experts already hold the gradient of every rank's rows, / W.
    for pname, p in ref.experts.named_parameters():
        if inp["cfg"].get("module_experts"):
            index, rest = pname.split(".", 2)[1:]
            r, j = divmod(int(index), ref.num_experts // WORLD)
            got = ranks[r]["expert_grads"][f"experts.{j}.{rest}"]
        else:
            got = torch.cat([r["expert_grads"][pname] for r in ranks])
        assert (got is None) == (p.grad is None), pname  # None: an idle expert module
        if got is not None:
            assert_close(WORLD * got, p.grad, msg=f"gradient of {pname}")
    # state_dict gathers the full bank, identical on every rank.
    for r in ranks:
        assert list(r["state"]) == list(inp["state"])  # the keys of the unsharded layer
        for key, value in inp["state"].items():
            assert_close(r["state"][key], value, msg=key)
    if name == "empty":
        assert sizes[1] == 0 and ranks[1]["out"].shape == (0, OUT)
        assert ranks[1]["expert_grads"]["weight1"][1].abs().sum() == 0  # expert 3: idle


def test_data_parallel_composition(session):
    r"""DDP on both ranks with different data, local-mean losses: the same
    gradients and step as one process with the mean loss on the global batch."""
    inputs, _, _ = session
    inp = inputs["ddp"]
    ranks = results(session, "ddp")
    ref = Net()
    ref.load_state_dict(inp["state"])
    x, g = torch.cat(inp["x"]), torch.cat(inp["g"])
    ((ref(x) * g).sum() / x.size(0)).backward()
    for name, p in ref.named_parameters():
        if name.startswith("moe.experts."):
            local = name.replace("moe.experts.", "moe.experts.local.")
            got = torch.cat([r["grads"][local] for r in ranks])
        else:
            got = ranks[0]["grads"][name]
            assert_close(ranks[1]["grads"][name], got)  # DDP averaged them
        assert_close(got, p.grad, msg=f"gradient of {name}")
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    for r in ranks:
        assert r["ignored"] == sorted(f"moe.experts.local.{n}" for n in
                                      ("weight1", "bias1", "weight2", "bias2"))
        for key, value in ref.state_dict().items():
            assert_close(r["state"][key], value, msg=key)


def test_checkpoint_one_to_two_processes(session):
    inputs, _, _ = session
    inp = inputs["checkpoint"]
    ranks = results(session, "checkpoint")
    ref = build(seed=0)
    ref.load_state_dict(inp["state"])
    for r in ranks:
        assert_close(r["out_loaded"], ref(inp["x"]).out.detach())


def test_checkpoint_two_to_one_process(session):
    inputs, _, tmp = session
    ranks = results(session, "checkpoint")
    state = torch.load(tmp / "two_processes.pt")
    model = build(seed=0)
    assert list(state) == list(model.state_dict())  # the layout of the unsharded layer
    model.load_state_dict(state)
    expected = model(inputs["checkpoint"]["x"]).out.detach()
    assert not torch.allclose(expected, ranks[0]["out_loaded"])  # it did change
    for r in ranks:
        assert_close(r["out_sharded"], expected)


def test_world_size_must_divide_experts(session):
    for message in results(session, "not_divisible"):
        assert "num_experts=3" in message and "world_size=2" in message


# One process: no torch.distributed ###############################################


def test_shard_experts_without_distributed_is_a_no_op():
    model = build()
    experts = model.experts
    assert shard_experts(model) is model and model.experts is experts
    assert sharded_names(model) == []


def test_world_size_one():
    torch.manual_seed(0)
    model = SparseMoE(F_IN, HID, OUT, num_experts=4, k=2, num_shared_experts=1)
    x = torch.randn(20, F_IN)
    expected = model(x).out
    state = copy.deepcopy(model.state_dict())
    model.experts = ShardedExperts(model.experts)
    assert str(model.experts) == ("ShardedExperts(MLPExperts(6, 8, 5, num_experts=4), "
                                  "num_experts=4, rank=0, world_size=1)")
    torch.testing.assert_close(model(x).out, expected)
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state)
    assert sharded_names(model) == [f"experts.local.{n}"
                                    for n in ("weight1", "bias1", "weight2", "bias2")]
    ignore_sharded_in_ddp(model)
    assert model._ddp_params_and_buffers_to_ignore == sharded_names(model)


def test_world_size_one_module_experts():
    model = build(module_experts=True)
    x = torch.randn(20, F_IN)
    expected = model(x).out
    state = model.state_dict()
    model.experts = ShardedExperts(model.experts)
    torch.testing.assert_close(model(x).out, expected)
    assert list(model.state_dict()) == list(state)
    other = build(module_experts=True, seed=3)
    other.experts = ShardedExperts(other.experts)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x).out, expected)


def test_bad_input():
    class Custom(Experts):
        num_experts, in_channels, out_channels = 2, 4, 4

    with pytest.raises(TypeError, match="MLPExperts, LinearExperts, ModuleExperts"):
        ShardedExperts(Custom())
    with pytest.raises(RuntimeError, match="not initialised"):
        ShardedExperts(MLPExperts(4, 8, 4, 2), group=object())
    experts = ShardedExperts(MLPExperts(4, 8, 4, 2))
    with pytest.raises(ValueError, match="'counts' has 3 entries but there are 2"):
        experts(torch.randn(3, 4), torch.tensor([1, 1, 1]))
    model = build()
    model.experts = ShardedExperts(model.experts)
    state = build(E=8).state_dict()
    with pytest.raises(RuntimeError, match="the checkpoint holds 8 experts, the layer 4"):
        model.load_state_dict(state)
