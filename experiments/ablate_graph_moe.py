r"""Ablation of the MoE-GNN block and of GMoE: what costs accuracy on
Planetoid and on the heterophilous sets.

Each variant is a list of config overrides of ``moegraph-train`` (the same
config tree, ``experiment=nc_<dataset>``), trained by a lean full-batch loop
with the protocol of the Lightning task (AdamW of the model config, the
weighted aux losses, ``trainer.max_epochs``, early stopping on the validation
metric with the experiment's patience, test at the best validation epoch),
without Lightning's per-epoch overhead, so that a Cora run takes seconds::

    python experiments/ablate_graph_moe.py --datasets cora citeseer --seeds 3
    python experiments/ablate_graph_moe.py --group gmoe --datasets amherst41 --seeds 3

Each run is cached as JSON under ``--runs`` (key: dataset, variant, seed and a
hash of the overrides, so a changed variant is never read from an old run);
the table goes to ``experiments/results/graph_moe_ablation.md`` (one section
per group).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
SPLIT_DATASETS = ("minesweeper", "tolokers", "amherst41", "reed98")

# Variants: name -> overrides added to ``experiment=nc_<dataset>``.
# (spectral_norm=false, ffn_bias=true: plain FFN weights with biases, what
# model=moe_gnn built when these variants ran; the cached runs were renamed to
# the hash with them.)
OLD_MOE = ["model=moe_gnn", "model.net.norm=layer_norm", "model.net.dropout=0.2",
           "model.net.residual=true", "model.net.input_dropout=0.0",
           "model.net.hidden_channels=64", "model.net.num_layers=2",
           "model.net.spectral_norm=false", "model.net.ffn_bias=true"]
OLD_DENSE = ["model=dense_gnn"] + OLD_MOE[1:]
# GMoE as first studied: hop-2 experts over the pairs at distance two, noisy
# top-1 gate renormalised over the chosen expert (always 1). The GMoE variants
# start from model=gmoe_paper (the paper's router, independent experts: the
# default of model=gmoe when they were run); model=gmoe is now
# "gmoe, straight-through gate, shared expert init".
OLD_GMOE = ["model=gmoe_paper", "model.net.hop2=pairs", "model.net.router_kwargs=null"]
GROUPS: dict[str, dict[str, list[str]]] = {
    "block": {
        "gcn": ["model=gnn", "model/strong=gcn"],
        "mlp": ["model=mlp"],
        "dense, old default": OLD_DENSE,
        "moe, old default": OLD_MOE,
        "dense, input dropout 0.5": OLD_DENSE + ["model.net.input_dropout=0.5"],
        "dense, dropout 0.5 (input too)": OLD_DENSE + ["model.net.input_dropout=0.5",
                                                       "model.net.dropout=0.5"],
        "dense, no norm": OLD_DENSE + ["model.net.norm=null"],
        # tolokers' 150 epochs end while every model still improves: does ReZero
        # (the default since section 14) lose there only because it fits later?
        "moe, 300 epochs": ["model=moe_gnn", "trainer.max_epochs=300"],
        "moe, no ffn scale, 300 epochs": ["model=moe_gnn", "model.net.ffn_scale=null",
                                          "trainer.max_epochs=300"],
        "dense, no FFN": OLD_DENSE + ["model.net.ffn=none"],
        "dense, no conv residual": OLD_DENSE + ["model.net.residual=false"],
        "dense, no conv residual, dropout 0.5": OLD_DENSE + [
            "model.net.residual=false", "model.net.input_dropout=0.5",
            "model.net.dropout=0.5"],
        "dense, no conv residual, dropout 0.5, no norm": OLD_DENSE + [
            "model.net.residual=false", "model.net.input_dropout=0.5",
            "model.net.dropout=0.5", "model.net.norm=null"],
        "moe, no conv residual, dropout 0.5": OLD_MOE + [
            "model.net.residual=false", "model.net.input_dropout=0.5",
            "model.net.dropout=0.5"],
        "moe, no conv residual, dropout 0.5, no norm": OLD_MOE + [
            "model.net.residual=false", "model.net.input_dropout=0.5",
            "model.net.dropout=0.5", "model.net.norm=null"],
    },
    "gmoe": {
        "gcn": ["model=gnn", "model/strong=gcn"],
        "gmoe, old default": OLD_GMOE,
        "gmoe, hop-1 experts only": OLD_GMOE + ["model.net.num_hop2_experts=0"],
        "gmoe, no balance loss": OLD_GMOE + ["model.aux_loss_weights.importance=0.0"],
        "gmoe, full-softmax gate": OLD_GMOE[:-1] + [
            "model.net.router_kwargs={noisy:true,normalize:false}"],
        "gmoe, hop2=square": OLD_GMOE[:-2] + ["model.net.hop2=square",
                                              "model.net.router_kwargs=null"],
        "gmoe, hop2=square, full-softmax gate": OLD_GMOE[:-2] + [
            "model.net.hop2=square", "model.net.router_kwargs={noisy:true,normalize:false}"],
        "gmoe, hop2=square, no router noise": OLD_GMOE[:-2] + [
            "model.net.hop2=square", "model.net.router_kwargs={noisy:false}"],
        "gmoe, hop2=square, no router noise, full-softmax gate": OLD_GMOE[:-2] + [
            "model.net.hop2=square", "model.net.router_kwargs={noisy:false,normalize:false}"],
        # hop2=square (then the default) with fewer or no hop-2 experts:
        # is the loss from the hop-2 aggregation or from splitting the nodes?
        "gmoe, hop2=square, hop-1 experts only": ["model=gmoe_paper",
                                                  "model.net.num_hop2_experts=0"],
        "gmoe, hop2=square, 2 experts (1 hop-1, 1 hop-2)": ["model=gmoe_paper",
                                                            "model.net.num_experts=2"],
        # the untrained router: training routes at random (noise), the experts
        # start unrelated; shared init starts every expert as the same GCN
        "gmoe, shared expert init": ["model=gmoe_paper", "model.net.expert_init=shared"],
        "gmoe, shared expert init, no router noise": [
            "model=gmoe_paper", "model.net.expert_init=shared",
            "model.net.router_kwargs={noisy:false}"],
        # a router trained by the task at k=1: gate value 1, gradient of p_e
        "gmoe, straight-through gate": [
            "model=gmoe_paper", "model.net.router_kwargs={noisy:true,straight_through:true}"],
        "gmoe, straight-through gate, no router noise": [
            "model=gmoe_paper", "model.net.router_kwargs={noisy:false,straight_through:true}"],
        "gmoe, straight-through gate, shared expert init": [
            "model=gmoe_paper", "model.net.router_kwargs={noisy:true,straight_through:true}",
            "model.net.expert_init=shared"],
        # model=gmoe (straight-through gate, shared init) without hop-2 experts
        "gmoe (straight-through, shared init), hop-1 experts only": [
            "model=gmoe", "model.net.num_hop2_experts=0"],
        "gmoe, straight-through gate, no router noise, shared expert init": [
            "model=gmoe_paper", "model.net.router_kwargs={noisy:false,straight_through:true}",
            "model.net.expert_init=shared"],
        # model=gmoe before section 7 (straight-through gate, shared init,
        # hop2=square); these variants ran as model=gmoe then, the cached runs
        # renamed to the hash with the hop2 pinned
        "gmoe (straight-through, shared init), hop2=square": ["model=gmoe",
                                                              "model.net.hop2=square"],
        # model=gmoe (straight-through gate, shared init) with a hop-2 expert
        # that keeps the hop-1 neighbourhood, (Â + Â²) X / 2, and/or a router
        # noise of constant std (not learned: it cannot grow with the logits)
        "gmoe, hop2=mix": ["model=gmoe", "model.net.hop2=mix"],
        "gmoe, constant router noise": [
            "model=gmoe", "model.net.hop2=square", "+model.net.router_kwargs.noise=constant"],
        "gmoe, hop2=mix, constant router noise": [
            "model=gmoe", "model.net.hop2=mix",
            "+model.net.router_kwargs.noise=constant"],
        "gmoe (straight-through, shared init), no balance loss": [
            "model=gmoe", "model.net.hop2=square", "model.aux_loss_weights.importance=0.0"],
        # hop-2 experts that are hop-1 experts plus a zero-initialised term on
        # Â² X: Â X W_e + Â² X W'_e (MixHop's powers 1 and 2, own weights)
        "gmoe, hop2=concat": ["model=gmoe", "model.net.hop2=concat"],
        "gmoe, hop2=concat, constant router noise": [
            "model=gmoe", "model.net.hop2=concat", "+model.net.router_kwargs.noise=constant"],
        # one learned scalar per hop-2 expert instead of W': ((1 - a) Â + a Â²) X W_e
        "gmoe, hop2=blend": ["model=gmoe", "model.net.hop2=blend"],
        # every layer adds a dense GCN that every node runs (DeepSeekMoE's shared
        # expert, DeepSpeed's Residual-MoE): the routed experts learn corrections
        "gmoe, shared expert": ["model=gmoe", "model.net.shared_expert=true"],
        # balance the hop-1 experts and the hop-2 experts each among themselves
        "gmoe, per-hop balance": ["model=gmoe", "model.net.balance=per_hop"],
        # one expert per hop: the router only picks each node's receptive field
        "gmoe, per-hop balance, 2 experts (1 per hop)": [
            "model=gmoe", "model.net.balance=per_hop", "model.net.num_experts=2"],
        # model=gmoe reduced to one expert: a GCN on Â X (HopMoEConv's own
        # aggregation, not PyG's GCNConv) or one on Â² X in every layer; where GMoE
        # beats GCN, is it the hop the router picks or the convolution itself?
        "gmoe, 1 expert, hop 1 only": ["model=gmoe", "model.net.balance=per_hop",
                                       "model.net.num_experts=1",
                                       "model.net.num_hop2_experts=0"],
        "gmoe, 1 expert, hop 2 only": ["model=gmoe", "model.net.balance=per_hop",
                                       "model.net.num_experts=1",
                                       "model.net.num_hop2_experts=1"],
        # In the residual layout (minesweeper, tolokers) model=gnn drops out its input
        # features (backbone.dropout) and model=gmoe did not (make_gmoe's
        # input_dropout 0.0): each with the other's input dropout
        "gcn, no input dropout": ["model=gnn", "model/strong=gcn",
                                  "+backbone.strong.input_dropout=0.0"],
        "gmoe, per-hop balance, 2 experts (1 per hop), input dropout as GCN": [
            "model=gmoe", "model.net.balance=per_hop", "model.net.num_experts=2",
            "+model.net.input_dropout=null"],
        # tolokers' 150-epoch budget ends while GCN and GMoE still improve (best
        # epochs 137-149): the two with twice the budget
        "gcn, 300 epochs": ["model=gnn", "model/strong=gcn", "trainer.max_epochs=300"],
        "gmoe, per-hop balance, 2 experts (1 per hop), 300 epochs": [
            "model=gmoe", "model.net.balance=per_hop", "model.net.num_experts=2",
            "trainer.max_epochs=300"],
    },
}
# Since 2026-12-03 model=gmoe takes GCN's input dropout (input_dropout: null); the
# variants below ran before, with none: the same network in the plain stack, but on
# minesweeper and tolokers (residual layout) a rerun of a cached "model=gmoe" variant
# would now drop 20% of the input features (section 13 of graph_moe_ablation.md).
# model=gmoe balanced every expert against every other (balance: all) with 4 experts
# until section 11 made it per_hop with 2: the variants that ran as model=gmoe pin what
# they ran with (their cached runs were renamed to the hash with the pins).
for _overrides in GROUPS["gmoe"].values():
    if _overrides[0] != "model=gmoe":
        continue
    if not any(o.startswith("model.net.balance=") for o in _overrides):
        _overrides.insert(1, "model.net.balance=all")
    if not any(o.startswith("model.net.num_experts=") for o in _overrides):
        _overrides.insert(1, "model.net.num_experts=4")


def run_key(dataset: str, variant: str, overrides: list[str], seed: int) -> str:
    digest = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() else "_" for c in variant).strip("_")
    return f"{dataset}__{slug}__{digest}__seed{seed}.json"


def overrides_for(dataset: str, variant_overrides: list[str], seed: int) -> list[str]:
    out = [f"experiment=nc_{dataset}", f"seed={seed}", "logger=none", *variant_overrides]
    if dataset in SPLIT_DATASETS:
        out.append(f"data.split={seed}")
    return out


def score(logits, y, metric: str) -> float:
    import torch

    if metric == "auroc":
        from torchmetrics.functional.classification import binary_auroc

        return float(binary_auroc(torch.softmax(logits, -1)[:, 1], y))
    return float((logits.argmax(-1) == y).float().mean())


def compose_lean(overrides: list[str]) -> Any:
    r"""The config of ``overrides`` (``conf/train.yaml``, as ``moegraph-train``
    composes it), set as Hydra's current config so that ``paths.*`` resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from moegraph.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def lean_setup(overrides: list[str]) -> tuple[Any, Any, Any, Any]:
    r"""``(cfg, task, data, optimizer)`` of one configuration for a plain
    training loop: the config seeds torch, then the task, its full graph and
    the task's own optimizer (with its parameter groups) are built."""
    import torch

    from moegraph.train import instantiate_run

    cfg = compose_lean(overrides)
    torch.manual_seed(cfg.seed)
    run = instantiate_run(cfg, trainer=False)
    task = run["task"]
    opt = task.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    return cfg, task, run["datamodule"].data, opt


