"""GoCA: open-vocabulary semantic segmentation from automatically aggregated, per-pixel rescaled cross-attention.

Meng et al., "Making Training-Free Diffusion Segmentors Scale with the Generative Power" (CVPR 2026); behaviour
follows the reference code (``Darkbblue/goca``) as specified in ``METHODS.md`` §3. One conditional pass at
``t = 100`` on a noised posterior sample with a prompt that lists the classes; then:

- G1 :func:`head_weights`: per pixel, each head's share of the layer output (``<c_h(p), o(p)> / |o(p)|^2``);
  computed during capture by :class:`~attnseg.capture.goca.HeadWeightedStore` (per-head maps never outlive a call).
- G2 :func:`layer_weights`: one weight per cross layer, the dot product of its block's self-attention with the
  pseudo self-attention ``softmax(F F^T / sqrt(C))`` of a reference feature ``F``; the scores are computed during
  capture, as the maps and ``F`` arrive (:class:`~attnseg.capture.goca.HeadWeightedStore`).
- G3 :func:`aggregate_cross_attention`: weighted sum of the upsampled layer maps, clamped, normalised over tokens.
- G4 :func:`rescale_per_pixel` (per-pixel rescaling among content tokens), :func:`gaussian_blur` and minmax.
- G5 background support: max over background-object maps.
- G6 :func:`refine_with_self_attention`: ``m <- S m``, ``order`` times, then minmax.
- G7 background channel ``threshold + support`` and argmax (in :meth:`GoCA.segment`).

Deviations from the reference (each also stated where it happens):

- Everything runs in float32 (the reference stores captured tensors in fp16), except G2's self maps of the layers
  that run before the reference feature: they are held in float16 until it arrives (as the reference stores them);
  every later layer is scored in float32 as its rows arrive.
- Head weights: where ``o(p) = 0`` the weights are uniform ([proposal]); with ``"dot-product"`` (clamped) a pixel
  whose clamped scores are all 0 also gets uniform weights (the reference's ``NaN -> 1`` gives weights summing to
  the head count there, a scale artefact).
- Layer weights: uniform when every score is <= 0 ([proposal]).
- Rescaling divides by ``Z + 1e-8`` and minmax adds ``1e-8`` to its denominator ([proposal]; the code has none).
- A class whose tokens were cut off by the tokenizer is dropped (zero map, never predicted) and listed in
  ``meta["dropped"]`` instead of producing NaN.
- Layer choices (reference feature, refinement layers, the baseline's layers) are expressed by block position, so
  they exist on any UNet; on SD 1.5 they are the reference's layers (on SDXL the refinement set differs slightly,
  see :func:`default_refine_layers`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from attnseg.errors import ConfigError, UnsupportedModelError
from attnseg.methods.base import METHODS, RunOptions
from attnseg.methods.ops import key_upsample, minmax, query_tile
from attnseg.types import SegmentationResult

if TYPE_CHECKING:
    from attnseg.capture.goca import HeadWeightedStore
    from attnseg.capture.store import AttentionStore
    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import AttentionKind, LayerInfo, Prompt

__all__ = [
    "HEAD_METHODS",
    "GoCA",
    "aggregate_cross_attention",
    "balance_by_resolution",
    "baseline_cross_layers",
    "default_reference_layer",
    "default_refine_layers",
    "gaussian_blur",
    "head_weights",
    "layer_scores",
    "layer_weights",
    "pseudo_self_attention",
    "refine_with_self_attention",
    "rescale_per_pixel",
    "resize_self_attention",
]

HEAD_METHODS = ("dot-product w/o clamp", "dot-product", "average")
_VARIANTS = ("goca", "vanilla", "baseline")
_BACKGROUND_MODES = ("offset", "max")
# Tokens the reference skips inside an entity's span (besides punctuation and special tokens).
_SKIPPED_WORDS = frozenset({"a", "an", "the", "and"})
_PUNCT = re.compile(r"^\W+$")
_ATTENTION_INDEX = re.compile(r"\.attentions\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------------
# G1: head weights
# ----------------------------------------------------------------------------------------------------------------------


def head_weights(
    head_outputs: torch.Tensor,
    out_weight: torch.Tensor,
    *,
    method: str = "dot-product w/o clamp",
) -> torch.Tensor:
    """G1: per-pixel head weights from each head's contribution to the layer output.

    With ``W_h`` the columns ``h*d .. (h+1)*d`` of ``to_out[0].weight``, head ``h`` contributes
    ``c_h(p) = W_h (A_h V_h)[p]`` and the layer outputs ``o(p) = sum_h c_h(p)`` (bias excluded). The score is
    ``s_{p,h} = <c_h(p), o(p)>``, computed as ``<(A_h V_h)[p], u_h[p]>`` with ``u = o W`` (no ``C``-sized tensor per
    head). Methods:

    - ``"dot-product w/o clamp"`` (the reference's released configs): ``w = s / sum_h s = s / |o(p)|^2``; weights
      sum to 1 and can be negative. Uniform where ``o(p) = 0`` ([proposal]).
    - ``"dot-product"``: ``max(s, 0)`` normalised to sum 1; uniform where all clamped scores are 0 (deviation:
      the reference sets NaN to 1).
    - ``"average"``: ``1 / H`` (the reference's choice for Flux, and the Vanilla/Baseline variants).

    Args:
        head_outputs: ``(H, N, d)`` or ``(B, H, N, d)`` per-head outputs ``A_h V_h`` (before ``to_out``).
        out_weight: ``(C, H * d)`` the layer's ``to_out[0].weight``.
        method: one of :data:`HEAD_METHODS`.

    Returns:
        ``(H, N)`` (or ``(B, H, N)``) float32 weights; for every pixel they sum to 1.
    """
    if method not in HEAD_METHODS:
        raise ConfigError(f"head method must be one of {HEAD_METHODS}, got {method!r}")
    if head_outputs.ndim not in (3, 4):
        raise ConfigError(f"head_outputs must be (H, N, d) or (B, H, N, d), got {tuple(head_outputs.shape)}")
    batched = head_outputs.ndim == 4
    outs = head_outputs if batched else head_outputs[None]
    b, h, n, d = outs.shape
    if method == "average":
        w = torch.full((b, h, n), 1.0 / h, dtype=torch.float32, device=outs.device)
        return w if batched else w[0]
    if out_weight.ndim != 2 or out_weight.shape[1] != h * d:
        raise ConfigError(
            f"out_weight must be (C, {h}*{d}) for {h} heads of {d} channels, got {tuple(out_weight.shape)}"
        )
    outs = outs.to(torch.float32)
    weight = out_weight.detach().to(device=outs.device, dtype=torch.float32)
    cat = outs.permute(0, 2, 1, 3).reshape(b, n, h * d)  # the heads concatenated, as to_out sees them
    o = cat @ weight.T  # (B, N, C): the layer output without bias
    u = (o @ weight).reshape(b, n, h, d)  # u_h = o W_h
    s = torch.einsum("bhnd,bnhd->bhn", outs, u)  # s_{p,h} = <c_h(p), o(p)>
    uniform = torch.full_like(s, 1.0 / h)
    if method == "dot-product w/o clamp":
        norm2 = o.pow(2).sum(-1)[:, None]  # |o(p)|^2 = sum_h s_{p,h}
        ok = norm2 > torch.finfo(torch.float32).tiny
        w = torch.where(ok, s / torch.where(ok, norm2, torch.ones_like(norm2)), uniform)
    else:
        pos = s.clamp_min(0)
        total = pos.sum(1, keepdim=True)
        ok = total > 0
        w = torch.where(ok, pos / torch.where(ok, total, torch.ones_like(total)), uniform)
    return w if batched else w[0]


# ----------------------------------------------------------------------------------------------------------------------
# G2: layer weights
# ----------------------------------------------------------------------------------------------------------------------


def _square(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"{what}: {n} tokens are not a square grid; pass the grid explicitly")
    return side, side


def resize_self_attention(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``QueryTile`` then ``KeyUp`` of self-attention to another grid, **without** renormalising the key maps.

    Query axes: nearest (repeats coarser maps, picks rows of finer ones); key axes: bilinear, half-pixel (down-sizing
    without antialiasing), as GoCA's G2/G6 need. The two act on different axes, so the order does not matter; the
    query side goes first because it shrinks finer maps before the key resize.

    Args:
        maps: ``(N, N)`` or ``(B, N, N)`` self-attention (row = query), ``N = h * w``.
        grid: ``(h, w)`` of ``maps``.
        size: target ``(H, W)``.

    Returns:
        ``(H*W, H*W)`` (or ``(B, H*W, H*W)``) of ``maps``' dtype; ``maps`` itself when ``grid == size``.
    """
    h, w = grid
    big_h, big_w = size
    if (h, w) == (big_h, big_w):
        return maps
    batched = maps.ndim == 3
    m = maps if batched else maps[None]
    if m.shape[-1] != h * w or m.shape[-2] != h * w:
        raise ConfigError(f"self-attention must be (N, N) with N = {h}*{w}, got {tuple(maps.shape)}")
    out = []
    for item in m:
        q = query_tile(item.reshape(h, w, h * w), (big_h, big_w))  # (H, W, h*w)
        k = key_upsample(q.reshape(big_h * big_w, h, w), (big_h, big_w))  # (H*W, H, W)
        out.append(k.reshape(big_h * big_w, big_h * big_w))
    res = torch.stack(out)
    return res if batched else res[0]


def pseudo_self_attention(feature: torch.Tensor) -> torch.Tensor:
    """G2: ``softmax(F F^T / sqrt(C))`` row-wise for a dense feature ``F``.

    Args:
        feature: ``(N, C)`` (a module output such as a ``to_q``; any dtype, computed in float32).

    Returns:
        ``(N, N) float32``, rows sum to 1.
    """
    if feature.ndim != 2:
        raise ConfigError(f"the reference feature must be (N, C), got {tuple(feature.shape)}")
    f = feature.detach().to(torch.float32)
    return torch.softmax(f @ f.T / math.sqrt(f.shape[1]), dim=-1)


def _feature_2d(feature: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    if feature.ndim == 3 and grid is None:  # (h, w, C)
        grid = (int(feature.shape[0]), int(feature.shape[1]))
        feature = feature.reshape(grid[0] * grid[1], -1)
    if feature.ndim != 2:
        raise ConfigError(f"the reference feature must be (N, C) or (h, w, C), got {tuple(feature.shape)}")
    grid = grid or _square(int(feature.shape[0]), "reference feature")
    if grid[0] * grid[1] != feature.shape[0]:
        raise ConfigError(f"the reference feature has {feature.shape[0]} positions, not {grid[0]}x{grid[1]}")
    return feature, grid


def _self_2d(m: torch.Tensor, grid: tuple[int, int] | None, what: str) -> tuple[torch.Tensor, tuple[int, int]]:
    if m.ndim == 4:  # (h, w, h, w)
        g = (int(m.shape[0]), int(m.shape[1]))
        return m.reshape(g[0] * g[1], g[0] * g[1]), g
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ConfigError(f"{what} must be (N, N) or (h, w, h, w), got {tuple(m.shape)}")
    g = grid or _square(int(m.shape[0]), what)
    return m, g


def layer_scores(
    reference_feature: torch.Tensor,
    self_maps: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    reference_grid: tuple[int, int] | None = None,
    grids: Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """G2 scores ``u_l = sum_{q,k} Pi[q, k] * S~_l[q, k]`` (before clamping and normalisation).

    ``Pi`` = :func:`pseudo_self_attention` of the reference feature; ``S~_l`` = each layer's head-mean self map
    resized to the reference grid by :func:`resize_self_attention` (no renormalisation, so the score keeps a
    resolution-dependent scale, as in the reference).

    Args:
        reference_feature: ``(N_r, C)`` (or ``(h, w, C)``).
        self_maps: per layer ``(N_l, N_l)`` (or ``(h, w, h, w)``) head-mean self-attention of the cross layer's block.
        reference_grid: ``(h, w)`` of the feature; default square.
        grids: per map ``(h, w)``; default square (or read from 4-D maps).

    Returns:
        ``(L,) float32`` scores in the order of ``self_maps``.
    """
    feature, rgrid = _feature_2d(reference_feature, reference_grid)
    pi = pseudo_self_attention(feature)
    items = list(self_maps.items()) if isinstance(self_maps, Mapping) else list(enumerate(self_maps))
    if not items:
        raise ConfigError("no self-attention maps to weight")
    scores = []
    for key, m in items:
        g = None
        if grids is not None:
            g = grids[key] if isinstance(grids, Mapping) else grids[int(key)]  # type: ignore[index]
        flat, grid = _self_2d(m, g, f"self-attention map {key!r}")
        resized = resize_self_attention(flat.detach().to(torch.float32), grid, rgrid).to(pi.device)
        scores.append((pi * resized).sum())
    return torch.stack(scores)


def layer_weights(
    reference_feature: torch.Tensor,
    self_maps: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    reference_grid: tuple[int, int] | None = None,
    grids: Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """G2: ``w_l = max(u_l, 0) / sum_m max(u_m, 0)`` with ``u`` from :func:`layer_scores`.

    Uniform when every score is <= 0 ([proposal]). Arguments as :func:`layer_scores`.

    Returns:
        ``(L,) float32`` weights summing to 1, in the order of ``self_maps``.
    """
    return _normalise_scores(layer_scores(reference_feature, self_maps, reference_grid=reference_grid, grids=grids))


def _normalise_scores(scores: torch.Tensor) -> torch.Tensor:
    pos = scores.clamp_min(0)
    total = pos.sum()
    if float(total) <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return pos / total


def balance_by_resolution(weights: torch.Tensor, resolutions: Sequence[int]) -> torch.Tensor:
    """Layer weights redistributed within each resolution only: every resolution keeps the share it has under
    uniform weights (its number of layers over the total), and G2's weights decide how that share is split among
    its layers ([proposal]).

    G2's scores are dot products with un-renormalised resized self maps, so their scale depends on the grid
    (METHODS §3 G2); on small or low-resolution models a coarse grid's weak layers can take most of the weight.
    Balancing keeps the automatic choice among comparable layers and removes the cross-resolution scale effect.
    A resolution whose weights are all 0 shares its part uniformly among its layers.

    Args:
        weights: ``(L,)`` non-negative layer weights (e.g. from :func:`layer_weights`).
        resolutions: the grid side (or any group key) of each layer.

    Returns:
        ``(L,)`` float32 weights summing to 1.
    """
    w = torch.as_tensor(weights, dtype=torch.float32).clone()
    keys = [int(r) for r in resolutions]
    if w.ndim != 1 or w.numel() != len(keys) or not keys:
        raise ConfigError(f"weights and resolutions must have one entry per layer, got {tuple(w.shape)}, {len(keys)}")
    out = torch.empty_like(w)
    for r in sorted(set(keys)):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == r])
        share = idx.numel() / len(keys)
        part = w[idx].clamp_min(0)
        total = float(part.sum())
        out[idx] = share * (part / total if total > 0 else torch.full_like(part, 1.0 / idx.numel()))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# G3-G6
# ----------------------------------------------------------------------------------------------------------------------


def aggregate_cross_attention(
    maps: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    weights: Sequence[float] | torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """G3: ``A^ = normalise_T(clamp_0(sum_l w_l Up(A_l)))``.

    Each layer map ``(N_l, T)`` becomes ``(T, h_l, w_l)``, is resized bilinearly (half-pixel) to ``size`` and
    weighted; the sum is clamped at 0 (head weights can be negative) and divided per pixel by its sum over **all**
    ``T`` tokens (special tokens included). A pixel whose sum is 0 stays 0.

    Args:
        maps: per layer ``(N_l, T)`` head-aggregated cross-attention.
        grids: per layer ``(h_l, w_l)``.
        weights: per layer weight.
        size: ``(H, W)`` of the aggregated map (the largest cross grid).

    Returns:
        ``(H*W, T) float32``, rows sum to 1 (or 0).
    """
    if not maps or len(maps) != len(grids) or len(maps) != len(weights):
        raise ConfigError(f"need one grid and weight per map, got {len(maps)} maps, {len(grids)} grids, "
                          f"{len(weights)} weights")
    acc: torch.Tensor | None = None
    for m, (h, w), wt in zip(maps, grids, weights, strict=True):
        if m.ndim != 2 or m.shape[0] != h * w:
            raise ConfigError(f"cross-attention map must be ({h}*{w}, T), got {tuple(m.shape)}")
        up = key_upsample(m.detach().to(torch.float32).T.reshape(-1, h, w), size)  # (T, H, W)
        part = up * float(wt)
        acc = part if acc is None else acc + part
    assert acc is not None
    flat = acc.clamp_min(0).reshape(acc.shape[0], -1).T  # (H*W, T)
    total = flat.sum(-1, keepdim=True)
    return flat / total.clamp_min(torch.finfo(torch.float32).tiny)


def rescale_per_pixel(
    scores: torch.Tensor, content: Sequence[int], *, eps: float = 1e-8, floor: float = 0.0
) -> torch.Tensor:
    """G4 steps 2-3: per pixel, each content token's share of the content tokens' total.

    ``r[p, i] = scores[p, content[i]] / (Z(p) + floor * median_p Z + eps)`` with
    ``Z(p) = sum_{j in content} scores[p, j]``; ``floor = 0`` is the reference's rescaling. A ``floor > 0``
    ([proposal]) keeps pixels that attend to hardly any content token (``Z(p)`` far below the image's typical
    ``Z``) from getting large shares out of noise; with few entities in the prompt (one class and nothing else,
    where every share is 1) this is what keeps the rescaled maps informative. It is relative to the image's own
    median, so it means the same for every model and resolution. Tokens
    outside ``content`` (special tokens such as ``<sos>``, stop words, padding) are ignored, so their scale, which
    varies from pixel to pixel, no longer shifts the content tokens' scores. ``eps`` ([proposal], 1e-8; the
    reference has none) keeps an all-zero row at 0 instead of 0/0; other rows sum to ``Z / (Z + eps)``, i.e. 1 up to
    ``eps / Z``.

    Args:
        scores: ``(N, T)`` non-negative token scores per position.
        content: indices of the content tokens (into the last axis), distinct.
        eps: added to ``Z``; >= 0.
        floor: added to ``Z`` in units of its median over positions; >= 0 (0: the reference).

    Returns:
        ``(N, len(content)) float32``.
    """
    idx = [int(i) for i in content]
    if not idx:
        raise ConfigError("content must name at least one token")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"content token indices must be distinct, got {idx}")
    if scores.ndim != 2 or min(idx) < 0 or max(idx) >= scores.shape[1]:
        raise ConfigError(f"scores must be (N, T) with T > {max(idx)}, got {tuple(scores.shape)}")
    if eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    if not (math.isfinite(floor) and floor >= 0):
        raise ConfigError(f"floor must be a finite number >= 0, got {floor}")
    sub = scores.detach().to(torch.float32)[:, idx]
    z = sub.sum(-1, keepdim=True)
    return sub / (z + floor * z.median() + eps)


def gaussian_blur(maps: torch.Tensor, *, kernel_size: int = 5, sigma: float = 1.1) -> torch.Tensor:
    """G4 step 4: Gaussian blur with reflect padding (the same kernel as torchvision's ``gaussian_blur``).

    Args:
        maps: ``(K, H, W)`` or ``(H, W)``.
        kernel_size: odd kernel side (5, reference).
        sigma: standard deviation (1.1, torchvision's default for a 5-tap kernel, used by the reference).

    Returns:
        Blurred maps of the same shape, float32. Maps too small for reflect padding use replicate padding.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    squeeze = maps.ndim == 2
    x = (maps[None] if squeeze else maps).to(torch.float32)
    if kernel_size == 1:
        return x[0] if squeeze else x
    half = (kernel_size - 1) // 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :])[None, None]
    mode = "reflect" if min(x.shape[-2:]) > half else "replicate"
    padded = F.pad(x[:, None], (half, half, half, half), mode=mode)
    out = F.conv2d(padded, kernel)[:, 0]
    return out[0] if squeeze else out


def refine_with_self_attention(maps: torch.Tensor, affinity: torch.Tensor, *, order: int = 2) -> torch.Tensor:
    """G6: ``m <- S m`` ``order`` times (``S`` query x key, not renormalised), then per-map minmax (eps 1e-8).

    Args:
        maps: ``(K, H, W)``.
        affinity: ``(H*W, H*W)`` self-attention ``S`` (row = query).
        order: number of propagation steps (2, reference; 5 for PixArt-Sigma); 0 returns ``maps`` unchanged.

    Returns:
        ``(K, H, W) float32``.
    """
    if order < 0:
        raise ConfigError(f"order must be >= 0, got {order}")
    if order == 0:
        return maps
    k, h, w = maps.shape
    if affinity.shape != (h * w, h * w):
        raise ConfigError(f"affinity must be ({h * w}, {h * w}) for {h}x{w} maps, got {tuple(affinity.shape)}")
    m = maps.to(torch.float32).reshape(k, h * w).T  # (HW, K)
    s = affinity.to(device=m.device, dtype=torch.float32)
    for _ in range(order):
        m = s @ m
    return minmax(m.T.reshape(k, h, w), (-2, -1), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Layer choices by block position
# ----------------------------------------------------------------------------------------------------------------------


def _attention_index(name: str) -> int:
    m = _ATTENTION_INDEX.search(name + ".")
    return int(m.group(1)) if m else 0


def _blocks(layers: Mapping[str, LayerInfo], kind: str, position: str) -> list[str]:
    """Blocks holding ``kind`` layers at ``position``, in forward order."""
    seen: list[str] = []
    for info in sorted(layers.values(), key=lambda i: i.index):
        if info.kind == kind and info.position == position and info.block not in seen:
            seen.append(info.block)
    return seen


def _require_unet(layers: Mapping[str, LayerInfo], what: str) -> None:
    if not any(i.position == "up" for i in layers.values()):
        raise UnsupportedModelError(
            f"GoCA's default {what} is defined by UNet block position (up/down blocks); this model has none: "
            f"pass {what}= explicitly"
        )


def default_reference_layer(
    layers: Mapping[str, LayerInfo], latent_size: tuple[int, int], *, sdxl: bool = False
) -> str:
    """The reference feature for G2, chosen by block position (``METHODS.md`` §3 table).

    The up block whose cross layers sit one level below the latent (``latent / 2``: 32 of 64 on SD 1.5 at 512 px,
    64 of 128 on SDXL at 1024 px), its second attention (SD 1.5: ``up_blocks.2.attentions.1``; the first on SDXL,
    ``up_blocks.1.attentions.0``), first transformer block, cross-attention ``to_q``.

    Args:
        layers: the model's attention layers.
        latent_size: ``(h, w)`` of the latent.
        sdxl: use SDXL's attention index (0) instead of SD 1.5's (1).

    Returns:
        A module name such as ``"up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"``.
    """
    _require_unet(layers, "reference_layer")
    cross_up = [i for i in layers.values() if i.kind == "cross" and i.position == "up"]
    if not cross_up:
        raise UnsupportedModelError("the model has no cross-attention in its up blocks; pass reference_layer=")
    goal = (latent_size[0] * latent_size[1]) / 4
    # closest grid to latent/2 (log scale); ties go to the finer grid
    best_tokens = min({i.num_tokens for i in cross_up}, key=lambda n: (abs(math.log(n / goal)), -n))
    block = next(i.block for i in sorted(cross_up, key=lambda i: i.index) if i.num_tokens == best_tokens)
    in_block = sorted((i for i in cross_up if i.block == block), key=lambda i: i.index)
    wanted = 0 if sdxl else 1
    indices = sorted({_attention_index(i.name) for i in in_block})
    att = wanted if wanted in indices else indices[-1]
    layer = next(i for i in in_block if _attention_index(i.name) == att)
    return f"{layer.name}.to_q"


def default_refine_layers(layers: Mapping[str, LayerInfo]) -> list[str]:
    """Self layers whose mean is the G6 affinity, by block position (SD 1.5's reference choice).

    SD 1.5: ``up_blocks.3`` attentions 0 and 1 and ``down_blocks.0`` attention 1, i.e. the finest up block's first
    two attentions plus the first down block's second attention (its last when it has one). On SDXL this gives
    ``up_blocks.1`` attentions 0-1 (4 blocks) and ``down_blocks.1`` attention 1, where the reference lists
    "up_blocks.1 (5 blocks), down_blocks.1 att 0" (unconfirmed detail); pass ``refine_layers=`` to match it.
    """
    _require_unet(layers, "refine_layers")
    selfs = [i for i in layers.values() if i.kind == "self"]
    ups = _blocks(layers, "self", "up")
    downs = _blocks(layers, "self", "down")
    chosen: list[LayerInfo] = []
    if ups:
        finest = ups[-1]
        chosen += [i for i in selfs if i.block == finest and _attention_index(i.name) in (0, 1)]
    if downs:
        first = downs[0]
        in_block = [i for i in selfs if i.block == first]
        indices = sorted({_attention_index(i.name) for i in in_block})
        att = 1 if 1 in indices else indices[-1]
        chosen += [i for i in in_block if _attention_index(i.name) == att]
    return [i.name for i in sorted(chosen, key=lambda i: i.index)]


def baseline_cross_layers(layers: Mapping[str, LayerInfo]) -> list[str]:
    """The Baseline's manual layers, by block position: SD 1.5's "layers 5-12" of 16.

    That is the deepest down block with cross-attention (``down_blocks.2``), the mid block, the first up block with
    cross-attention (``up_blocks.1``) and the first two attentions of the next up block (``up_blocks.2``).
    """
    _require_unet(layers, "cross layers of the baseline")
    cross = [i for i in layers.values() if i.kind == "cross"]
    downs = _blocks(layers, "cross", "down")
    ups = _blocks(layers, "cross", "up")
    chosen = [i for i in cross if i.position == "mid"]
    if downs:
        chosen += [i for i in cross if i.block == downs[-1]]
    if ups:
        chosen += [i for i in cross if i.block == ups[0]]
    if len(ups) > 1:
        chosen += [i for i in cross if i.block == ups[1] and _attention_index(i.name) in (0, 1)]
    return [i.name for i in sorted(chosen, key=lambda i: i.index)]


def _self_sibling(cross: LayerInfo, layers: Mapping[str, LayerInfo]) -> str:
    """The self-attention layer of the same transformer block as a cross layer (``attn2`` -> ``attn1``)."""
    parent = cross.name.rsplit(".", 1)[0]
    for info in layers.values():
        if info.kind == "self" and info.name.rsplit(".", 1)[0] == parent:
            return info.name
    raise UnsupportedModelError(f"no self-attention layer in the block of {cross.name}; GoCA's layer weights need one")


def _reference_grid(reference: str, layers: Mapping[str, LayerInfo]) -> tuple[int, int]:
    """Grid of a module inside an attention block: the attention layer sharing the longest name prefix."""
    for info in layers.values():  # a module of (or inside) an attention module: its image grid
        module = info.module_name
        if reference == module or reference.startswith(module + "."):
            return info.grid
    parts = reference.split(".")
    best: tuple[int, LayerInfo] | None = None
    for info in layers.values():
        lp = info.name.split(".")
        common = 0
        for a, b in zip(parts, lp, strict=False):
            if a != b:
                break
            common += 1
        # at least the attention module's block ("up_blocks.2.attentions.1" / "transformer_blocks.13")
        container = next((k for k, p in enumerate(lp) if p in ("attentions", "transformer_blocks")), None)
        if container is None or common < container + 2:
            continue
        if best is None or common > best[0]:
            best = (common, info)
    if best is None:
        raise ConfigError(
            f"reference_layer {reference!r} is not inside an attention block of the model; name a module such as "
            "'<block>.attentions.<i>.transformer_blocks.0.attn2.to_q'"
        )
    return best[1].grid


def _latent_size(adapter: DiffusionAdapter, meta: Mapping[str, Any] | None = None) -> tuple[int, int]:
    size = (meta or {}).get("image_size") or adapter.resolution
    s = adapter.latent_scale
    return int(size[0]) // s, int(size[1]) // s


# ----------------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------------


def _split_names(value: Sequence[str] | str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, Sequence):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(f"{what} must be names (strings), got {v!r}")
            items.append(v.strip())
    else:
        raise ConfigError(f"{what} must be a list of names or a comma-separated string, got {value!r}")
    items = [v for v in items if v]
    if len(set(i.lower() for i in items)) != len(items):
        raise ConfigError(f"{what} has duplicates: {items}")
    return tuple(items)


def _word_in(text: str, word: str) -> bool:
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


_VARIANT_SETTINGS: dict[str, dict[str, Any]] = {
    # METHODS §3 "Variants": head method, layer weighting, per-pixel rescaling, cross layers.
    "goca": {"head_method": "dot-product w/o clamp", "layer_method": "auto", "rescale": True, "cross": "all"},
    "vanilla": {"head_method": "average", "layer_method": "uniform", "rescale": False, "cross": "all"},
    "baseline": {"head_method": "average", "layer_method": "uniform", "rescale": False, "cross": "baseline"},
}


@METHODS.register("goca", help="open-vocabulary semantic segmentation: auto-aggregated, rescaled cross-attention")
class GoCA:
    """GoCA open-vocabulary semantic segmentation (one label per class named in the prompt, 0 = background).

    Reference pass: VAE posterior **sample** noised to ``t = 100`` (seeded here; the reference's draws are not),
    one conditional call with the classes comma-joined as the prompt (see :meth:`run_options`).

    Args (keyword-only):
        classes: class names, a list or a comma-separated string (``"cat, grass, wall"``). Label ``i`` is
            ``classes[i - 1]``.
        background_objects: names of things in the image that are not classes; their maps form the background
            support (G5; the reference lists them with GPT-4o). Default none.
        prompt: the prompt; default ``", ".join(classes + background_objects)`` (the reference's caption form).
            Must contain every class and background object.
        variant: ``"goca"`` (auto head and layer weights, per-pixel rescaling; all cross layers), ``"vanilla"``
            (average heads, uniform layers, no rescaling) or ``"baseline"`` (as vanilla on SD 1.5's manual layers
            5-12, chosen by block position: :func:`baseline_cross_layers`). METHODS §3, paper Table 1.
        head_method, layer_method, rescale: override the variant's head weighting (:data:`HEAD_METHODS`), layer
            weighting (``"auto"`` or ``"uniform"``) and per-pixel rescaling (bool), for the paper's ablation (Table 2).
        background_threshold: the background score's constant (0.5, [proposal]; the reference sweeps offsets
            -0.4..0.4 on the evaluated data).
        background_mode: ``"offset"`` (reference code: ``threshold + support``) or ``"max"`` (paper App. E.4:
            ``max(threshold, support)``).
        refine_order: self-attention propagation steps (2, reference SD 1.5/SDXL/Flux; PixArt uses 5); 0 disables G6.
        reference_layer: module whose output is G2's reference feature; default by block position
            (:func:`default_reference_layer`; SD 1.5: ``up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q``).
        refine_layers: self-attention layers averaged into G6's affinity; default :func:`default_refine_layers`.
        cross_layers: cross-attention layers to aggregate, instead of the variant's choice (all; the Baseline's
            by block position); e.g. the Vanilla variant's blocks on PixArt and Flux (METHODS §3 Variants).
        timestep: the pass's timestep (100, reference configs).
        blur_kernel_size, blur_sigma: G4's Gaussian blur (5, 1.1: reference).
        rescale_floor: G4's rescaling divides by ``Z + rescale_floor * median(Z)`` (:func:`rescale_per_pixel`;
            reference 0).
        layer_balance: redistribute G2's layer weights within each resolution only
            (:func:`balance_by_resolution`; reference False).

    Example:
        >>> seg = GoCA(classes="cat, grass")
        >>> seg.run_options().prompt
        'cat, grass'
    """

    name: ClassVar[str] = "goca"
    requires: ClassVar[frozenset[AttentionKind]] = frozenset({"self", "cross"})
    #: The paper's settings are per model (its reference configs: layers, head method, timestep), kept in each
    #: family's ``recommended`` table, so the paper preset starts from them; then ``paper_preset``.
    paper_settings_per_family: ClassVar[bool] = True
    paper_preset: ClassVar[dict[str, Any]] = {"rescale_floor": 0.0, "layer_balance": False}

    def __init__(
        self,
        *,
        classes: Sequence[str] | str,
        background_objects: Sequence[str] | str = (),
        prompt: str | None = None,  # reference: comma-joined entity list
        variant: str = "goca",
        head_method: str | None = None,  # variant's: "dot-product w/o clamp" (reference configs) or "average"
        layer_method: str | None = None,  # variant's: "auto" (G2) or "uniform"
        rescale: bool | None = None,  # variant's: per-pixel rescaling (G4) on for "goca"
        background_threshold: float = 0.5,  # [proposal]; reference sweeps -0.4..0.4
        background_mode: str = "offset",  # reference code
        refine_order: int = 2,  # reference configs (SD 1.5, SDXL, Flux)
        reference_layer: str | None = None,  # reference configs, by block position
        refine_layers: Sequence[str] | None = None,  # reference configs, by block position
        cross_layers: Sequence[str] | None = None,  # the variant's
        timestep: int = 100,  # reference configs
        blur_kernel_size: int = 5,  # reference
        blur_sigma: float = 1.1,  # reference (torchvision's default for 5 taps)
        rescale_floor: float = 0.0,  # reference: 0; see rescale_per_pixel
        layer_balance: bool = False,  # reference: False; see balance_by_resolution
    ) -> None:
        self.classes = _split_names(classes, "classes")
        if not self.classes:
            raise ConfigError("classes must name at least one class")
        self.background_objects = _split_names(background_objects, "background_objects")
        overlap = {c.lower() for c in self.classes} & {b.lower() for b in self.background_objects}
        if overlap:
            raise ConfigError(f"background_objects repeat classes: {sorted(overlap)}")
        entities = (*self.classes, *self.background_objects)
        self.default_prompt = prompt is None  # the prompt is attnseg's to build (and to split, see split_prompts)
        if prompt is None:
            self.prompt = ", ".join(entities)
        else:
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt must be a string, got {prompt!r}")
            missing = [e for e in entities if not _word_in(prompt, e)]
            if missing:
                raise ConfigError(f"prompt {prompt!r} does not contain {missing}; every class and background object "
                                  "must be in it")
            self.prompt = prompt
        if variant not in _VARIANTS:
            raise ConfigError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant = variant
        settings = _VARIANT_SETTINGS[variant]
        if head_method is not None and head_method not in HEAD_METHODS:
            raise ConfigError(f"head_method must be one of {HEAD_METHODS} or None, got {head_method!r}")
        self.head_method: str = head_method or settings["head_method"]
        if layer_method is not None and layer_method not in ("auto", "uniform"):
            raise ConfigError(f"layer_method must be 'auto', 'uniform' or None, got {layer_method!r}")
        self.layer_method: str = layer_method or settings["layer_method"]
        if rescale is not None and not isinstance(rescale, bool):
            raise ConfigError(f"rescale must be a bool or None, got {rescale!r}")
        self.rescale: bool = settings["rescale"] if rescale is None else rescale
        self._cross_choice: str = settings["cross"]
        bt = background_threshold
        if isinstance(bt, bool) or not isinstance(bt, int | float) or not math.isfinite(bt):
            raise ConfigError(f"background_threshold must be a finite number (default 0.5), got {bt!r}")
        self.background_threshold = float(bt)
        if background_mode not in _BACKGROUND_MODES:
            raise ConfigError(f"background_mode must be one of {_BACKGROUND_MODES}, got {background_mode!r}")
        self.background_mode = background_mode
        if isinstance(refine_order, bool) or not isinstance(refine_order, int) or refine_order < 0:
            raise ConfigError(f"refine_order must be an int >= 0 (default 2), got {refine_order!r}")
        self.refine_order = refine_order
        if reference_layer is not None and (not isinstance(reference_layer, str) or not reference_layer.strip()):
            raise ConfigError(f"reference_layer must be a module name or None, got {reference_layer!r}")
        self.reference_layer = reference_layer
        if refine_layers is not None:
            if isinstance(refine_layers, str) or not isinstance(refine_layers, Sequence) or not refine_layers:
                raise ConfigError(
                    f"refine_layers must be a non-empty list of layer names or None, got {refine_layers!r}"
                )
            refine_layers = tuple(refine_layers)
        self.refine_layers = refine_layers
        if cross_layers is not None:
            if isinstance(cross_layers, str) or not isinstance(cross_layers, Sequence) or not cross_layers:
                raise ConfigError(f"cross_layers must be a non-empty list of layer names or None, got {cross_layers!r}")
            cross_layers = tuple(cross_layers)
        self.cross_layers = cross_layers
        if isinstance(timestep, bool) or not isinstance(timestep, int) or timestep < 0:
            raise ConfigError(f"timestep must be an int >= 0 (default 100), got {timestep!r}")
        self.timestep = timestep
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int) or blur_kernel_size < 1 \
                or blur_kernel_size % 2 == 0:
            raise ConfigError(f"blur_kernel_size must be a positive odd int (default 5), got {blur_kernel_size!r}")
        self.blur_kernel_size = blur_kernel_size
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, int | float) or not blur_sigma > 0:
            raise ConfigError(f"blur_sigma must be > 0 (default 1.1), got {blur_sigma!r}")
        self.blur_sigma = float(blur_sigma)
        rf = rescale_floor
        if isinstance(rf, bool) or not isinstance(rf, int | float) or not math.isfinite(rf) or rf < 0:
            raise ConfigError(f"rescale_floor must be a finite number >= 0 (reference 0), got {rf!r}")
        self.rescale_floor = float(rf)
        if not isinstance(layer_balance, bool):
            raise ConfigError(f"layer_balance must be a bool, got {layer_balance!r}")
        self.layer_balance = layer_balance

    # -- description -------------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The hyper-parameters as a JSON-friendly dict (recorded in every result)."""
        return {
            "classes": list(self.classes), "background_objects": list(self.background_objects),
            "prompt": self.prompt, "variant": self.variant, "head_method": self.head_method,
            "layer_method": self.layer_method, "rescale": self.rescale,
            "background_threshold": self.background_threshold, "background_mode": self.background_mode,
            "refine_order": self.refine_order, "reference_layer": self.reference_layer,
            "refine_layers": None if self.refine_layers is None else list(self.refine_layers),
            "cross_layers": None if self.cross_layers is None else list(self.cross_layers),
            "timestep": self.timestep, "blur_kernel_size": self.blur_kernel_size, "blur_sigma": self.blur_sigma,
            "rescale_floor": self.rescale_floor, "layer_balance": self.layer_balance,
        }

    def __repr__(self) -> str:
        return f"GoCA({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def run_options(self) -> RunOptions:
        """Reference pass: posterior sample noised to ``timestep`` (100), the class prompt, no CFG."""
        return RunOptions(
            timestep=self.timestep, add_noise=True, sample_posterior=True, prompt=self.prompt,
            heads="mean", group="layer",
        )

    # -- layers ------------------------------------------------------------------------------------------------------

    def _cross_layers(self, layers: Mapping[str, LayerInfo]) -> list[LayerInfo]:
        if self.cross_layers is not None:
            bad = [n for n in self.cross_layers if n not in layers or layers[n].kind != "cross"]
            if bad:
                raise ConfigError(f"cross_layers must be cross-attention layers of the model; not: {bad[:5]}")
            return sorted((layers[n] for n in self.cross_layers), key=lambda i: i.index)
        if self._cross_choice == "baseline":
            names = baseline_cross_layers(layers)
        else:
            names = [n for n, i in layers.items() if i.kind == "cross"]
        if not names:
            raise UnsupportedModelError("the model has no cross-attention layers; GoCA needs them")
        return sorted((layers[n] for n in names), key=lambda i: i.index)

    def _refine_layers(self, layers: Mapping[str, LayerInfo]) -> list[str]:
        if self.refine_order == 0:
            return []
        names = list(self.refine_layers) if self.refine_layers is not None else default_refine_layers(layers)
        bad = [n for n in names if n not in layers or layers[n].kind != "self"]
        if bad:
            raise ConfigError(f"refine_layers must be self-attention layers of the model; not: {bad[:5]}")
        if not names:
            raise UnsupportedModelError("no self-attention layer for the refinement; pass refine_layers= or "
                                        "refine_order=0")
        return names

    def _reference(self, layers: Mapping[str, LayerInfo], adapter: DiffusionAdapter,
                   meta: Mapping[str, Any] | None = None) -> str:
        if self.reference_layer is not None:
            return self.reference_layer
        sdxl = bool(getattr(adapter, "is_sdxl", False))
        return default_reference_layer(layers, _latent_size(adapter, meta), sdxl=sdxl)

    def select_layers(self, layers: dict[str, LayerInfo]) -> list[str]:
        """The cross layers of the variant, their blocks' self layers (auto layer weights) and the G6 self layers."""
        cross = self._cross_layers(layers)
        names = {i.name for i in cross}
        if self.layer_method == "auto":
            names |= {_self_sibling(i, layers) for i in cross}
        names |= set(self._refine_layers(layers))
        return [n for n in sorted(names, key=lambda n: layers[n].index)]

    def features(self, adapter: DiffusionAdapter) -> list[str]:
        """The reference feature's module (hooked into ``store.features``) when layer weights are automatic."""
        if self.layer_method != "auto":
            return []
        name = self._reference(adapter.attention_layers(), adapter)
        try:
            adapter.denoiser.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"reference_layer {name!r} is not a module of the denoiser") from None
        return [name]

    def make_store(
        self, adapter: DiffusionAdapter, layers: dict[str, LayerInfo], meta: dict[str, Any]
    ) -> HeadWeightedStore:
        """A :class:`~attnseg.capture.goca.HeadWeightedStore` that head-weights cross maps during capture, scores
        G2's layers as their self maps arrive (the maps of the layers before the reference feature are held in
        float16 until it arrives) and keeps the refinement affinity G6 needs; with ``meta["tokens"]`` (the prompt's
        tokens, padding excluded) and non-negative head weights it keeps only the prompt's text columns."""
        from attnseg.capture.goca import HeadWeightedStore

        all_layers = adapter.attention_layers(tuple(meta["image_size"]) if meta.get("image_size") else None)
        cross = [i for i in self._cross_layers(all_layers) if i.name in layers]
        if not cross:
            raise ConfigError("none of GoCA's cross layers were selected for capture")
        map_grid = max((i.grid for i in cross), key=lambda g: g[0] * g[1])
        out_weights: dict[str, torch.Tensor] = {}
        if self.head_method != "average":
            for info in cross:  # the output projection's columns that see the heads (joint layers: image output)
                weight = adapter.denoiser.get_submodule(info.output_module).weight
                out_weights[info.name] = weight[:, : info.heads * info.head_dim]
        pairs: dict[str, str] = {}
        reference: str | None = None
        reference_grid: tuple[int, int] | None = None
        if self.layer_method == "auto":
            pairs = {i.name: _self_sibling(i, all_layers) for i in cross}
            reference = self._reference(all_layers, adapter, meta)
            reference_grid = _reference_grid(reference, all_layers)
        refine = [n for n in self._refine_layers(all_layers) if n in layers]
        # GoCA reads the prompt's tokens only: with non-negative head weights the padding columns are summed into
        # one per pixel, which keeps G3's normalisation over all tokens exact (HeadWeightedStore)
        tokens = meta.get("tokens")
        text_columns = len(tokens) if tokens and self.head_method in ("average", "dot-product") else None
        goca_meta = {
            "head_method": self.head_method, "layer_method": self.layer_method,
            "cross_layers": [i.name for i in cross], "pairs": pairs,
            "reference_layer": reference, "reference_grid": list(reference_grid) if reference_grid else None,
            "refine_layers": refine, "map_grid": list(map_grid), "text_columns": text_columns,
            "reference_map_dtype": "float16" if reference else None,
        }
        return HeadWeightedStore(
            out_weights=out_weights, head_method=self.head_method,
            reference_layers=set(pairs.values()), reference_grid=reference_grid, reference_feature=reference,
            reference_map_dtype=torch.float16, text_columns=text_columns,
            refine_layers=refine, refine_grid=map_grid if refine else None,
            meta={**meta, "goca": goca_meta}, device=adapter.device,
        )

    # -- segmentation ------------------------------------------------------------------------------------------------

    def _entity_tokens(self, prompt: Prompt, name: str) -> tuple[int, ...]:
        from attnseg.prompts import find_word

        span = find_word(prompt, name)
        kept = []
        for i in span.indices:
            a, b = prompt.offsets[i]
            piece = prompt.text[a:b].strip().lower()
            if piece in _SKIPPED_WORDS or _PUNCT.match(piece or ","):
                continue
            kept.append(i)
        return tuple(kept) or tuple(span.indices)

    def segment(
        self,
        store: AttentionStore,
        *,
        prompt: Prompt | None = None,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationResult:
        """Semantic labels from a store made by :meth:`make_store` (or loaded from one).

        Args:
            store: holds head-weighted cross maps per layer, reduced self maps and (auto layers) the reference
                feature; see :class:`~attnseg.capture.goca.HeadWeightedStore`.
            prompt: the encoded prompt of the pass (to find the classes' tokens); required.
            out_size: ``(H, W)`` of the labels; default ``store.meta["image_size"]``, else the map grid.
            generator: unused (deterministic).

        Returns:
            :class:`SegmentationResult`: ``labels (H, W) int64`` (0 background, ``i`` = ``classes[i-1]``),
            ``scores (n_classes + 1, H, W) float32`` (channel 0 the background score), ``label_names``;
            ``meta`` has token indices, layer weights, dropped classes and the layer choices.
        """
        from attnseg.capture.goca import cross_maps, cross_rest, layer_scores_of, reference_self_maps, refine_affinity
        from attnseg.errors import TokenNotFoundError
        from attnseg.prompts import content_tokens

        if prompt is None:
            raise ConfigError("GoCA needs the encoded prompt (segment(store, prompt=...)) to find the classes' tokens")
        gmeta = (getattr(store, "meta", None) or {}).get("goca")
        if not isinstance(gmeta, Mapping):
            raise ConfigError("this store was not made by GoCA.make_store (no 'goca' metadata); capture with GoCA")
        maps = cross_maps(store)
        if not maps:
            raise ConfigError("the store holds no cross-attention")
        names = list(maps)
        grids = [(int(store.info(n)[1][0]), int(store.info(n)[1][1])) for n in names]
        stored_grid = gmeta.get("map_grid") or max(grids, key=lambda g: g[0] * g[1])
        map_grid = (int(stored_grid[0]), int(stored_grid[1]))
        meta: dict[str, Any] = {"variant": self.variant, "head_method": gmeta.get("head_method"),
                                "map_grid": list(map_grid), "warnings": []}

        if gmeta.get("head_method") != self.head_method:
            meta["warnings"].append(f"heads were weighted with {gmeta.get('head_method')!r} at capture, "
                                    f"not {self.head_method!r}")

        # G2: layer weights, from the scores computed during capture, or (stores that kept the maps) from the
        # reference feature and the reference-grid self maps.
        if self.layer_method == "auto":
            if gmeta.get("layer_method") != "auto":
                raise ConfigError("automatic layer weights need a store captured with layer_method='auto' "
                                  "(reference feature and self maps)")
            ref = gmeta["reference_layer"]
            pairs = gmeta["pairs"]
            stored = layer_scores_of(store)
            if stored:
                missing = [n for n in names if pairs.get(n) not in stored]
                if missing:
                    raise ConfigError(f"the store lacks the layer scores of {missing[:3]}; capture them with GoCA")
                scores = torch.stack([stored[pairs[n]].to(torch.float32) for n in names])
            else:
                feats = getattr(store, "features", {})
                if ref not in feats:
                    raise ConfigError(f"the store has no reference feature {ref!r}; capture with GoCA.features() "
                                      "hooked")
                feature = feats[ref][0]
                if feature.ndim == 3:  # (C, h, w) module outputs
                    feature = feature.flatten(1).T
                selfs = reference_self_maps(store)
                missing = [n for n in names if pairs.get(n) not in selfs]
                if missing:
                    raise ConfigError(f"the store lacks the self maps of {missing[:3]} for the layer weights")
                rgrid = (int(gmeta["reference_grid"][0]), int(gmeta["reference_grid"][1]))
                scores = layer_scores(feature, [selfs[pairs[n]] for n in names], reference_grid=rgrid,
                                      grids=[rgrid] * len(names))
            weights = _normalise_scores(scores)
            if self.layer_balance:
                weights = balance_by_resolution(weights, [max(g) for g in grids])
            meta["layer_scores"] = {n: float(s) for n, s in zip(names, scores, strict=True)}
            meta["reference_layer"] = ref
        else:
            weights = torch.full((len(names),), 1.0 / len(names))
        meta["layer_weights"] = {n: float(w) for n, w in zip(names, weights, strict=True)}

        # G3: aggregate. With the prompt's columns kept only, the other columns' per-pixel sum joins as one last
        # column: the normalisation over all tokens sees it, then it is dropped.
        rest = cross_rest(store)
        if rest and any(n not in rest for n in names):
            raise ConfigError("the store holds the other text columns' sums of some cross layers only; capture again")
        columns = [torch.cat([maps[n], rest[n]], dim=1) if rest else maps[n] for n in names]
        agg = aggregate_cross_attention(columns, grids, weights, map_grid)  # (HW, T) or (HW, L + 1)
        if rest:
            agg = agg[:, :-1]

        # Tokens: classes and background objects; R = content tokens.
        tokens: dict[str, tuple[int, ...]] = {}
        dropped: list[str] = []
        for name in (*self.classes, *self.background_objects):
            try:
                tokens[name] = self._entity_tokens(prompt, name)
            except TokenNotFoundError:
                dropped.append(name)
        if not any(c in tokens for c in self.classes):
            raise ConfigError(f"none of the classes is in the prompt's tokens {prompt.text!r}")
        t_count = agg.shape[1]
        beyond = [n for n, idx in tokens.items() if max(idx) >= t_count]
        if beyond:
            raise ConfigError(f"the store keeps the first {t_count} text tokens only, and {beyond} lie beyond them; "
                              "segment with the prompt the store was captured with")
        content = sorted({i for idx in tokens.values() for i in idx} | {i for i in content_tokens(prompt)})
        content = [i for i in content if i < t_count]
        meta["token_indices"] = {k: list(v) for k, v in tokens.items()}
        meta["content_tokens"] = content
        meta["dropped"] = dropped
        if dropped:
            meta["warnings"].append(f"cut off by the tokenizer, dropped: {dropped}")

        # G4: per-entity maps.
        if self.rescale:
            cols = rescale_per_pixel(agg, content, floor=self.rescale_floor)
            col = {j: k for k, j in enumerate(content)}
            entity = {n: cols[:, [col[j] for j in idx]].mean(1) for n, idx in tokens.items()}
        else:
            entity = {n: agg[:, list(idx)].mean(1) for n, idx in tokens.items()}
        h, w = map_grid
        zero = torch.zeros(h, w, device=agg.device)
        names_all = list(tokens)
        stacked = torch.stack([entity[n].reshape(h, w) for n in names_all]) if names_all else zero[None, :0]
        stacked = minmax(gaussian_blur(stacked, kernel_size=self.blur_kernel_size, sigma=self.blur_sigma),
                         (-2, -1), eps=1e-8)
        processed = dict(zip(names_all, stacked, strict=True))
        flat_maps = [n for n in names_all if not bool(processed[n].any())]
        if flat_maps:  # e.g. one content entity under per-pixel rescaling: its share is 1 everywhere
            meta["warnings"].append(f"constant map (no information) for {flat_maps}")
        class_maps = torch.stack([processed.get(c, zero) for c in self.classes])
        present_bg = [b for b in self.background_objects if b in processed]
        # G5: background support.
        support = torch.stack([processed[b] for b in present_bg]).amax(0) if present_bg else zero.clone()
        refine_support = bool(support.any())  # G6 refines the support map only if it is non-zero

        # G6: refinement.
        if self.refine_order > 0:
            affinity = refine_affinity(store)
            if affinity is None:
                raise ConfigError("refine_order > 0 but the store holds no refinement self-attention")
            refine_what = torch.cat([class_maps, support[None]]) if refine_support else class_maps
            refined = refine_with_self_attention(refine_what, affinity, order=self.refine_order)
            class_maps = refined[: len(self.classes)]
            if refine_support:
                support = refined[-1]
            meta["refine_layers"] = list(gmeta.get("refine_layers") or [])
        for k, c in enumerate(self.classes):  # a dropped class never wins
            if c not in tokens:
                class_maps[k] = 0

        # G7: background channel and argmax.
        if self.background_mode == "offset":
            background = self.background_threshold + support
        else:
            background = support.clamp_min(self.background_threshold)
        scores_grid = torch.cat([background[None], class_maps])
        size = self._out_size(store, out_size, map_grid)
        up = key_upsample(scores_grid, size)
        ranked = up.clone()
        for k, c in enumerate(self.classes):
            if c not in tokens:
                ranked[k + 1] = -math.inf
        labels = ranked.argmax(0).to(torch.int64)
        return SegmentationResult(
            labels=labels.cpu(), scores=up.cpu(), label_names=("background", *self.classes), method=self.name,
            params=self.params(), meta=meta,
        )

    # -- more classes than one prompt holds ---------------------------------------------------------------------------

    def split_prompts(self, fitting: Callable[[str, Sequence[str]], list[bool]]) -> list[GoCA]:
        """This method once per prompt, so that every class fits in the text encoder's token limit.

        Args:
            fitting: ``fitting(text, words)`` tells, per word, whether the tokenizer keeps all of it (see
                :func:`attnseg.prompts.words_within` on the encoded ``text``).

        Returns:
            ``[self]`` when the prompt holds every class and background object; else one GoCA per group of classes,
            each prompt listing the background objects first, then as many classes as fit ([proposal]: the
            reference drops the classes that are cut off). Each group is captured and segmented on its own and
            :meth:`combine_parts` merges the results.

        Raises:
            ConfigError: a user-given prompt is cut off (it cannot be split), or the background objects with a single
                class do not fit.
        """
        entities = [*self.classes, *self.background_objects]
        if all(fitting(self.prompt, entities)):
            return [self]
        if not self.default_prompt:
            cut = [e for e, ok in zip(entities, fitting(self.prompt, entities), strict=True) if not ok]
            raise ConfigError(
                f"the prompt is longer than the text encoder's limit and cuts off {cut}; shorten the prompt, or leave "
                "it unset so that the classes are spread over several prompts"
            )
        background = list(self.background_objects)
        groups: list[list[str]] = []
        remaining = list(self.classes)
        while remaining:
            words = background + remaining
            ok = fitting(", ".join(words), words)
            if not all(ok[: len(background)]):
                raise ConfigError("the background objects alone fill the text encoder's token limit; name fewer "
                                  "background objects")
            k = 0
            while k < len(remaining) and ok[len(background) + k]:
                k += 1
            if k == 0:
                raise ConfigError(f"class {remaining[0]!r} does not fit in one prompt with the background objects; "
                                  "use a shorter name or fewer background objects")
            groups.append(remaining[:k])
            remaining = remaining[k:]
        return [self.for_classes(g, prompt=", ".join(background + g)) for g in groups]

    def for_classes(self, classes: Sequence[str], *, prompt: str | None = None) -> GoCA:
        """A copy with other classes (and the given prompt, default the comma-joined entities); same settings."""
        params = self.params()
        params.update(classes=list(classes), prompt=prompt)
        part = GoCA(**params)
        part.default_prompt = self.default_prompt
        return part

    def combine_parts(self, results: Sequence[SegmentationResult]) -> SegmentationResult:
        """Merge the results of :meth:`split_prompts`'s parts into one result over all classes.

        Class channels are taken as they are (each class map is min-max normalised within its own prompt, G4/G6);
        the background channel is the mean of the parts' background channels ([proposal]); then the argmax (G7).
        ``meta["prompts"]`` is the number of prompts and ``meta["parts"]`` each part's meta.
        """
        if len(results) == 1:
            return replace(results[0], meta={**results[0].meta, "prompts": 1})
        by_name: dict[str, torch.Tensor] = {}
        backgrounds = []
        for r in results:
            if r.scores is None or r.label_names is None or r.label_names[0] != "background":
                raise ConfigError("combine_parts needs GoCA results (scores with a background channel first)")
            backgrounds.append(r.scores[0])
            by_name.update({n: r.scores[i] for i, n in enumerate(r.label_names) if i > 0})
        missing = [c for c in self.classes if c not in by_name]
        if missing:
            raise ConfigError(f"the parts do not cover the classes {missing}")
        scores = torch.stack([torch.stack(backgrounds).mean(0), *[by_name[c] for c in self.classes]])
        dropped = [c for r in results for c in r.meta.get("dropped", ())]
        ranked = scores.clone()
        for k, c in enumerate(self.classes):
            if c in dropped:
                ranked[k + 1] = -math.inf
        meta = {
            "variant": self.variant, "prompts": len(results), "prompt_texts": [r.params.get("prompt") for r in results],
            "dropped": dropped, "warnings": [w for r in results for w in r.meta.get("warnings", ())],
            "parts": [dict(r.meta) for r in results],
        }
        return SegmentationResult(
            labels=ranked.argmax(0).to(torch.int64), scores=scores, label_names=("background", *self.classes),
            method=self.name, params=self.params(), meta=meta,
        )

    @staticmethod
    def _out_size(store: AttentionStore, out_size: Sequence[int] | None, grid: Sequence[int]) -> tuple[int, int]:
        size = out_size if out_size is not None else (getattr(store, "meta", {}) or {}).get("image_size")
        if size is None:
            return int(grid[0]), int(grid[1])
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ConfigError(f"out_size must be a (H, W) pair of ints, got {size!r}") from None
        if h < 1 or w < 1:
            raise ConfigError(f"out_size must be positive, got {(h, w)}")
        return h, w
