r"""Why full HoME degrades on tabular input: learning curves and internals.

A plain training loop (Adam, no Lightning, so that every variant runs in
seconds) over the rows of a :class:`~moegraph.data.TabularMultiTaskDataModule`
(statistics fitted on the training rows): the MMoE paper's synthetic
benchmark written as a Census-like table (each of the ``d`` features a
categorical column of ``--bins`` bins, one-hot encoded: ``d * bins`` sparse
columns; both labels made binary at their median), or its numeric form
(``--numeric``: two regression tasks). Each epoch records the training loss,
the validation score of each task (AUC, or R^2), and what could explain a
late-epoch fall:

* ``bn_gap``: the validation score with batch norm in eval mode (running
  statistics, what is tested) minus the score with the statistics of the
  validation rows themselves (a diagnostic only); a large gap means the
  running statistics do not describe the features the experts see;
* ``fg_dev``: mean ``|2 sigmoid(x A B) - 1|`` of the feature gates on the
  validation rows (0: identity), and ``fg_max``, their largest value;
* ``out_scale``: mean absolute expert activation.

One JSON per (variant, seed) in ``experiments/results/home_diagnosis_runs/``
(cached; ``--table-only`` rebuilds the table), and the table in
``experiments/results/home_diagnosis.md``::

    OMP_NUM_THREADS=1 python experiments/diagnose_home.py --seeds 2
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _study import RESULTS, command_line
from torchmetrics.functional import auroc, r2_score

from moegraph.data import TabularMultiTaskDataModule, mmoe_synthetic_frame
from moegraph.nn import HoME, MMoE
from moegraph.nn.multitask import MultiGateLevel

RUNS = RESULTS / "home_diagnosis_runs"

# name -> (class, kwargs); every HoME: each task its own group, 4 shared + 2 per group
# (+ 1 per task at level 2), as the synthetic benchmark's config.
HOME = dict(num_shared_experts=4, num_group_experts=2, num_task_experts=1)
VARIANTS: dict[str, tuple[type, dict]] = {
    "MMoE": (MMoE, dict(num_experts=8)),
    "HoME (paper)": (HoME, dict(HOME, paper=True)),
    "HoME w/o expert norm": (HoME, dict(HOME, paper=True, expert_norm=None)),
    "HoME w/o feature gate": (HoME, dict(HOME, paper=True, feature_gate=False)),
    "HoME w/o self gate": (HoME, dict(HOME, paper=True, self_gate=False)),
    "HoME layer norm": (HoME, dict(HOME, paper=True, expert_norm="layer_norm")),
    "HoME batch norm + ReLU": (HoME, dict(HOME, paper=True, activation="relu")),
    "HoME Swish w/o norm": (HoME, dict(HOME, paper=True, expert_norm=None,
                                       activation="silu")),
    "HoME (paper), lr / 4": (HoME, dict(HOME, paper=True, lr_scale=0.25)),
    "HoME BN gamma 0.25": (HoME, dict(HOME, paper=True, post="gamma")),
    "HoME BN gamma 0.1": (HoME, dict(HOME, paper=True, post="gamma0.1")),
    "HoME BN gamma 0.03": (HoME, dict(HOME, paper=True, post="gamma0.03")),
    "HoME BN unit-scale weights": (HoME, dict(HOME, paper=True, unit_scale=True)),
    "HoME BN unit-scale weights, gamma 0.1": (HoME, dict(HOME, paper=True, unit_scale=True,
                                                         post="gamma0.1")),
    "HoME BN detached stats": (HoME, dict(HOME, paper=True, post="detached")),
    "HoME BN running stats": (HoME, dict(HOME, paper=True, post="running")),
    "HoME BN eps 1": (HoME, dict(HOME, paper=True, post="eps1")),
    "HoME layer norm gain 0.1": (HoME, dict(HOME, expert_norm="layer_norm",
                                            expert_norm_gain=0.1)),
    "HoME BN gain 0.1 + ReLU": (HoME, dict(HOME, expert_norm_gain=0.1, activation="relu")),
    "HoME BN level 2 only": (HoME, dict(HOME, paper=True, post="level2")),
    "HoME expert scale norm": (HoME, dict(HOME, paper=True, post="scale")),
}


class _ExpertScaleNorm(torch.nn.Module):
    """Exploration: one scale per expert (RMS over the batch and its units),
    running average for eval; no centring, no per-unit standardisation."""

    def __init__(self, E, H):
        super().__init__()
        self.E, self.H = E, H
        self.register_buffer("running", torch.ones(E))

    def forward(self, h):
        v = h.view(h.size(0), self.E, self.H)
        if self.training:
            ms = v.pow(2).mean((0, 2))
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * ms)
        else:
            ms = self.running
        return (v / (ms + 1e-5).sqrt()[None, :, None]).reshape(h.shape)


@torch.no_grad()
def unit_scale(model, x):
    """Rescale every normalised expert's weights and bias so that its
    pre-normalisation activations have unit std on ``x``: the function is
    unchanged (batch norm is scale-invariant), only the weights' norm (and so
    Adam's effective step on their direction) changes."""
    seen = {}
    hooks = [lv.norm.register_forward_hook(
        lambda m, inp, out, lv=lv: seen.__setitem__(lv, inp[0].std(0)))
        for lv in model.modules() if isinstance(lv, MultiGateLevel) and lv.norm is not None]
    model.train()
    model(x)
    for h in hooks:
        h.remove()
    for lv, std in seen.items():
        scale = 1.0 / std.clamp_min(1e-6).view(lv.num_experts, lv.hidden_channels)
        lv.weight.mul_(scale[:, None, :])
        lv.bias.mul_(scale)
        print(f"unit_scale: level weights x {scale.mean().item():.2f} on average")


