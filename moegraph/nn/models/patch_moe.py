r"""The patch-wise mixture of experts of Chen et al. (2022) for the
cluster-structured task of :mod:`moegraph.data.clusters`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from moegraph.nn.dispatch import indices_and_bins, permute_and_compute
from moegraph.nn.experts import Experts
from moegraph.nn.output import ModelOutput
from moegraph.nn.routing import TopKRouter

ACTS = ("cubic", "linear")
ROUTER_INITS = ("default", "zeros")


class PatchExperts(Experts):
    r"""``E`` two-layer patch-wise experts with a fixed second layer, as in
    Chen et al. (2022): each of the ``J`` neurons is applied to every patch
    and the outputs are summed over neurons and patches,

    .. math::
        f_m(\mathbf{x}) = \sum_{j=1}^{J} \sum_{p=1}^{P}
        \sigma\big(\langle \mathbf{w}_{m,j}, \mathbf{x}^{(p)} \rangle\big),
        \qquad \sigma(z) = z^3 \text{ (or } z \text{ for linear experts)}.

    Like every expert bank it runs each expert once, on the contiguous block
    of samples routed to it. The weights ``[E, d, J]`` are drawn slice by
    slice from :math:`\mathcal{N}(0, \sigma_0^2)`.

    Args:
        in_channels (int): patch dimension :math:`d`.
        hidden_channels (int): neurons per expert :math:`J`.
        num_experts (int): number of experts :math:`E`.
        act (str, optional): ``"cubic"`` or ``"linear"``. (default: :obj:`"cubic"`)
        init_std (float, optional): :math:`\sigma_0`. (default: :obj:`0.1`)

    Shapes:
        - **input:** ``x_sorted [A, P, d]`` sorted by expert, ``counts [E]``
        - **output:** ``[A, 1]``
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_experts: int,
                 act: str = "cubic", init_std: float = 0.1):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"'{name}' must be a positive integer (got {value!r})")
        if act not in ACTS:
            raise ValueError(f"'act' must be one of {ACTS} (got {act!r})")
        if not (init_std >= 0 and math.isfinite(init_std)):
            raise ValueError(f"'init_std' must be non-negative (got {init_std})")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = 1
        self.num_experts = num_experts
        self.act = act
        self.init_std = float(init_std)
        self.weight = Parameter(torch.empty(num_experts, in_channels, hidden_channels))
        self.reset_parameters()

    def reset_parameters(self):
        for e in range(self.num_experts):
            torch.nn.init.normal_(self.weight[e], std=self.init_std)

    def forward(self, x_sorted: Tensor, counts: Tensor,
                weight: Optional[Tensor] = None) -> Tensor:
        outs = []
        for e, block in enumerate(x_sorted.split(counts.tolist())):  # host sync: block sizes
            if block.size(0) == 0:
                continue
            h = block @ self.weight[e]  # [n, P, J]
            if self.act == "cubic":
                h = h.pow(3)
            outs.append(h.sum(dim=(1, 2)))  # [n]
        y = torch.cat(outs) if outs else x_sorted.new_zeros(0)
        y = y.unsqueeze(-1)  # [A, 1]
        return y if weight is None else y * weight.to(y.dtype).unsqueeze(-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"num_experts={self.num_experts}, act={self.act})")


