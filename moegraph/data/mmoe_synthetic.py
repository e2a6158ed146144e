r"""The synthetic two-task regression benchmark of MMoE (`Ma et al., KDD 2018
<https://dl.acm.org/doi/10.1145/3219819.3220007>`_, section 3), whose task
correlation is a knob.

Two orthogonal unit vectors :math:`\mathbf{u}_1, \mathbf{u}_2 \in
\mathbb{R}^d`, a scale :math:`c` and a correlation :math:`p \in [-1, 1]` give
the task weights

.. math::
    \mathbf{w}_1 = c\,\mathbf{u}_1, \qquad
    \mathbf{w}_2 = c\,(p\,\mathbf{u}_1 + \sqrt{1 - p^2}\,\mathbf{u}_2),

so that :math:`\cos(\mathbf{w}_1, \mathbf{w}_2) = p`. Each row draws
:math:`\mathbf{x} \sim \mathcal{N}(0, \mathbf{I}_d)` and its labels

.. math::
    y_t = \mathbf{w}_t^\top\mathbf{x} + \sum_{i=1}^{m}
    \sin(\alpha_i\,\mathbf{w}_t^\top\mathbf{x} + \beta_i) + \epsilon_t,
    \qquad \epsilon_t \sim \mathcal{N}(0, \sigma^2),

with the same :math:`\alpha_i, \beta_i \sim \mathcal{N}(0, 1)` for both tasks
(drawn once per seed) and :math:`\sigma^2 = 0.01`. The labels' Pearson
correlation falls with :math:`p` but is not equal to it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def mmoe_synthetic(num_rows: int, correlation: float, in_channels: int = 100,
                   scale: float = 1.0, num_sinusoids: int = 10, noise_std: float = 0.1,
                   seed: int = 0) -> dict[str, Tensor]:
    r"""Rows of the MMoE synthetic benchmark (see the module docstring).

    Args:
        num_rows (int): rows to draw.
        correlation (float): :math:`p`, the cosine of the two task weights,
            in ``[-1, 1]``.
        in_channels (int, optional): :math:`d`, at least 2. (default: :obj:`100`)
        scale (float, optional): :math:`c > 0`. (default: :obj:`1.0`)
        num_sinusoids (int, optional): :math:`m`. (default: :obj:`10`)
        noise_std (float, optional): :math:`\sigma`. (default: :obj:`0.1`)
        seed (int, optional): seed of the weights, sinusoids, rows and noise.
            (default: :obj:`0`)

    Returns:
        dict with ``x [N, d]``, ``y1 [N]``, ``y2 [N]``, ``w1 [d]``, ``w2 [d]``,
        ``alpha [m]``, ``beta [m]``.
    """
    p = float(correlation)
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"'correlation' must be in [-1, 1] (got {correlation})")
    if int(in_channels) < 2:
        raise ValueError(f"'in_channels' must be at least 2 (got {in_channels})")
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"'scale' must be positive (got {scale})")
    if int(num_rows) < 1 or int(num_sinusoids) < 0 or not noise_std >= 0:
        raise ValueError("need num_rows >= 1, num_sinusoids >= 0, noise_std >= 0 (got "
                         f"{num_rows}, {num_sinusoids}, {noise_std})")
    g = torch.Generator().manual_seed(seed)
    d = int(in_channels)
    # Two orthonormal vectors: Gram-Schmidt on two Gaussian draws (in float64).
    a, b = torch.randn(2, d, generator=g, dtype=torch.float64)
    u1 = a / a.norm()
    b = b - (b @ u1) * u1
    u2 = b / b.norm()
    w1 = scale * u1
    w2 = scale * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    alpha = torch.randn(num_sinusoids, generator=g, dtype=torch.float64)
    beta = torch.randn(num_sinusoids, generator=g, dtype=torch.float64)
    x = torch.randn(int(num_rows), d, generator=g, dtype=torch.float64)
    ys = []
    for w in (w1, w2):
        z = x @ w  # [N]
        y = z + torch.sin(alpha[None, :] * z[:, None] + beta[None, :]).sum(1)
        ys.append(y + noise_std * torch.randn(int(num_rows), generator=g, dtype=torch.float64))
    return dict(x=x.float(), y1=ys[0].float(), y2=ys[1].float(), w1=w1.float(), w2=w2.float(),
                alpha=alpha.float(), beta=beta.float())


def mmoe_synthetic_frame(num_rows: int, correlation: float, in_channels: int = 100,
                         scale: float = 1.0, num_sinusoids: int = 10, noise_std: float = 0.1,
                         seed: int = 0, num_bins: Optional[int] = None, binary: bool = False):
    r""":func:`mmoe_synthetic` as a pandas frame (columns ``x0 .. x{d-1}``,
    ``y1``, ``y2``) for :class:`~moegraph.data.TabularMultiTaskDataModule`.

    Args:
        num_bins (int, optional): write each feature as a categorical column
            instead: the index (``"b0"`` .. ``"b{k-1}"``) of its bin among
            ``num_bins`` equiprobable bins of :math:`\mathcal{N}(0, 1)` (the
            features' known law, so nothing is fitted to the rows). One-hot
            encoded, this gives a Census-like table of ``d * num_bins``
            sparse columns. :obj:`None` keeps the numbers. (default: :obj:`None`)
        binary (bool, optional): replace each label by ``y_t > median(y_t)``
            (1 or 0; the median over the drawn rows defines the task), making
            two balanced binary tasks. (default: :obj:`False`)
    """
    import pandas as pd

    data = mmoe_synthetic(num_rows, correlation, in_channels, scale, num_sinusoids,
                          noise_std, seed)
    x = data["x"].double()
    names = [f"x{i}" for i in range(in_channels)]
    if num_bins is None:
        frame = pd.DataFrame(data["x"].numpy(), columns=names)
    else:
        if int(num_bins) < 2:
            raise ValueError(f"'num_bins' must be at least 2 (got {num_bins})")
        k = int(num_bins)
        edges = torch.distributions.Normal(0.0, 1.0).icdf(
            torch.arange(1, k, dtype=torch.float64) / k)  # [k-1] inner edges
        codes = torch.bucketize(x, edges).numpy()  # [N, d], bin of each value in 0..k-1
        frame = pd.DataFrame({n: [f"b{c}" for c in codes[:, i]] for i, n in enumerate(names)})
    for t in ("y1", "y2"):
        y = data[t]
        frame[t] = (y > y.median()).long().numpy() if binary else y.numpy()
    return frame
