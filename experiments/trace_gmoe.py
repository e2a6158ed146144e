r"""Why GMoE underfits: a per-epoch trace of one run, and the router's scale.

``trace``: trains one configuration with the lean loop of
:mod:`experiments.ablate_graph_moe` (same optimiser, aux-loss weights, no early
stopping) and prints every ``--every`` epochs the cross-entropy, the training
accuracy in training and in eval mode, the validation and test accuracy, and
per routed layer the share of nodes whose training-time expert (noise, dropout)
is their test-time one, and for MoE-GNN with ``ffn_scale`` the mean |γ| of each
feed-forward part::

    python experiments/trace_gmoe.py trace reed98 --seed 1 --epochs 200 -- model=gmoe_paper
    python experiments/trace_gmoe.py trace reed98 --seed 0 --epochs 150 -- \
        model=gmoe_paper model.net.num_hop2_experts=0 model.net.expert_init=shared \
        "model.net.router_kwargs={noisy:false}"

``router``: the same loop, and every ``--every`` epochs, per routed layer, the
router's clean logits (spread over the experts, top-1 margin) against its noise
std, the gate weight's norm and the load in training and at test time
(max/mean, experts under 2% of the nodes), with the best validation epoch so
far::

    python experiments/trace_gmoe.py router citeseer --seed 4 --epochs 120 --every 10 -- \
        model=gmoe model.expert_weight_decay=null

``scale``: at init (seed 0), the first layer router's clean logits (spread over
the experts, top-1 margin) against its noise std; and the between-node spread
of ``X``, ``ÂX`` and ``Â²X`` (root mean squared distance of a row to the mean
row)::

    python experiments/trace_gmoe.py scale reed98 citeseer amherst41
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def trace(dataset: str, seed: int, epochs: int, every: int, extra: list[str]) -> None:
    import torch

    from experiments.ablate_graph_moe import lean_setup, lean_step, overrides_for, score
    from moegraph.nn.output import as_model_output

    cfg, task, data, opt = lean_setup(overrides_for(dataset, extra, seed))
    net, metric = task.net, cfg.data.get("metric", "acc")
    tr, va, te = data.train_mask, data.val_mask, data.test_mask
    for epoch in range(epochs):
        out, ce = lean_step(net, task, data, opt)
        if epoch % every and epoch != epochs - 1:
            continue
        net.eval()
        with torch.no_grad():
            ev = as_model_output(net(data.x, data.edge_index))
        agree = [float((a.expert == b.expert).float().mean())
                 for a, b in zip(out.routing or (), ev.routing or (), strict=True)
                 if a.expert.shape == b.expert.shape]
        # MoEGNN's LayerScale / ReZero vectors: mean |gamma| of each feed-forward part
        gammas = [float(g.detach().abs().mean()) for g in getattr(net, "ffn_scales", None) or ()]
        print(f"epoch {epoch:3d}  ce {float(ce):.3f}  "
              f"train {score(out.logits.detach()[tr], data.y[tr], metric):.3f} (train mode) "
              f"{score(ev.logits[tr], data.y[tr], metric):.3f} (eval)  "
              f"val {score(ev.logits[va], data.y[va], metric):.3f}  "
              f"test {score(ev.logits[te], data.y[te], metric):.3f}  "
              f"routing agreement {' / '.join(f'{a:.2f}' for a in agree) or '-'}"
              + (f"  |gamma| {' / '.join(f'{g:.3f}' for g in gammas)}" if gammas else ""),
              flush=True)


def router_trace(dataset: str, seed: int, epochs: int, every: int, extra: list[str]) -> None:
    r"""Per epoch, per routed layer: the router's clean-logit spread over the
    experts and top-1 margin against its noise std, the training-time and the
    test-time load (max/mean, experts under 2%), the gate and noise weight
    norms; with the train / val / test accuracy and early stopping's best
    epoch (the lean loop's protocol, run for ``epochs`` epochs)."""
    import torch
    import torch.nn.functional as F

    from experiments.ablate_graph_moe import lean_setup, lean_step, overrides_for, score
    from moegraph.nn.conv.hop_moe import HopMoEConv
    from moegraph.nn.output import as_model_output

    cfg, task, data, opt = lean_setup(overrides_for(dataset, extra, seed))
    net, metric = task.net, cfg.data.get("metric", "acc")
    tr, va, te = data.train_mask, data.val_mask, data.test_mask
    convs = [m for m in net.modules() if isinstance(m, HopMoEConv)]
    inputs: dict[int, torch.Tensor] = {}
    for i, conv in enumerate(convs):
        conv.router.register_forward_hook(
            lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].detach()))

    def load_txt(routing) -> str:
        E = routing.num_experts
        load = routing.load / routing.load.sum()
        return f"{float(load.max()) * E:.2f}/{int((load < 0.02).sum())}"

    best, best_epoch = -1.0, 0
    for epoch in range(epochs):
        out, ce = lean_step(net, task, data, opt)
        net.eval()
        with torch.no_grad():
            ev = as_model_output(net(data.x, data.edge_index))
        val = score(ev.logits[va], data.y[va], metric)
        if val > best:
            best, best_epoch = val, epoch
        if epoch % every and epoch != epochs - 1:
            continue
        layers = []
        for i, conv in enumerate(convs):
            r, x = conv.router, inputs[i]
            with torch.no_grad():
                clean = r._logits(x)
                top2 = clean.topk(2, -1).values
                noise = (F.softplus(r._logits(x, r.noise_weight)) + r.noise_epsilon
                         if getattr(r, "noise_weight", None) is not None else clean.new_zeros(1))
            layers.append(
                f"L{i}: spread {float(clean.std(-1).mean()):.4f} margin "
                f"{float((top2[:, 0] - top2[:, 1]).mean()):.4f} noise {float(noise.mean()):.3f} "
                f"|Wg| {float(r.weight.detach().norm()):.3f} load tr {load_txt(out.routing[i])} "
                f"ev {load_txt(ev.routing[i])}")
        print(f"ep {epoch:3d} ce {float(ce):.3f} "
              f"train {score(ev.logits[tr], data.y[tr], metric):.3f} val {val:.3f} "
              f"test {score(ev.logits[te], data.y[te], metric):.3f} "
              f"best@{best_epoch} | " + " | ".join(layers), flush=True)


