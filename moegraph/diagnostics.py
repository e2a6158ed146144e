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
