r"""Mixture of weak and strong experts (Mowst, `Zeng et al., ICLR 2024
<https://arxiv.org/abs/2311.05185>`_): a light MLP expert and a GNN expert per
node, mixed by a confidence computed from the MLP's own prediction.

The GNN is needed only where the MLP is unsure, so :meth:`Mowst.predict` can
run it on the computation subgraph of those nodes alone (sparse inference).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.nn import GCNConv, MessagePassing
from torch_geometric.utils import k_hop_subgraph

from moegraph.nn.output import ModelOutput, as_model_output
from moegraph.utils.graph import (  # noqa: F401 (public here before)
    HopSubgraph,
    check_edge_index,
    gcn_degree_inv_sqrt,
    gcn_normalized_edges,
    hop_ordered_subgraph,
    trimmable_convs,
)

VARIANTS = ("mowst", "mowst_star")
DISPERSIONS = ("variance", "entropy")
GATE_TYPES = ("mlp", "variance", "entropy")
IGNORE_INDEX = -100
# Sparse inference runs the strong expert on the whole graph instead when its
# trimmed layers would visit this share of the whole-graph pass's edge visits
# (layers times edges) or more.
DENSE_EDGE_SHARE = 0.9


def variance_dispersion(probs: Tensor) -> Tensor:
    r"""Variance of each row of a probability matrix, divided by that of a
    one-hot row, so that a uniform row gives 0 and a one-hot row gives 1.

    .. math::
        D_{\mathrm{var}}(\mathbf{p}) = \frac{\mathrm{Var}(\mathbf{p})}
        {\mathrm{Var}(\mathbf{e}_1)} = \frac{C \sum_c (p_c - 1/C)^2}{C - 1}

    Shapes:
        - **input:** ``probs [N, C]`` (rows sum to one)
        - **output:** ``[N]`` in ``[0, 1]``
    """
    C = probs.size(-1)
    if C < 2:
        raise ValueError(f"dispersion needs at least two classes (got {C})")
    return ((probs - 1.0 / C).pow(2).sum(-1) * C / (C - 1)).clamp(0.0, 1.0)


def entropy_dispersion(probs: Tensor) -> Tensor:
    r"""One minus the normalised entropy of each row: uniform gives 0,
    one-hot gives 1.

    .. math::
        D_{\mathrm{ent}}(\mathbf{p}) = 1 - \frac{H(\mathbf{p})}{\log C}

    Shapes:
        - **input:** ``probs [N, C]`` (rows sum to one)
        - **output:** ``[N]`` in ``[0, 1]``
    """
    C = probs.size(-1)
    if C < 2:
        raise ValueError(f"dispersion needs at least two classes (got {C})")
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return (1.0 - entropy / math.log(C)).clamp(0.0, 1.0)


def dispersions(logits: Tensor) -> Tensor:
    r"""Both dispersions of ``softmax(logits)``, computed from the logits
    (never from already-softmaxed outputs) in float32.

    Shapes:
        - **input:** ``logits [N, C]``
        - **output:** ``[N, 2]`` (variance, entropy)
    """
    probs = logits.float().softmax(dim=-1)
    return torch.stack([variance_dispersion(probs), entropy_dispersion(probs)], dim=-1)


class ConfidenceGate(Module):
    r"""The confidence :math:`C = G(D)` of the weak expert, in ``[0, 1]``.

    ``gate_type="mlp"``: a small MLP with a sigmoid output over the dispersions
    :math:`[D_{\mathrm{var}}, D_{\mathrm{ent}}]`, optionally concatenated
    with the node features (as in the reference code). ``gate_type="variance"``
    or ``"entropy"``: the fixed function :math:`C = D^{p}` of one dispersion
    (``power`` :math:`p > 0`), monotone and hence quasiconvex as the theory
    asks; it has no parameters.

    Args:
        gate_type (str, optional): ``"mlp"``, ``"variance"`` or ``"entropy"``.
            (default: :obj:`"mlp"`)
        hidden_channels (int, optional): hidden size of the MLP.
            (default: :obj:`32`)
        num_layers (int, optional): layers of the MLP. (default: :obj:`2`)
        in_channels (int, optional): node-feature size to concatenate with the
            dispersions; :obj:`0` uses the dispersions alone. (default: :obj:`0`)
        power (float, optional): exponent of the fixed gates. (default: :obj:`1.0`)

    Shapes:
        - **input:** ``disp [N, 2]``, ``x [N, F]`` (when ``in_channels > 0``)
        - **output:** logit of the confidence ``[N]`` (``sigmoid`` of it is
          ``C``; fixed gates return ``logit(C)``)
    """

    def __init__(self, gate_type: str = "mlp", hidden_channels: int = 32, num_layers: int = 2,
                 in_channels: int = 0, power: float = 1.0):
        super().__init__()
        if gate_type not in GATE_TYPES:
            raise ValueError(f"'gate_type' must be one of {GATE_TYPES} (got {gate_type!r})")
        if power <= 0:
            raise ValueError(f"'power' must be positive (got {power})")
        if num_layers < 1:
            raise ValueError(f"'num_layers' must be positive (got {num_layers})")
        self.gate_type = gate_type
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.in_channels = in_channels
        self.power = power
        self.mlp: Optional[Module]
        if gate_type == "mlp":
            from torch_geometric.nn.models import MLP
            channels = [2 + in_channels] + [hidden_channels] * (num_layers - 1) + [1]
            self.mlp = MLP(channels, norm=None, dropout=0.0)
        else:
            self.register_module("mlp", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.mlp is not None:
            self.mlp.reset_parameters()

    def forward(self, disp: Tensor, x: Optional[Tensor] = None) -> Tensor:
        if self.mlp is None:
            d = disp[:, DISPERSIONS.index(self.gate_type)].pow(self.power)
            return torch.logit(d.clamp(1e-6, 1 - 1e-6))
        h = disp
        if self.in_channels > 0:
            if x is None or x.size(-1) != self.in_channels:
                raise ValueError(f"the gate expects node features of size {self.in_channels}")
            h = torch.cat([disp, x.to(disp.dtype)], dim=-1)
        return self.mlp(h).squeeze(-1)

    def __repr__(self) -> str:
        if self.gate_type != "mlp":
            return f"{self.__class__.__name__}(gate_type={self.gate_type}, power={self.power})"
        return (f"{self.__class__.__name__}(gate_type=mlp, "
                f"hidden_channels={self.hidden_channels}, "
                f"in_channels={self.in_channels})")


class MowstOutput(NamedTuple):
    r"""Everything a Mowst forward pass computes, per node.

    Attributes:
        weak_logits (Tensor): ``[N, C]`` of the MLP expert.
        strong_logits (Tensor): ``[N, C]`` of the GNN expert.
        gate_logit (Tensor): ``[N]``; the confidence is its sigmoid.
        confidence (Tensor): ``[N]`` in ``[0, 1]``.
    """

    weak_logits: Tensor
    strong_logits: Tensor
    gate_logit: Tensor
    confidence: Tensor


def check_target(target: Tensor, num_classes: int) -> Tensor:
    r"""The mask of the labelled nodes of ``target`` (those not
    :data:`IGNORE_INDEX`, PyTorch's ``-100``); raise a clear error for a label
    outside ``[0, num_classes)`` or when no node is labelled."""
    if target.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"'target' must hold class indices (got {target.dtype})")
    labelled = target != IGNORE_INDEX
    if not bool(labelled.any()):
        raise ValueError(f"every node of 'target' is ignored ({IGNORE_INDEX}): the loss of no "
                         f"node is defined")
    y = target[labelled]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"'target' must lie in [0, {num_classes - 1}] (or be {IGNORE_INDEX} "
                         f"to ignore a node) (got {low if low < 0 else high})")
    return labelled


def mowst_loss(weak_logits: Tensor, strong_logits: Tensor, confidence: Tensor,
               target: Tensor) -> Tensor:
    r"""The Mowst loss, the confidence-weighted sum of the experts' losses,
    averaged over the labelled nodes (a target of ``-100`` is ignored):

    .. math::
        \mathcal{L} = \frac{1}{|V|}\sum_{v} C_v\,\mathrm{CE}(\mathbf{p}^{w}_v, y_v)
        + (1 - C_v)\,\mathrm{CE}(\mathbf{p}^{s}_v, y_v)
    """
    labelled = check_target(target, weak_logits.size(-1))
    ce_weak = F.cross_entropy(weak_logits.float()[labelled], target[labelled], reduction="none")
    ce_strong = F.cross_entropy(strong_logits.float()[labelled], target[labelled],
                                reduction="none")
    c = confidence[labelled]
    return (c * ce_weak + (1 - c) * ce_strong).mean()


def mixture_log_probs(weak_logits: Tensor, strong_logits: Tensor, gate_logit: Tensor) -> Tensor:
    r"""``log(C p_weak + (1 - C) p_strong)`` computed stably from logits, with
    ``C = sigmoid(gate_logit)``.

    Shapes:
        - **output:** ``[N, C]``
    """
    log_c = F.logsigmoid(gate_logit.float()).unsqueeze(-1)
    log_1mc = F.logsigmoid(-gate_logit.float()).unsqueeze(-1)
    return torch.logaddexp(log_c + weak_logits.float().log_softmax(-1),
                           log_1mc + strong_logits.float().log_softmax(-1))


def mowst_star_loss(weak_logits: Tensor, strong_logits: Tensor, gate_logit: Tensor,
                    target: Tensor) -> Tensor:
    r"""The Mowst\* loss, the cross-entropy of the probability mixture,
    averaged over the labelled nodes (a target of ``-100`` is ignored):

    .. math::
        \mathcal{L} = -\frac{1}{|V|}\sum_{v}\log\big(C_v\,p^{w}_{v,y_v}
        + (1 - C_v)\,p^{s}_{v,y_v}\big)
    """
    labelled = check_target(target, weak_logits.size(-1))
    return F.nll_loss(mixture_log_probs(weak_logits[labelled], strong_logits[labelled],
                                        gate_logit[labelled]), target[labelled])


def receptive_hops(module: Module) -> Optional[int]:
    r"""Hops of the computation subgraph that :meth:`Mowst.strong_forward_at`
    needs to compute a node's output exactly: one per message-passing layer;
    :obj:`0` for a model that takes no ``edge_index``; :obj:`None` when
    ``module`` takes one but holds no PyG
    :class:`~torch_geometric.nn.conv.MessagePassing` layer (a model that
    aggregates neighbours its own way, e.g. with ``index_add_``, has a
    receptive field that cannot be read off it).

    A model that :meth:`Mowst.strong_forward_at` cannot trim layer by layer
    (anything but a PyG :class:`~torch_geometric.nn.models.basic_gnn.BasicGNN`
    without jumping knowledge, see :func:`trimmable_convs`) runs on the plain
    :func:`~torch_geometric.utils.k_hop_subgraph`, and needs one hop more when
    a :class:`~torch_geometric.nn.conv.GCNConv` normalises by degree (the
    degree of a node at the last hop counts its own neighbours). A trimmable
    GCN does not: its normalisation is computed on the whole graph and carried
    into the subgraph as edge weights."""
    convs = [m for m in module.modules() if isinstance(m, MessagePassing)]
    if not convs:
        return None if _takes_graph(module) else 0
    if trimmable_convs(module) is not None:
        return len(convs)
    extra = any(isinstance(m, GCNConv) and m.normalize for m in convs)
    return len(convs) + int(extra)


# Salts of the side streams (see side_stream_seed): the initialisation of
# Mowst's weak expert and gate, and the training of what is not the strong
# expert's pre-training (moegraph.tasks.MowstTask).
SIDE_STREAM_INIT = 0x6D6F7773
SIDE_STREAM_TRAIN = 0x74726169


def side_stream_seed(salt: int) -> int:
    r"""A seed for a random stream apart from torch's global one, drawn from
    it without consuming it: the next 63-bit number the global CPU generator
    would give, mixed with ``salt`` (seeds that differ give unrelated
    Mersenne-Twister streams). It follows the run's seed, and a caller that
    draws from the seeded stream inside :func:`torch.random.fork_rng` leaves
    the global stream exactly where it was.
    """
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    peek = int(torch.randint(1 << 62, (), generator=generator))
    return (peek ^ (salt * 0x9E3779B97F4A7C15)) % (1 << 63)


def _build(expert: Union[Module, Callable[..., Module]], in_channels: Optional[int],
           out_channels: Optional[int], name: str) -> Module:
    if isinstance(expert, Module):
        return expert
    if callable(expert):
        if in_channels is None or out_channels is None:
            raise ValueError(f"'{name}' is a factory: 'in_channels' and 'out_channels' are needed")
        return expert(in_channels=in_channels, out_channels=out_channels)
    raise TypeError(f"'{name}' must be a Module or a factory of one (got {type(expert).__name__})")


class Mowst(Module):
    r"""Mixture of a weak (MLP) and a strong (GNN) expert, gated per node by a
    confidence computed from the weak expert's prediction (`Zeng et al.
    <https://arxiv.org/abs/2311.05185>`_):

    .. math::
        y_v = C_v \, f_{\mathrm{weak}}(\mathbf{x}_v)
        + (1 - C_v) \, f_{\mathrm{strong}}(\mathbf{X}, \mathcal{E})_v,
        \qquad C_v = G\big(D(\mathrm{softmax}(f_{\mathrm{weak}}(\mathbf{x}_v)))\big)

    ``variant="mowst"`` trains with :func:`mowst_loss` and predicts with the
    weak expert where a draw :math:`q \sim U[0,1]` falls below :math:`C_v`
    (the reported metric is its expectation) or, deterministically, where
    :math:`C_v \ge \tau`. ``variant="mowst_star"`` trains with
    :func:`mowst_star_loss` and predicts the argmax of the mixture.

    Construction: the strong expert is built (a factory) or re-initialised
    (a module) first, from the caller's random state, so that it starts as
    the GNN alone built at the same point (same seed: same weights), and the
    random state after the constructor is the one that GNN leaves; the weak
    expert and the gate are initialised from a side stream seeded by it
    (:func:`side_stream_seed`).

    Args:
        weak (Module or callable): the weak expert ``weak(x) -> [N, C]`` (an
            MLP; it is called with ``x`` alone, or ``(x, edge_index)`` if it
            needs it), or a factory called with ``in_channels`` and
            ``out_channels``.
        strong (Module or callable): the strong expert
            ``strong(x, edge_index) -> [N, C]``, any PyG GNN, or a factory.
        in_channels (int, optional): node feature size (for factories).
        out_channels (int, optional): number of classes (for factories).
        variant (str, optional): ``"mowst"`` or ``"mowst_star"``.
            (default: :obj:`"mowst"`)
        gate_type (str, optional): ``"mlp"``, ``"variance"`` or ``"entropy"``, see
            :class:`ConfidenceGate`. (default: :obj:`"mlp"`)
        gate_hidden_channels (int, optional): (default: :obj:`32`)
        gate_num_layers (int, optional): (default: :obj:`2`)
        gate_features (bool, optional): concatenate ``x`` to the dispersions
            in the gate's input. (default: :obj:`False`)
        threshold (float, optional): :math:`\tau` of the deterministic
            prediction and of sparse inference. (default: :obj:`0.5`)
        num_hops (int, optional): hops of the strong expert's computation
            subgraph for sparse inference (:meth:`strong_forward_at`); found
            from its message-passing layers if :obj:`None` (see
            :func:`receptive_hops`: one per layer, plus one for a GCN that
            cannot be trimmed layer by layer). A value other than the number
            of layers of a trimmable model runs it untrimmed on the
            ``num_hops``-hop subgraph. A strong expert without PyG
            message-passing layers has no known receptive field: sparse
            inference then runs it on the whole graph, with a warning, unless
            ``num_hops`` is given.

    Shapes:
        - **input:** ``x [N, F]``, ``edge_index [2, M]``
        - **output:** :class:`~moegraph.nn.output.ModelOutput` whose
          ``logits [N, C]`` are the log-probabilities of the mixture and whose
          ``confidence [N]`` is :math:`C`; :meth:`forward_experts`
          returns :class:`MowstOutput` with both experts' logits.
    """

    def __init__(
        self,
        weak: Union[Module, Callable[..., Module]],
        strong: Union[Module, Callable[..., Module]],
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        variant: str = "mowst",
        gate_type: str = "mlp",
        gate_hidden_channels: int = 32,
        gate_num_layers: int = 2,
        gate_features: bool = False,
        threshold: float = 0.5,
        num_hops: Optional[int] = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"'variant' must be one of {VARIANTS} (got {variant!r})")
        check_threshold(threshold)
        if num_hops is not None and (isinstance(num_hops, bool) or not isinstance(num_hops, int)
                                     or num_hops < 0):
            raise ValueError(f"'num_hops' must be a non-negative integer or None (got "
                             f"{num_hops!r})")
        # The strong expert first, from the caller's random state: built by a
        # factory, it is initialised as the GNN alone built at this point would
        # be (``model=gnn``), and the random state after it is that GNN's. The
        # weak expert and the gate draw from a stream of their own (see
        # :func:`side_stream_seed`), so the state Mowst leaves is the GNN's too.
        self.strong = _build(strong, in_channels, out_channels, "strong")
        reset = getattr(self.strong, "reset_parameters", None)
        if isinstance(strong, Module) and callable(reset):
            reset()  # a given module is re-initialised
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(side_stream_seed(SIDE_STREAM_INIT))
            self.weak = _build(weak, in_channels, out_channels, "weak")
            for name, expert in (("weak", self.weak), ("strong", self.strong)):
                c = getattr(expert, "out_channels", None)
                if out_channels is not None and isinstance(c, int) and c != out_channels:
                    raise ValueError(f"the {name} expert predicts {c} classes, but "
                                     f"'out_channels' is {out_channels}")
            c_weak = getattr(self.weak, "out_channels", None)
            c_strong = getattr(self.strong, "out_channels", None)
            if isinstance(c_weak, int) and isinstance(c_strong, int) and c_weak != c_strong:
                raise ValueError(f"the weak expert predicts {c_weak} classes and the strong "
                                 f"expert {c_strong}: they must agree")
            if gate_features and in_channels is None:
                in_channels = getattr(self.weak, "in_channels", None)
                if in_channels is None:
                    raise ValueError("'gate_features=True' needs 'in_channels'")
            self.gate = ConfidenceGate(gate_type, gate_hidden_channels, gate_num_layers,
                                       in_channels if gate_features and in_channels else 0)
            for module in (self.weak, self.gate):  # as reset_parameters() does
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else c_weak
        self.variant = variant
        self.threshold = threshold
        self.gate_type = gate_type
        self.num_hops: Optional[int] = (receptive_hops(self.strong) if num_hops is None
                                        else num_hops)
        self._weak_takes_graph = _takes_graph(self.weak)
        # GCN's inverse square-root degrees of the last graph seen, when the
        # strong expert's GCN layers are ``cached`` (the graph is then static).
        self._gcn_cache: Optional[tuple[tuple, Tensor]] = None

    def reset_parameters(self):
        for module in (self.weak, self.strong, self.gate):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    # -- the three parts ---------------------------------------------------------
    def weak_forward(self, x: Tensor, edge_index: Optional[Tensor] = None) -> Tensor:
        r"""Logits of the weak expert ``[N, C]``."""
        out = self.weak(x, edge_index) if self._weak_takes_graph else self.weak(x)
        return as_model_output(out).logits

    def strong_forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        r"""Logits of the strong expert ``[N, C]``."""
        return as_model_output(self.strong(x, edge_index)).logits

    def gate_forward(self, weak_logits: Tensor, x: Tensor) -> Tensor:
        r"""The gate's logit ``[N]`` from the weak expert's logits: the
        confidence is its sigmoid, computed the same way in training and
        evaluation (from logits, never from softmaxed outputs)."""
        return self.gate(dispersions(weak_logits), x)

    def check_inputs(self, x: Tensor, edge_index: Tensor) -> None:
        r"""Raise a clear error for node features that are not a finite
        ``[N, F]`` float tensor or edges that are not ``[2, M]`` node ids in
        ``[0, N)``."""
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"'x' must be a [num_nodes, num_features] float tensor (got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                             f"{', ' + str(x.dtype) if isinstance(x, Tensor) else ''})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("'x' holds NaN or infinite features")
        if isinstance(edge_index, Tensor):
            check_edge_index(edge_index, x.size(0))

    def forward_experts(self, x: Tensor, edge_index: Tensor) -> MowstOutput:
        r"""Both experts and the gate on the whole graph."""
        self.check_inputs(x, edge_index)
        weak_logits = self.weak_forward(x, edge_index)
        strong_logits = self.strong_forward(x, edge_index)
        check_experts_agree(weak_logits, strong_logits)
        gate_logit = self.gate_forward(weak_logits, x)
        return MowstOutput(weak_logits, strong_logits, gate_logit, torch.sigmoid(gate_logit))

    def forward(self, x: Tensor, edge_index: Tensor) -> ModelOutput:
        r"""
        Args:
            x (Tensor): node features ``[N, F]``.
            edge_index (Tensor): edges ``[2, M]``.
        """
        out = self.forward_experts(x, edge_index)
        logits = mixture_log_probs(out.weak_logits, out.strong_logits, out.gate_logit)
        return ModelOutput(logits, confidence=out.confidence)

    def loss(self, out: MowstOutput, target: Tensor) -> Tensor:
        r"""The training loss of :attr:`variant` on the nodes of ``out``,
        averaged over the labelled ones (``-100`` marks a node to ignore; a
        label outside ``[0, C)``, or no labelled node, raises)."""
        if self.variant == "mowst":
            return mowst_loss(out.weak_logits, out.strong_logits, out.confidence, target)
        return mowst_star_loss(out.weak_logits, out.strong_logits, out.gate_logit, target)

    @torch.no_grad()
    def predict(self, x: Tensor, edge_index: Tensor, threshold: Optional[float] = None,
                sparse: bool = True) -> MowstPrediction:
        r"""Deterministic prediction with threshold :math:`\tau`: the weak
        expert where :math:`C_v \ge \tau`, the strong one elsewhere.

        With ``sparse=True`` (the point of Mowst) the strong expert runs only
        on the :attr:`num_hops`-hop computation subgraph of the nodes below
        the threshold; their predictions equal those of the full graph.

        Returns:
            :class:`MowstPrediction` with ``probs [N, C]`` (weak softmax where
            confident, strong softmax elsewhere), ``confidence [N]``,
            ``strong_mask [N]`` (nodes the strong expert decided) and
            ``num_subgraph_nodes`` (nodes the strong expert ran on).
        """
        tau = self.threshold if threshold is None else check_threshold(threshold)
        self.check_inputs(x, edge_index)
        if sparse and self.num_hops is None:
            warnings.warn(f"Mowst.predict: the strong expert "
                          f"({type(self.strong).__name__}) has no PyG message-passing layer, "
                          f"so its receptive field is unknown and sparse inference would not "
                          f"be exact; it runs on the whole graph (give 'num_hops' to Mowst to "
                          f"run it sparsely)", stacklevel=2)
            sparse = False
        weak_logits = self.weak_forward(x, edge_index)
        confidence = torch.sigmoid(self.gate_forward(weak_logits, x))
        probs = weak_logits.float().softmax(-1)
        strong_mask = confidence < tau
        idx = strong_mask.nonzero().view(-1)
        num_sub = 0
        if idx.numel():
            if sparse:
                strong_logits, num_sub = self.strong_forward_at(x, edge_index, idx)
            else:
                strong_logits, num_sub = self.strong_forward(x, edge_index)[idx], x.size(0)
            probs[idx] = strong_logits.float().softmax(-1)
        return MowstPrediction(probs, confidence, strong_mask, num_sub)

    @torch.no_grad()
    def strong_forward_at(self, x: Tensor, edge_index: Tensor, index: Tensor
                          ) -> tuple[Tensor, int]:
        r"""Logits of the strong expert at the nodes ``index`` only, equal to
        the full-graph logits there.

        A strong expert that :func:`trimmable_convs` accepts (PyG's ``GCN``,
        ``GraphSAGE``, ``GAT``, ``GIN``, ...) runs on the hop-ordered
        :attr:`num_hops`-hop subgraph of ``index`` (:func:`hop_ordered_subgraph`),
        trimmed layer by layer: layer :math:`\ell` of :math:`k` computes only
        the nodes within :math:`k - \ell` hops, from the edges into them. GCN
        layers run with ``normalize=False`` for the call and get the
        normalised weights of the subgraph's edges from the degrees of the
        whole graph (:func:`~moegraph.utils.graph.gcn_degree_inv_sqrt`, one
        count over the edges, kept when the layers are ``cached``), so the
        outermost nodes' degrees are those of the whole graph. Every node
        sums its messages in the order of the full-graph pass, so the logits
        are those of :meth:`strong_forward` bit for bit wherever the dense
        layers round a row alike for the subgraph's rows and the whole
        graph's (a BLAS may differ there by one unit in the last place).
        Any other
        expert runs untrimmed on :func:`~torch_geometric.utils.k_hop_subgraph`.
        When the trimmed layers would still visit :data:`DENSE_EDGE_SHARE`
        (90%) of the edges that the whole-graph pass visits, summed over the
        layers (almost every node unconfident, or dense graphs where one hop
        reaches almost every node), the strong expert runs on the whole graph
        instead: the gathers would cost more than the visits they save.

        Args:
            x (Tensor): node features of the whole graph.
            edge_index (Tensor): edges of the whole graph.
            index (Tensor): the nodes to predict.

        Returns:
            The logits at ``index`` and the number of nodes of the subgraph
            (those within :attr:`num_hops` hops of ``index``).

        Shapes:
            - **input:** ``x [N, F]``, ``edge_index [2, M]``, ``index [B]``
            - **output:** ``[B, C]``, int
        """
        num_nodes = x.size(0)
        if self.num_hops is None:
            raise ValueError(f"the strong expert ({type(self.strong).__name__}) has no PyG "
                             f"message-passing layer: its receptive field is unknown; give "
                             f"'num_hops' to Mowst, or run it on the whole graph")
        convs = trimmable_convs(self.strong)
        if convs is None or len(convs) != self.num_hops or not isinstance(edge_index, Tensor):
            subset, sub_edge_index, mapping, _ = k_hop_subgraph(
                index, self.num_hops, edge_index, relabel_nodes=True, num_nodes=num_nodes)
            return self.strong_forward(x[subset], sub_edge_index)[mapping], subset.numel()

        gcn = [c for c in convs if isinstance(c, GCNConv) and c.normalize]
        self_loops = bool(gcn) and gcn[0].add_self_loops
        sub = hop_ordered_subgraph(index, self.num_hops, edge_index, num_nodes,
                                   add_self_loops=self_loops)
        # Edge visits: layer l of k runs on the edges into hops < k - l.
        k, whole = self.num_hops, edge_index.size(1) + (num_nodes if self_loops else 0)
        visits = sum(count * (k - h) for h, count in enumerate(sub.num_edges_per_hop))
        if visits >= DENSE_EDGE_SHARE * k * whole:
            # nearly every edge in every layer: the gathers would cost more than they save
            return self.strong_forward(x, edge_index)[index], num_nodes
        kwargs: dict[str, Any] = dict(num_sampled_nodes_per_hop=sub.num_nodes_per_hop,
                                      num_sampled_edges_per_hop=sub.num_edges_per_hop)
        if gcn:
            # The weights of GCN's normalisation on the whole graph, at the
            # subgraph's edges only: dinv[u] * dinv[v], bit for bit gcn_norm's.
            dinv = self._gcn_degree_inv_sqrt(gcn, edge_index, num_nodes, x.dtype)
            dinv = dinv[sub.subset]
            src, dst = sub.edge_index
            kwargs["edge_weight"] = dinv[src] * dinv[dst]  # [e]
        try:
            for conv in gcn:
                conv.normalize = False  # the weights are normalised already
            out = self.strong(x.index_select(0, sub.subset), sub.edge_index, **kwargs)
        finally:
            for conv in gcn:
                conv.normalize = True
        return as_model_output(out).logits[sub.mapping], sub.subset.numel()

    def _gcn_degree_inv_sqrt(self, convs: list[GCNConv], edge_index: Tensor, num_nodes: int,
                             dtype: torch.dtype) -> Tensor:
        r""":func:`~moegraph.utils.graph.gcn_degree_inv_sqrt` of the whole
        graph, kept for the next call when the GCN layers are ``cached``."""
        cached = all(c.cached for c in convs)
        key = (edge_index.data_ptr(), tuple(edge_index.shape), edge_index.device, num_nodes,
               dtype)
        if cached and self._gcn_cache is not None and self._gcn_cache[0] == key:
            return self._gcn_cache[1]
        out = gcn_degree_inv_sqrt(convs, edge_index, num_nodes, dtype)
        self._gcn_cache = (key, out) if cached else None
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(weak={self.weak.__class__.__name__}, "
                f"strong={self.strong.__class__.__name__}, variant={self.variant}, "
                f"gate_type={self.gate_type})")


class MowstPrediction(NamedTuple):
    r"""The result of :meth:`Mowst.predict`."""

    probs: Tensor
    confidence: Tensor
    strong_mask: Tensor
    num_subgraph_nodes: int


def check_threshold(threshold: float) -> float:
    r"""``threshold`` if it is a number in ``[0, 1]``, else a clear error
    (NaN included)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"'threshold' must be a number in [0, 1] (got {threshold!r})")
    return float(threshold)


def check_experts_agree(weak_logits: Tensor, strong_logits: Tensor) -> None:
    r"""Raise a clear error when the experts' outputs differ in shape (other
    class counts, or other nodes)."""
    if weak_logits.shape != strong_logits.shape:
        raise ValueError(f"the weak expert returns {tuple(weak_logits.shape)} and the "
                         f"strong expert {tuple(strong_logits.shape)}: they must predict "
                         f"the same classes for the same nodes")


def _takes_graph(module: Module) -> bool:
    r"""Whether ``module.forward`` has an ``edge_index`` argument (PyG's
    :class:`~torch_geometric.nn.models.MLP` takes ``batch`` second, so the
    name decides, not the position)."""
    import inspect
    try:
        return "edge_index" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
