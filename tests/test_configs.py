r"""Every option of the config tree in ``conf/`` composes and instantiates."""
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, GraphSAGE

from moegraph.data import ClusterDataModule, MovieLensDataModule, NodeDataModule
from moegraph.nn import (
    PLE,
    ExpertChoiceRouter,
    HoME,
    MMoE,
    Mowst,
    SharedBottom,
    SparseMoE,
    TopKRouter,
    TopPRouter,
)
from moegraph.nn.models import GMoE, MoEGNN, MultiTaskRecommender, PatchMoE
from moegraph.tasks import MowstTask, MultiTaskLearning, NodeClassificationTask
from moegraph.train import CONFIG_DIR, instantiate_run

TINY = "data.dataset_kwargs.num_nodes=60"
NODE_MODELS = ["dense_gnn", "gmoe", "gmoe_paper", "gnn", "mlp", "moe_gnn", "mowst",
               "mowst_paper"]
MULTITASK_MODELS = {"home": HoME, "home_paper": HoME, "mmoe": MMoE, "ple": PLE,
                    "shared_bottom": SharedBottom}
# The multi-task configs on the small synthetic rating table (no files needed).
SYNTHETIC_RATINGS = "data.name=synthetic"
OPTIONS = {
    "data": ["amherst41", "citeseer", "clusters", "cora", "minesweeper", "molhiv", "movielens",
             "mtl_synthetic", "ogbg_molhiv", "reed98", "synthetic", "tabular", "tolokers",
             "ogbn_arxiv", "ogbn_products", "ogbn_proteins", "pyg_file"],
    "model": ["dense_gnn", "gmoe", "gmoe_paper", "gnn", "graph_gmoe", "graph_gnn", "home",
              "home_paper", "mlp",
              "mmoe", "moe_gnn", "mowst", "mowst_paper", "patch_moe", "patch_moe_paper", "ple",
              "shared_bottom"],
    "model/strong": ["gat", "gcn", "gin", "sage"],
    "model/weak": ["mlp"],
    "callbacks": ["default", "none"],
    "logger": ["csv", "none", "tensorboard", "wandb", "many"],
    "trainer": ["cpu", "ddp", "default", "gpu"],
    "experiment": ["cluster_moe", "cluster_single", "molhiv_gcn", "molhiv_gin",
                   "molhiv_gin_gmoe", "molhiv_gmoe", "movielens_home", "movielens_mmoe",
                   "movielens_ple", "movielens_shared_bottom", "mtl_synthetic_home",
                   "mtl_synthetic_mmoe", "mtl_synthetic_ple", "mtl_synthetic_shared_bottom",
                   "nc_amherst41", "nc_citeseer",
                   "nc_cora", "nc_minesweeper", "nc_reed98", "nc_tolokers", "synthetic_gnn",
                   "synthetic_moe_gnn"],
    "debug": ["fdr"],
    "hparams_search": ["dense_gnn", "gmoe", "gnn", "mlp", "moe_gnn", "mowst",
                       "mowst_star"],
}
# Files that other options of their group build on (their name starts with "_").
BASES = {"data": ["_real"], "model": ["_multitask", "_node"], "model/strong": ["_base"],
         "experiment": ["_movielens", "_mtl_synthetic", "_nc", "_nc_heterophilous"],
         "hparams_search": ["_optuna"]}
# What an option of a group needs beside it to compose.
NEEDS = {"model/strong": ["model=gnn"], "model/weak": ["model=mlp"]}


def test_every_option_is_tested():
    for group, options in OPTIONS.items():
        found = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        assert found == sorted(options + BASES.get(group, [])), group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in OPTIONS.items() for o in opts])
def test_every_option_composes_and_resolves(compose_cfg, group, option):
    cfg = compose_cfg(*NEEDS.get(group, []), f"{group}={option}")
    resolved = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in cfg.items() if k != "hydra"}
    assert resolved["model"]["_target_"].startswith("moegraph.tasks.")
    assert "_target_" in resolved["data"] and "_target_" in resolved["trainer"]


def test_a_base_is_not_a_choice(compose_cfg):
    cfg = compose_cfg("data=_real")  # a real data set without its name
    with pytest.raises(MissingMandatoryValue, match="name"):
        instantiate_run(cfg, trainer=False)


