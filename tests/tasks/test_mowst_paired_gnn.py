r"""Mowst's strong expert is the GNN that ``model=gnn`` trains with the same
seed: the same initial weights, the same random numbers in its pre-training
(dropout, loader seeds, mini-batches), the same early stopping and selection,
so that its weights, and Mowst's score when the gate leaves every node to it,
are exactly the GNN's. Runs go through :func:`moegraph.train.train`, as the
CLI does; the reference is the ``model=gnn`` run itself."""
import functools
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from torch_geometric.nn.models import GCN, MLP

from moegraph.nn import Mowst
from moegraph.nn.models import make_backbone
from moegraph.nn.mowst import SIDE_STREAM_INIT, side_stream_seed
from moegraph.train import compose_config, train

pytestmark = pytest.mark.filterwarnings(
    "ignore:MowstTask early-stops each turn itself:UserWarning",
    "ignore:Mowst cross-fitting trains its expert copies:UserWarning")

# A small graph whose features say little (the MLP is weak, the GNN is not):
# 300 nodes, 4 classes, 150 training nodes.
GRAPH = ["data.dataset_kwargs.num_nodes=300", "data.dataset_kwargs.signal=0.1",
         "logger=none", "callbacks.rich_progress_bar=null",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
         "backbone.dropout=0.5"]
# the GNN alone: 60 epochs at most, patience 10 ...
GNN = ["model=gnn", "trainer.max_epochs=60", "callbacks.early_stopping.patience=10"]
# ... and Mowst's pre-training of its GNN with the same budget and patience
MOWST = ["model=mowst", "trainer.max_epochs=1000", "model.pretrain_weak_epochs=30",
         "model.pretrain_strong_epochs=60", "model.pretrain_patience=10",
         "model.turn_patience=5"]
MINI_BATCH = ["+data.batch_size=64", "+data.num_neighbors=[5,5]"]


@pytest.fixture
def compose_cfg():
    r"""Compose as the CLI would, writing to the given folder."""
    yield compose_config
    HydraConfig.instance().cfg = None


def run(compose_cfg, tmp_path: Path, name: str, *overrides: str):
    r"""Train through ``train(cfg)``; the metrics and the tested checkpoint."""
    out = tmp_path / name
    metrics = train(compose_cfg([*GRAPH, *overrides], out))
    path = out / "checkpoints" / f"epoch_{int(metrics['best/epoch']):03d}.ckpt"
    return metrics, torch.load(path, map_location="cpu", weights_only=False)


def sub_state(checkpoint, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
            if k.startswith(prefix)}


def check_paired(compose_cfg, tmp_path, strong: str, seed: int, *extra: str,
                 mowst_extra: tuple = ()):
    gnn, gnn_ckpt = run(compose_cfg, tmp_path, "gnn", *GNN, f"model/strong={strong}",
                        f"seed={seed}", *extra)
    mowst, ckpt = run(compose_cfg, tmp_path, "mowst", *MOWST, f"model/strong={strong}",
                      f"seed={seed}", *extra, *mowst_extra)
    reference, strong_state = sub_state(gnn_ckpt, "net."), sub_state(ckpt, "net.strong.")
    assert reference.keys() == strong_state.keys()
    for key, value in reference.items():  # bit for bit
        assert torch.equal(strong_state[key], value), key
    # the GNN's own scores: validation (what both selected on) and test
    assert mowst["val/acc_strong"] == gnn["val/acc"]
    assert mowst["test/acc_strong"] == gnn["test/acc"]
    turns = {t["phase"]: t for t in ckpt["mowst_run"]["turn_log"]}
    # the pre-training stopped where the GNN alone stopped: its best epoch
    # (0-based) and the patience after it
    assert turns["pretrain_strong"]["epochs"] == gnn["time/epochs"]
    assert turns["pretrain_strong"]["turn_best"] == gnn["val/acc"]
    return gnn, mowst, turns["gate"]