def lean_step(net: Any, task: Any, data: Any, opt: Any) -> tuple[Any, Any]:
    r"""One full-batch training step of the lean loop, as the Lightning task
    takes it: ``net`` in training mode, cross-entropy on the training nodes
    plus the task's weighted aux losses, backward, optimizer step. Returns the
    training-mode output and the cross-entropy (without the aux losses)."""
    import torch.nn.functional as F

    from moegraph.nn.output import as_model_output
    from moegraph.tasks.node_classification import weighted_aux_loss

    net.train()
    opt.zero_grad()
    out = as_model_output(net(data.x, data.edge_index))
    ce = F.cross_entropy(out.logits[data.train_mask], data.y[data.train_mask])
    (ce + weighted_aux_loss(out.aux_loss, task.aux_loss_weights, ce)).backward()
    opt.step()
    return out, ce


def train_lean(overrides: list[str], make_net: Callable[[Any, Any], Any] | None = None,
               diagnose: Callable[[Any, Any], dict] | None = None) -> dict:
    r"""Fit and test one configuration with the protocol of the Lightning
    task, in a plain loop: returns the scores, epochs (run and best), time
    and the expert load of every routed layer on the full graph (eval mode).

    ``make_net(cfg, data)``, if given, builds the network in place of the
    config's (a hand-built layout trained under the config's protocol:
    optimiser, aux-loss weights, epochs, patience); ``diagnose(net, data)``
    adds its entries to the record, called on the best-validation state in
    eval mode."""
    import torch

    from moegraph.nn.output import as_model_output

    cfg, task, data, opt = lean_setup(overrides)
    net, metric = task.net, cfg.data.get("metric", "acc")
    if make_net is not None:  # a hand-built network: one group, the task's optimizer
        torch.manual_seed(cfg.seed)
        net = make_net(cfg, data)
        opt = task.optimizer_factory(params=net.parameters())
    patience = cfg.callbacks.early_stopping.patience
    best, best_state, since, epochs, best_epoch = -1.0, None, 0, 0, 0
    start = time.perf_counter()
    for epoch in range(cfg.trainer.max_epochs):
        lean_step(net, task, data, opt)
        net.eval()
        with torch.no_grad():
            logits = as_model_output(net(data.x, data.edge_index)).logits
        val = score(logits[data.val_mask], data.y[data.val_mask], metric)
        epochs = epoch + 1
        if val > best:
            best, since, best_epoch = val, 0, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        out = as_model_output(net(data.x, data.edge_index))
    record = {"metric": metric, "val": best, "epochs": epochs, "best_epoch": best_epoch,
              "test": score(out.logits[data.test_mask], data.y[data.test_mask], metric),
              "train": score(out.logits[data.train_mask], data.y[data.train_mask], metric),
              "seconds": time.perf_counter() - start}
    if out.routing:
        from moegraph.diagnostics import expert_load
        from moegraph.nn.conv.hop_moe import HopMoEConv

        load = expert_load(out.routing)  # [layers, experts]
        record["expert_load"] = load.tolist()
        record["max_over_mean_load"] = float((load.max(-1).values * load.size(-1)).mean())
        hop_convs = [m for m in net.modules() if isinstance(m, HopMoEConv)]
        if hop_convs and len(hop_convs) == load.size(0):
            record["hop2_share"] = float(sum(load[i, c.num_hop1_experts:].sum()
                                             for i, c in enumerate(hop_convs)) / len(hop_convs))
    if diagnose is not None:
        with torch.no_grad():
            record.update(diagnose(net, data))
    return record


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def table(group: str, datasets: list[str], seeds: int, runs: Path) -> list[str]:
    lines = [f"## {group}", "",
             "| variant | " + " | ".join(datasets) + " | train acc (first) | epochs (first) |",
             "|---|" + "---|" * (len(datasets) + 2)]
    for variant, ov in GROUPS[group].items():
        cells, first = [], None
        for dataset in datasets:
            rs = []
            for seed in range(seeds):
                p = runs / run_key(dataset, variant, ov, seed)
                if p.exists():
                    rs.append(json.loads(p.read_text()))
            cell = mean_std([r["test"] for r in rs]) + (f" ({len(rs)})" if len(rs) != seeds
                                                        else "")
            h2 = [r["hop2_share"] for r in rs if "hop2_share" in r]
            if h2:
                load = [r["max_over_mean_load"] for r in rs]
                cell += (f" [hop-2 {100 * sum(h2) / len(h2):.0f}%, "
                         f"max/mean {sum(load) / len(load):.2f}]")
            cells.append(cell)
            if first is None and rs:
                first = rs
        extra = ["–", "–"] if not first else [
            mean_std([r["train"] for r in first]),
            f"{sum(r['epochs'] for r in first) / len(first):.0f}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    return lines


def train_lean_cached(path: Path, overrides: list[str], info: dict, **kwargs: Any) -> dict:
    r"""The record at ``path`` if cached; otherwise :func:`train_lean` of
    ``overrides`` (``kwargs`` passed on) with ``info`` added, written to
    ``path`` as JSON and summed up in one printed line."""
    if path.exists():
        return json.loads(path.read_text())
    record = train_lean(overrides, **kwargs)
    record.update(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"{info.get('dataset')} | {info.get('variant')} | seed {info.get('seed')}: "
          f"test={record['test']:.4f} train={record['train']:.3f} epochs={record['epochs']} "
          f"(best {record['best_epoch']}) ({record['seconds']:.1f}s)", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", default="block", choices=list(GROUPS))
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--datasets", nargs="+", default=["cora", "citeseer"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=RESULTS / "graph_moe_ablation_runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    variants = args.variants or list(GROUPS[args.group])
    if not args.table_only:
        for dataset in args.datasets:
            for variant in variants:
                ov = GROUPS[args.group][variant]
                for seed in range(args.seeds):
                    train_lean_cached(args.runs / run_key(dataset, variant, ov, seed),
                                      overrides_for(dataset, ov, seed),
                                      dict(dataset=dataset, variant=variant, seed=seed,
                                           overrides=ov))
    print("\n".join(table(args.group, args.datasets, args.seeds, args.runs)))


if __name__ == "__main__":
    main()
