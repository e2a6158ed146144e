r"""Every option of the config tree in ``conf/`` composes and instantiates."""
from pathlib import Path

import lightning as L
import pytest
from hydra.errors import InstantiationException
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, GraphSAGE

from moegraph.data import NodeDataModule
from moegraph.nn import ExpertChoiceRouter, Mowst, SparseMoE, TopKRouter, TopPRouter
from moegraph.nn.models import MoEGNN
from moegraph.tasks import MowstTask, NodeClassificationTask
from moegraph.train import CONFIG_DIR, instantiate_run

TINY = "data.dataset_kwargs.num_nodes=60"
OPTIONS = {
    "data": ["amherst41", "citeseer", "cora", "minesweeper", "reed98", "synthetic", "tolokers"],
    "model": ["dense_gnn", "gnn", "mlp", "moe_gnn", "mowst"],
    "model/strong": ["gat", "gcn", "gin", "sage"],
    "model/weak": ["mlp"],
    "callbacks": ["default", "none"],
    "logger": ["csv", "none"],
    "trainer": ["cpu", "default", "gpu"],
    "experiment": ["nc_amherst41", "nc_citeseer", "nc_cora", "nc_minesweeper", "nc_reed98",
                   "nc_tolokers", "synthetic_gnn", "synthetic_moe_gnn"],
    "debug": ["fdr"],
}


def test_every_option_is_tested():
    for group, options in OPTIONS.items():
        found = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        assert found == sorted(options), group


def test_default_config(compose_cfg, tmp_path):
    cfg = compose_cfg(TINY)
    assert cfg.task_name == "train" and cfg.seed == 0 and cfg.optimized_metric == "val/acc"
    run = instantiate_run(cfg)
    assert isinstance(run["datamodule"], NodeDataModule)
    assert run["datamodule"].num_features == 32 and run["datamodule"].num_classes == 4
    net = run["net"]
    assert isinstance(net, MoEGNN) and net.in_channels == 32 and net.out_channels == 4
    assert [type(f) for f in net.ffns] == [SparseMoE, SparseMoE]
    assert isinstance(net.ffns[0].router, TopKRouter) and net.ffns[0].router.k == 2
    task = run["task"]
    assert isinstance(task, NodeClassificationTask) and task.net is net
    assert task.aux_loss_weights == {"load_balance": 0.01, "z_loss": 0.001}
    optimizer = task.configure_optimizers()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 0.01
    names = sorted(type(c).__name__ for c in run["callbacks"])
    assert names == ["EarlyStopping", "ModelCheckpoint", "RichProgressBar"]
    ckpt = next(c for c in run["callbacks"] if type(c).__name__ == "ModelCheckpoint")
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"
    assert [type(lg).__name__ for lg in run["loggers"]] == ["CSVLogger"]
    assert Path(run["loggers"][0].save_dir) == tmp_path
    trainer = run["trainer"]
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == 100
    assert Path(trainer.default_root_dir) == tmp_path


@pytest.mark.parametrize("model", OPTIONS["model"])
@pytest.mark.parametrize("callbacks", OPTIONS["callbacks"])
@pytest.mark.parametrize("logger", OPTIONS["logger"])
def test_model_callbacks_logger(compose_cfg, model, callbacks, logger):
    cfg = compose_cfg(TINY, f"model={model}", f"callbacks={callbacks}", f"logger={logger}",
                      "trainer=cpu")
    run = instantiate_run(cfg)
    assert len(run["callbacks"]) == (3 if callbacks == "default" else 0)
    assert len(run["loggers"]) == (1 if logger == "csv" else 0)
    net = run["net"]
    expected = {"moe_gnn": MoEGNN, "dense_gnn": MoEGNN, "gnn": GCN, "mlp": MLP, "mowst": Mowst}
    assert isinstance(net, expected[model])
    if isinstance(net, MoEGNN):
        num_moe = sum(isinstance(f, SparseMoE) for f in net.ffns)
        assert num_moe == (2 if model == "moe_gnn" else 0)
    assert isinstance(run["task"], MowstTask if model == "mowst" else NodeClassificationTask)


@pytest.mark.parametrize("experiment,task_name,num_moe", [("synthetic_moe_gnn",
                                                           "synthetic_moe_gnn", 2),
                                                          ("synthetic_gnn", "synthetic_gnn", 0)])
def test_experiments(compose_cfg, experiment, task_name, num_moe):
    cfg = compose_cfg(TINY, f"experiment={experiment}")
    assert cfg.task_name == task_name
    run = instantiate_run(cfg)
    assert sum(isinstance(f, SparseMoE) for f in run["net"].ffns) == num_moe


def test_gnn_baseline(compose_cfg):
    run = instantiate_run(compose_cfg(TINY, "model=dense_gnn"), trainer=False)
    net, task = run["net"], run["task"]
    dense = net.ffns[0]
    assert dense[0].out_features == 128  # k * expert hidden = 2 * 64
    # The dense baseline weights no auxiliary loss (moe_gnn's weights are not inherited).
    assert task.aux_loss_weights == {}


@pytest.mark.parametrize("trainer", ["cpu", "default"])
def test_cpu_trainers(compose_cfg, trainer):
    cfg = compose_cfg(TINY, f"trainer={trainer}")
    assert cfg.trainer.accelerator == "cpu"
    assert isinstance(instantiate_run(cfg)["trainer"], L.Trainer)


