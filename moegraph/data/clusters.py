r"""The cluster-structured patch data of Chen et al. (2022), `"Towards
Understanding the Mixture-of-Experts Layer in Deep Learning"
<https://arxiv.org/abs/2208.02813>`_: a binary task that one expert cannot
learn and a mixture of experts can, generated in-process.

Each sample belongs to one of ``K`` clusters and holds ``P`` patches of
dimension ``d`` in random order:

* the label signal :math:`y\,\alpha\,\mathbf{v}_k`,
* the cluster centre :math:`\beta\,\mathbf{c}_k`,
* feature noise :math:`\epsilon\,\gamma\,\mathbf{v}_{k'}` from another
  cluster :math:`k' \ne k`, with a random sign :math:`\epsilon`,
* ``P - 3`` Gaussian noise patches :math:`\mathcal{N}(0, \sigma^2 I_d)`,
  :math:`\sigma = 1/\sqrt{d}` by default,

with :math:`y \in \{-1, +1\}`, :math:`\alpha \sim U(0.5, 2)`,
:math:`\beta \sim U(1, 2)`, :math:`\gamma \sim U(0.5, 3)` and the ``2K``
vectors :math:`\mathbf{v}_k, \mathbf{c}_k` orthonormal. Since
:math:`\gamma` is often larger than :math:`\alpha`, the feature noise of
another cluster drowns the signal for a predictor that treats every cluster
alike; a router that reads the centre can send each cluster to its own
expert, which then ignores the other clusters' signal directions.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_geometric.data import Data


class ClusterPatches(NamedTuple):
    r"""Samples of :func:`cluster_patches`.

    Attributes:
        x (Tensor): ``[N, P, d]`` patches.
        y (Tensor): ``[N]`` labels in :math:`\{-1, +1\}` (long).
        cluster (Tensor): ``[N]`` cluster :math:`k` of each sample.
        noise_cluster (Tensor): ``[N]`` cluster :math:`k'` of its feature noise.
    """

    x: Tensor
    y: Tensor
    cluster: Tensor
    noise_cluster: Tensor


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"'{name}' must be a pair (low, high) (got {value!r})") from None
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"'{name}' must satisfy 0 < low <= high (got ({low}, {high}))")
    return low, high


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"'{name}' must be an integer >= {minimum} (got {value!r})")


def cluster_vectors(num_clusters: int = 4, dim: int = 50,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    r"""The signal vectors :math:`\mathbf{v}_k` and the cluster centres
    :math:`\mathbf{c}_k`: ``2K`` orthonormal vectors of :math:`\mathbb{R}^d`
    (a QR decomposition of a Gaussian matrix), so ``dim >= 2 * num_clusters``.

    Returns:
        ``(v, c)``, each ``[K, d]``.
    """
    _check_positive_int("num_clusters", num_clusters, 2)
    _check_positive_int("dim", dim)
    if dim < 2 * num_clusters:
        raise ValueError(f"'dim' must be at least 2 * num_clusters = {2 * num_clusters} to "
                         f"hold {2 * num_clusters} orthogonal vectors (got {dim})")
    gaussian = torch.randn(dim, 2 * num_clusters, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)  # [d, 2K], orthonormal columns
    q = q.t().float()
    return q[:num_clusters].contiguous(), q[num_clusters:].contiguous()


def cluster_patches(num_samples: int, signal_vectors: Tensor, centres: Tensor,
                    num_patches: int = 4, alpha: Sequence[float] = (0.5, 2.0),
                    beta: Sequence[float] = (1.0, 2.0), gamma: Sequence[float] = (0.5, 3.0),
                    noise_std: Optional[float] = None,
                    generator: Optional[torch.Generator] = None) -> ClusterPatches:
    r"""Draw ``num_samples`` samples of the cluster-structured patch data
    (see the module docstring) around given vectors (:func:`cluster_vectors`).

    Labels and clusters are balanced exactly (each ``y`` half of the samples
    up to one, each cluster ``N / K`` up to one), and drawn independently of
    each other; the feature-noise cluster :math:`k'` is uniform over the
    other ``K - 1``.

    Args:
        num_samples (int): number of samples :math:`N`.
        signal_vectors (Tensor): ``[K, d]`` the :math:`\mathbf{v}_k`.
        centres (Tensor): ``[K, d]`` the :math:`\mathbf{c}_k`.
        num_patches (int, optional): patches per sample :math:`P \ge 3`.
            (default: :obj:`4`)
        alpha (pair, optional): range of the signal amplitude. (default: :obj:`(0.5, 2.0)`)
        beta (pair, optional): range of the centre amplitude. (default: :obj:`(1.0, 2.0)`)
        gamma (pair, optional): range of the feature-noise amplitude.
            (default: :obj:`(0.5, 3.0)`)
        noise_std (float, optional): standard deviation of each coordinate of
            a Gaussian noise patch; :math:`1/\sqrt{d}` if :obj:`None`.
        generator (torch.Generator, optional): source of randomness.

    Shapes:
        - **output:** :class:`ClusterPatches` with ``x [N, P, d]`` and
          ``y``, ``cluster``, ``noise_cluster`` of shape ``[N]``
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("num_patches", num_patches, 3)
    if signal_vectors.dim() != 2 or signal_vectors.shape != centres.shape:
        raise ValueError(f"'signal_vectors' and 'centres' must both be [K, d] (got "
                         f"{tuple(signal_vectors.shape)} and {tuple(centres.shape)})")
    K, d = signal_vectors.shape
    if K < 2:
        raise ValueError(f"need at least 2 clusters for the feature noise (got {K})")
    ranges = [_check_range(n, r) for n, r in (("alpha", alpha), ("beta", beta),
                                                 ("gamma", gamma))]
    noise_std = 1.0 / math.sqrt(d) if noise_std is None else float(noise_std)
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"'noise_std' must be non-negative (got {noise_std})")
    g, N, P = generator, num_samples, num_patches

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(N, 1, generator=g)  # [N, 1]

    y = (torch.arange(N) % 2) * 2 - 1
    y = y[torch.randperm(N, generator=g)]
    cluster = (torch.arange(N) % K)[torch.randperm(N, generator=g)]
    noise_cluster = (cluster + 1 + torch.randint(K - 1, (N,), generator=g)) % K
    sign = torch.randint(2, (N, 1), generator=g) * 2 - 1  # the epsilon of the feature noise
    a, b, c = (uniform(*r) for r in ranges)

    x = noise_std * torch.randn(N, P, d, generator=g)  # the Gaussian patches
    slot = torch.argsort(torch.rand(N, P, generator=g), dim=1)  # random patch order
    rows = torch.arange(N)
    x[rows, slot[:, 0]] = y.unsqueeze(1) * a * signal_vectors[cluster]
    x[rows, slot[:, 1]] = b * centres[cluster]
    x[rows, slot[:, 2]] = sign * c * signal_vectors[noise_cluster]
    return ClusterPatches(x, y, cluster, noise_cluster)


