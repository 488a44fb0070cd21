"""Principal-component clustering: class-agnostic masks at several granularities (Stillger et al.).

"Beyond Labels: Self-Attention-Driven Semantic Separation Using Principal Component Clustering in Latent
Diffusion Models" (VISAPP 2025), as specified in ``METHODS.md`` §5. The paper's code is not released; the
predecessor is ``felixstillger/Syntagen_Submission_PCC_Segmentation``. The steps:

1. Per-head PCA as the attention arrives (:class:`~attnseg.capture.pca.PCAHeadStore`, :func:`head_pca`):
   ``Y_h = PCA_k(X_h)``, ``(k, r, r)`` per head, ``X_h = A_h V_h`` (``N x head_dim``).
2. :func:`upsample_components`: every head to one ``U x U`` grid, bilinear (paper; the predecessor uses
   nearest).
3. Optional reweighting (paper eq. 5): features of a grid of side r times ``r / max r``.
4. Positions: up-block self-attention by default; down, both; never mid unless asked (paper §3, Table 8).
5. :func:`stack_features`: ``F in R^{U^2 x D}``, ``D = sum_heads k``.
6. :func:`kmeans_multi`: scikit-learn ``KMeans`` per k in ``[2, 5, 6, 10, 20]`` with a fixed seed.
7. :func:`merge_masks`: pool every cluster mask over k; a mask whose IoU with a kept mask of smaller (or
   equal) k is >= theta is merged into it.
8. :func:`upsampling_error` (paper eq. 6), a diagnostic per resolution; :func:`pca_rgb`, the first three
   components of every head as colours (paper Fig. 3).

Deviations (each also stated where it happens):

- Only the conditional half of a CFG batch is used by default (``cfg_half="cond"``); the predecessor's hook
  treats both halves as heads (``cfg_half="both"`` reproduces that).
- The predecessor's extras (pixel coordinates as features, per-dimension min-max, connected-component
  splitting, cross-attention labels) are left out, as in the paper, which rejects position features.
- Cluster ids of each label map are renumbered by first appearance in row-major order (scikit-learn's ids
  are arbitrary), so results are comparable across runs and k.
- theta = 0.9 for merging is a [proposal]: the paper gives no value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.capture.pca import HeadPCA, PCAHeadStore, head_pca
from attnseg.errors import AttnSegError, ConfigError
from attnseg.methods.base import METHODS, RunOptions
from attnseg.methods.ops import minmax
from attnseg.types import SegmentationResult

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.capture.store import AttentionStore
    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import AttentionKind, LayerInfo, Prompt

__all__ = [
    "ClusteringResult",
    "HeadPCA",
    "MaskSet",
    "PCAClustering",
    "head_pca",
    "kmeans_multi",
    "merge_masks",
    "pca_rgb",
    "stack_features",
    "upsample_components",
    "upsampling_error",
]

UpsampleMode = Literal["bilinear", "nearest"]
_UPSAMPLE_MODES = ("bilinear", "nearest")
_POSITIONS = ("down", "up", "both", "all")
_CFG_HALVES = ("cond", "uncond", "both")


def _as_size(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    if isinstance(size, bool):
        raise ConfigError(f"{what} must be an int or (H, W), got {size!r}")
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be an int or (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{what} must be positive, got {size!r}")
    return h, w


# ----------------------------------------------------------------------------------------------------------------------
# Steps 2-5: one resolution, reweighting, stacking
# ----------------------------------------------------------------------------------------------------------------------


def upsample_components(
    components: torch.Tensor, size: int | Sequence[int], mode: UpsampleMode = "bilinear"
) -> torch.Tensor:
    """Step 2: resize principal-component maps to a common grid.

    ``"bilinear"`` is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (the paper's
    choice, half-pixel centres as ``METHODS.md`` §0 ``KeyUp``); ``"nearest"`` is PyTorch's
    ``src = floor(dst * h / H)`` rule (the predecessor's choice).

    Args:
        components: ``(..., k, h, w)`` floating maps (any leading axes, e.g. heads).
        size: target ``(H, W)``, or one int for a square grid.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(..., k, H, W)`` float32; a float32 copy of the input when the size is unchanged.
    """
    if mode not in _UPSAMPLE_MODES:
        raise ConfigError(f"mode must be one of {_UPSAMPLE_MODES}, got {mode!r}")
    if not isinstance(components, torch.Tensor) or components.ndim < 3:
        shape = tuple(components.shape) if isinstance(components, torch.Tensor) else type(components).__name__
        raise ConfigError(f"components must be a (..., k, h, w) tensor, got {shape}")
    out_h, out_w = _as_size(size)
    *lead, h, w = components.shape
    x = components.to(torch.float32)
    if (h, w) == (out_h, out_w):
        return x.clone()
    flat = x.reshape(-1, 1, h, w)
    if mode == "bilinear":
        up = F.interpolate(flat, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    else:
        up = F.interpolate(flat, size=(out_h, out_w), mode="nearest")
    return up.reshape(*lead, out_h, out_w)


def upsampling_error(components: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Paper eq. 6: ``E(i, j) = (1/n) sum_c |x_bilinear(i, j, c) - x_nearest(i, j, c)|`` over n PC channels.

    A diagnostic (paper Fig. 10): zero where the maps are locally constant, large along the contours where
    components change. It does not enter the clustering.

    Args:
        components: ``(..., n, h, w)`` maps; the mean runs over the channel axis ``-3`` (stack several heads'
            components along it to get one map per resolution).
        size: target ``(H, W)`` or one int.

    Returns:
        ``(..., H, W)`` float32, ``>= 0``.
    """
    bil = upsample_components(components, size, "bilinear")
    near = upsample_components(components, size, "nearest")
    return (bil - near).abs().mean(dim=-3)


def stack_features(
    per_head: Sequence[torch.Tensor],
    size: int | Sequence[int],
    *,
    reweight: bool = False,
    mode: UpsampleMode = "bilinear",
) -> torch.Tensor:
    """Steps 2, 3 and 5: resize every head's components to ``size`` and stack them as pixel features.

    Args:
        per_head: one ``(k_i, h_i, w_i)`` tensor per head (grids and k may differ between heads).
        size: the common grid ``U`` (``(H, W)`` or one int).
        reweight: multiply the features of a grid of side ``r = max(h_i, w_i)`` by ``r / max r`` (paper
            eq. 5: 0.25 / 0.5 / 1 for 16 / 32 / 64). ``max r`` is taken over ``per_head``.
        mode: ``"bilinear"`` (paper) or ``"nearest"`` (predecessor).

    Returns:
        ``(H * W, D)`` float32 features, ``D = sum_i k_i``, rows in row-major pixel order, columns in the order
        of ``per_head`` (all of head 0's components first).
    """
    if isinstance(per_head, torch.Tensor):
        per_head = list(per_head)
    if not per_head:
        raise ConfigError("per_head must hold at least one (k, h, w) tensor")
    for i, t in enumerate(per_head):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"per_head[{i}] must be a (k, h, w) tensor, got {shape}")
    out_h, out_w = _as_size(size)
    sides = [max(int(t.shape[-2]), int(t.shape[-1])) for t in per_head]
    r_max = max(sides)
    dim = sum(int(t.shape[0]) for t in per_head)
    feats = torch.empty(out_h * out_w, dim, dtype=torch.float32, device=per_head[0].device)
    col = 0
    for t, r in zip(per_head, sides, strict=True):
        k = int(t.shape[0])
        up = upsample_components(t, (out_h, out_w), mode).reshape(k, out_h * out_w)
        if reweight:
            up = up * (r / r_max)
        feats[:, col : col + k] = up.T
        col += k
    return feats


