"""Synthetic attention with known structure, at any grid: for tests, benchmarks and threshold calibration.

A layout (a small label map) is resized to an ``R x R`` token grid. Self-attention prefers the query's own
region and nearby keys, as in trained diffusion models: for query ``q`` and key ``k`` (positions in units of the
image side),

    logit(q, k) = sharpness * (boost * [region(q) == region(k)] - |q - k|^2 / (2 sigma^2))

and each row is a softmax over the keys. ``sharpness`` grows with the grid by default (``R / 16``): finer
attention layers are more peaked, so the same layout gives larger divergences at larger grids, which is how a
threshold tuned at one resolution stops meaning the same at another. Cross-attention of a word is its region's
indicator, softened by the same spatial kernel, plus a little of everything else.

Example:
    >>> import torch
    >>> layout = torch.tensor([[0, 1], [0, 1]])
    >>> attn = synthetic_self_attention(layout, 8)
    >>> attn.shape, bool(torch.allclose(attn.sum((-2, -1)), torch.ones(8, 8)))
    (torch.Size([8, 8, 8, 8]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_layout", "synthetic_cross_attention", "synthetic_self_attention"]


def resize_layout(layout: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest resize of an ``(h, w)`` integer layout to ``(size, size)``."""
    return F.interpolate(layout[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def _coords(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).to(torch.float32)


def synthetic_self_attention(
    layout: torch.Tensor,
    size: int,
    *,
    sigma: float = 0.25,
    boost: float = 1.0,
    sharpness: float | None = None,
) -> torch.Tensor:
    """``(R, R, R, R) float32`` self-attention (query axes first; every map sums to 1) of ``layout`` at ``R = size``.

    Args:
        layout: ``(h, w)`` integer region ids.
        size: the token grid side ``R``.
        sigma: the spatial reach of attention, as a fraction of the image side.
        boost: extra logit (before ``sharpness``) for keys in the query's own region.
        sharpness: scale of all logits; default ``R / 16`` (peakier attention at larger grids).
    """
    sharp = size / 16 if sharpness is None else sharpness
    lab = resize_layout(layout, size).reshape(-1)
    c = _coords(size) / size
    d2 = torch.cdist(c, c).pow(2)
    logits = sharp * (boost * (lab[:, None] == lab[None, :]).float() - d2 / (2 * sigma**2))
    return torch.softmax(logits, dim=1).reshape(size, size, size, size)


def synthetic_cross_attention(
    layout: torch.Tensor, region: int, size: int, *, sigma: float = 0.05, floor: float = 0.05
) -> torch.Tensor:
    """``(R, R) float32`` cross-attention of a word naming ``region``: its indicator blurred by a Gaussian of
    ``sigma`` (fraction of the image side), plus ``floor`` everywhere, normalised to sum 1."""
    lab = resize_layout(layout, size)
    c = _coords(size) / size
    kernel = torch.exp(-torch.cdist(c, c).pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    m = kernel @ (lab.reshape(-1) == region).float() + floor
    return (m / m.sum()).reshape(size, size)