def scale(datasets: list[str]) -> None:
    import torch
    import torch.nn.functional as F
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    from experiments.ablate_graph_moe import compose_lean
    from moegraph.train import instantiate_run

    for dataset in datasets:
        cfg = compose_lean([f"experiment=nc_{dataset}", "model=gmoe_paper", "logger=none",
                            "seed=0"])
        torch.manual_seed(0)
        run = instantiate_run(cfg, trainer=False)
        data, router = run["datamodule"].data, run["task"].net.convs[0].router
        x = data.x.float()
        with torch.no_grad():
            clean = router._logits(x)
            noise = F.softplus(router._logits(x, router.noise_weight)) + router.noise_epsilon
            top2 = clean.topk(2, -1).values
        N = data.num_nodes
        ei, w = gcn_norm(data.edge_index, None, N, add_self_loops=True)
        a_hat = torch.sparse_coo_tensor(ei.flip(0), w, (N, N)).coalesce()
        ax = torch.sparse.mm(a_hat, x)
        a2x = torch.sparse.mm(a_hat, ax)

        def spread(z):
            return float((z - z.mean(0)).pow(2).sum(1).mean().sqrt())

        print(f"{dataset}: router logits spread over experts {float(clean.std(-1).mean()):.3f}, "
              f"top-1 margin {float((top2[:, 0] - top2[:, 1]).mean()):.3f}, noise std "
              f"{float(noise.mean()):.3f}; node spread X {spread(x):.3f}, ÂX {spread(ax):.3f}, "
              f"Â²X {spread(a2x):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace")
    t.add_argument("dataset")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--every", type=int, default=20)
    t.add_argument("overrides", nargs="*")
    d = sub.add_parser("router")
    d.add_argument("dataset")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=200)
    d.add_argument("--every", type=int, default=20)
    d.add_argument("overrides", nargs="*")
    s = sub.add_parser("scale")
    s.add_argument("datasets", nargs="+")
    # the config overrides may follow the options, after "--" or not
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    args, rest = parser.parse_known_args(argv)
    if any(a.startswith("-") for a in rest) or (rest and args.cmd == "scale"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("MOEGRAPH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if args.cmd == "trace":
        trace(args.dataset, args.seed, args.epochs, args.every, args.overrides + rest)
    elif args.cmd == "router":
        router_trace(args.dataset, args.seed, args.epochs, args.every, args.overrides + rest)
    else:
        scale(args.datasets)


if __name__ == "__main__":
    main()
