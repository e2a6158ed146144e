r"""Where the feed-forward part of MoE-GNN may sit, and how it must be built,
not to cost GCN's accuracy (issue 15, section 1).

Every variant is trained by the lean full-batch loop of
:func:`experiments.ablate_graph_moe.train_lean` under the protocol of
``experiment=nc_<dataset>`` (on Cora and CiteSeer: row-normalised features,
Adam with L2 5e-4, lr 0.01, dropout 0.5 on the input and after every hidden
convolution, hidden 64, 2 GCN convolutions, at most 300 epochs, early stopping
with patience 50 on the validation accuracy, test at the best validation
epoch)::

    python experiments/ablate_moe_gnn_layout.py --datasets cora citeseer --seeds 3
    python experiments/ablate_moe_gnn_layout.py --datasets reed98 --seeds 3 --variants gcn dense

Two kinds of variant:

- **config variants**: overrides of the config tree (``model=dense_gnn``,
  ``model.net.<option>=...``): the network that ``moegraph-train`` builds.
- **hand-built layouts** ``layout:<layout>_<ffn>``, for layouts
  :class:`~moegraph.nn.models.MoEGNN` does not build (the history of
  ``graph_moe_ablation.md``, section 3). ``ffn`` is ``dense`` (a 64 -> 128 ->
  64 MLP, the dense twin) or ``moe`` (:class:`~moegraph.nn.SparseMoE`, 8
  experts of width 64, top-2); they train under ``model=dense_gnn`` or
  ``model=moe_gnn`` (the optimiser and aux-loss weights):

  - ``cur``: the residual-free layout of ``MoEGNN`` before the plain stack:
    input projection ``F -> 64``, two ``conv(64 -> 64)`` blocks each followed
    by ``h + FFN(h)``, a linear classifier.
  - ``noin``: ``cur`` without the input projection (first conv reads ``F``).
  - ``gcnpre``: the plain stack with a pre-norm FFN, ``h + FFN(LayerNorm(h))``.

Each run is cached as JSON under ``--runs`` (key: dataset, variant, seed and a
hash of the overrides); besides the scores each record holds the
diagnostics of the trained model (best validation epoch, training accuracy,
the mean per-node norm of the FFN's input ``h`` and of its (scaled) output,
the stored spectral norms of the FFN's weights and, for a MoE block, how its
routing in a training-mode forward agrees with the test-time one and how
many experts it effectively uses: :func:`moe_diagnostics`).
Prints one markdown table: test accuracy, mean ± std over seeds, per dataset.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn import Linear, ReLU, Sequential
from torch_geometric.nn import GCNConv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.ablate_graph_moe import overrides_for, run_key, train_lean_cached  # noqa: E402
from moegraph.nn import ModelOutput, SparseMoE  # noqa: E402
from moegraph.nn.routing import sum_aux_losses  # noqa: E402

HIDDEN = 64
LAYOUTS = ("cur", "noin", "gcnpre")
RUNS = ROOT / "experiments" / "results" / "graph_moe_ablation_runs" / "moe_gnn_layout"

SN = ["model.net.spectral_norm=true", "model.net.ffn_bias=false"]  # section 5's default

# model=moe_gnn before section 9 (8 routed experts, top-2, no shared expert): the
# MoE variants of sections 5-6 pin it.
TOP2 = ["model.net.k=2", "~model.net.moe_kwargs.num_shared_experts"]
# section 9's default: top-1 routed experts beside one shared expert
SHARED = ["model.net.k=1", "model.net.moe_kwargs={num_shared_experts:1}"]
# section 10's default (model=moe_gnn as studied since): SHARED without input dropout
MOE_NO_INPUT_DROPOUT = ["model=moe_gnn", *SHARED, *SN, "model.net.input_dropout=0.0"]

VARIANTS: dict[str, list[str]] = {
    "gcn": ["model=gnn", "model/strong=gcn"],
    # the plain stack as it was: FFN weights used as they are, with biases
    "dense": ["model=dense_gnn", "model.net.spectral_norm=false", "model.net.ffn_bias=true"],
    "moe": ["model=moe_gnn", *TOP2, "model.net.spectral_norm=false",
            "model.net.ffn_bias=true"],
    # spectrally normalised FFN / expert weights, with biases
    "dense, spectral norm": ["model=dense_gnn", "model.net.spectral_norm=true",
                             "model.net.ffn_bias=true"],
    "moe, spectral norm": ["model=moe_gnn", *TOP2, "model.net.spectral_norm=true",
                           "model.net.ffn_bias=true"],
    # without biases too (section 5's default): with spectral norm a bias-free
    # FFN or expert cannot make its output longer than its input
    "dense, spectral norm, no bias": ["model=dense_gnn", *SN],
    "moe, spectral norm, no bias": ["model=moe_gnn", *TOP2, *SN],
    # section 6, from section 5's default: the router reads the block's output
    # before its dropout; the experts' coupled L2 or learning rate scaled by
    # their share k / E of the nodes; every expert started alike; noisy top-k
    # gating
    "moe, route before dropout": ["model=moe_gnn", *TOP2, *SN,
                                  "model.net.route_before_dropout=true"],
    "moe, expert decay k/E": ["model=moe_gnn", *TOP2, *SN,
                              "+model.expert_weight_decay=load_share"],
    "moe, shared expert init": ["model=moe_gnn", *TOP2, *SN,
                                "+model.net.moe_kwargs.expert_init=shared"],
    "moe, noisy router": ["model=moe_gnn", *TOP2, *SN,
                          "+model.net.moe_kwargs.router_kwargs.noisy=true"],
    "moe, expert lr k/E": ["model=moe_gnn", *TOP2, *SN,
                           "+model.param_groups=[{params:net.ffns.0.experts,lr:0.0025}]"],
    # section 9, against the over-fitting of section 6 (8 experts hold four times
    # the dense twin's FFN parameters): fewer experts at the same active width;
    # an always-on shared expert (Dai et al., 2024) beside top-1 routing, at the
    # dense twin's active width (64 shared + 64 routed; the new default); the
    # aux-loss weight; LayerScale / ReZero on the feed-forward branch
    "moe, 4 experts": ["model=moe_gnn", *TOP2, *SN, "model.net.num_experts=4"],
    "moe, shared expert, top-1": ["model=moe_gnn", *SHARED, *SN],
    "moe, shared expert, top-1, 4 experts": ["model=moe_gnn", *SHARED, *SN,
                                             "model.net.num_experts=4"],
    "moe, load balance 0.1": ["model=moe_gnn", *TOP2, *SN,
                              "model.aux_loss_weights.load_balance=0.1"],
    "dense, layer scale 0": ["model=dense_gnn", *SN, "+model.net.ffn_scale=0.0"],
    "moe, shared expert, top-1, layer scale 0": ["model=moe_gnn", *SHARED, *SN,
                                                 "+model.net.ffn_scale=0.0"],
    # section 10: no dropout on the input features, as PyG's GCN (model=gnn), so
    # that the plain stack without its feed-forward parts is the GCN baseline
    "dense, no input dropout": ["model=dense_gnn", *SN, "model.net.input_dropout=0.0"],
    "moe, shared expert, top-1, no input dropout": [*MOE_NO_INPUT_DROPOUT],
    # ... and on top of that (the new default): LayerScale / ReZero, 4 experts
    "dense, no input dropout, layer scale 0": ["model=dense_gnn", *SN,
                                               "model.net.input_dropout=0.0",
                                               "+model.net.ffn_scale=0.0"],
    "moe, shared expert, top-1, no input dropout, layer scale 0": [
        *MOE_NO_INPUT_DROPOUT, "+model.net.ffn_scale=0.0"],
    "moe, shared expert, top-1, no input dropout, 4 experts": [
        *MOE_NO_INPUT_DROPOUT, "model.net.num_experts=4"],
    # section 12: at k=1 the renormalised gate is the constant 1, so the default's
    # router learns from its aux losses only. A task gradient through a
    # straight-through gate (value 1, gradient of p_e; as model=gmoe), through
    # Switch's gate p_e (normalize=false), or a slower router (lr 0.001)
    "moe, shared expert, top-1, no input dropout, straight-through router": [
        *MOE_NO_INPUT_DROPOUT,
        "+model.net.moe_kwargs.router_kwargs={straight_through:true}"],
    "moe, shared expert, top-1, no input dropout, Switch gate": [
        *MOE_NO_INPUT_DROPOUT,
        "+model.net.moe_kwargs.router_kwargs={normalize:false}"],
    "moe, shared expert, top-1, no input dropout, router lr 0.001": [
        *MOE_NO_INPUT_DROPOUT,
        "+model.param_groups=[{params:net.ffns.0.router,lr:0.001}]"],
}


class Net(torch.nn.Module):
    r"""A hand-built layout (see the module's docstring)."""

    def __init__(self, variant: str, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.layout, _, ffn = variant.partition("_")
        if self.layout not in LAYOUTS or ffn not in ("dense", "moe"):
            raise SystemExit(f"unknown layout {variant!r}: <layout>_<dense|moe> with layout "
                             f"in {LAYOUTS}")
        self.dropout = dropout

        def make_ffn() -> torch.nn.Module:
            if ffn == "moe":
                return SparseMoE(HIDDEN, 64, HIDDEN, num_experts=8, k=2)
            return Sequential(Linear(HIDDEN, 128), ReLU(), Linear(128, HIDDEN))

        H = HIDDEN
        self.lin_in = Linear(in_channels, H) if self.layout == "cur" else None
        self.pre_norm = torch.nn.LayerNorm(H) if self.layout == "gcnpre" else None
        if self.layout in ("cur", "noin"):
            first = H if self.layout == "cur" else in_channels
            self.convs = torch.nn.ModuleList([GCNConv(first, H), GCNConv(H, H)])
            self.ffns = torch.nn.ModuleList([make_ffn(), make_ffn()])
            self.lin_out: Linear | None = Linear(H, num_classes)
        else:
            self.convs = torch.nn.ModuleList([GCNConv(in_channels, H), GCNConv(H, num_classes)])
            self.ffns = torch.nn.ModuleList([make_ffn()])
            self.lin_out = None

    def _ffn(self, ffn: torch.nn.Module, h: torch.Tensor, routings: list) -> torch.Tensor:
        h_in = self.pre_norm(h) if self.pre_norm is not None else h
        if isinstance(ffn, SparseMoE):
            y, routing = ffn(h_in)
            routings.append(routing)
        else:
            y = ffn(h_in)
        return h + F.dropout(y, self.dropout, self.training)

    def forward(self, x, edge_index) -> ModelOutput:
        x = F.dropout(x, self.dropout, self.training)
        routings: list = []
        if self.lin_out is not None:
            h = self.lin_in(x) if self.lin_in is not None else x
            for conv, ffn in zip(self.convs, self.ffns, strict=True):
                h = F.dropout(F.relu(conv(h, edge_index)), self.dropout, self.training)
                h = self._ffn(ffn, h, routings)
            logits = self.lin_out(h)
        else:
            h = F.dropout(F.relu(self.convs[0](x, edge_index)), self.dropout, self.training)
            h = self._ffn(self.ffns[0], h, routings)
            logits = self.convs[1](h, edge_index)
        return ModelOutput(logits, sum_aux_losses(routings), tuple(routings))


def variant_overrides(variant: str) -> list[str]:
    if variant.startswith("layout:"):
        ffn = variant.rpartition("_")[2]
        return [f"model={'moe_gnn' if ffn == 'moe' else 'dense_gnn'}", f"+layout={variant[7:]}"]
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: one of {list(VARIANTS)} or "
                         f"layout:<{'|'.join(LAYOUTS)}>_<dense|moe>")
    return VARIANTS[variant]


def ffn_branch(net, data) -> dict:
    r"""Diagnostics of a trained plain stack (eval mode): the mean per-node
    norm of the first FFN's input ``h`` (the first convolution's activated
    output) and of what the FFN adds to it."""
    from moegraph.nn.models import MoEGNN

    if not isinstance(net, MoEGNN) or net.residual or not len(net.ffns):
        return {}
    h = net.act(net.convs[0](data.x, data.edge_index))
    y, _ = net.ffn_branch(0, h)
    record = {"h_norm": float(h.norm(dim=-1).mean()), "ffn_norm": float(y.norm(dim=-1).mean())}
    ffn = net.ffns[0]
    if isinstance(ffn, SparseMoE):
        record.update(moe_diagnostics(net, ffn, data, h))
    else:  # raw (stored) spectral norms of the dense FFN's two matrices
        lins = [m for m in ffn if isinstance(m, Linear)]
        record["raw_sigma"] = [float(torch.linalg.matrix_norm(m.weight, ord=2)) for m in lins]
    return record


def _topk_sets(ffn: SparseMoE, h: torch.Tensor) -> torch.Tensor:
    r"""Each row's chosen experts ``[N, k]``, sorted (router in eval mode)."""
    routing = ffn.router(h)
    return routing.expert.view(h.size(0), -1).sort(dim=-1).values


def moe_diagnostics(net, ffn: SparseMoE, data, h_eval: torch.Tensor) -> dict:
    r"""Routing of the trained MoE block (best-validation state):

    - ``agree_set`` / ``agree_top1``: share of the nodes (all, and training
      nodes) whose top-k set / first choice is the same for the router input
      of a training-mode forward (dropout on) and of the eval forward, mean
      over 20 dropout draws;
    - ``eff_experts``: ``exp`` of the entropy of the eval load over the
      experts (8 = balanced), on all nodes and on the training nodes;
    - ``train_nodes_per_expert``: training nodes each expert gets (eval routing);
    - ``raw_sigma``: the stored (unnormalised) spectral norm of each expert's
      two weight matrices, mean over experts, and ``router_norm`` the
      Frobenius norm of the router's weight."""
    captured: list[torch.Tensor] = []  # what the router reads in a training forward
    handle = ffn.router.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    sets_eval = _topk_sets(ffn, h_eval)
    agree_set, agree_top1, agree_set_tr = [], [], []
    first_eval = ffn.router(h_eval).expert.view(h_eval.size(0), -1)[:, 0]
    gen_state = torch.get_rng_state()
    torch.manual_seed(12345)
    try:
        for _ in range(20):
            captured.clear()
            net.train()
            net(data.x, data.edge_index)
            net.eval()
            h_train = captured[0]
            same = (_topk_sets(ffn, h_train) == sets_eval).all(dim=-1)
            agree_set.append(float(same.float().mean()))
            agree_set_tr.append(float(same[data.train_mask].float().mean()))
            first = ffn.router(h_train).expert.view(h_train.size(0), -1)[:, 0]
            agree_top1.append(float((first == first_eval).float().mean()))
    finally:
        handle.remove()
        net.eval()
        torch.set_rng_state(gen_state)
    E = ffn.num_experts
    load_all = torch.bincount(sets_eval.reshape(-1), minlength=E).float()
    load_tr = torch.bincount(sets_eval[data.train_mask].reshape(-1), minlength=E).float()

    def eff(load: torch.Tensor) -> float:
        p = load / load.sum()
        return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))

    experts = ffn.experts
    sig = [float(torch.linalg.matrix_norm(w, ord=2).mean())
           for w in (experts.weight1, experts.weight2)]
    return {"agree_set": statistics.mean(agree_set), "agree_set_train": statistics.mean(
        agree_set_tr), "agree_top1": statistics.mean(agree_top1),
            "eff_experts": eff(load_all), "eff_experts_train": eff(load_tr),
            "train_nodes_per_expert": load_tr.tolist(), "raw_sigma": sig,
            "router_norm": float(ffn.router.weight.norm())}


