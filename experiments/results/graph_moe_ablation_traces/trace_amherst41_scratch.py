r"""Per-epoch trace of one configuration (graph_moe_ablation.md, section 10):
the lean loop of ``ablate_graph_moe.py`` without early stopping, printing every
25 epochs the training cross-entropy in training and in eval mode and the
training / validation / test accuracy in eval mode. Run from the repository
root with ``PYTHONPATH=.``::

    python <this file> amherst41 0 "model=dense_gnn model.net.input_dropout=0.0" 300

Several configurations: separate them with ``;``. ``FFN_INIT_SCALE=c``
multiplies the weight matrices of the feed-forward parts by ``c`` after init.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from experiments.ablate_graph_moe import lean_setup, lean_step, overrides_for, score
from moegraph.nn.output import as_model_output


def main() -> None:
    torch.set_num_threads(1)
    dataset, seed, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(";")
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    scale = float(os.environ.get("FFN_INIT_SCALE", "1"))
    for variant in variants:
        overrides = variant.split(" ") if variant else []
        cfg, task, data, opt = lean_setup(overrides_for(dataset, overrides, seed)
                                          + [f"trainer.max_epochs={epochs}"])
        net = task.net
        if scale != 1:
            with torch.no_grad():
                for ffn in net.ffns:
                    for name, p in ffn.named_parameters():
                        if p.dim() >= 2 and "router" not in name and "gate" not in name:
                            p.mul_(scale)
        group = opt.param_groups[0]
        print("==", variant, "opt", type(opt).__name__,
              {k: group[k] for k in ("lr", "weight_decay")},
              "train n", int(data.train_mask.sum()), "F", data.x.size(1), flush=True)
        tr, va_, te = data.train_mask, data.val_mask, data.test_mask
        best = (-1.0, 0, 0.0)
        for epoch in range(epochs):
            train_mode_loss = float(lean_step(net, task, data, opt)[1].detach())
            net.eval()
            with torch.no_grad():
                logits = as_model_output(net(data.x, data.edge_index)).logits
            val = score(logits[va_], data.y[va_], "acc")
            if val > best[0]:
                best = (val, epoch, score(logits[te], data.y[te], "acc"))
            if epoch % 25 == 0 or epoch == epochs - 1:
                eval_loss = float(F.cross_entropy(logits[tr], data.y[tr]))
                print(f"ep {epoch:3d} trainloss(train-mode) {train_mode_loss:.3f} "
                      f"trainloss(eval) {eval_loss:.3f} "
                      f"train {score(logits[tr], data.y[tr], 'acc'):.3f} val {val:.3f} "
                      f"test {score(logits[te], data.y[te], 'acc'):.3f}", flush=True)
        print("best val", best, flush=True)


if __name__ == "__main__":
    main()
