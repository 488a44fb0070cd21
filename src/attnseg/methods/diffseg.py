"""DiffSeg: unsupervised segmentation by iterative merging of self-attention maps.

Tian et al., "Diffuse, Attend, and Segment" (CVPR 2024); behaviour follows the reference code
``google/diffseg:diffseg/segmentor.py`` as specified in ``METHODS.md`` §2. The steps:

1-3. :func:`aggregate_self_attention`: per-resolution head/layer means -> ``KeyUp`` to the largest grid R,
     renormalise every key map, ``QueryTile`` to R, weighted sum -> ``(R, R, R, R)``.
4.   :func:`anchor_grid`: a regular ``M x M`` grid of anchor queries.
5-7. :func:`merge_proposals`: iterative merging with the symmetric KL distance.
8.   :func:`refine_kmeans` (optional): K-means on the ``R^2`` attention maps, initialised at the proposals.
9.   :func:`assign_labels`: bilinear upsampling of the proposals, then argmax.
10.  :func:`label_segments` (optional): a word of the prompt per segment from cross-attention.

Deviations from the reference (each also stated where it happens):

- Iteration 0 runs in float32 (the reference casts to float16); later iterations run in float64, as there.
- Probabilities are floored at ``1e-10`` inside the logarithms ([proposal]); the reference adds no epsilon,
  so an exact (or fp16-underflowed) zero gives ``0 * log 0 = NaN`` and silently blocks a merge.
- Every anchor (iteration 0) and every walked proposal (later iterations) is forced into its own group, so
  no group is empty. In the reference an anchor whose self-distance is NaN gives a ``0/0`` proposal that the
  next iteration drops; here it keeps the anchor's own map.
- Explicit resolution weights are normalised to sum 1 (the reference uses them as given), so every
  aggregated map stays a distribution and the KL thresholds keep their meaning.
- The anchor grid and all sizes are derived from the inputs (the reference hard-codes a 64 x 64 grid and
  512 x 512 output); with a 64 x 64 grid the results are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from attnseg.errors import ConfigError
from attnseg.methods.base import METHODS, RunOptions
from attnseg.methods.ops import add_query_tiled, check_memory, group_mean, key_upsample, symmetric_kl_matrix
from attnseg.types import SegmentationResult

if TYPE_CHECKING:
    from attnseg.capture.store import AttentionStore
    from attnseg.types import AttentionKind, LayerInfo, Prompt

__all__ = [
    "DiffSeg",
    "SemanticLabels",
    "aggregate_self_attention",
    "anchor_divergence_unit",
    "anchor_grid",
    "assign_labels",
    "label_segments",
    "merge_proposals",
    "refine_kmeans",
]

#: Floor applied to probabilities inside logarithms ([proposal], ``METHODS.md`` §2 edge cases).
KL_EPS = 1e-10

#: The reference's absolute merging threshold (COCO-Stuff-27 setting, ``google/diffseg:benchmarks.ipynb``).
PAPER_THRESHOLD = 1.1
#: Default merging threshold in units of :func:`anchor_divergence_unit` ([proposal]; chosen on the toy world's
#: val split for both toy models, checked for transfer across grids on synthetic attention,
#: ``benchmarks/threshold_transfer.py``).
RELATIVE_THRESHOLD = 0.3

_LABEL_MODES = ("mean", "majority")

_LOG_EPS = math.log(KL_EPS)

# Elements of the (rows, Nk) block floored at once when pooling keys (1 Mi elements, 4 MiB in float32).
_POOL_BLOCK_ELEMENTS = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Steps 1-3: aggregation
# ----------------------------------------------------------------------------------------------------------------------


def _grid_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(
            f"{what}: {num_tokens} tokens do not form a square grid; DiffSeg needs square self-attention grids"
        )
    return side


def _check_square_matrix(t: torch.Tensor, what: str) -> int:
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ConfigError(f"{what}: expected a (N, N) self-attention matrix, got shape {tuple(t.shape)}")
    return _grid_side(int(t.shape[0]), what)


def _resolve_weights(
    resolutions: list[int],
    weights: Sequence[float] | Mapping[int, float] | None,
) -> list[float]:
    if weights is None:
        # Step 3: weights proportional to resolution (reference ``get_weight_rato``: r / sum r = r/120 at 64..8).
        raw = [float(r) for r in resolutions]
    elif isinstance(weights, Mapping):
        missing = sorted({r for r in resolutions if r not in weights})
        if missing:
            raise ConfigError(f"weights has no entry for resolution(s) {missing}; given for {sorted(weights)}")
        raw = [float(weights[r]) for r in resolutions]
    else:
        raw = [float(w) for w in weights]
        if len(raw) != len(resolutions):
            raise ConfigError(f"weights has {len(raw)} entries but {len(resolutions)} attention maps were given")
    if any(not math.isfinite(w) or w < 0 for w in raw):
        raise ConfigError(f"weights must be finite and >= 0, got {raw}")
    total = sum(raw)
    if total <= 0:
        raise ConfigError(f"weights must not all be 0, got {raw}")
    return [w / total for w in raw]


def _aggregate(
    maps: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    weights: Sequence[float] | Mapping[int, float] | None,
) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    entries: list[tuple[int, torch.Tensor]] = []
    if isinstance(maps, Mapping):
        for key, t in maps.items():
            side = _check_square_matrix(t, f"self-attention at resolution {key}")
            if int(key) != side:
                raise ConfigError(f"self-attention keyed by resolution {key} has {t.shape[0]} tokens ({side}^2)")
            entries.append((side, t))
    else:
        for i, t in enumerate(maps):
            entries.append((_check_square_matrix(t, f"self-attention map {i}"), t))
    if not entries:
        raise ConfigError("no self-attention maps were given")
    devices = {t.device for _, t in entries}
    if len(devices) > 1:
        raise ConfigError(f"self-attention maps live on different devices: {sorted(map(str, devices))}")

    resolutions = [r for r, _ in entries]
    ws = _resolve_weights(resolutions, weights)
    big = max(resolutions)
    n_big = big * big
    # the aggregate, one resized resolution and the merge's log-maps: about three R^4 float32 tensors
    check_memory(3 * n_big * n_big * 4, f"aggregating self-attention at {big}x{big}", device=entries[0][1].device)

    out: torch.Tensor | None = None
    # The largest grid first: its weighted copy becomes the accumulator (no extra R^4 zero-fill).
    order = sorted(range(len(entries)), key=lambda i: -resolutions[i])
    for i in order:
        r, t = entries[i]
        w = ws[i]
        if w == 0.0:
            continue
        # Step 2: (N_r, N_r) -> (N_r, r, r) key maps -> KeyUp to (big, big) -> renormalise each key map to sum 1.
        keys = key_upsample(t.detach().to(torch.float32).reshape(r * r, r, r), big).reshape(r * r, n_big)
        sums = keys.sum(dim=1, keepdim=True)
        if not bool(torch.isfinite(sums).all()) or bool((sums <= 0).any()):
            raise ConfigError(f"self-attention at resolution {r} has rows that are not finite, positive distributions")
        scaled = keys * (w / sums)  # step 3 weight folded into the renormalisation
        if out is None and r == big:
            out = scaled.view(big, big, n_big)
            continue
        if out is None:
            out = torch.zeros((big, big, n_big), dtype=torch.float32, device=t.device)
        # Step 2 (QueryTile) and step 3 (weighted sum) in one in-place broadcast add.
        add_query_tiled(out, scaled.view(r, r, n_big))
    if out is None:  # every weight zero is rejected above; kept for type narrowing
        raise ConfigError("weights must not all be 0")
    return out.view(big, big, big, big), list(zip(resolutions, ws, strict=True))


def aggregate_self_attention(
    maps: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    weights: Sequence[float] | Mapping[int, float] | None = None,
) -> torch.Tensor:
    """DiffSeg steps 1-3: align the per-resolution self-attention maps and sum them with weights.

    For each resolution ``r``: view the map as ``(r, r, r, r)``, ``KeyUp`` the key axes to ``R x R``
    (bilinear, half-pixel), renormalise each key map to sum 1, ``QueryTile`` the query axes to ``R x R``
    (nearest), multiply by ``w_r`` and add. ``R`` is the largest resolution given.

    Args:
        maps: head- and layer-averaged self-attention, one per resolution: a mapping ``r -> (r*r, r*r)`` or a
            sequence of ``(N_r, N_r)`` tensors (``N_r = r*r``, row = query in row-major order, rows sum to 1).
            Any floating dtype; computed in float32. Square grids only.
        weights: per-map weights: ``None`` for weights proportional to resolution, ``w_r = r / sum(r)``
            (reference ``get_weight_rato``; 64/120, 32/120, 16/120, 8/120 for SD 1.x at 512 px); a mapping
            ``r -> w`` (entries for absent resolutions are ignored); or a sequence aligned with ``maps``.
            Normalised to sum 1 (deviation: the reference uses given weights as they are).

    Returns:
        ``(R, R, R, R) float32`` ``A[qy, qx, ky, kx]``; each ``A[i, j]`` map sums to 1.

    Raises:
        ConfigError: on a non-square or non-(N, N) input, a key that does not match its tensor, weights of the
            wrong length, negative or all-zero weights, or rows that are not positive finite distributions.
    """
    return _aggregate(maps, weights)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Step 4: anchors
# ----------------------------------------------------------------------------------------------------------------------


def anchor_grid(num_anchors: int, size: int) -> torch.Tensor:
    """DiffSeg step 4: the regular grid of anchor queries (reference ``generate_sampling_grid``).

    With ``L = size - 1`` (63 in the reference), ``s = L // (M - 1)``, span ``S = s (M - 1)`` and offset
    ``o = (L - S) // 2``, the coordinates are ``o, o + s, ..., o + S``; the grid is every ``(row, col)``
    pair, row slowest. For ``(16, 64)``: ``{1, 5, ..., 61}^2``.

    Args:
        num_anchors: ``M``, anchors per side, ``2 <= M <= size``.
        size: ``R``, the side of the (square) query grid.

    Returns:
        ``(M * M, 2) int64`` ``(row, col)`` pairs.
    """
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int):
        raise ConfigError(f"num_anchors must be an int, got {num_anchors!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive int, got {size!r}")
    if not 2 <= num_anchors <= size:
        raise ConfigError(f"num_anchors must be between 2 and the grid side {size}, got {num_anchors}")
    last = size - 1
    step = last // (num_anchors - 1)
    span = step * (num_anchors - 1)
    offset = (last - span) // 2
    coords = offset + step * torch.arange(num_anchors, dtype=torch.int64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Threshold scale
# ----------------------------------------------------------------------------------------------------------------------

_THRESHOLD_MODES = ("relative", "absolute")


def anchor_divergence_unit(attn: torch.Tensor, num_anchors: int) -> float:
    """The image's own scale of divergence: the median symmetric KL between the maps of two anchors.

    The anchors of the ``M x M`` :func:`anchor_grid` cover the image evenly at every resolution, so the median over
    all pairs of them is the typical divergence between two places of *this* image, for this model, resolution and
    timestep. Divergences between maps grow with the attention grid (more bins, and attention that is local in token
    units covers a smaller part of the image) and with the model's sharpness, so thresholds in multiples of this
    unit keep their meaning where absolute ones (tuned by DiffSeg for SD 1.4 at 64 x 64) merge everything at small
    grids and split regions at large ones. On the toy world's val scenes the best threshold per scene is 0.3-0.5
    of this unit for both toy models (a UNet at a 32 x 32 grid and a transformer at 16 x 16); the neighbouring-anchor
    median, the other candidate, varied ten times more across models.

    Args:
        attn: ``(R, R, R, R)`` aggregated self-attention (each ``[i, j]`` map sums to 1).
        num_anchors: ``M``, anchors per side (as for :func:`anchor_grid`).

    Returns:
        The median over the ``M^2 (M^2 - 1) / 2`` anchor pairs of ``D(p, q) = 1/2 sum (p - q)(log p - log q)``
        (probabilities floored at ``1e-10``), at least ``1e-6``.
    """
    if not isinstance(attn, torch.Tensor) or attn.ndim != 4:
        raise ConfigError("attn must be a (R, R, R, R) tensor")
    qh, qw, kh, kw = (int(s) for s in attn.shape)
    anchors = anchor_grid(num_anchors, min(qh, qw))
    maps = attn.detach()[anchors[:, 0], anchors[:, 1]].reshape(-1, kh * kw).to(torch.float32)
    dist = symmetric_kl_matrix(maps, maps, eps=KL_EPS)
    upper = torch.triu_indices(maps.shape[0], maps.shape[0], offset=1, device=dist.device)
    return max(float(dist[upper[0], upper[1]].median()), 1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Steps 5-7: iterative merging
# ----------------------------------------------------------------------------------------------------------------------


def _check_thresholds(kl_thresholds: Sequence[float], name: str = "kl_thresholds") -> tuple[float, ...]:
    if isinstance(kl_thresholds, str | bytes):
        raise ConfigError(f"{name} must be a sequence of floats, got {kl_thresholds!r}")
    try:
        values = tuple(float(t) for t in kl_thresholds)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of floats, got {kl_thresholds!r}") from None
    if len(values) < 2:
        raise ConfigError(f"{name} needs at least 2 thresholds (iteration 0 plus one merge), got {len(values)}")
    if any(not math.isfinite(t) or t <= 0 for t in values):
        raise ConfigError(f"{name} must be finite and > 0, got {list(values)}")
    return values


def _sequential_groups(close: np.ndarray) -> np.ndarray:
    """Step 7's walk: in order, an unmarked proposal takes every proposal within the threshold (marked ones
    included) and marks them. ``close: (K, K) bool`` with a True diagonal; returns ``(G, K) bool``."""
    marked = np.zeros(close.shape[0], dtype=bool)
    rows: list[np.ndarray] = []
    for k in range(close.shape[0]):
        if marked[k]:
            continue
        row = close[k]
        marked |= row
        rows.append(row)
    return np.stack(rows)


# Exact pruning of iteration 0 (used when the grids are large enough and divisible): queries are visited in
# tiles of _PRUNE_TILE x _PRUNE_TILE neighbours, keys are summed into a _PRUNE_BINS x _PRUNE_BINS grid for the
# lower bound.
_PRUNE_TILE = 8
_PRUNE_BINS = 8
_PRUNE_MIN_GRID = 32


def _prune_plan(qh: int, qw: int, kh: int, kw: int) -> tuple[int, int, int] | None:
    """``(tile side, key pooling factor y, x)``, or None where pruning does not apply (small or odd grids)."""
    if min(qh, qw, kh, kw) < _PRUNE_MIN_GRID:
        return None
    if qh % _PRUNE_TILE or qw % _PRUNE_TILE or kh % _PRUNE_BINS or kw % _PRUNE_BINS:
        return None
    return _PRUNE_TILE, kh // _PRUNE_BINS, kw // _PRUNE_BINS


def _iteration0_dense(flat: torch.Tensor, index: torch.Tensor, tau: float) -> torch.Tensor:
    """Iteration 0 over every (anchor, map) pair. ``flat: (N, Nk) float32``, ``index: (M,)`` anchor rows;
    returns ``(M, Nk) float32`` proposals."""
    dist = symmetric_kl_matrix(flat[index], flat, eps=KL_EPS)
    member = dist < tau
    del dist
    # Force each anchor into its own group (the reference can produce an empty group -> 0/0 proposal).
    member[torch.arange(index.numel(), device=member.device), index] = True
    return group_mean(member, flat)


def _iteration0_pruned(
    flat: torch.Tensor,
    index: torch.Tensor,
    tau: float,
    query_grid: tuple[int, int],
    key_grid: tuple[int, int],
    plan: tuple[int, int, int],
) -> torch.Tensor:
    """Iteration 0 with the same result as :func:`_iteration0_dense`, skipping pairs that provably exceed ``tau``.

    Bound: summing key bins is a coarse-graining, and the symmetric KL (an f-divergence, also for the
    un-normalised floored maps ``max(p, eps)``) cannot grow under coarse-graining (data-processing
    inequality). So ``D_coarse(a, x) >= tau + slack`` implies ``D(a, x) >= tau``; ``slack`` covers the
    floor (``|D - D_floored| <= Nk * eps * log(max / eps) / 2``) and float32 rounding (``1e-3 * max(1, tau)``,
    far above it).
    Exact distances are then computed only for tiles of neighbouring queries that hold a candidate, for the
    anchors that have one there; the group sums are accumulated in the same pass.
    """
    tile, fy, fx = plan
    (qh, qw), (kh, kw) = query_grid, key_grid
    n, nk = flat.shape
    m = int(index.numel())
    device = flat.device

    coarse = torch.empty((n, (kh // fy) * (kw // fx)), dtype=flat.dtype, device=device)
    step = max(1, _POOL_BLOCK_ELEMENTS // nk)
    buffer = torch.empty((min(step, n), nk), dtype=flat.dtype, device=device)  # reused: stays in cache
    for start in range(0, n, step):
        block = flat[start : start + step]
        floored = torch.clamp_min(block, KL_EPS, out=buffer[: block.shape[0]])
        coarse[start : start + step] = floored.view(-1, kh // fy, fy, kw // fx, fx).sum(dim=(2, 4)).flatten(1)
    del buffer
    bound = symmetric_kl_matrix(coarse[index], coarse, eps=KL_EPS)
    top = max(float(flat.max()), KL_EPS)
    slack = 1e-3 * max(1.0, tau) + nk * KL_EPS * math.log(top / KL_EPS)
    candidate = bound < tau + slack
    candidate[torch.arange(m, device=device), index] = True  # the anchor's own tile is always visited
    del bound, coarse

    tiles = torch.arange(n, device=device).view(qh // tile, tile, qw // tile, tile).permute(0, 2, 1, 3)
    tiles = tiles.reshape(-1, tile * tile)  # (T, tile^2) map rows per tile
    candidate_tiles = candidate[:, tiles].any(dim=2)  # (M, T)
    del candidate

    anchors = flat[index]
    log_anchors = anchors.clamp_min(KL_EPS).log_()
    h_anchors = torch.einsum("md,md->m", anchors, log_anchors)
    sums = torch.zeros((m, nk), dtype=flat.dtype, device=device)
    counts = torch.zeros(m, dtype=flat.dtype, device=device)
    for t in torch.nonzero(candidate_tiles.any(dim=0)).reshape(-1).tolist():
        rows = tiles[t]
        sel = torch.nonzero(candidate_tiles[:, t]).reshape(-1)
        x = flat[rows]
        log_x = x.log().clamp_min_(_LOG_EPS)  # = log(max(x, eps)), one pass fewer
        dist = h_anchors[sel, None] + torch.einsum("bd,bd->b", x, log_x)[None, :]
        dist.addmm_(anchors[sel], log_x.T, alpha=-1.0).addmm_(log_anchors[sel], x.T, alpha=-1.0)
        member = dist.mul_(0.5) < tau
        member |= index[sel, None] == rows[None, :]  # each anchor in its own group, as in the dense path
        weights = member.to(flat.dtype)
        sums.index_add_(0, sel, weights @ x)
        counts.index_add_(0, sel, weights.sum(dim=1))
    return sums.div_(counts[:, None])


def _merge(
    attn: torch.Tensor,
    kl_thresholds: Sequence[float],
    anchors: torch.Tensor,
    *,
    prune: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    thresholds = _check_thresholds(kl_thresholds)
    if not isinstance(attn, torch.Tensor) or attn.ndim != 4:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ConfigError(f"attn must be a (R, R, R, R) tensor, got {shape}")
    qh, qw, kh, kw = (int(s) for s in attn.shape)
    if not isinstance(anchors, torch.Tensor) or anchors.ndim != 2 or anchors.shape[1] != 2 or anchors.shape[0] == 0:
        raise ConfigError("anchors must be a non-empty (M, 2) tensor of (row, col) pairs")
    if anchors.is_floating_point() or anchors.is_complex():
        raise ConfigError(f"anchors must hold integers, got {anchors.dtype}")
    anchors = anchors.to(device=attn.device, dtype=torch.int64)
    if bool((anchors < 0).any()) or bool((anchors[:, 0] >= qh).any()) or bool((anchors[:, 1] >= qw).any()):
        raise ConfigError(f"anchors must lie inside the {qh} x {qw} query grid")

    flat = attn.detach().reshape(qh * qw, kh * kw).to(torch.float32)
    index = anchors[:, 0] * qw + anchors[:, 1]
    counts = [int(index.numel())]

    # Iteration 0 (step 6), float32 instead of the reference's fp16.
    plan = _prune_plan(qh, qw, kh, kw) if prune else None
    if plan is None:
        proposals = _iteration0_dense(flat, index, thresholds[0])
    else:
        proposals = _iteration0_pruned(flat, index, thresholds[0], (qh, qw), (kh, kw), plan)
    proposals = proposals.to(torch.float64)

    # Iterations 1..N-1 (step 7) in float64 as in the reference; distances once per iteration as a matrix.
    for tau in thresholds[1:]:
        close = (symmetric_kl_matrix(proposals, proposals, eps=KL_EPS) < tau).cpu().numpy()
        np.fill_diagonal(close, True)
        groups = torch.from_numpy(_sequential_groups(close)).to(proposals.device)
        proposals = group_mean(groups, proposals)
        counts.append(int(proposals.shape[0]))
    return proposals.to(torch.float32).reshape(-1, kh, kw), counts


def merge_proposals(
    attn: torch.Tensor,
    kl_thresholds: Sequence[float],
    anchors: torch.Tensor,
) -> torch.Tensor:
    """DiffSeg steps 5-7: iterative attention merging with the symmetric KL distance.

    - Iteration 0 (``tau_0``): for every anchor ``a_k = attn[row_k, col_k]``, the proposal is the mean of all
      ``R^2`` maps within ``D < tau_0`` of it (``D`` = :func:`~attnseg.methods.ops.symmetric_kl_matrix`,
      computed for all anchors at once as matrix products, the maps processed in blocks to bound memory).
      On grids of side >= 32 (divisible by 8) the pairs are first screened with a coarse lower bound (keys
      summed into 8 x 8 bins; the symmetric KL cannot grow under such coarse-graining), and exact distances
      are computed only for tiles of 8 x 8 neighbouring queries that may hold a match. The screen is exact:
      it only skips pairs that provably have ``D >= tau_0``.
    - Iterations ``n = 1..N-1``: walk the proposals in order; an unmarked proposal groups every proposal
      (marked ones included) with ``D < tau_n``, marks them and emits the group mean. Distances are computed
      once per iteration as a ``(K, K)`` matrix; only the inherently sequential walk loops in Python.

    Deviations from the reference: float32 in iteration 0 (reference: fp16) and float64 later (as the
    reference); probabilities floored at ``1e-10`` inside logs (reference: no epsilon, NaN on zeros);
    anchors and walked proposals forced into their own group, so no group is empty (reference: an empty
    group gives a NaN proposal that is dropped at the next iteration).

    Args:
        attn: ``(R, R, R, R)`` aggregated self-attention (query axes first), each ``[i, j]`` map sums to 1.
        kl_thresholds: ``(tau_0, ..., tau_{N-1})``, ``N >= 2`` floats > 0 (reference: 1.1 on COCO-Stuff-27,
            0.9 on Cityscapes and in the demo).
        anchors: ``(M, 2)`` integer ``(row, col)`` query positions, e.g. :func:`anchor_grid`.

    Returns:
        ``(K, R, R) float32`` proposals, ``K <= M``, each summing to 1, in the order they were emitted.
    """
    return _merge(attn, kl_thresholds, anchors)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Step 8: optional K-means refinement
# ----------------------------------------------------------------------------------------------------------------------


def refine_kmeans(
    attn: torch.Tensor,
    proposals: torch.Tensor,
    *,
    max_iter: int = 300,
    random_state: int | None = 0,
) -> torch.Tensor:
    """DiffSeg step 8 (optional): K-means on the ``R^2`` attention maps, initialised at the proposals.

    ``sklearn.cluster.KMeans(n_clusters=K, init=proposals, n_init=1)`` on the rows of ``attn`` viewed as
    ``(R^2, R^2)`` (reference: ``refine=True`` in the demo, off in the benchmarks); each proposal is replaced by
    the mean of its cluster. K-means may leave clusters empty, so labels are iterated over the labels that
    occur (sorted), which returns ``K' <= K`` maps. Runs in float32 (the reference passes float64).

    Args:
        attn: ``(R, R, R, R)`` aggregated self-attention.
        proposals: ``(K, R, R)`` initial centres (``K <= R^2``).
        max_iter: K-means iterations (scikit-learn's default 300, which the reference keeps).
        random_state: seed passed to scikit-learn ([proposal] 0; with an explicit ``init`` and ``n_init=1``
            Lloyd's algorithm only uses it to relocate empty clusters).

    Returns:
        ``(K', R, R) float32`` cluster means, ``K' <= K``.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("DiffSeg's K-means refinement (refine=True) needs `pip install scikit-learn`") from exc
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive int, got {max_iter!r}")
    if attn.ndim != 4:
        raise ConfigError(f"attn must be (R, R, R, R), got shape {tuple(attn.shape)}")
    qh, qw, kh, kw = (int(s) for s in attn.shape)
    if proposals.ndim != 3 or tuple(proposals.shape[1:]) != (kh, kw) or proposals.shape[0] == 0:
        raise ConfigError(f"proposals must be (K, {kh}, {kw}), got shape {tuple(proposals.shape)}")
    k = int(proposals.shape[0])
    if k > qh * qw:
        raise ConfigError(f"{k} proposals exceed the {qh * qw} attention maps to cluster")

    data = attn.detach().reshape(qh * qw, kh * kw).to(torch.float32).cpu()
    init = proposals.detach().reshape(k, kh * kw).to(torch.float32).cpu().numpy()
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter, random_state=random_state)
    labels = km.fit(data.numpy()).labels_
    present = np.unique(labels)
    member = torch.from_numpy(labels[None, :] == present[:, None])
    return group_mean(member, data).reshape(-1, kh, kw).to(attn.device)


# ----------------------------------------------------------------------------------------------------------------------
# Step 9: labels
# ----------------------------------------------------------------------------------------------------------------------


def _check_out_size(out_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in out_size)
    except (TypeError, ValueError):
        raise ConfigError(f"out_size must be a (H, W) pair of ints, got {out_size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"out_size must be positive, got {(h, w)}")
    return h, w


def _upsample_assign(
    proposals: torch.Tensor,
    out_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``labels (H, W) int64``, ``order (K',) int64`` (proposal index of each id) and the upsampled
    ``(K, H, W) float32`` proposals."""
    if not isinstance(proposals, torch.Tensor) or proposals.ndim != 3 or proposals.shape[0] == 0:
        raise ConfigError("proposals must be a non-empty (K, R, R) tensor")
    h, w = _check_out_size(out_size)
    up = key_upsample(proposals.detach().to(torch.float32), (h, w))
    winner = up.argmax(dim=0).reshape(-1)  # ties go to the lower proposal index
    k = int(proposals.shape[0])
    first = torch.full((k,), h * w, dtype=torch.int64, device=winner.device)
    first.scatter_reduce_(0, winner, torch.arange(h * w, device=winner.device), reduce="amin")
    present = torch.nonzero(first < h * w).reshape(-1)
    order = present[torch.argsort(first[present])]
    remap = torch.full((k,), -1, dtype=torch.int64, device=winner.device)
    remap[order] = torch.arange(order.numel(), device=winner.device)
    return remap[winner].reshape(h, w), order, up


def assign_labels(proposals: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """DiffSeg step 9: bilinear upsampling of the proposals to ``out_size``, then argmax over proposals.

    Ids are made contiguous, ``0..K'-1``, numbered by **first appearance** in a row-major scan of the output
    (so the labelling does not depend on the proposals' order); proposals that win no pixel get no id. Ties
    go to the lower proposal index (``torch.argmax``).

    Args:
        proposals: ``(K, R, R)`` float maps.
        out_size: ``(H, W)`` of the output (reference: ``(512, 512)``, i.e. 8 R).

    Returns:
        ``(H, W) int64`` labels.
    """
    return _upsample_assign(proposals, out_size)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Step 10: optional semantic labels
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticLabels:
    """Words assigned to segments (DiffSeg step 10).

    Attributes:
        segments: word -> segment ids it labels, for words that label at least one segment, in the order of
            the given words (the reference's ``label_to_mask``).
        words: segment id -> its word, for every id in the label map.
    """

    segments: dict[str, list[int]]
    words: dict[int, str]


def label_segments(
    labels: torch.Tensor,
    cross_maps: Mapping[str, torch.Tensor],
    *,
    mode: str = "mean",
) -> SemanticLabels:
    """DiffSeg step 10 (optional): give each segment the word whose cross-attention dominates it.

    Each word's map is L2-normalised over pixels (as the reference does). Then per segment:

    - ``"mean"`` (the reference demo's setting): the word with the highest mean normalised score;
    - ``"majority"``: the word that wins the most pixels (per-pixel argmax, then the **mode**; [proposal]
      — the reference takes the median of the winning word indices, which is not a vote).

    Ties go to the word given first. An all-zero map stays zero (no division by zero).

    Args:
        labels: ``(H, W)`` integer segment ids (need not be contiguous).
        cross_maps: word -> ``(H, W)`` float score map, already at the labels' size (e.g. cross-attention of
            the word's tokens, normalised over tokens per pixel); at least one word.
        mode: ``"mean"`` or ``"majority"``.

    Returns:
        :class:`SemanticLabels`.
    """
    if mode not in _LABEL_MODES:
        raise ConfigError(f"mode must be one of {_LABEL_MODES}, got {mode!r}")
    if labels.ndim != 2 or labels.is_floating_point():
        raise ConfigError(f"labels must be an (H, W) integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    words = list(cross_maps)
    if not words:
        raise ConfigError("cross_maps must hold at least one word")
    for word in words:
        if tuple(cross_maps[word].shape) != tuple(labels.shape):
            raise ConfigError(
                f"cross map of {word!r} has shape {tuple(cross_maps[word].shape)}, labels {tuple(labels.shape)}"
            )
    scores = torch.stack([cross_maps[w].detach().to(torch.float32).reshape(-1) for w in words]).to(labels.device)
    scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    seg_ids, inverse = torch.unique(labels.reshape(-1), return_inverse=True)
    n_seg, n_words = int(seg_ids.numel()), len(words)
    if mode == "mean":
        sums = torch.zeros((n_seg, n_words), dtype=torch.float32, device=scores.device)
        sums.index_add_(0, inverse, scores.T)
        sizes = torch.bincount(inverse, minlength=n_seg).to(torch.float32)
        choice = (sums / sizes[:, None]).argmax(dim=1)
    else:
        winner = scores.argmax(dim=0)
        votes = torch.bincount(inverse * n_words + winner, minlength=n_seg * n_words).reshape(n_seg, n_words)
        choice = votes.argmax(dim=1)
    by_segment = {int(s): words[int(c)] for s, c in zip(seg_ids.tolist(), choice.tolist(), strict=True)}
    by_word: dict[str, list[int]] = {}
    for word in words:
        ids = [s for s, w in by_segment.items() if w == word]
        if ids:
            by_word[word] = ids
    return SemanticLabels(segments=by_word, words=by_segment)


# ----------------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------------


@METHODS.register("diffseg")
class DiffSeg:
    """DiffSeg (Tian et al., CVPR 2024): unsupervised segmentation from SD self-attention alone.

    Reads the per-resolution self-attention of one denoiser pass (reference: SD 1.4, clean VAE-mean latent,
    t = 300 embedding, empty prompt, no CFG; see :meth:`run_options`), aggregates it, merges anchor
    attention maps by symmetric KL and labels pixels by argmax. Optionally refines with K-means and names
    segments with words of the prompt from cross-attention.

    Args (keyword-only):
        kl_thresholds: merging thresholds, one per iteration, ``>= 2`` values > 0, read as ``threshold_mode``
            says. Default ``(RELATIVE, RELATIVE, RELATIVE)`` in units of :func:`anchor_divergence_unit`
            (chosen on the toy world's val split, ``benchmarks/toyworld.py``; see :data:`RELATIVE_THRESHOLD`).
            The reference's absolute values are ``(1.1, 1.1, 1.1)`` on COCO-Stuff-27 (``benchmarks.ipynb``) and 0.9
            on Cityscapes and in the demo: ``threshold_mode="absolute"`` with them reproduces the paper exactly
            (the ``paper`` preset, ``attnseg segment --paper-defaults``).
        threshold_mode: ``"relative"`` (default): a threshold ``tau`` merges maps with ``D < tau * u``, ``u`` the
            image's median divergence between two anchors (:func:`anchor_divergence_unit`), so one setting works
            at every resolution and on every model; ``"absolute"``: ``D < tau`` as in the reference.
        num_anchors: anchors per side of the anchor grid (reference ``NUM_POINTS = 16``: 256 anchors); a smaller
            attention grid uses every position as an anchor.
        resolution_weights: resolution -> weight; ``None`` for weights proportional to resolution (reference
            ``get_weight_rato``). Normalised to sum 1.
        refine: K-means refinement (step 8). Reference: off in the benchmarks (default here), on in the demo.
        kmeans_max_iter: K-means iterations when ``refine`` (scikit-learn default 300, as in the reference).
        random_state: K-means seed ([proposal] 0); a ``generator`` passed to :meth:`segment` overrides it.
        timestep: timestep embedding of the single denoiser pass (reference 300; no noise is added).
        label_words: words to name segments with (step 10, off by default as in the reference benchmarks):
            a sequence of words of the prompt (token indices come from ``attnseg.prompts.find_word``; needs
            ``prompt=`` in :meth:`segment`) or a mapping word -> token indices. Enables cross-attention capture.
        label_mode: ``"mean"`` (reference demo) or ``"majority"`` (per-pixel vote, real mode; [proposal]).

    Example:
        >>> seg = DiffSeg(kl_thresholds=(0.9, 0.9, 0.9))
        >>> seg.run_options().timestep
        300
    """

    name: ClassVar[str] = "diffseg"
    requires: ClassVar[frozenset[AttentionKind]] = frozenset({"self"})
    #: With :meth:`run_options` (the reference pass), the settings that reproduce the paper's code exactly.
    paper_preset: ClassVar[dict[str, Any]] = {"threshold_mode": "absolute", "kl_thresholds": (PAPER_THRESHOLD,) * 3}
    #: A mode given by the user drops a preset's thresholds, which were meant for the other mode.
    preset_links: ClassVar[dict[str, tuple[str, ...]]] = {"threshold_mode": ("kl_thresholds",)}
    #: steps 1-3 align square self-attention grids; non-square inputs are refused before capture
    square_grids: ClassVar[bool] = True

    def __init__(
        self,
        *,
        kl_thresholds: Sequence[float] | None = None,  # relative: RELATIVE_THRESHOLD x 3; paper: 1.1 absolute
        threshold_mode: str = "relative",  # [proposal]; "absolute" = DiffSeg reference
        num_anchors: int = 16,
        resolution_weights: Mapping[int, float] | None = None,
        refine: bool = False,
        kmeans_max_iter: int = 300,
        random_state: int = 0,
        timestep: int = 300,
        label_words: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
        label_mode: str = "mean",
    ) -> None:
        if threshold_mode not in _THRESHOLD_MODES:
            raise ConfigError(f"threshold_mode must be one of {_THRESHOLD_MODES}, got {threshold_mode!r}")
        self.threshold_mode = threshold_mode
        if kl_thresholds is None:
            kl_thresholds = (RELATIVE_THRESHOLD if threshold_mode == "relative" else PAPER_THRESHOLD,) * 3
        self.kl_thresholds = _check_thresholds(kl_thresholds)
        if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 2:
            raise ConfigError(f"num_anchors must be an int >= 2, got {num_anchors!r}")
        self.num_anchors = num_anchors
        self.resolution_weights = self._check_resolution_weights(resolution_weights)
        if not isinstance(refine, bool):
            raise ConfigError(f"refine must be a bool, got {refine!r}")
        self.refine = refine
        if isinstance(kmeans_max_iter, bool) or not isinstance(kmeans_max_iter, int) or kmeans_max_iter < 1:
            raise ConfigError(f"kmeans_max_iter must be a positive int, got {kmeans_max_iter!r}")
        self.kmeans_max_iter = kmeans_max_iter
        if isinstance(random_state, bool) or not isinstance(random_state, int) or random_state < 0:
            raise ConfigError(f"random_state must be an int >= 0, got {random_state!r}")
        self.random_state = random_state
        if isinstance(timestep, bool) or not isinstance(timestep, int) or timestep < 0:
            raise ConfigError(f"timestep must be an int >= 0, got {timestep!r}")
        self.timestep = timestep
        self.label_words = self._check_label_words(label_words)
        if label_mode not in _LABEL_MODES:
            raise ConfigError(f"label_mode must be one of {_LABEL_MODES}, got {label_mode!r}")
        self.label_mode = label_mode

    # -- validation helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_resolution_weights(weights: Mapping[int, float] | None) -> dict[int, float] | None:
        if weights is None:
            return None
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError(f"resolution_weights must be a non-empty mapping resolution -> weight, got {weights!r}")
        out: dict[int, float] = {}
        for r, w in weights.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"resolution_weights keys must be positive ints (grid sides), got {r!r}")
            wf = float(w)
            if not math.isfinite(wf) or wf < 0:
                raise ConfigError(f"resolution_weights[{r}] must be finite and >= 0, got {w!r}")
            out[r] = wf
        if sum(out.values()) <= 0:
            raise ConfigError("resolution_weights must not all be 0")
        return out

    @staticmethod
    def _check_label_words(
        words: Sequence[str] | Mapping[str, Sequence[int]] | None,
    ) -> tuple[str, ...] | dict[str, tuple[int, ...]] | None:
        if words is None:
            return None
        if isinstance(words, Mapping):
            if not words:
                raise ConfigError("label_words must not be empty")
            out: dict[str, tuple[int, ...]] = {}
            for word, idx in words.items():
                if not isinstance(word, str) or not word:
                    raise ConfigError(f"label_words keys must be non-empty strings, got {word!r}")
                indices = tuple(idx) if not isinstance(idx, int) else (idx,)
                if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                    raise ConfigError(f"label_words[{word!r}] must be non-empty token indices >= 0, got {idx!r}")
                out[word] = indices
            return out
        if isinstance(words, str):  # "cat, dog" from a command line
            words = [w.strip() for w in words.split(",") if w.strip()]
        if not isinstance(words, Sequence):
            raise ConfigError(f"label_words must be a sequence of words or a mapping word -> indices, got {words!r}")
        seq = tuple(words)
        if not seq or any(not isinstance(w, str) or not w.strip() for w in seq):
            raise ConfigError(f"label_words must be non-empty words, got {words!r}")
        if len(set(seq)) != len(seq):
            raise ConfigError(f"label_words has duplicates: {list(seq)}")
        return seq

    # -- Segmenter protocol ------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The hyper-parameters as a JSON-friendly dict (recorded in every result)."""
        words: list[str] | dict[str, list[int]] | None
        if isinstance(self.label_words, dict):
            words = {w: list(i) for w, i in self.label_words.items()}
        else:
            words = None if self.label_words is None else list(self.label_words)
        return {
            "kl_thresholds": list(self.kl_thresholds),
            "threshold_mode": self.threshold_mode,
            "num_anchors": self.num_anchors,
            "resolution_weights": None if self.resolution_weights is None else dict(self.resolution_weights),
            "refine": self.refine,
            "kmeans_max_iter": self.kmeans_max_iter,
            "random_state": self.random_state,
            "timestep": self.timestep,
            "label_words": words,
            "label_mode": self.label_mode,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"DiffSeg({args})"

    def run_options(self) -> RunOptions:
        """Reference pass: clean VAE-mean latent, ``timestep`` embedding (300), no noise, empty prompt."""
        return RunOptions(
            timestep=self.timestep,
            add_noise=False,
            sample_posterior=False,
            prompt="",
            heads="mean",
            group="resolution",
        )

    def select_layers(self, layers: dict[str, LayerInfo]) -> list[str]:
        """Every self-attention layer (the reference captures all 16 of SD 1.x), plus every cross-attention
        layer when ``label_words`` is set; in forward order."""
        kinds = {"self", "cross"} if self.label_words is not None else {"self"}
        chosen = [info for info in layers.values() if info.kind in kinds]
        return [info.name for info in sorted(chosen, key=lambda info: info.index)]

    def segment(
        self,
        store: AttentionStore,
        *,
        prompt: Prompt | None = None,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationResult:
        """Segment from the self-attention in ``store``.

        Args:
            store: holds ``self_attention(batch_index=0) -> {r: (r*r, r*r) float32}`` (mean over heads and
                layers of each resolution) and, for ``label_words``, ``cross_attention(batch_index=0) ->
                {r: (r*r, T) float32}``.
            prompt: the encoded prompt; needed only when ``label_words`` is a list of words.
            out_size: ``(H, W)`` of the labels. Default: ``store.meta["image_size"]`` when the store records
                it, else ``(R, R)`` (the attention grid; the reference always returns 512 x 512 = 8 R).
            generator: seeds the K-means refinement instead of ``random_state`` (unused otherwise).

        Returns:
            :class:`SegmentationResult` with ``labels (H, W) int64`` (ids by first appearance),
            ``scores (K', H, W) float32`` (the upsampled proposal of each id), ``label_names`` (with
            ``label_words``) and ``meta`` (``num_proposals``, proposals per iteration, grid, weights...).
        """
        self_maps = store.self_attention(batch_index=0)
        if not self_maps:
            raise ConfigError("the store holds no self-attention; capture the layers chosen by select_layers()")
        attn, used_weights = _aggregate(self_maps, self.resolution_weights)
        grid = int(attn.shape[0])
        # A grid smaller than the anchor grid (a small model or input) takes every position as an anchor.
        num_anchors = min(self.num_anchors, grid)
        anchors = anchor_grid(num_anchors, grid)
        unit = anchor_divergence_unit(attn, num_anchors) if self.threshold_mode == "relative" else 1.0
        thresholds = tuple(t * unit for t in self.kl_thresholds)
        proposals, per_iteration = _merge(attn, thresholds, anchors)
        num_merged = int(proposals.shape[0])
        if self.refine:
            seed = self.random_state
            if generator is not None:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
            proposals = refine_kmeans(attn, proposals, max_iter=self.kmeans_max_iter, random_state=seed)
        del attn

        size = self._out_size(store, out_size, grid)
        labels, order, upsampled = _upsample_assign(proposals, size)
        scores = upsampled[order]
        meta: dict[str, Any] = {
            "num_proposals": int(proposals.shape[0]),
            "num_merged_proposals": num_merged,
            "proposals_per_iteration": per_iteration,
            "num_segments": int(order.numel()),
            "grid": grid,
            "divergence_unit": unit,
            "effective_kl_thresholds": list(thresholds),
            "num_anchor_points": int(anchors.shape[0]),
            "num_anchors_per_side": num_anchors,
            "resolution_weights": {int(r): w for r, w in used_weights},
            "out_size": list(size),
        }
        label_names: tuple[str, ...] | None = None
        if self.label_words is not None:
            token_indices = self._token_indices(prompt)
            cross_maps = self._cross_maps(store, token_indices, size)
            semantic = label_segments(labels, cross_maps, mode=self.label_mode)
            label_names = tuple(semantic.words[i] for i in range(int(order.numel())))
            meta["semantic"] = semantic.segments
            meta["token_indices"] = {w: list(i) for w, i in token_indices.items()}
        return SegmentationResult(
            labels=labels,
            scores=scores,
            label_names=label_names,
            method=self.name,
            params=self.params(),
            meta=meta,
        )

    # -- helpers -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _out_size(store: AttentionStore, out_size: tuple[int, int] | None, grid: int) -> tuple[int, int]:
        if out_size is not None:
            return _check_out_size(out_size)
        meta = getattr(store, "meta", None) or {}
        image_size = meta.get("image_size") if isinstance(meta, Mapping) else None
        if image_size is not None:
            return _check_out_size(image_size)
        return grid, grid

    def _token_indices(self, prompt: Prompt | None) -> dict[str, tuple[int, ...]]:
        if isinstance(self.label_words, dict):
            return dict(self.label_words)
        if prompt is None:
            raise ConfigError(
                "label_words needs the prompt to find the words' tokens: pass prompt= to segment(), "
                "or give label_words as a mapping word -> token indices"
            )
        from attnseg.prompts import find_word

        return {word: tuple(find_word(prompt, word).indices) for word in self.label_words or ()}

    @staticmethod
    def _cross_maps(
        store: AttentionStore,
        token_indices: Mapping[str, tuple[int, ...]],
        size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Per word an ``(H, W)`` score: per resolution, bilinear to ``size``, normalise over all tokens per
        pixel, then sum over resolutions with weight 1 (reference ``aggregate_x_weights`` with weights
        ``[1, 1, 1, 1]``); sub-tokens of a word are averaged ([proposal]). Normalising after upsampling is done
        as ``up(x_word) / up(sum_t x_t)``, which is the same because bilinear resizing is linear."""
        cross = store.cross_attention(batch_index=0)
        if not cross:
            raise ConfigError("label_words needs cross-attention, but the store holds none")
        words = list(token_indices)
        acc: torch.Tensor | None = None
        for key, x in cross.items():
            if x.ndim != 2:
                raise ConfigError(f"cross-attention at resolution {key} must be (N, T), got {tuple(x.shape)}")
            side = _grid_side(int(x.shape[0]), f"cross-attention at resolution {key}")
            num_tokens = int(x.shape[1])
            for word, idx in token_indices.items():
                if max(idx) >= num_tokens:
                    raise ConfigError(f"token index {max(idx)} of {word!r} is outside the {num_tokens} text tokens")
            x = x.detach().to(torch.float32)
            cols = [x[:, list(token_indices[w])].mean(dim=1) for w in words]
            stacked = torch.stack([*cols, x.sum(dim=1)]).reshape(len(words) + 1, side, side)
            up = key_upsample(stacked, size)
            part = up[:-1] / up[-1:].clamp_min(torch.finfo(torch.float32).tiny)
            acc = part if acc is None else acc + part
        if acc is None:  # unreachable: ``cross`` is non-empty
            raise ConfigError("label_words needs cross-attention, but the store holds none")
        return {w: acc[i] for i, w in enumerate(words)}