def run_one(dataset: str, variant: str, seed: int) -> dict:
    ov = variant_overrides(variant)
    overrides = [o for o in overrides_for(dataset, ov, seed) if not o.startswith("+layout=")]
    make_net = None
    if variant.startswith("layout:"):
        def make_net(cfg, data):
            return Net(variant[7:], data.num_features, int(data.y.max()) + 1,
                       cfg.backbone.dropout)
    return train_lean_cached(RUNS / run_key(dataset, variant, ov, seed), overrides,
                             dict(dataset=dataset, variant=variant, seed=seed, overrides=ov),
                             make_net=make_net, diagnose=ffn_branch)


def mean_of(records: list[dict], key: str, fmt: str, index: int | None = None) -> str:
    r"""``fmt`` of the mean of ``record[key]`` (its ``index``-th entry) over
    the records that hold it; ``–`` if none does."""
    values = [r[key] if index is None else r[key][index] for r in records if key in r]
    return fmt.format(statistics.mean(values)) if values else "–"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cora", "citeseer"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    rows = ["| dataset | variant | test acc | per seed | train acc | best epoch | "
            "‖FFN(h)‖ / ‖h‖ | train/eval routing agree (set / top-1) | eff. experts "
            "(all / train) | raw σ W1 / W2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        for variant in args.variants:
            rs = []
            for seed in range(args.seeds):
                path = RUNS / run_key(dataset, variant, variant_overrides(variant), seed)
                if args.table_only and not path.exists():
                    continue
                rs.append(run_one(dataset, variant, seed))
            if not rs:
                continue
            test = [100 * r["test"] for r in rs]
            std = statistics.stdev(test) if len(test) > 1 else 0.0
            ratio = [r["ffn_norm"] / r["h_norm"] for r in rs if r.get("h_norm")]
            rows.append(
                f"| {dataset} | {variant} | {statistics.mean(test):.2f} ± {std:.2f}"
                f"{'' if len(rs) == args.seeds else f' ({len(rs)})'} | "
                f"{', '.join(f'{t:.1f}' for t in test)} | "
                f"{100 * statistics.mean(r['train'] for r in rs):.1f} | "
                f"{statistics.mean(r['best_epoch'] for r in rs):.0f} | "
                f"{f'{statistics.mean(ratio):.2f}' if ratio else '–'} | "
                f"{mean_of(rs, 'agree_set', '{:.0%}')} / {mean_of(rs, 'agree_top1', '{:.0%}')} | "
                f"{mean_of(rs, 'eff_experts', '{:.2f}')} / "
                f"{mean_of(rs, 'eff_experts_train', '{:.2f}')} | "
                f"{mean_of(rs, 'raw_sigma', '{:.2f}', 0)} / "
                f"{mean_of(rs, 'raw_sigma', '{:.2f}', 1)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
