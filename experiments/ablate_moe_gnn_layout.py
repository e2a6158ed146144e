r"""Where the feed-forward part of MoE-GNN may sit without costing GCN's accuracy
on Planetoid (issue 15, section 1): a lean full-batch loop over hand-built
layouts, under the Planetoid protocol of ``experiment=nc_cora|nc_citeseer``
(row-normalised features, Adam with L2 5e-4, lr 0.01, dropout 0.5 on the input
and after every hidden convolution, hidden 64, 2 GCN convolutions, at most 300
epochs, early stopping with patience 50 on the validation accuracy, test at
the best validation epoch)::

    python experiments/ablate_moe_gnn_layout.py --dataset cora --variants plain cur_dense gcn_dense
    python experiments/ablate_moe_gnn_layout.py --dataset citeseer --variants gcnpre_dense --seeds 3

Layouts (``<layout>_<ffn>``; ``ffn`` is ``dense``: a 64 -> 128 -> 64 MLP, the
dense twin, or ``moe``: :class:`~moegraph.nn.SparseMoE` with 8 experts of
width 64, top-2, its auxiliary losses at weight 0.01):

- ``plain``: PyG's GCN, ``conv(F -> 64)``, ``conv(64 -> C)``; no FFN.
- ``cur``: the residual-free layout of ``MoEGNN`` before the plain stack:
  input projection ``F -> 64``, two ``conv(64 -> 64)`` blocks each followed
  by ``h + FFN(h)``, a linear classifier.
- ``noin``: ``cur`` without the input projection (first conv reads ``F``).
- ``gcn``: the plain stack (``MoEGNN(residual=False)`` now): ``conv(F -> 64)``,
  ``h + FFN(h)``, ``conv(64 -> C)``.
- ``gcnz``: ``gcn`` with the FFN's last layer initialised to zero (starts as GCN).
- ``gcnpre``: ``gcn`` with a pre-norm FFN, ``h + FFN(LayerNorm(h))``.

Prints one markdown row per variant: test accuracy, mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn import Linear, ReLU, Sequential
from torch_geometric.nn import GCNConv

from moegraph.data import load_real_dataset, row_normalize_features
from moegraph.nn import SparseMoE

HIDDEN, DROPOUT = 64, 0.5
LAYOUTS = ("plain", "cur", "noin", "gcn", "gcnz", "gcnpre")


class Net(torch.nn.Module):
    def __init__(self, variant: str, in_channels: int, num_classes: int):
        super().__init__()
        self.layout, _, ffn = variant.partition("_")
        if self.layout not in LAYOUTS or (self.layout != "plain") != (ffn in ("dense", "moe")):
            raise SystemExit(f"unknown variant {variant!r}: <layout>_<dense|moe> with layout in "
                             f"{LAYOUTS[1:]}, or 'plain'")

        def make_ffn() -> torch.nn.Module:
            if ffn == "moe":
                return SparseMoE(HIDDEN, 64, HIDDEN, num_experts=8, k=2)
            return Sequential(Linear(HIDDEN, 128), ReLU(), Linear(128, HIDDEN))

        H = HIDDEN
        if self.layout in ("cur", "noin"):
            self.lin_in = Linear(in_channels, H) if self.layout == "cur" else None
            first = H if self.layout == "cur" else in_channels
            self.convs = torch.nn.ModuleList([GCNConv(first, H), GCNConv(H, H)])
            self.ffns = torch.nn.ModuleList([make_ffn(), make_ffn()])
            self.lin_out = Linear(H, num_classes)
        else:
            self.convs = torch.nn.ModuleList([GCNConv(in_channels, H), GCNConv(H, num_classes)])
            self.ffns = torch.nn.ModuleList([] if self.layout == "plain" else [make_ffn()])
            if self.layout == "gcnz" and ffn == "dense":
                torch.nn.init.zeros_(self.ffns[0][-1].weight)
                torch.nn.init.zeros_(self.ffns[0][-1].bias)
            self.pre_norm = torch.nn.LayerNorm(H) if self.layout == "gcnpre" else None

    def _ffn(self, ffn: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux = h.new_zeros(())
        if getattr(self, "pre_norm", None) is not None:
            h_in = self.pre_norm(h)
        else:
            h_in = h
        if isinstance(ffn, SparseMoE):
            y, routing = ffn(h_in)
            aux = sum(routing.aux_loss.values(), aux)
        else:
            y = ffn(h_in)
        return h + F.dropout(y, DROPOUT, self.training), aux

    def forward(self, x, edge_index):
        x = F.dropout(x, DROPOUT, self.training)
        aux = x.new_zeros(())
        if self.layout in ("cur", "noin"):
            h = self.lin_in(x) if self.lin_in is not None else x
            for conv, ffn in zip(self.convs, self.ffns, strict=True):
                h = F.dropout(F.relu(conv(h, edge_index)), DROPOUT, self.training)
                h, a = self._ffn(ffn, h)
                aux = aux + a
            return self.lin_out(h), aux
        h = F.dropout(F.relu(self.convs[0](x, edge_index)), DROPOUT, self.training)
        if len(self.ffns):
            h, aux = self._ffn(self.ffns[0], h)
        return self.convs[1](h, edge_index), aux


def run(data, variant: str, seed: int) -> float:
    torch.manual_seed(seed)
    net = Net(variant, data.num_features, int(data.y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    best_val, best_test, best_epoch = -1.0, 0.0, 0
    for epoch in range(300):
        net.train()
        opt.zero_grad()
        out, aux = net(data.x, data.edge_index)
        loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask]) + 0.01 * aux
        loss.backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(data.x, data.edge_index)[0].argmax(1)
        val = (pred[data.val_mask] == data.y[data.val_mask]).float().mean().item()
        if val > best_val:
            test = (pred[data.test_mask] == data.y[data.test_mask]).float().mean().item()
            best_val, best_test, best_epoch = val, test, epoch
        if epoch - best_epoch > 50:
            break
    return 100 * best_test


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["cora", "citeseer"], default="cora")
    parser.add_argument("--variants", nargs="+", default=["plain", "cur_dense", "gcn_dense"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = os.environ.get("MOEGRAPH_DATA_DIR", "../shared/data")
    data = row_normalize_features(load_real_dataset(args.dataset, root, ".cache"), args.dataset)
    print("| dataset | variant | test acc | per seed |\n|---|---|---|---|")
    for variant in args.variants:
        scores = [run(data, variant, seed) for seed in range(args.seeds)]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"| {args.dataset} | {variant} | {statistics.mean(scores):.2f} ± {std:.2f} | "
              f"{', '.join(f'{s:.1f}' for s in scores)} |", flush=True)


if __name__ == "__main__":
    main()