# ----------------------------------------------------------------------------------------------------------------------
# Step 6: k-means at several k
# ----------------------------------------------------------------------------------------------------------------------


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids by first appearance: the first pixel is 0, the next new cluster 1, ..."""
    ids, first = np.unique(labels, return_index=True)
    order = ids[np.argsort(first, kind="stable")]
    lut = np.empty(int(ids.max()) + 1, dtype=np.int64)
    lut[order] = np.arange(order.size, dtype=np.int64)
    return lut[labels]


def _check_ks(ks: Sequence[int], what: str = "ks") -> tuple[int, ...]:
    if isinstance(ks, (int, str)) or not isinstance(ks, Sequence) or not ks:
        raise ConfigError(f"{what} must be a non-empty sequence of cluster counts, got {ks!r}")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise ConfigError(f"{what} must hold ints >= 2 (cluster counts), got {list(ks)!r}")
        out.append(int(k))
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} has duplicates: {out}")
    return tuple(sorted(out))


def kmeans_multi(
    features: torch.Tensor,
    ks: Sequence[int],
    *,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 300,
) -> dict[int, torch.Tensor]:
    """Step 6: scikit-learn ``KMeans(n_clusters=k, random_state=seed, n_init=n_init)`` for every k.

    The same features and seed give the same labels. Ids are renumbered by first appearance (row order).

    Args:
        features: ``(N, D)`` floating (run in float32, as the predecessor's numpy arrays).
        ks: cluster counts, ints ``2 <= k <= N`` (the paper's list is ``(2, 5, 6, 10, 20)``).
        seed: k-means++ seed (paper: a fixed seed; 0 in the predecessor).
        n_init: k-means runs per k (1: the predecessor's scikit-learn 1.4 ``n_init="auto"`` with k-means++).
        max_iter: Lloyd iterations per run (scikit-learn's default 300).

    Returns:
        ``{k: (N,) int64}`` label per row, ascending k. Fewer than k ids occur when rows repeat.
    """
    from sklearn.cluster import KMeans

    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ConfigError(f"features must be a floating (N, D) tensor, got {shape}")
    ks_t = _check_ks(ks)
    n = int(features.shape[0])
    if ks_t[-1] > n:
        raise ConfigError(f"ks has k = {ks_t[-1]} but there are only {n} samples")
    for name, v, lo in (("seed", seed, 0), ("n_init", n_init, 1), ("max_iter", max_iter, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
    x = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
    out: dict[int, torch.Tensor] = {}
    for k in ks_t:
        km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
        labels = km.fit_predict(x)
        out[k] = torch.from_numpy(_renumber(labels.astype(np.int64)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Step 7: pooling and merging masks over k
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskSet:
    """Cluster masks pooled over several k, after merging near-duplicates.

    Attributes:
        masks: ``(M, H, W)`` bool, ordered by ascending k, then cluster id.
        mask_k: ``(M,)`` the k each mask comes from.
        mask_label: ``(M,)`` the mask's cluster id in the label map of its k.
        members: per kept mask, the ``(k, id)`` of every pooled mask merged into it (itself first).
        num_pooled: masks before merging.
    """

    masks: torch.Tensor
    mask_k: tuple[int, ...]
    mask_label: tuple[int, ...]
    members: tuple[tuple[tuple[int, int], ...], ...]
    num_pooled: int


def merge_masks(label_maps: Mapping[int, torch.Tensor], *, iou_threshold: float = 0.9) -> MaskSet:
    """Step 7: pool the cluster masks of every k and merge pairs with IoU >= ``iou_threshold``.

    Masks are visited by ascending k (then id). A mask is merged into (dropped in favour of) the kept mask
    with which its IoU is highest, if that IoU is >= the threshold; otherwise it is kept. So a merge always
    keeps the mask from the smaller k, kept masks have pairwise IoU < threshold, and every dropped mask has
    IoU >= threshold with a kept one. Masks of one k are disjoint and never merge with each other.

    Args:
        label_maps: ``{k: (H, W) int}`` label maps of one image (ids need not be contiguous).
        iou_threshold: theta in ``(0, 1]`` ([proposal] 0.9; the paper gives no value).

    Returns:
        :class:`MaskSet`.
    """
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)):
        raise ConfigError(f"iou_threshold must be a number in (0, 1], got {iou_threshold!r}")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ConfigError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    if not label_maps:
        raise ConfigError("label_maps must hold at least one label map")
    shape: tuple[int, ...] | None = None
    pooled: list[torch.Tensor] = []
    tags: list[tuple[int, int]] = []
    for k in sorted(label_maps):
        lab = label_maps[k]
        if not isinstance(lab, torch.Tensor) or lab.ndim != 2:
            raise ConfigError(f"label_maps[{k}] must be an (H, W) tensor")
        if shape is None:
            shape = tuple(lab.shape)
        elif tuple(lab.shape) != shape:
            raise ConfigError(f"label maps differ in size: {shape} and {tuple(lab.shape)} (k = {k})")
        for i in torch.unique(lab).tolist():
            pooled.append(lab == i)
            tags.append((int(k), int(i)))
    assert shape is not None
    stack = torch.stack(pooled)  # (P, H, W)
    flat = stack.reshape(len(pooled), -1)
    # exact integer counts: float32 sums are exact below 2^24 pixels
    dtype = torch.float32 if flat.shape[1] < 2**24 else torch.float64
    fl = flat.to(dtype)
    inter = fl @ fl.T
    area = fl.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))

    kept: list[int] = []
    members: dict[int, list[tuple[int, int]]] = {}
    for p in range(len(pooled)):
        if kept:
            scores = iou[p, kept]
            best = int(torch.argmax(scores))  # first on ties: the smaller k
            if float(scores[best]) >= iou_threshold:
                members[kept[best]].append(tags[p])
                continue
        kept.append(p)
        members[p] = [tags[p]]
    return MaskSet(
        masks=stack[kept],
        mask_k=tuple(tags[p][0] for p in kept),
        mask_label=tuple(tags[p][1] for p in kept),
        members=tuple(tuple(members[p]) for p in kept),
        num_pooled=len(pooled),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Paper Fig. 3: principal components as colours
# ----------------------------------------------------------------------------------------------------------------------


def _head_rgb(t: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    k = int(t.shape[0])
    rgb = t[:3].to(torch.float32)
    if k < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(3 - k, *rgb.shape[1:])])
    rgb = minmax(rgb, (-2, -1))
    return upsample_components(rgb, tile, "nearest")


def pca_rgb(
    components: torch.Tensor | Sequence[torch.Tensor],
    *,
    columns: int | None = None,
    tile: int | Sequence[int] | None = None,
    padding: int = 1,
    background: float = 1.0,
) -> torch.Tensor:
    """The first three principal components of every head as RGB, min-max per channel, in a grid (paper Fig. 3).

    Args:
        components: the heads, in the order to show them: an ``(n, k, h, w)`` tensor or a sequence of
            ``(k, h, w)`` tensors (a grid of ``columns`` tiles per row), or a sequence of ``(n_i, k, h, w)``
            tensors (one row per item, e.g. per layer). Heads with ``k < 3`` get zero channels.
        columns: tiles per row for flat input (default ``ceil(sqrt(n))``); ignored for one-row-per-item input.
        tile: tile ``(H, W)`` (or one int); default the largest head grid. Tiles are nearest-resized.
        padding: pixels between tiles.
        background: value of the padding and of empty cells, in ``[0, 1]``.

    Returns:
        ``(3, H_grid, W_grid)`` float32 in ``[0, 1]``.
    """
    rows: list[list[torch.Tensor]]
    if isinstance(components, torch.Tensor):
        if components.ndim != 4:
            raise ConfigError(f"components must be (n, k, h, w), got {tuple(components.shape)}")
        heads = list(components)
        rows = []
    else:
        items = list(components)
        if not items:
            raise ConfigError("components must hold at least one head")
        if all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in items):
            rows = [list(t) for t in items]
            heads = [h for row in rows for h in row]
        elif all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in items):
            heads, rows = items, []
        else:
            raise ConfigError("components must be (k, h, w) heads or (n, k, h, w) rows, not a mix")
    if not heads:
        raise ConfigError("components must hold at least one head")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding must be an int >= 0, got {padding!r}")
    if not rows:
        n = len(heads)
        cols = columns if columns is not None else math.ceil(math.sqrt(n))
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
            raise ConfigError(f"columns must be an int >= 1, got {columns!r}")
        rows = [heads[i : i + cols] for i in range(0, n, cols)]
    if tile is None:
        th = max(int(h.shape[-2]) for h in heads)
        tw = max(int(h.shape[-1]) for h in heads)
    else:
        th, tw = _as_size(tile, "tile")
    ncols = max(len(r) for r in rows)
    height = len(rows) * th + (len(rows) - 1) * padding
    width = ncols * tw + (ncols - 1) * padding
    grid = torch.full((3, height, width), float(background), dtype=torch.float32)
    for i, row in enumerate(rows):
        for j, head in enumerate(row):
            y, x = i * (th + padding), j * (tw + padding)
            grid[:, y : y + th, x : x + tw] = _head_rgb(head.detach().cpu(), (th, tw))
    return grid


# ----------------------------------------------------------------------------------------------------------------------
# Result and method
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusteringResult:
    """Everything the clustering produced for one image.

    Attributes:
        label_maps: ``{k: (H, W) int64}`` per cluster count, at the output size (nearest from the feature
            grid), ids by first appearance.
        masks: ``(M, H, W)`` bool, the pooled masks after merging (:func:`merge_masks`), at the output size.
        mask_k: ``(M,)`` the k of each mask.
        mask_label: ``(M,)`` each mask's id in ``label_maps[mask_k[i]]``.
        upsampling_error: ``{r: (U_h, U_w) float32}`` paper eq. 6 per resolution (grid side r), on the
            feature grid.
        pca_rgb: ``(3, H_grid, W_grid)`` float32 in [0, 1], one row per layer, one tile per head.
        feature_size: ``(U_h, U_w)``, the common grid the features were clustered on.
        heads: per stacked head ``(layer name, head index, batch item)``, in feature order.
        explained_variance_ratio: ``(len(heads), k_pc)`` float32.
        primary_k: the k :meth:`to_segmentation` uses by default.
        params: the method's hyper-parameters.
        meta: JSON-able facts (timings, timesteps, number of merged masks...).
    """

    label_maps: dict[int, torch.Tensor]
    masks: torch.Tensor
    mask_k: tuple[int, ...]
    mask_label: tuple[int, ...]
    upsampling_error: dict[int, torch.Tensor]
    pca_rgb: torch.Tensor
    feature_size: tuple[int, int]
    heads: tuple[tuple[str, int, str], ...]
    explained_variance_ratio: torch.Tensor
    primary_k: int
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted(self.label_maps))

    @property
    def size(self) -> tuple[int, int]:
        h, w = next(iter(self.label_maps.values())).shape
        return int(h), int(w)

    def masks_of(self, k: int) -> torch.Tensor:
        """``(K', H, W)`` bool: the kept masks that come from cluster count ``k``."""
        idx = [i for i, mk in enumerate(self.mask_k) if mk == k]
        return self.masks[idx]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no tensors)."""
        return {
            "ks": list(self.ks),
            "primary_k": self.primary_k,
            "segments_per_k": {int(k): int(v.unique().numel()) for k, v in self.label_maps.items()},
            "num_masks": int(self.masks.shape[0]),
            "mask_k": list(self.mask_k),
            "mask_label": list(self.mask_label),
            "feature_size": list(self.feature_size),
            "num_heads": len(self.heads),
            "feature_dim": int(self.explained_variance_ratio.numel()),
            **self.meta,
        }

    def to_segmentation(self, k: int | None = None) -> SegmentationResult:
        """The label map of cluster count ``k`` (default :attr:`primary_k`) as a :class:`SegmentationResult`,
        with the merged masks of all k as boolean ``scores (M, H, W)``; its ``meta`` holds :meth:`summary`."""
        k = self.primary_k if k is None else k
        if k not in self.label_maps:
            raise ConfigError(f"k={k} was not clustered; available: {list(self.ks)}")
        # the merged masks of every k travel as boolean scores: best-match protocols score the whole set
        return SegmentationResult(
            labels=self.label_maps[k], scores=self.masks, method=PCAClustering.name, params=dict(self.params),
            meta={**self.summary(), "k": int(k), "scores_are_masks": True},
        )

    def pca_rgb_image(self) -> Image.Image:
        """:attr:`pca_rgb` as an RGB PIL image."""
        from PIL import Image as PILImage

        arr = (self.pca_rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return PILImage.fromarray(arr)


@METHODS.register("clustering", help="PCA per self-attention head + k-means at several k (Stillger et al.)")
class PCAClustering:
    """Principal-component clustering of per-head self-attention (Stillger et al., VISAPP 2025).

    Every selected self-attention head is reduced by PCA as it arrives (:class:`PCAHeadStore`), brought to one
    grid, stacked, and clustered by k-means at several cluster counts; the masks of all k are pooled and
    near-duplicates merged. :meth:`cluster` returns everything (:class:`ClusteringResult`); :meth:`segment`
    (the :class:`~attnseg.methods.base.Segmenter` protocol) returns the label map of one k.

    Args (keyword-only):
        n_components: principal components per head, k_pc. Default 3 (paper Table 2; 1-64 studied).
        ks: cluster counts. Default ``(2, 5, 6, 10, 20)`` (paper Fig. 5).
        primary_k: the k whose label map :meth:`segment` returns; default the largest of ``ks``.
        positions: ``"up"`` (default, paper Table 2 best), ``"down"``, ``"both"``, or ``"all"`` (every
            self-attention layer whatever its position; for transformer denoisers, which have no up/down).
        include_mid: also use the UNet mid block (off: paper §3 and Table 8).
        resolutions: grid sides to use, e.g. ``(16, 32, 64)``; None uses all (paper: ``[16, 32, 64]``).
        size: the common grid U, an int or ``(H, W)``; None: the largest captured grid (paper: U = 64 at 512 px,
            256 also studied).
        upsample: ``"bilinear"`` (paper) or ``"nearest"`` (predecessor).
        reweight: paper eq. 5 resolution weights ``r / max r`` (off: paper Table 2 best).
        merge_iou: theta for merging masks across k ([proposal] 0.9; the paper gives none).
        reading: ``"outputs"`` (``A_h V_h``, predecessor) or ``"probs"`` (``A_h``, [proposal]).
        seed: k-means seed (paper: fixed; 0 in the predecessor). A ``generator`` given to :meth:`segment`
            overrides it.
        n_init: k-means runs per k (1: predecessor's scikit-learn 1.4 ``n_init="auto"``; 10 is an option).
        max_iter: k-means iterations (scikit-learn default 300).
        cfg_half: which half of a classifier-free-guidance batch to use: ``"cond"`` ([proposal], METHODS §5),
            ``"uncond"``, or ``"both"`` (halves as extra heads, the predecessor). A single pass (batch 1) is
            used whatever the setting.
        timestep: timestep of the single-pass reading (:meth:`run_options`). Default 1: the last timestep of
            the paper's img2img setting (40 "leading" DDIM steps with offset 1 end at t = 1).
        img2img_strength: the paper's real-image img2img strength (0.05, paper §5), read by
            :func:`attnseg.generation.img2img_capture`.
        num_inference_steps: the img2img step grid (40 [proposal]: ``int(40 * 0.05) = 2`` steps as in the
            paper's "2 steps"), read by :func:`attnseg.generation.img2img_capture`.

    Example:
        >>> method = PCAClustering(ks=(2, 5, 10))
        >>> method.run_options().timestep
        1
    """

    name: ClassVar[str] = "clustering"
    requires: ClassVar[frozenset[AttentionKind]] = frozenset({"self"})

    def __init__(
        self,
        *,
        n_components: int = 3,
        ks: Sequence[int] = (2, 5, 6, 10, 20),
        primary_k: int | None = None,
        positions: Literal["down", "up", "both", "all"] = "up",
        include_mid: bool = False,
        resolutions: Sequence[int] | None = None,
        size: int | Sequence[int] | None = None,
        upsample: UpsampleMode = "bilinear",
        reweight: bool = False,
        merge_iou: float = 0.9,
        reading: Literal["outputs", "probs"] = "outputs",
        seed: int = 0,
        n_init: int = 1,
        max_iter: int = 300,
        cfg_half: Literal["cond", "uncond", "both"] = "cond",
        timestep: int = 1,
        img2img_strength: float = 0.05,
        num_inference_steps: int = 40,
    ) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ConfigError(f"n_components must be an int >= 1, got {n_components!r}")
        self.n_components = n_components
        self.ks = _check_ks(ks)
        if primary_k is not None and primary_k not in self.ks:
            raise ConfigError(f"primary_k must be one of ks {list(self.ks)}, got {primary_k!r}")
        self.primary_k = primary_k if primary_k is not None else self.ks[-1]
        if positions not in _POSITIONS:
            raise ConfigError(f"positions must be one of {_POSITIONS}, got {positions!r}")
        self.positions = positions
        if not isinstance(include_mid, bool):
            raise ConfigError(f"include_mid must be a bool, got {include_mid!r}")
        self.include_mid = include_mid
        if resolutions is not None:
            if isinstance(resolutions, (int, str)) or not isinstance(resolutions, Sequence) or not resolutions:
                raise ConfigError(f"resolutions must be None or a non-empty sequence of sides, got {resolutions!r}")
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in resolutions):
                raise ConfigError(f"resolutions must hold positive ints, got {list(resolutions)!r}")
            resolutions = tuple(sorted(set(resolutions)))
        self.resolutions: tuple[int, ...] | None = resolutions
        self.size = None if size is None else _as_size(size, "size")
        if upsample not in _UPSAMPLE_MODES:
            raise ConfigError(f"upsample must be one of {_UPSAMPLE_MODES}, got {upsample!r}")
        self.upsample: UpsampleMode = upsample
        if not isinstance(reweight, bool):
            raise ConfigError(f"reweight must be a bool, got {reweight!r}")
        self.reweight = reweight
        if isinstance(merge_iou, bool) or not isinstance(merge_iou, (int, float)) or not 0 < merge_iou <= 1:
            raise ConfigError(f"merge_iou must be a number in (0, 1], got {merge_iou!r}")
        self.merge_iou = float(merge_iou)
        if reading not in ("outputs", "probs"):
            raise ConfigError(f"reading must be 'outputs' or 'probs', got {reading!r}")
        self.reading: Literal["outputs", "probs"] = reading
        for pname, v, lo in (("seed", seed, 0), ("n_init", n_init, 1), ("max_iter", max_iter, 1),
                             ("timestep", timestep, 0), ("num_inference_steps", num_inference_steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{pname} must be an int >= {lo}, got {v!r}")
        self.seed = seed
        self.n_init = n_init
        self.max_iter = max_iter
        self.timestep = timestep
        self.num_inference_steps = num_inference_steps
        if cfg_half not in _CFG_HALVES:
            raise ConfigError(f"cfg_half must be one of {_CFG_HALVES}, got {cfg_half!r}")
        self.cfg_half: Literal["cond", "uncond", "both"] = cfg_half
        s = img2img_strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ConfigError(f"img2img_strength must be a number in (0, 1], got {img2img_strength!r}")
        self.img2img_strength = float(s)

    # -- description -------------------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The hyper-parameters as a JSON-friendly dict (recorded in every result)."""
        return {
            "n_components": self.n_components,
            "ks": list(self.ks),
            "primary_k": self.primary_k,
            "positions": self.positions,
            "include_mid": self.include_mid,
            "resolutions": None if self.resolutions is None else list(self.resolutions),
            "size": None if self.size is None else list(self.size),
            "upsample": self.upsample,
            "reweight": self.reweight,
            "merge_iou": self.merge_iou,
            "reading": self.reading,
            "seed": self.seed,
            "n_init": self.n_init,
            "max_iter": self.max_iter,
            "cfg_half": self.cfg_half,
            "timestep": self.timestep,
            "img2img_strength": self.img2img_strength,
            "num_inference_steps": self.num_inference_steps,
        }

    def __repr__(self) -> str:
        return f"PCAClustering({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    # -- Segmenter protocol ------------------------------------------------------------------------------------------
    def run_options(self) -> RunOptions:
        """Single-pass reading: the latent noised to ``timestep`` (default 1), empty prompt, no CFG.

        The paper's real-image setting (img2img, strength 0.05, two steps) is
        :func:`attnseg.generation.img2img_capture`; this single pass approximates its last call.
        """
        return RunOptions(
            timestep=self.timestep, add_noise=True, sample_posterior=False, prompt="", heads="all", group="layer"
        )

    def _wants(self, info: LayerInfo) -> bool:
        if info.kind != "self":
            return False
        if info.position == "mid":
            ok = self.include_mid
        elif self.positions == "all":
            ok = True
        elif self.positions == "both":
            ok = info.position in ("down", "up")
        else:
            ok = info.position == self.positions
        return ok and (self.resolutions is None or info.resolution in self.resolutions)

    def select_layers(self, layers: dict[str, LayerInfo]) -> list[str]:
        """Self-attention layers at ``positions`` (plus mid with ``include_mid``) and ``resolutions``, in
        forward order."""
        chosen = sorted((i for i in layers.values() if self._wants(i)), key=lambda i: i.index)
        if not chosen:
            found = sorted({f"{i.position}@{i.resolution}" for i in layers.values() if i.kind == "self"})
            raise ConfigError(
                f"no self-attention layer matches positions={self.positions!r}, include_mid={self.include_mid}, "
                f"resolutions={self.resolutions}; the model has (position@grid side): {', '.join(found) or 'none'}"
                " (transformer denoisers have no up/down blocks: use positions='all')"
            )
        return [i.name for i in chosen]

    def make_store(
        self, adapter: DiffusionAdapter | None, layers: dict[str, LayerInfo], meta: dict[str, Any]
    ) -> PCAHeadStore:
        """A :class:`PCAHeadStore` keeping ``n_components`` per head of the last captured call."""
        device = adapter.device if adapter is not None else "cpu"  # the maps' device: nothing moves to the host
        return PCAHeadStore(n_components=self.n_components, reading=self.reading, step="last", meta=meta, device=device)

    @staticmethod
    def load_store(path: str | Path) -> PCAHeadStore:
        """Read back a store written by :meth:`PCAHeadStore.save` (used by the evaluation runner's cache)."""
        return PCAHeadStore.load(path)

    def segment(
        self,
        store: AttentionStore,
        *,
        prompt: Prompt | None = None,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationResult:
        """The label map of ``primary_k``; :meth:`cluster` gives all k, the merged masks and diagnostics.

        Args:
            store: a :class:`PCAHeadStore` (from :meth:`make_store`, or loaded with ``PCAHeadStore.load``).
            prompt: unused (the method is class-agnostic).
            out_size: ``(H, W)`` of the labels (default ``store.meta["image_size"]``, else the feature grid).
            generator: seeds k-means instead of ``seed``.

        Returns:
            :class:`SegmentationResult` with ``labels (H, W) int64`` and ``meta`` = :meth:`ClusteringResult.summary`.
        """
        return self.cluster(store, out_size=out_size, generator=generator).to_segmentation()

    # -- the method ----------------------------------------------------------------------------------------------------
    def _batch_items(self, store: PCAHeadStore) -> list[tuple[int, str]]:
        b = store.batch_size
        names = store.meta.get("batch_items")
        if not isinstance(names, list) or len(names) != b:
            if b == 1:
                names = ["image"]
            elif b % 2 == 0:
                names = ["uncond"] * (b // 2) + ["cond"] * (b // 2)  # diffusers' CFG layout (METHODS §1)
            else:
                names = [f"item{i}" for i in range(b)]
        if b == 1:
            return [(0, str(names[0]))]  # a single pass has no halves
        if self.cfg_half == "both":
            return [(i, str(n)) for i, n in enumerate(names)]
        chosen = [(i, str(n)) for i, n in enumerate(names) if n == self.cfg_half]
        if not chosen:
            raise AttnSegError(f"cfg_half={self.cfg_half!r}, but the store's batch items are {names}")
        return chosen

    def cluster(
        self,
        store: AttentionStore,
        *,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> ClusteringResult:
        """Steps 2-8 on the per-head components in ``store``.

        Args:
            store: a :class:`PCAHeadStore` holding the selected layers (layers outside this method's
                ``positions``/``resolutions`` are ignored, so one store can serve several settings); it must
                keep at least ``n_components`` components per head.
            out_size: ``(H, W)`` of the label maps and masks (default ``store.meta["image_size"]``, else the
                feature grid); nearest from the feature grid.
            generator: seeds k-means instead of ``seed``.

        Returns:
            :class:`ClusteringResult`.
        """
        import time

        if not isinstance(store, PCAHeadStore):
            raise AttnSegError(
                f"clustering needs a PCAHeadStore (per-head principal components), got {type(store).__name__}; "
                "capture with the method's make_store() (the pipeline does), or load one with PCAHeadStore.load"
            )
        if store.n_components < self.n_components:
            raise AttnSegError(
                f"the store keeps {store.n_components} components per head, fewer than n_components="
                f"{self.n_components}; capture again with more"
            )
        start = time.perf_counter()
        layers = sorted((store.layers[n] for n in store), key=lambda i: i.index)
        used = [info for info in layers if self._wants(info)]
        if not used:
            have = ", ".join(f"{i.position}@{i.resolution}" for i in layers) or "none"
            raise AttnSegError(
                f"the store holds no layer for positions={self.positions!r}, resolutions={self.resolutions}, "
                f"include_mid={self.include_mid} (it holds {have})"
            )
        items = self._batch_items(store)
        k = self.n_components
        per_head: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        heads: list[tuple[str, int, str]] = []
        ratios: list[torch.Tensor] = []
        by_res: dict[int, list[torch.Tensor]] = {}
        for info in used:
            comps = store.components(info.name, batch_index=None)[:, :, :k]  # (B, H, k, h, w)
            ratio = store.explained_variance_ratio(info.name, batch_index=None)[:, :, :k]  # (B, H, k)
            for b, item in items:
                rows.append(comps[b])
                by_res.setdefault(info.resolution, []).append(comps[b].reshape(-1, *info.grid))
                for h in range(comps.shape[1]):
                    per_head.append(comps[b, h])
                    heads.append((info.name, h, item))
                    ratios.append(ratio[b, h])
        if self.size is not None:
            fsize = self.size
        else:
            biggest = max(used, key=lambda i: (i.grid[0] * i.grid[1], i.grid))
            fsize = biggest.grid

        # Steps 2-5
        feats = stack_features(per_head, fsize, reweight=self.reweight, mode=self.upsample)
        # Step 6
        seed = self.seed
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        flat_maps = kmeans_multi(feats, self.ks, seed=seed, n_init=self.n_init, max_iter=self.max_iter)
        grid_maps = {kk: v.reshape(fsize) for kk, v in flat_maps.items()}
        # Step 7, on the feature grid
        merged = merge_masks(grid_maps, iou_threshold=self.merge_iou)
        # Step 8: diagnostics
        errors = {r: upsampling_error(torch.cat(maps), fsize) for r, maps in sorted(by_res.items())}
        rgb = pca_rgb(rows)

        size = self._out_size(store, out_size, fsize)
        label_maps = {kk: _nearest(v, size).to(torch.int64) for kk, v in grid_maps.items()}
        masks = _nearest(merged.masks, size).to(torch.bool)
        meta: dict[str, Any] = {
            "num_pooled_masks": merged.num_pooled,
            "out_size": list(size),
            "batch_items": sorted({name for _, name in items}),
            "kmeans_seed": seed,
            "cluster_seconds": round(time.perf_counter() - start, 4),
        }
        for key in ("timesteps", "captured_timestep", "capture"):
            if key in store.meta:
                meta[key] = store.meta[key]
        return ClusteringResult(
            label_maps=label_maps,
            masks=masks,
            mask_k=merged.mask_k,
            mask_label=merged.mask_label,
            upsampling_error=errors,
            pca_rgb=rgb,
            feature_size=(int(fsize[0]), int(fsize[1])),
            heads=tuple(heads),
            explained_variance_ratio=torch.stack(ratios),
            primary_k=self.primary_k,
            params=self.params(),
            meta=meta,
        )

    @staticmethod
    def _out_size(store: AttentionStore, out_size: Sequence[int] | None, fsize: tuple[int, int]) -> tuple[int, int]:
        if out_size is not None:
            return _as_size(out_size, "out_size")
        image_size = store.meta.get("image_size")
        if image_size:
            return _as_size(image_size, "store.meta['image_size']")
        return fsize


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of the last two axes of ``(..., h, w)`` (labels or masks)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).to(torch.float32)
    return F.interpolate(flat, size=size, mode="nearest").reshape(*lead, *size).to(x.dtype)
