r"""Expert-utilisation statistics and their plots, in one place."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from moegraph.nn.routing import Routing


def expert_load(routings: Sequence[Routing]) -> Tensor:
    r"""Share of the assignments each expert received, one row per layer,
    ``[L, E]`` (rows sum to one; all-zero for a layer without assignments)."""
    if not routings:
        return torch.zeros(0, 0)
    loads = torch.stack([r.load.detach().float().cpu() for r in routings])  # [L, E]
    return loads / loads.sum(dim=1, keepdim=True).clamp_min(1.0)


def format_expert_load(load: Tensor) -> str:
    r"""A markdown table of :func:`expert_load`: layers as rows, experts as
    columns, shares in percent, plus the max/mean ratio (1.0 = balanced)."""
    if load.numel() == 0:
        return "(no MoE layer)"
    L, E = load.shape
    head = "| layer | " + " | ".join(f"e{i}" for i in range(E)) + " | max/mean |"
    rule = "|---" * (E + 2) + "|"
    rows = [head, rule]
    for layer in range(L):
        share = load[layer]
        imbalance = float(share.max() / share.mean()) if share.sum() > 0 else float("nan")
        cells = " | ".join(f"{100 * float(s):.1f}" for s in share)
        rows.append(f"| {layer} | {cells} | {imbalance:.2f} |")
    return "\n".join(rows)


def plot_expert_load(load: Tensor, path: str | Path, title: str = "expert load") -> Path:
    r"""Save :func:`expert_load` as a heatmap PNG (layers x experts)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    L, E = load.shape
    fig = Figure(figsize=(max(4.0, 0.5 * E + 2), 0.6 * L + 1.8))
    ax = fig.subplots()
    im = ax.imshow(100 * load.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="% of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def routing_by_group(routing: Routing, group: Tensor, num_groups: int | None = None,
                     rows: Tensor | None = None) -> Tensor:
    r"""Router specialisation: the share of each group's assignments that went
    to each expert, ``[G, E]`` (rows sum to one; all-zero for an empty group).
    ``group [N]`` labels the routed rows (e.g. the cluster of each sample);
    ``rows`` (a boolean mask or indices) keeps a subset, e.g. the test rows."""
    group = torch.as_tensor(group).flatten().long().cpu()
    if group.numel() != routing.num_rows:
        raise ValueError(f"'group' must label the {routing.num_rows} routed rows "
                         f"(got {group.numel()})")
    if group.numel() and int(group.min()) < 0:
        raise ValueError("'group' must be non-negative")
    G = int(num_groups if num_groups is not None else (int(group.max()) + 1 if group.numel()
                                                          else 0))
    E = routing.num_experts
    keep = torch.ones(group.numel(), dtype=torch.bool)
    if rows is not None:
        rows = torch.as_tensor(rows).cpu()
        keep = rows.bool() if rows.dtype == torch.bool else keep.new_zeros(keep.shape).index_fill_(
            0, rows.long(), True)
    row, expert = routing.row.cpu(), routing.expert.cpu()
    kept = keep[row]
    counts = torch.zeros(G * E).index_add_(0, group[row[kept]] * E + expert[kept],
                                           torch.ones(int(kept.sum()))).view(G, E)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def plot_routing_by_group(share: Tensor, path: str | Path, group_name: str = "cluster",
                          title: str = "routing by group") -> Path:
    r"""Save :func:`routing_by_group` as a heatmap PNG (groups x experts,
    percent written in each cell)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    G, E = share.shape
    fig = Figure(figsize=(max(4.0, 0.6 * E + 2), 0.5 * G + 1.8))
    ax = fig.subplots()
    im = ax.imshow(100 * share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=100)
    for i in range(G):
        for j in range(E):
            value = 100 * float(share[i, j])
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="k" if value > 60 else "w")
    ax.set_xlabel("expert")
    ax.set_ylabel(group_name)
    ax.set_xticks(range(E))
    ax.set_yticks(range(G))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"% of the {group_name}'s samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def confidence_histogram(confidence: Tensor, correct: Tensor, bins: int = 20
                         ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Counts of the Mowst confidence :math:`C \in [0, 1]` in ``bins`` equal
    bins, for nodes the weak expert classifies rightly and wrongly.

    Returns:
        ``(edges [bins + 1], right [bins], wrong [bins])``
    """
    confidence = torch.as_tensor(confidence, dtype=torch.float).flatten().cpu()
    correct = torch.as_tensor(correct, dtype=torch.bool).flatten().cpu()
    if confidence.shape != correct.shape:
        raise ValueError("'confidence' and 'correct' must have one entry per node")
    edges = torch.linspace(0, 1, bins + 1)
    index = (confidence.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    right = torch.bincount(index[correct], minlength=bins)
    wrong = torch.bincount(index[~correct], minlength=bins)
    return edges, right, wrong


def plot_confidence_histogram(confidence: Tensor, correct: Tensor, path: str | Path,
                              title: str = "Mowst confidence", bins: int = 20) -> Path:
    r"""Save the histogram of :func:`confidence_histogram` as a PNG: where
    the gate puts the nodes the MLP gets right (ideally near 1) and wrong
    (ideally near 0, deferred to the GNN)."""
    from matplotlib.figure import Figure

    edges, right, wrong = confidence_histogram(confidence, correct, bins)
    centers = ((edges[1:] + edges[:-1]) / 2).numpy()
    width = 1.0 / bins
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.bar(centers, right.numpy(), width=width * 0.9, alpha=0.6, label="weak expert right")
    ax.bar(centers, wrong.numpy(), width=width * 0.9, alpha=0.6, label="weak expert wrong")
    ax.set_xlabel("confidence C")
    ax.set_ylabel("nodes")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path



# ---------------------------------------------------------------------------
# Multi-task experts (MMoE, PLE, HoME): HoME's three anomalies as numbers.
# ---------------------------------------------------------------------------

def _owner_of(label: str) -> str:
    return label.split(":", 1)[1] if ":" in label else label


def multitask_diagnostics(gates: dict[str, Tensor], experts: Sequence[Tensor],
                          expert_labels: Sequence[Sequence[str]], tasks: Sequence[str],
                          group_of: dict[str, str] | None = None,
                          eps: float = 1e-3) -> dict:
    r"""Numbers for the three anomalies of multi-gate experts named in HoME
    (Wang et al., 2024), from one :class:`~moegraph.nn.MultiTaskOutput`.

    * **collapse**, per level and expert: ``zero_share``, the share of its
      activations with :math:`|a| \le` ``eps`` (exact zeros for ReLU experts),
      and ``scale``, the mean :math:`|a|`; ``scale_spread`` = max / min scale
      over the level's experts.
    * **degradation**, per shared expert of each level: the mean weight each
      task (or group) gate of that level puts on it and its share of the
      total; the gate *uses* the expert when its mean weight is at least half
      of uniform (``0.5 / experts the gate sees``); an expert used by at most
      one gate is ``flagged``.
    * **underfitting**, per task (gates of the last level): the mean weight on
      its own experts (``task:<t>`` and its group's ``group:<g>``), on the
      shared ones, and on any other.

    Args:
        gates (dict): gate weights ``[N, E_l]`` by ``"<level>/<stream>"``.
        experts (list of Tensor): expert activations ``[N, E_l, H]`` per level.
        expert_labels (list of list of str): owner of each expert per level.
        tasks (list of str): task names.
        group_of (dict, optional): task -> meta-task group (HoME).
        eps (float, optional): near-zero threshold. (default: :obj:`1e-3`)
    """
    group_of = dict(group_of or {})
    levels = []
    for h, labels in zip(experts, expert_labels, strict=True):
        a = h.detach().float().abs()  # [N, E, H]
        zero = (a <= eps).float().mean(dim=(0, 2))  # [E]
        scale = a.mean(dim=(0, 2))  # [E]
        spread = float(scale.max() / scale.min().clamp_min(1e-12))
        levels.append({"labels": list(labels), "zero_share": zero.tolist(),
                       "scale": scale.tolist(), "scale_spread": spread})
    usage = {name: w.detach().float().mean(dim=0).tolist() for name, w in gates.items()}
    visible = {name: int((w.detach() > 0).any(dim=0).sum()) for name, w in gates.items()}

    degradation = []
    for li, labels in enumerate(expert_labels):
        level_gates = [n for n in usage if n.startswith(f"{li}/") and not n.endswith("/shared")]
        for e, label in enumerate(labels):
            if label != "shared" or not level_gates:
                continue
            weight = {n.split("/", 1)[1]: usage[n][e] for n in level_gates}
            total = sum(weight.values()) or 1.0
            users = [n.split("/", 1)[1] for n in level_gates
                     if usage[n][e] >= 0.5 / max(visible[n], 1)]
            degradation.append({"level": li, "expert": e, "weight": weight,
                                "share": {k: v / total for k, v in weight.items()},
                                "users": users, "flagged": len(users) <= 1})

    underfitting = {}
    last = len(expert_labels) - 1
    for t in tasks:
        name = f"{last}/{t}"
        if name not in usage:
            continue
        own_labels = {f"task:{t}"} | ({f"group:{group_of[t]}"} if t in group_of else set())
        own = shared = 0.0
        for w, label in zip(usage[name], expert_labels[last], strict=True):
            if label in own_labels:
                own += w
            elif label == "shared":
                shared += w
        underfitting[t] = {"own": own, "shared": shared, "other": max(0.0, 1 - own - shared)}
    return {"levels": levels, "gate_usage": usage, "degradation": degradation,
            "underfitting": underfitting}


def multitask_summary(diag: dict) -> dict[str, float]:
    r"""Scalars of :func:`multitask_diagnostics` to log: the largest zero
    share of any expert, the largest scale spread of any level, the number of
    flagged shared experts, and each task's weight on its own experts."""
    out: dict[str, float] = {}
    if diag["levels"]:
        out["diag/max_zero_share"] = max(max(lv["zero_share"]) for lv in diag["levels"])
        out["diag/scale_spread"] = max(lv["scale_spread"] for lv in diag["levels"])
        out["diag/flagged_shared_experts"] = float(sum(d["flagged"]
                                                       for d in diag["degradation"]))
    for t, u in diag["underfitting"].items():
        out[f"diag/own_weight/{t}"] = u["own"]
    return out


def format_multitask_diagnostics(diag: dict) -> str:
    r"""A readable text report of :func:`multitask_diagnostics`."""
    lines = []
    for li, lv in enumerate(diag["levels"]):
        cells = ", ".join(f"{lab}={100 * z:.0f}%/{s:.2f}" for lab, z, s in
                          zip(lv["labels"], lv["zero_share"], lv["scale"], strict=True))
        lines.append(f"level {li} collapse (zero share / mean |a|): {cells}; "
                     f"scale spread {lv['scale_spread']:.2f}")
    for d in diag["degradation"]:
        share = ", ".join(f"{k}={100 * v:.0f}%" for k, v in d["share"].items())
        flag = "  <- used by one gate at most" if d["flagged"] else ""
        lines.append(f"level {d['level']} shared expert {d['expert']}: {share}{flag}")
    for t, u in diag["underfitting"].items():
        lines.append(f"task {t}: own experts {100 * u['own']:.0f}%, shared "
                     f"{100 * u['shared']:.0f}%, other {100 * u['other']:.0f}%")
    return "\n".join(lines)


def plot_multitask_diagnostics(diags: dict[str, dict], path: str | Path,
                               kind: str = "gates") -> Path:
    r"""Heatmaps of :func:`multitask_diagnostics` for several models side by
    side (one row of panels per model, one panel per level).

    ``kind="gates"``: mean gate weight (rows: gates, columns: experts, labelled
    by owner). ``kind="collapse"``: zero share (%) and relative scale (scale /
    level mean) per expert.
    """
    from matplotlib.figure import Figure

    if kind not in ("gates", "collapse"):
        raise ValueError(f"'kind' must be 'gates' or 'collapse' (got {kind!r})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(m, d) for m, d in diags.items() if d["levels"]]
    cols = max((len(d["levels"]) for _, d in rows), default=1)
    fig = Figure(figsize=(4.2 * cols + 1, 2.6 * max(len(rows), 1) + 0.5))
    axes = fig.subplots(max(len(rows), 1), cols, squeeze=False)
    for r, (model, diag) in enumerate(rows):
        for li in range(cols):
            ax = axes[r][li]
            if li >= len(diag["levels"]):
                ax.axis("off")
                continue
            lv = diag["levels"][li]
            xlabels = [lab.replace("task:", "t:").replace("group:", "g:")
                       for lab in lv["labels"]]
            if kind == "gates":
                names = [n for n in diag["gate_usage"] if n.startswith(f"{li}/")]
                mat = torch.tensor([diag["gate_usage"][n] for n in names])
                ylabels = [n.split("/", 1)[1] for n in names]
                im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
                for i in range(mat.size(0)):
                    for j in range(mat.size(1)):
                        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center",
                                fontsize=6, color="w" if mat[i, j] < 0.5 else "k")
            else:
                scale = torch.tensor(lv["scale"])
                mat = torch.stack([100 * torch.tensor(lv["zero_share"]),
                                   100 * scale / scale.mean().clamp_min(1e-12)])
                ylabels = ["zero %", "scale %mean"]
                im = ax.imshow(mat.numpy(), aspect="auto", cmap="magma", vmin=0)
                top = float(mat.max()) or 1.0
                for i in range(2):
                    for j in range(mat.size(1)):
                        ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center",
                                fontsize=6, color="k" if mat[i, j] > 0.6 * top else "w")
            ax.set_xticks(range(len(xlabels)))
            ax.set_xticklabels(xlabels, rotation=60, fontsize=6)
            ax.set_yticks(range(len(ylabels)))
            ax.set_yticklabels(ylabels, fontsize=7)
            ax.set_title(f"{model}, level {li}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mean gate weight per expert" if kind == "gates"
                 else "expert collapse: zero activations and output scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