class _StatNorm(torch.nn.Module):
    """Exploration: batch norm whose statistics carry no gradient
    (``detached``), or the running statistics used in training too
    (``running``, updated from each batch)."""

    def __init__(self, bn, how):
        super().__init__()
        self.bn, self.how = bn, how

    def forward(self, h):
        bn = self.bn
        if not self.training:
            return bn(h)
        mean, var = h.mean(0).detach(), h.var(0, unbiased=False).detach()
        with torch.no_grad():
            bn.running_mean.mul_(0.9).add_(0.1 * mean)
            bn.running_var.mul_(0.9).add_(0.1 * var)
        if self.how == "running":
            mean, var = bn.running_mean, bn.running_var
        return (h - mean) / (var + bn.eps).sqrt() * bn.weight + bn.bias


def _post(model, how):
    levels = [m for m in model.modules() if isinstance(m, MultiGateLevel)]
    for li, lv in enumerate(levels):
        if how.startswith("gamma"):
            torch.nn.init.constant_(lv.norm.weight, float(how[5:] or 0.25))
        elif how == "level2" and li == 0:
            lv.norm, lv.activation = None, "relu"
        elif how == "eps1":
            lv.norm.eps = 1.0
        elif how in ("detached", "running"):
            lv.norm = _StatNorm(lv.norm, how)
        elif how == "scale":
            lv.norm = _ExpertScaleNorm(lv.num_experts, lv.hidden_channels)
    return model


def build(name: str, in_channels: int, hidden: int, tasks: list[str]):
    cls, kwargs = VARIANTS[name]
    kwargs = dict(kwargs)
    kwargs.pop("lr_scale", None)
    post = kwargs.pop("post", None)
    kwargs.pop("unit_scale", None)
    if kwargs.pop("paper", False):  # the paper's expert normalisation: gain 1
        kwargs["expert_norm_gain"] = 1.0
    model = cls(in_channels, hidden, tasks, tower_channels=8, **kwargs)
    return _post(model, post) if post else model


def score(kind: str, pred, y) -> float:
    if kind == "binary":
        return float(auroc(torch.sigmoid(pred), y.long(), task="binary"))
    return float(r2_score(pred, y))


@torch.no_grad()
def internals(model, x: torch.Tensor, y: dict, kind: str) -> dict:
    model.eval()
    out = model(x)
    scores = {t: score(kind, out.outputs[t], y[t]) for t in y}
    rec = {"scores": scores,
           "out_scale": float(torch.stack([h.abs().mean() for h in out.experts]).mean())}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if bns:
        probe = copy.deepcopy(model)
        for m in probe.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.train()  # normalise with the statistics of these rows
        own = probe(x)
        rec["bn_gap"] = statistics.fmean(scores[t] - score(kind, own.outputs[t], y[t])
                                         for t in y)
    level = next((m for m in model.modules() if isinstance(m, MultiGateLevel)
                  and m.fg_a is not None), None)
    if level is not None:
        E, r = level.num_experts, level.feature_gate_rank
        z = (x @ level.fg_a).view(-1, E, r).transpose(0, 1)  # [E, N, r]
        gate = 2 * torch.sigmoid(torch.bmm(z, level.fg_b))  # [E, N, F]
        rec["fg_dev"] = float((gate - 1).abs().mean())
        rec["fg_max"] = float(gate.max())
    return rec