def cluster_dataset(num_train: int = 16000, num_val: int = 4000, num_test: int = 16000,
                    num_clusters: int = 4, num_patches: int = 4, dim: int = 50,
                    alpha: Sequence[float] = (0.5, 2.0), beta: Sequence[float] = (1.0, 2.0),
                    gamma: Sequence[float] = (0.5, 3.0), noise_std: Optional[float] = None,
                    seed: int = 0, scale: float = 1.0) -> Data:
    r"""The cluster-structured task as one full batch: one draw of the vectors
    (:func:`cluster_vectors`), then ``num_train + num_val + num_test``
    samples (:func:`cluster_patches`), seeded by ``seed`` alone.

    Chen et al. use 16,000 training and 16,000 test samples, ``K = 4``,
    ``P = 4``, ``d = 50``; the validation samples are drawn on top of them.
    ``scale`` multiplies every patch (Chen et al.'s official code feeds its
    models ten times the generator's inputs): the same samples, at another
    input scale.

    Returns:
        :class:`torch_geometric.data.Data` with ``x [N, P, d]``, ``y [N]`` in
        ``{0, 1}`` (``(y + 1) / 2``), ``cluster``, ``noise_cluster``,
        ``train_mask`` / ``val_mask`` / ``test_mask`` (the first
        ``num_train`` samples, the next ``num_val``, the rest), and the
        vectors ``signal_vectors`` / ``centres`` ``[K, d]``.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        _check_positive_int(name, value)
    _check_positive_int("num_val", num_val, 0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"'scale' must be a positive number (got {scale!r})")
    generator = torch.Generator().manual_seed(seed)
    v, c = cluster_vectors(num_clusters, dim, generator)
    N = num_train + num_val + num_test
    s = cluster_patches(N, v, c, num_patches, alpha, beta, gamma, noise_std, generator)
    split = torch.arange(N)
    return Data(x=s.x * scale, y=(s.y + 1) // 2, cluster=s.cluster, noise_cluster=s.noise_cluster,
                train_mask=split < num_train,
                val_mask=(split >= num_train) & (split < num_train + num_val),
                test_mask=split >= num_train + num_val,
                signal_vectors=v, centres=c, num_nodes=N)


class ClusterDataModule(L.LightningDataModule):
    r"""The cluster-structured patch task of Chen et al. (2022)
    (:func:`cluster_dataset`) as one full batch, trained by full-batch
    gradient descent as in the paper: every loader yields the whole
    :class:`~torch_geometric.data.Data` (no edges), and the task reads the
    split from its masks, as for a graph.

    Args:
        num_train (int, optional): training samples. (default: :obj:`16000`)
        num_val (int, optional): validation samples. (default: :obj:`4000`)
        num_test (int, optional): test samples. (default: :obj:`16000`)
        num_clusters (int, optional): clusters :math:`K`. (default: :obj:`4`)
        num_patches (int, optional): patches per sample :math:`P`. (default: :obj:`4`)
        dim (int, optional): patch dimension :math:`d`. (default: :obj:`50`)
        alpha, beta, gamma (pair, optional): amplitude ranges (see
            :func:`cluster_patches`).
        noise_std (float, optional): Gaussian patch noise; :math:`1/\sqrt{d}`
            if :obj:`None`.
        seed (int, optional): seed of the data. (default: :obj:`0`)
        scale (float, optional): factor on every input patch. (default: :obj:`1.0`)
    """

    def __init__(self, num_train: int = 16000, num_val: int = 4000, num_test: int = 16000,
                 num_clusters: int = 4, num_patches: int = 4, dim: int = 50,
                 alpha: Sequence[float] = (0.5, 2.0), beta: Sequence[float] = (1.0, 2.0),
                 gamma: Sequence[float] = (0.5, 3.0), noise_std: Optional[float] = None,
                 seed: int = 0, scale: float = 1.0):
        super().__init__()
        self.kwargs: dict[str, Any] = dict(num_train=num_train, num_val=num_val, num_test=num_test,
                           num_clusters=num_clusters, num_patches=num_patches, dim=dim,
                           alpha=tuple(alpha), beta=tuple(beta), gamma=tuple(gamma),
                           noise_std=noise_std, seed=seed, scale=scale)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"'scale' must be a positive number (got {scale!r})")
        self.num_clusters = num_clusters
        self.num_patches = num_patches
        self.dim = dim
        self.data: Optional[Data] = None
        if num_val == 0:
            raise ValueError("'num_val' must be positive: the task monitors val/acc")
        # Fail on bad sizes now, not at setup(): draw nothing but check everything.
        cluster_vectors(num_clusters, dim, torch.Generator().manual_seed(0))
        for name in ("alpha", "beta", "gamma"):
            _check_range(name, self.kwargs[name])
        _check_positive_int("num_patches", num_patches, 3)
        for name in ("num_train", "num_test"):
            _check_positive_int(name, self.kwargs[name])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            self.data = cluster_dataset(**self.kwargs)

    @property
    def num_classes(self) -> int:
        return 2

    def net_kwargs(self) -> dict[str, int]:
        r"""What the network needs to know of the data (given by ``train``)."""
        return {"in_channels": self.dim, "out_channels": self.num_classes}

    def task_kwargs(self) -> dict[str, object]:
        r"""What the LightningModule needs to know of the data."""
        return {"num_classes": self.num_classes, "metric": "acc"}

    def _loader(self):
        self.setup()
        return DataLoader([self.data], batch_size=None, collate_fn=lambda d: d)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        return self._loader()

    def __repr__(self) -> str:
        k = self.kwargs
        return (f"{self.__class__.__name__}(num_train={k['num_train']}, "
                f"num_clusters={self.num_clusters}, num_patches={self.num_patches}, "
                f"dim={self.dim})")