def test_default_config(compose_cfg, tmp_path):
    cfg = compose_cfg(TINY)
    assert cfg.task_name == "train" and cfg.seed == 0 and cfg.optimized_metric == "val/acc"
    run = instantiate_run(cfg)
    assert isinstance(run["datamodule"], NodeDataModule)
    assert run["datamodule"].num_features == 32 and run["datamodule"].num_classes == 4
    net = run["net"]
    assert isinstance(net, MoEGNN) and net.in_channels == 32 and net.out_channels == 4
    # PyG's plain 2-layer stack: one MoE feed-forward block, between the convolutions
    assert [type(f) for f in net.ffns] == [SparseMoE] and len(net.convs) == 2
    assert net.convs[-1].out_channels == 4 and net.lin_out is None
    # top-1 routed experts beside one always-on shared expert of the same width
    assert isinstance(net.ffns[0].router, TopKRouter) and net.ffns[0].router.k == 1
    assert net.ffns[0].num_shared_experts == 1 and net.ffns[0].shared[0].out_features == 64
    task = run["task"]
    assert isinstance(task, NodeClassificationTask) and task.net is net
    assert task.aux_loss_weights == {"load_balance": 0.01, "z_loss": 0.001}
    optimizer = task.configure_optimizers()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 0.01
    names = sorted(type(c).__name__ for c in run["callbacks"])
    assert names == ["EarlyStopping", "ModelCheckpoint", "RichProgressBar", "RunCheckpoint"]
    ckpt = next(c for c in run["callbacks"] if type(c).__name__ == "ModelCheckpoint")
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"
    assert [type(lg).__name__ for lg in run["loggers"]] == ["CSVLogger"]
    assert Path(run["loggers"][0].save_dir) == tmp_path
    trainer = run["trainer"]
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == 100
    assert Path(trainer.default_root_dir) == tmp_path


@pytest.mark.parametrize("model", NODE_MODELS)
@pytest.mark.parametrize("callbacks", OPTIONS["callbacks"])
@pytest.mark.parametrize("logger", [g for g in OPTIONS["logger"] if g != "wandb"])
def test_model_callbacks_logger(compose_cfg, model, callbacks, logger):
    cfg = compose_cfg(TINY, f"model={model}", f"callbacks={callbacks}", f"logger={logger}",
                      "trainer=cpu")
    run = instantiate_run(cfg)
    # every run adds RunCheckpoint (config and random states in the checkpoints)
    assert len(run["callbacks"]) == (4 if callbacks == "default" else 1)
    assert len(run["loggers"]) == {"csv": 1, "none": 0, "tensorboard": 1, "many": 2}[logger]
    net = run["net"]
    expected = {"moe_gnn": MoEGNN, "dense_gnn": MoEGNN, "gnn": GCN, "mlp": MLP, "mowst": Mowst,
                "mowst_paper": Mowst, "gmoe": GMoE, "gmoe_paper": GMoE}
    assert isinstance(net, expected[model])
    if isinstance(net, MoEGNN):
        num_moe = sum(isinstance(f, SparseMoE) for f in net.ffns)
        assert num_moe == (1 if model == "moe_gnn" else 0)  # 2 layers: one block between
    assert isinstance(run["task"], MowstTask if model.startswith("mowst")
                      else NodeClassificationTask)