def run(name: str, seed: int, args) -> dict:
    frame = mmoe_synthetic_frame(args.rows, args.correlation, in_channels=args.features,
                                 seed=seed, num_bins=None if args.numeric else args.bins,
                                 binary=not args.numeric)
    kind = "regression" if args.numeric else "binary"
    dm = TabularMultiTaskDataModule(frames=frame, tasks={"y1": kind, "y2": kind},
                                    batch_size=args.batch_size, seed=seed)
    dm.setup()
    tr, va, te = (dm.tensors[s] for s in ("train", "val", "test"))
    tasks = ["y1", "y2"]
    torch.manual_seed(seed)
    model = build(name, tr["x"].size(1), args.hidden, tasks)
    if VARIANTS[name][1].get("unit_scale"):
        unit_scale(model, tr["x"][:args.batch_size])
    opt = torch.optim.Adam(model.parameters(),
                           lr=args.lr * VARIANTS[name][1].get("lr_scale", 1.0))
    loss_fn = F.binary_cross_entropy_with_logits if kind == "binary" else F.mse_loss
    epochs, best, best_state = [], -float("inf"), None
    g = torch.Generator().manual_seed(seed)
    start = time.process_time()
    for _ in range(args.epochs):
        model.train()
        total, n = 0.0, 0
        for idx in torch.randperm(tr["x"].size(0), generator=g).split(args.batch_size):
            if idx.numel() < 2:
                continue
            out = model(tr["x"][idx])
            loss = sum(loss_fn(out.outputs[t], tr["y"][t][idx].float()) for t in tasks)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * idx.numel(), n + idx.numel()
        rec = internals(model, va["x"], va["y"], kind)
        rec["train_loss"] = total / n
        rec["val_mean"] = statistics.fmean(rec["scores"].values())
        epochs.append(rec)
        if rec["val_mean"] > best:
            best, best_state = rec["val_mean"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test = internals(model, te["x"], te["y"], kind)
    return dict(name=name, seed=seed, epochs=epochs, test=test["scores"],
                best_epoch=1 + max(range(len(epochs)), key=lambda i: epochs[i]["val_mean"]),
                params=sum(p.numel() for p in model.parameters()),
                cpu_seconds=time.process_time() - start, args=vars(args) | {"runs": None})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--bins", type=int, default=5)
    parser.add_argument("--numeric", action="store_true")
    parser.add_argument("--correlation", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tag", default="onehot")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", default=None,
                        help="write the summary table (markdown) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = RUNS / args.tag
    runs.mkdir(parents=True, exist_ok=True)
    recs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for name in args.variants:
            path = runs / f"{name.replace(' ', '_').replace('/', '')}_seed{seed}.json"
            if path.is_file():
                rec = json.loads(path.read_text())
            elif args.table_only:
                continue
            else:
                rec = run(name, seed, args)
                path.write_text(json.dumps(rec, indent=1))
            recs.setdefault(name, []).append(rec)
            e = rec["epochs"]
            print(f"{name} seed {seed}: best epoch {rec['best_epoch']}, test "
                  f"{statistics.fmean(rec['test'].values()):.4f}; val by epoch "
                  + " ".join(f"{r['val_mean']:.3f}" for r in e)
                  + (f"; bn_gap last {e[-1]['bn_gap']:+.4f}" if "bn_gap" in e[-1] else "")
                  + (f"; fg_dev last {e[-1]['fg_dev']:.3f} max {e[-1]['fg_max']:.2f}"
                     if "fg_dev" in e[-1] else "")
                  + f"; train loss best/last {e[rec['best_epoch'] - 1]['train_loss']:.3f}/"
                  f"{e[-1]['train_loss']:.3f}; {rec['cpu_seconds']:.0f} s", flush=True)
    print(command_line(__file__, argv))
    if args.out:
        what = "R^2" if args.numeric else "AUC"
        Path(args.out).write_text(
            f"Command: `PYTHONPATH=. OMP_NUM_THREADS=1 {command_line(__file__, argv)}`\n\n"
            + summary_table(recs, what) + "\n")


def summary_table(recs: dict[str, list[dict]], what: str) -> str:
    r"""One row per variant: mean over its seeds of the epoch-by-epoch record."""
    def m(values):
        return statistics.fmean(values) if values else float("nan")

    lines = [f"| variant | seeds | best epoch | best val {what} | val {what}, last epoch "
             f"| test {what} (best epoch) | train loss, best / last epoch "
             "| eval - own-stats val (last) | feature-gate mean dev. (last) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in recs.items():
        last = [r["epochs"][-1] for r in rs]
        best = [r["epochs"][r["best_epoch"] - 1] for r in rs]
        gap = [e["bn_gap"] for e in last if "bn_gap" in e]
        dev = [e["fg_dev"] for e in last if "fg_dev" in e]
        lines.append(
            f"| {name} | {len(rs)} | {m([r['best_epoch'] for r in rs]):.1f} "
            f"| {m([e['val_mean'] for e in best]):.4f} | {m([e['val_mean'] for e in last]):.4f} "
            f"| {m([statistics.fmean(r['test'].values()) for r in rs]):.4f} "
            f"| {m([e['train_loss'] for e in best]):.3f} / "
            f"{m([e['train_loss'] for e in last]):.3f} "
            f"| {f'{m(gap):+.4f}' if gap else '-'} | {f'{m(dev):.3f}' if dev else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