class PatchMoE(Module):
    r"""The mixture of patch-wise experts of Chen et al. (2022), `"Towards
    Understanding the Mixture-of-Experts Layer in Deep Learning"
    <https://arxiv.org/abs/2208.02813>`_, for binary classification of
    samples made of patches (:class:`~moegraph.data.ClusterDataModule`).

    A linear router reads the sum of the patches and sends each sample to one
    expert (top-1), whose output is scaled by the router probability:

    .. math::
        h_m(\mathbf{x}) &= \sum_{p=1}^{P} \langle \boldsymbol\theta_m,
        \mathbf{x}^{(p)} \rangle,\qquad
        \pi_m(\mathbf{x}) = \mathrm{softmax}_m\big(h(\mathbf{x}) + \mathbf{r}\big)

        m^\star(\mathbf{x}) &= \arg\max_m \big(h_m(\mathbf{x}) + r_m\big),\qquad
        F(\mathbf{x}) = \pi_{m^\star}(\mathbf{x})\, f_{m^\star}(\mathbf{x})

    with :math:`f_m` a :class:`PatchExperts` expert and :math:`\mathbf{r}`
    Gaussian exploration noise in training (``noisy``, the learned noise of
    :class:`~moegraph.nn.TopKRouter`). The class scores are
    :math:`(-F/2, F/2)`, so the cross-entropy is the logistic loss
    :math:`\log(1 + e^{-yF})` of the paper. Samples are sorted by expert and
    each expert runs only on its own samples. With ``num_experts=1`` there is
    no router (:math:`F = f_1`): the single-expert baseline.

    Args:
        in_channels (int): patch dimension :math:`d`.
        hidden_channels (int, optional): neurons per expert :math:`J`.
            (default: :obj:`16`)
        out_channels (int, optional): number of classes; must be 2.
            (default: :obj:`2`)
        num_experts (int, optional): experts :math:`E`. (default: :obj:`8`)
        noisy (bool, optional): noisy routing in training. (default: :obj:`True`)
        act (str, optional): ``"cubic"`` or ``"linear"`` experts.
            (default: :obj:`"cubic"`)
        init_std (float, optional): standard deviation of the initial expert
            weights. (default: :obj:`0.1`)
        input_norm (bool, optional): divide the inputs by one scalar, the
            root-mean-square patch norm of the first batch seen
            (:math:`s = \sqrt{\mathbb{E}\|\mathbf{x}^{(p)}\|^2}`, a buffer saved
            with the model), so that the model does not depend on the input
            scale: cubic experts scale as :math:`s^3` and Adam moves every
            logit by about ``lr`` :math:`\cdot s`, so raw inputs ten times
            larger saturate the loss and stall the router. The analysis of
            Chen et al. takes unit-norm cluster vectors with
            :math:`\Theta(1)` amplitudes; one positive factor on every patch
            keeps their orthogonality and amplitude ratios and puts the
            patches at that scale. (default: :obj:`True`)
        noise (str, optional): the router's exploration noise with ``noisy``:
            ``"gaussian"`` (learned, :class:`~moegraph.nn.TopKRouter`'s
            default) or ``"uniform"`` (:math:`r_m \sim \mathcal{U}[0, 1)`, the
            paper's). (default: :obj:`"gaussian"`)
        router_init (str, optional): ``"default"`` (the router's own init)
            or ``"zeros"`` (the paper's: every sample starts with equal
            router probabilities, so the first dispatch is the noise's).
            (default: :obj:`"default"`)

    The paper trains the experts by normalised gradient descent and the router
    by gradient descent at its own, larger rate (``model=patch_moe_paper``:
    :class:`~moegraph.optim.NormalizedGD` with a parameter group for
    ``net.router``).

    Shapes:
        - **input:** ``x [N, P, d]``
        - **output:** :class:`~moegraph.nn.output.ModelOutput` with logits
          ``[N, 2]``, the router's auxiliary losses and its
          :class:`~moegraph.nn.Routing` (none for one expert)
    """

    def __init__(self, in_channels: int, hidden_channels: int = 16, out_channels: int = 2,
                 num_experts: int = 8, noisy: bool = True, act: str = "cubic",
                 init_std: float = 0.1, input_norm: bool = True, noise: str = "gaussian",
                 router_init: str = "default"):
        super().__init__()
        if router_init not in ROUTER_INITS:
            raise ValueError(f"'router_init' must be one of {ROUTER_INITS} "
                             f"(got {router_init!r})")
        if out_channels != 2:
            raise ValueError(f"PatchMoE is a binary classifier: 'out_channels' must be 2 "
                             f"(got {out_channels})")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_experts = num_experts
        self.noisy = noisy
        self.act = act
        self.init_std = init_std
        self.input_norm = input_norm
        self.router_init = router_init
        # 0: not measured yet (set by the first forward pass when input_norm).
        self.input_scale: Tensor
        self.register_buffer("input_scale", torch.zeros(()))
        self.experts = PatchExperts(in_channels, hidden_channels, num_experts, act, init_std)
        if num_experts > 1:
            self.router = TopKRouter(in_channels, num_experts, k=1, noisy=noisy,
                                     normalize=False, noise=noise)
        else:
            self.register_module("router", None)
        self.reset_parameters()

    def reset_parameters(self):
        self.input_scale.zero_()
        self.experts.reset_parameters()
        if self.router is not None:
            self.router.reset_parameters()
            if self.router_init == "zeros":
                torch.nn.init.zeros_(self.router.weight)

    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None) -> ModelOutput:
        r"""
        Args:
            x (Tensor): ``[N, P, d]`` samples of P patches (N samples, P
                patches, d features; E experts).
            edge_index (Tensor, optional): ignored: the samples are
                independent. Accepted for the signature of the node tasks.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"'x' must be a tensor (got {type(x).__name__})")
        if x.dim() != 3 or x.size(-1) != self.in_channels:
            raise ValueError(f"'x' must be [num_samples, num_patches, {self.in_channels}] "
                             f"(got shape {tuple(x.shape)})")
        if self.input_norm:
            x = self.normalize(x)
        N = x.size(0)
        if self.router is None:
            counts = torch.tensor([N], device=x.device)
            score = self.experts(x, counts)[:, 0]  # [N]
            aux_loss, routings = {}, ()
        else:
            routing = self.router(x.sum(dim=1))  # [N, d] -> one expert per sample
            bins = indices_and_bins(routing, self.num_experts)
            score = permute_and_compute(x, bins, self.experts, routing.fixed_k,
                                        deterministic=True)[:, 0]  # [N]
            aux_loss, routings = routing.aux_loss, (routing,)
        logits = torch.stack([-0.5 * score, 0.5 * score], dim=-1)  # [N, 2]
        return ModelOutput(logits, aux_loss, routings)

    def normalize(self, x: Tensor) -> Tensor:
        r"""``x / s``, with ``s`` the root-mean-square patch norm of the first
        batch this model saw (measured once, then kept)."""
        if float(self.input_scale) == 0.0:  # host sync: once per model
            with torch.no_grad():
                rms = x.detach().float().pow(2).sum(-1).mean().sqrt()
                self.input_scale.fill_(float(rms) if float(rms) > 0 else 1.0)
        return x / self.input_scale.to(x.dtype)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"{self.out_channels}, num_experts={self.num_experts}, act={self.act})")