@pytest.mark.parametrize("experiment,task_name,num_moe", [("synthetic_moe_gnn",
                                                           "synthetic_moe_gnn", 1),
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
    assert dense[0].out_features == 128  # moe_gnn's active width: 1 routed + 1 shared x 64
    # The dense baseline weights no auxiliary loss (moe_gnn's weights are not inherited).
    assert task.aux_loss_weights == {}


@pytest.mark.parametrize("model", ["moe_gnn", "dense_gnn"])
def test_moe_gnn_feed_forward_starts_at_zero_scale_by_default(compose_cfg, model):
    r"""``model=moe_gnn`` and its dense twin put ReZero on every feed-forward
    part (a learned per-channel scale started at 0); ``ffn_scale=null`` is the
    unscaled branch of the older runs."""
    net = instantiate_run(compose_cfg(TINY, f"model={model}"), trainer=False)["net"]
    assert net.ffn_scale == 0.0 and net.ffn_scales is not None
    assert len(net.ffn_scales) == len(net.ffns) > 0
    assert all(g.requires_grad and torch.equal(g, torch.zeros_like(g)) for g in net.ffn_scales)
    off = instantiate_run(compose_cfg(TINY, f"model={model}", "model.net.ffn_scale=null"),
                          trainer=False)["net"]
    assert off.ffn_scale is None and off.ffn_scales is None


@pytest.mark.parametrize("model", ["moe_gnn", "dense_gnn"])
def test_moe_gnn_feed_forward_is_spectral_and_bias_free_by_default(compose_cfg, model):
    from moegraph.nn.experts import SpectralLinear

    net = instantiate_run(compose_cfg(TINY, f"model={model}"), trainer=False)["net"]
    assert net.spectral_norm and not net.ffn_bias
    block = net.ffns[0]
    if model == "moe_gnn":
        assert block.experts.spectral_norm and block.experts.bias1 is None
    else:
        assert all(isinstance(block[i], SpectralLinear) and block[i].bias is None
                   for i in (0, 2))
    off = instantiate_run(compose_cfg(TINY, f"model={model}", "model.net.spectral_norm=false",
                                      "model.net.ffn_bias=true"), trainer=False)["net"]
    assert not off.spectral_norm and off.ffn_bias
    assert not any(isinstance(m, SpectralLinear) for m in off.modules())


@pytest.mark.parametrize("trainer", ["cpu", "default"])
def test_cpu_trainers(compose_cfg, trainer):
    import torch

    cfg = compose_cfg(TINY, f"trainer={trainer}")
    # trainer=default takes a GPU when there is one
    assert cfg.trainer.accelerator == ("cpu" if trainer == "cpu" else "auto")
    made = instantiate_run(cfg)["trainer"]
    assert isinstance(made, L.Trainer)
    on_gpu = trainer == "default" and torch.cuda.is_available()
    assert type(made.accelerator).__name__ == ("CUDAAccelerator" if on_gpu else "CPUAccelerator")


def test_gpu_trainer_composes(compose_cfg):
    cfg = compose_cfg(TINY, "trainer=gpu")  # not instantiated: no GPU here
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_epochs == 100  # inherited from trainer/default


def test_ddp_trainer(compose_cfg):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_cfg(TINY, "trainer=ddp")
    assert cfg.trainer.max_epochs == 100  # inherited from trainer/default
    trainer = instantiate_run(cfg)["trainer"]
    strategy = trainer.strategy
    assert isinstance(strategy, DDPStrategy) and trainer.num_devices == 2
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert strategy._start_method == "popen"
    assert strategy._get_process_group_backend() == "gloo"  # CPU
    assert trainer._accelerator_connector.use_distributed_sampler


def test_debug_fdr(compose_cfg):
    cfg = compose_cfg(TINY, "debug=fdr")
    assert cfg.trainer.fast_dev_run is True
    run = instantiate_run(cfg)
    # No progress bar and no callbacks: a RichProgressBar would clash with
    # enable_progress_bar=false.
    assert [type(c).__name__ for c in run["callbacks"]] == ["RunCheckpoint"]
    assert run["loggers"] == []
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


def test_moe_gnn_routing_options(compose_cfg):
    r"""``model=moe_gnn``: noise-free top-k routers reading the dropped-out
    input by default; the overrides of the ablation (section 6 of
    ``graph_moe_ablation.md``) reach the objects."""
    net = instantiate_run(compose_cfg(TINY), trainer=False)["net"]
    assert not net.route_before_dropout
    assert net.ffns and all(isinstance(f.router, TopKRouter) and not f.router.noisy
                            for f in net.ffns)
    on = instantiate_run(compose_cfg(TINY, "model.net.route_before_dropout=true",
                                     "+model.net.moe_kwargs.router_kwargs.noisy=true",
                                     "+model.net.moe_kwargs.expert_init=shared"),
                         trainer=False)["net"]
    assert on.route_before_dropout
    assert all(f.router.noisy and f.experts.init == "shared" for f in on.ffns)


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
    assert isinstance(task, MowstTask) and task.pretrain_weak_epochs == 300
    assert task.crossfit_folds == 2 and task.gate_holdout == 0.0
    assert task.select_on == "deterministic"


@pytest.mark.parametrize("strong", ["gcn", "sage"])
def test_mowst_paper_is_mowst_with_the_papers_formulation(compose_cfg, strong):
    cfg = compose_cfg(TINY, "model=mowst_paper", f"model/strong={strong}")
    task = instantiate_run(cfg, trainer=False)["task"]
    assert isinstance(task, MowstTask) and isinstance(task.net.strong, STRONG[strong])
    assert task.gate_holdout == 0.0 and task.select_on == "expected"
    assert task.crossfit_folds == 0 and task.pretrain_weak_epochs == 300
    assert task.net.gate_type == "mlp"


@pytest.mark.parametrize("strong", OPTIONS["model/strong"])
def test_gnn_and_mlp_baselines_share_the_backbone(compose_cfg, strong):
    cfg = compose_cfg(TINY, "model=gnn", f"model/strong={strong}", "backbone.num_layers=3",
                      "backbone.residual=true", "backbone.norm=layer_norm")
    net = instantiate_run(cfg, trainer=False)["net"]
    assert isinstance(net, MoEGNN) and net.num_layers == 3 and net.conv_name == strong
    net = instantiate_run(compose_cfg(TINY, "model=mlp"), trainer=False)["net"]
    assert isinstance(net, MLP) and net.channel_list == [32, 64, 4]


def test_gmoe_follows_the_backbone(compose_cfg):
    cfg = compose_cfg("experiment=nc_cora", "model=gmoe", "backbone.hidden_channels=32",
                      "backbone.num_layers=3")
    net = hydra.utils.instantiate(cfg.model.net, in_channels=8, out_channels=3)
    assert isinstance(net, GMoE) and net.num_layers == 3 and net.hidden_channels == 32
    conv = net.convs[0]
    # one expert per hop, balanced each within its hop: the router learns the hop
    assert conv.num_experts == 2 and conv.num_hop2_experts == 1 and conv.router.k == 1
    assert conv.router.noisy and conv.router.straight_through
    assert conv.expert_init == "shared"
    assert conv.balance == "per_hop" and conv.router.balance_groups == (1, 1)
    assert torch.equal(conv.experts.weight[1], conv.experts.weight[0])
    assert cfg.model.aux_loss_weights == {"importance": 0.01}
    # the experts' coupled L2 scaled by their share k / E = 1/2 (Adam of nc_cora: 5e-4)
    assert cfg.model.expert_weight_decay == "load_share"
    task = hydra.utils.instantiate(cfg.model, net=net, num_classes=3)
    opt = task.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and not opt.defaults["decoupled_weight_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([5e-4] + [2.5e-4] * 3)


@pytest.mark.parametrize("experiment", ["nc_cora", "nc_minesweeper"])
def test_gmoe_has_the_input_dropout_of_its_gcn_baseline(compose_cfg, experiment):
    # GMoE differs from model=gnn by its hop experts only: none on the input
    # features in the plain stack (PyG's GCN), backbone.dropout in the residual layout
    cfg = compose_cfg(f"experiment={experiment}", "model=gmoe")
    gmoe = hydra.utils.instantiate(cfg.model.net, in_channels=8, out_channels=3)
    gnn_cfg = compose_cfg(f"experiment={experiment}", "model=gnn")
    gcn = hydra.utils.instantiate(gnn_cfg.model.net)(in_channels=8, out_channels=3)
    residual = experiment == "nc_minesweeper"
    assert cfg.backbone.residual == residual
    expected = cfg.backbone.dropout if residual else 0.0
    assert gmoe.input_dropout == expected
    if residual:
        assert isinstance(gmoe, MoEGNN) and gcn.input_dropout == expected > 0.0
    else:
        assert isinstance(gmoe, GMoE) and gcn.__class__.__name__ == "GCN"


def test_gmoe_paper_is_gmoe_with_the_papers_router(compose_cfg):
    cfg = compose_cfg("experiment=nc_cora", "model=gmoe_paper")
    net = hydra.utils.instantiate(cfg.model.net, in_channels=8, out_channels=3)
    assert isinstance(net, GMoE)
    conv = net.convs[0]
    assert conv.router.noisy and not conv.router.straight_through and conv.router.normalize
    assert conv.expert_init == "independent" and conv.hop2 == "square"
    assert conv.balance == "all" and conv.router.balance_groups is None
    assert conv.num_experts == 4 and conv.num_hop2_experts == 2
    assert cfg.model.expert_weight_decay is None
    assert not torch.equal(conv.experts.weight[1], conv.experts.weight[0])


@pytest.mark.parametrize("experiment", [e for e in OPTIONS["experiment"] if e.startswith("nc_")])
def test_node_classification_experiments(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "model=mowst")
    name = experiment[3:]
    assert cfg.data.name == name and cfg.task_name == experiment
    metric = "auroc" if name in ("minesweeper", "tolokers") else "acc"
    assert cfg.data.metric == metric and cfg.optimized_metric == f"val/{metric}"
    assert cfg.callbacks.model_checkpoint.monitor == f"val/{metric}"
    assert cfg.backbone.residual == (metric == "auroc")


@pytest.mark.parametrize("data", [d for d in OPTIONS["data"]
                                  if d not in ("synthetic", "movielens", "clusters", "pyg_file",
                                               "mtl_synthetic", "tabular", "molhiv",
                                               "ogbg_molhiv")])
def test_real_data_options(compose_cfg, real_data, data):
    from moegraph.data import REAL_DATASETS

    spec = REAL_DATASETS[data]
    root = real_data(f"{spec.folder}/{spec.subfolder}").parent
    cfg = compose_cfg(f"data={data}", f"paths.data_dir={root}",
                      f"paths.cache_dir={root.parent / 'cache'}")
    dm = instantiate_run(cfg, trainer=False)["datamodule"]
    assert isinstance(dm, NodeDataModule) and dm.name == data and dm.metric == spec.metric


@pytest.mark.parametrize("model", list(MULTITASK_MODELS))
def test_multitask_models(compose_cfg, model):
    cfg = compose_cfg("data=movielens", SYNTHETIC_RATINGS, f"model={model}")
    run = instantiate_run(cfg, trainer=False)
    assert isinstance(run["datamodule"], MovieLensDataModule)
    net, task = run["net"], run["task"]
    assert isinstance(net, MultiTaskRecommender) and type(net.head) is MULTITASK_MODELS[model]
    assert net.head.tasks == ["watch", "like", "rating"] and net.head.in_channels == 48
    if model.startswith("home"):  # the paper's form: expert batch norm starting at gain 1
        gain = 1.0 if model == "home_paper" else 0.1
        assert all((lv.norm.weight == gain).all() for lv in net.head.levels)
    assert isinstance(task, MultiTaskLearning) and task.net is net
    assert task.task_weights == {"watch": 1.0, "like": 1.0, "rating": 1.0}
    assert task.tasks["rating"]["type"] == "regression"


@pytest.mark.parametrize("experiment", [e for e in OPTIONS["experiment"]
                                        if e.startswith("movielens_")])
def test_movielens_experiments(compose_cfg, tmp_path, experiment):
    cfg = compose_cfg(f"experiment={experiment}", SYNTHETIC_RATINGS)
    # the study's protocol, the same for every model: early stopping and checkpoint on the
    # validation mean score (higher is better), room to converge before the epoch cap
    assert cfg.task_name == experiment and cfg.optimized_metric == "val/mean_score"
    assert cfg.data._target_ == "moegraph.data.MovieLensDataModule"
    run = instantiate_run(cfg)
    by_name = {type(c).__name__: c for c in run["callbacks"]}
    stop, ckpt = by_name["EarlyStopping"], by_name["ModelCheckpoint"]
    assert stop.monitor == "val/mean_score" and stop.mode == "max" and stop.patience == 5
    assert ckpt.monitor == "val/mean_score" and ckpt.mode == "max"
    assert run["trainer"].max_epochs == 40 and run["datamodule"].batch_size == 4096
    assert type(run["net"].head).__name__ == {"movielens_home": "HoME", "movielens_mmoe": "MMoE",
                                              "movielens_ple": "PLE",
                                              "movielens_shared_bottom": "SharedBottom"}[experiment]


@pytest.mark.parametrize("override,attr,value", [
    ("model.net.head.expert_norm=null", "expert_norm", None),
    ("model.net.head.expert_norm=layer_norm", "expert_norm", "layer_norm"),
    ("model.net.head.hierarchy_mask=false", "hierarchy_mask", False),
    ("model.net.head.feature_gate=false", "feature_gate", False),
    ("model.net.head.self_gate=false", "self_gate", False),
])
def test_home_ablation_overrides(compose_cfg, override, attr, value):
    run = instantiate_run(compose_cfg("experiment=movielens_home", SYNTHETIC_RATINGS, override),
                          trainer=False)
    assert getattr(run["net"].head, attr) == value


def test_multitask_overrides_reach_the_objects(compose_cfg):
    cfg = compose_cfg("experiment=movielens_mmoe", SYNTHETIC_RATINGS, "data.tasks=[like,rating]",
                      "model.net.head.num_experts=3", "+model.task_weights.rating=0.2",
                      "model.uncertainty_weighting=true", "model.net.embedding_channels=8")
    run = instantiate_run(cfg, trainer=False)
    head, task = run["net"].head, run["task"]
    assert head.tasks == ["like", "rating"] and head.num_experts == 3 and head.in_channels == 24
    assert task.task_weights == {"like": 1.0, "rating": 0.2} and task.log_vars is not None


def test_multitask_config_errors(compose_cfg):
    cfg = compose_cfg("experiment=movielens_home", SYNTHETIC_RATINGS,
                      "model.net.head.groups.engage=[watch,click]")
    with pytest.raises(InstantiationException, match="task 'click' in meta-task group 'engage' "
                                                     "is not in the task list"):
        instantiate_run(cfg, trainer=False)
    # HoME's groups name all three tasks; the data labels only two.
    cfg = compose_cfg("experiment=movielens_home", SYNTHETIC_RATINGS, "data.tasks=[watch,like]")
    with pytest.raises(InstantiationException, match="not in the task list"):
        instantiate_run(cfg, trainer=False)
    cfg = compose_cfg("experiment=movielens_mmoe", SYNTHETIC_RATINGS,
                      "+model.task_weights.click=1.0")
    with pytest.raises(InstantiationException, match="'task_weights' names \\['click'\\]"):
        instantiate_run(cfg, trainer=False)


def test_movielens_missing_files_error(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=movielens_mmoe", f"paths.data_dir={tmp_path}/nothing")
    with pytest.raises(FileNotFoundError, match="MovieLens-100K: .* missing in .*Offline, put"):
        instantiate_run(cfg, trainer=False)


@pytest.mark.parametrize("experiment,num_experts", [("cluster_moe", 8), ("cluster_single", 1)])
def test_cluster_experiments(compose_cfg, experiment, num_experts):
    cfg = compose_cfg(f"experiment={experiment}", "seed=3", "data.num_train=20",
                      "data.num_val=10", "data.num_test=20")
    assert cfg.task_name == experiment and cfg.optimized_metric == "val/acc"
    run = instantiate_run(cfg)
    dm, net, task = run["datamodule"], run["net"], run["task"]
    assert isinstance(dm, ClusterDataModule) and dm.kwargs["seed"] == 3
    assert dm.data.x.shape == (50, 4, 50)
    assert isinstance(net, PatchMoE) and net.num_experts == num_experts
    assert net.in_channels == 50 and net.hidden_channels == 16 and net.act == "cubic"
    assert (net.router is None) == (num_experts == 1)
    assert isinstance(task, NodeClassificationTask) and task.aux_loss_weights == {}
    assert type(task.configure_optimizers()).__name__ == "Adam"
    assert run["trainer"].max_epochs == 200


def test_patch_moe_on_other_data_fails_clearly(compose_cfg):
    cfg = compose_cfg(TINY, "model=patch_moe")  # the 4-class CSBM graph
    with pytest.raises((InstantiationException, ValueError),
                       match="'out_channels' must be 2|model=patch_moe does not fit"):
        instantiate_run(cfg, trainer=False)
