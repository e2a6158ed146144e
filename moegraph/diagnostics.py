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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    L, E = load.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * E + 2), 0.6 * L + 1.8))
    im = ax.imshow(100 * load.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="% of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, right, wrong = confidence_histogram(confidence, correct, bins)
    centers = ((edges[1:] + edges[:-1]) / 2).numpy()
    width = 1.0 / bins
    fig, ax = plt.subplots(figsize=(5, 3.2))
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
    plt.close(fig)
    return path
