r"""One factory for the node-level backbones that Mowst and the baselines use:
PyG's own models, or residual blocks with normalisation."""
from __future__ import annotations

from typing import Any, Optional

from torch.nn import Module

from moegraph.nn.models.gnn import MoEGNN

BACKBONES = ("mlp", "gcn", "sage", "gat", "gin")


def make_backbone(name: str, in_channels: int, out_channels: int, hidden_channels: int = 64,
                  num_layers: int = 2, dropout: float = 0.5, residual: bool = False,
                  norm: Optional[str] = None, input_dropout: Optional[float] = None,
                  **kwargs: Any) -> Module:
    r"""A node classifier by name: ``"mlp"`` (no graph), ``"gcn"``,
    ``"sage"``, ``"gat"`` or ``"gin"``.

    With ``residual=False`` it is PyG's own model
    (:class:`~torch_geometric.nn.models.MLP`, ``GCN``, ``GraphSAGE``,
    ``GAT``, ``GIN``: ``num_layers`` layers from ``in_channels`` to
    ``out_channels``, the architecture of the Planetoid baselines). With
    ``residual=True`` it is :class:`~moegraph.nn.models.MoEGNN` with a dense
    feed-forward part: an input projection, ``num_layers`` residual blocks
    (convolution, then a two-layer FFN, each added back and normalised) and a
    linear classifier, the architecture of the heterophilous-graph baselines
    of `Platonov et al. <https://arxiv.org/abs/2302.11640>`_ (``"mlp"`` is
    then their ResNet).

    Args:
        name (str): one of :data:`BACKBONES`.
        in_channels (int): node feature size.
        out_channels (int): number of classes.
        hidden_channels (int, optional): width. (default: :obj:`64`)
        num_layers (int, optional): layers or residual blocks. (default: :obj:`2`)
        dropout (float, optional): dropout rate. (default: :obj:`0.5`)
        residual (bool, optional): residual blocks instead of PyG's plain
            stack. (default: :obj:`False`)
        norm (str, optional): ``"layer_norm"``, ``"batch_norm"`` or
            :obj:`None`. (default: :obj:`None`)
        input_dropout (float, optional): dropout on the input features of
            the residual model; ``dropout`` if :obj:`None`.
        **kwargs: further arguments of the model (e.g. ``heads`` for GAT).
    """
    if name not in BACKBONES:
        raise ValueError(f"'name' must be one of {BACKBONES} (got {name!r})")
    if num_layers < 1:
        raise ValueError(f"'num_layers' must be positive (got {num_layers})")
    if norm == "none":
        norm = None
    if residual:
        conv = "none" if name == "mlp" else name
        model = MoEGNN(in_channels, hidden_channels, out_channels, num_layers=num_layers,
                       conv=conv, conv_kwargs=kwargs or None, ffn="dense", norm=norm,
                       dropout=dropout,
                       input_dropout=dropout if input_dropout is None else input_dropout)
        return model
    from torch_geometric.nn import models

    if name == "mlp":
        channels = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        return models.MLP(channels, dropout=dropout, norm=norm, **kwargs)
    cls = {"gcn": models.GCN, "sage": models.GraphSAGE, "gat": models.GAT,
           "gin": models.GIN}[name]
    return cls(in_channels, hidden_channels, num_layers, out_channels, dropout=dropout,
               norm=norm, **kwargs)