@pytest.mark.parametrize("strong", ["gcn", "sage"])
@pytest.mark.parametrize("seed", [0, 1])
def test_strong_expert_is_the_gnn_of_the_same_seed(compose_cfg, tmp_path, strong, seed):
    gnn, mowst, gate = check_paired(compose_cfg, tmp_path, strong, seed)
    if not gate["kept"] or mowst["test/confident"] == 0:
        # no test node left to the weak expert (rolled back: C = 9e-14 < tau)
        assert mowst["test/acc"] == gnn["test/acc"]


def test_kept_gate_without_weak_nodes_scores_as_its_gnn(compose_cfg, tmp_path):
    # CiteSeer's case: the gate's turn ties the GNN's validation score and is
    # kept, with C below tau on every test node: Mowst is its GNN.
    gnn, mowst, gate = check_paired(compose_cfg, tmp_path, "gcn", 0,
                                    "data.dataset_kwargs.signal=0.0")
    assert gate["kept"] and mowst["test/confident"] == 0.0  # the scenario
    assert mowst["test/acc"] == gnn["test/acc"]
    assert mowst["val/acc"] == gnn["val/acc"]


def test_strong_expert_is_the_gnn_with_mini_batches(compose_cfg, tmp_path):
    # NeighborLoader: the pre-training's k-th epoch sees the GNN's k-th epoch
    # of mini-batches and neighbourhoods
    check_paired(compose_cfg, tmp_path, "gcn", 0, *MINI_BATCH)


def test_gnn_of_another_seed_differs(compose_cfg, tmp_path):
    # the comparison above can fail: two seeds give two GNNs
    _, a = run(compose_cfg, tmp_path, "a", *GNN, "seed=0")
    _, b = run(compose_cfg, tmp_path, "b", *GNN, "seed=1")
    sa, sb = sub_state(a, "net."), sub_state(b, "net.")
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)


# -- construction --------------------------------------------------------------------
def factories(feat=6, classes=3):
    weak = functools.partial(make_backbone, name="mlp", hidden_channels=8, num_layers=2)
    strong = functools.partial(make_backbone, name="gcn", hidden_channels=8, num_layers=2)
    return weak, strong


@pytest.mark.parametrize("seed", [0, 7])
def test_constructor_builds_the_strong_expert_as_the_gnn_alone(seed):
    weak, strong = factories()
    torch.manual_seed(seed)
    gnn = strong(in_channels=6, out_channels=3)
    after_gnn = torch.get_rng_state()
    torch.manual_seed(seed)
    net = Mowst(weak, strong, in_channels=6, out_channels=3)
    # same weights, and the random state the GNN alone leaves
    for key, value in gnn.state_dict().items():
        assert torch.equal(net.strong.state_dict()[key], value), key
    assert torch.equal(torch.get_rng_state(), after_gnn)
    # the weak expert and the gate follow the seed, on a stream of their own
    torch.manual_seed(seed)
    again = Mowst(weak, strong, in_channels=6, out_channels=3)
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    torch.manual_seed(seed + 1)
    other = Mowst(weak, strong, in_channels=6, out_channels=3)
    assert not torch.equal(other.weak.lins[0].weight, net.weak.lins[0].weight)
    assert not torch.equal(other.strong.convs[0].lin.weight, net.strong.convs[0].lin.weight)


def test_constructor_with_modules_resets_the_strong_one_first():
    torch.manual_seed(3)
    strong = GCN(6, 8, 2, 3)
    weak = MLP([6, 8, 3])
    torch.manual_seed(5)
    net = Mowst(weak, strong)
    reference = GCN(6, 8, 2, 3)
    torch.manual_seed(5)
    reference.reset_parameters()  # the GNN re-initialised at that point
    for key, value in reference.state_dict().items():
        assert torch.equal(net.strong.state_dict()[key], value), key


def test_side_stream_seed_does_not_draw():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = side_stream_seed(SIDE_STREAM_INIT)
    assert torch.equal(torch.get_rng_state(), before)
    assert side_stream_seed(SIDE_STREAM_INIT) == a
    assert side_stream_seed(SIDE_STREAM_INIT + 1) != a
    assert 0 <= a < 1 << 63
    torch.rand(1)  # the seed follows the stream
    assert side_stream_seed(SIDE_STREAM_INIT) != a