def test_gpu_trainer_composes(compose_cfg):
    cfg = compose_cfg(TINY, "trainer=gpu")  # not instantiated: no GPU here
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_epochs == 100  # inherited from trainer/default


def test_debug_fdr(compose_cfg):
    cfg = compose_cfg(TINY, "debug=fdr")
    assert cfg.trainer.fast_dev_run is True
    run = instantiate_run(cfg)
    # No progress bar and no callbacks: a RichProgressBar would clash with
    # enable_progress_bar=false.
    assert run["callbacks"] == [] and run["loggers"] == []
    assert run["trainer"].fast_dev_run is True


def test_overrides_reach_the_objects(compose_cfg):
    cfg = compose_cfg(TINY, "model.net.num_experts=4", "model.net.k=1",
                      "model.net.num_layers=3", "model.net.conv=sage",
                      "model.optimizer.lr=0.5", "model.aux_loss_weights.z_loss=0.2",
                      "data.dataset_kwargs.num_classes=3")
    run = instantiate_run(cfg, trainer=False)
    net = run["net"]
    assert net.out_channels == 3 and net.num_layers == 3 and net.conv_name == "sage"
    assert all(f.num_experts == 4 and f.router.k == 1 for f in net.ffns)
    assert run["task"].aux_loss_weights == {"load_balance": 0.01, "z_loss": 0.2}
    assert run["task"].configure_optimizers().defaults["lr"] == 0.5


@pytest.mark.parametrize("overrides,router", [
    (["+model.net.moe_kwargs.router=topp", "model.net.k=null"], TopPRouter),
    (["+model.net.moe_kwargs.router=expert_choice", "model.net.k=null"], ExpertChoiceRouter),
    (["+model.net.moe_kwargs.router=topk", "+model.net.moe_kwargs.router_kwargs.noisy=true"],
     TopKRouter),
])
def test_router_overrides(compose_cfg, overrides, router):
    net = instantiate_run(compose_cfg(TINY, *overrides), trainer=False)["net"]
    assert all(isinstance(f.router, router) for f in net.ffns)


def test_k_with_another_router_fails_clearly(compose_cfg):
    cfg = compose_cfg(TINY, "+model.net.moe_kwargs.router=topp")  # k=2 left in
    with pytest.raises(InstantiationException, match="'k' applies to the 'topk' router only"):
        instantiate_run(cfg, trainer=False)


def test_unknown_override_fails(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.net.no_such_key=1")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model=no_such_model")


STRONG = {"gcn": GCN, "sage": GraphSAGE, "gat": GAT, "gin": GIN}


@pytest.mark.parametrize("strong", OPTIONS["model/strong"])
@pytest.mark.parametrize("variant", ["mowst", "mowst_star"])
def test_mowst_options(compose_cfg, strong, variant):
    cfg = compose_cfg(TINY, "model=mowst", f"model/strong={strong}",
                      f"model.net.variant={variant}", "backbone.hidden_channels=16")
    run = instantiate_run(cfg, trainer=False)
    net, task = run["net"], run["task"]
    assert isinstance(net, Mowst) and net.variant == variant
    assert isinstance(net.weak, MLP) and isinstance(net.strong, STRONG[strong])
    assert net.strong.hidden_channels == 16 and net.strong.out_channels == 4
    assert isinstance(task, MowstTask) and task.pretrain_weak_epochs == 100


@pytest.mark.parametrize("strong", OPTIONS["model/strong"])
def test_gnn_and_mlp_baselines_share_the_backbone(compose_cfg, strong):
    cfg = compose_cfg(TINY, "model=gnn", f"model/strong={strong}", "backbone.num_layers=3",
                      "backbone.residual=true", "backbone.norm=layer_norm")
    net = instantiate_run(cfg, trainer=False)["net"]
    assert isinstance(net, MoEGNN) and net.num_layers == 3 and net.conv_name == strong
    net = instantiate_run(compose_cfg(TINY, "model=mlp"), trainer=False)["net"]
    assert isinstance(net, MLP) and net.channel_list == [32, 64, 4]


@pytest.mark.parametrize("experiment", [e for e in OPTIONS["experiment"] if e.startswith("nc_")])
def test_node_classification_experiments(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "model=mowst")
    name = experiment[3:]
    assert cfg.data.name == name and cfg.task_name == experiment
    metric = "auroc" if name in ("minesweeper", "tolokers") else "acc"
    assert cfg.data.metric == metric and cfg.optimized_metric == f"val/{metric}"
    assert cfg.callbacks.model_checkpoint.monitor == f"val/{metric}"
    assert cfg.backbone.residual == (metric == "auroc")


@pytest.mark.parametrize("data", [d for d in OPTIONS["data"] if d != "synthetic"])
def test_real_data_options(compose_cfg, real_data, data):
    from moegraph.data import REAL_DATASETS

    spec = REAL_DATASETS[data]
    root = real_data(f"{spec.folder}/{spec.subfolder}").parent
    cfg = compose_cfg(f"data={data}", f"paths.data_dir={root}",
                      f"paths.cache_dir={root.parent / 'cache'}")
    dm = instantiate_run(cfg, trainer=False)["datamodule"]
    assert isinstance(dm, NodeDataModule) and dm.name == data and dm.metric == spec.metric
