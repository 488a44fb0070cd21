"""Target segmentation: cross-attention-guided selection of self-attention maps (the hair paper).

Kim et al., "Spatially-Guided Self-Attention Refinement for Zero-Shot Hair Segmentation" (AAAI 2026 student
abstract), as specified in ``METHODS.md`` §4. One denoiser pass at ``t = 0`` with a fixed prompt that names the
target; then:

1. *Target tokens*: the prompt tokens of the target word (``attnseg.prompts.find_word``; split words averaged).
2. *A_cross*: per resolution the head/layer mean of the target column, bilinear to the largest grid, minmax, then a
   weighted sum over resolutions (:func:`aggregate_target_cross`).
3. *A_self*: DiffSeg steps 1-3 (:func:`attnseg.methods.diffseg.aggregate_self_attention`, weights ``r / sum r``).
4-6. *Select*: L1-normalise both, symmetric KL between A_cross and every ``A_self[i, j]``, keep ``D < tau`` and
   average the kept maps (:func:`guided_selection`).
7. *Binarise*: Otsu (256 bins) on the averaged map, then nearest resize (paper order), or the other way round.

Variants: ``"cross-only"`` is the paper's ablation "w/o SA" (Otsu on A_cross); ``"diffsegmenter"`` is the
DiffSegmenter-style baseline (A_cross propagated once by the finest self-attention, ``minmax(S @ c)``, Otsu),
run with the same prompt and pass as the proposed method ([proposal]; how the paper ran it is unconfirmed).

Deviations and choices where the paper is silent ([proposal] in ``METHODS.md``):

- Resolution weights (0.3, 0.5, 0.1, 0.1) coarse -> fine are DiffSegmenter's; the paper gives none.
- SD 1.x/2.x have no 8x8 up-block attention; ``layers="up+mid"`` uses the up blocks plus the mid block.
- ``(x + eps) / sum(x + eps)`` with ``eps = 1e-8`` for the L1 normalisation (A_cross has exact zeros after minmax).
- When no map passes ``tau``, the ``fallback_fraction`` (1 %) lowest-divergence maps are averaged and the event is
  recorded in ``meta["fallback"]``; the paper does not say what happens.
- ``scores`` and the recorded Otsu threshold are on the minmax-normalised map (Otsu is invariant to that affine
  change, so the mask is the same as on the raw map).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from attnseg.errors import ConfigError
from attnseg.methods.base import METHODS, RunOptions
from attnseg.methods.ops import key_upsample, minmax, symmetric_kl_matrix
from attnseg.types import SegmentationResult

if TYPE_CHECKING:
    from collections.abc import Iterator

    from attnseg.capture.store import AttentionStore
    from attnseg.types import AttentionKind, LayerInfo, Prompt

__all__ = [
    "GuidedSelection",
    "TargetSegmenter",
    "aggregate_target_cross",
    "guided_selection",
    "otsu_threshold",
    "resolve_resolution_weights",
]

_HAIR_PROMPT = "a photo of a man with detailed hair"  # hair paper

_VARIANTS = ("guided", "cross-only", "diffsegmenter")
_TAU_MODES = ("relative", "absolute")
#: The hair paper's absolute selection threshold.
PAPER_TAU = 0.9
#: Default selection threshold as a fraction of the image's median divergence ([proposal]; chosen on the toy
#: world's val split by ``benchmarks/toyworld.py``, checked for transfer across grids on synthetic attention).
RELATIVE_TAU = 0.5
_BINARIZE = ("otsu-then-resize", "resize-then-otsu")
_LAYERS = ("up+mid", "all")


# ----------------------------------------------------------------------------------------------------------------------
# Steps 4-6: selection
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidedSelection:
    """Result of :func:`guided_selection`. Unpacks as ``mean_map, selected = guided_selection(...)``.

    Attributes:
        mean_map: ``(R, R) float32`` mean of the selected self-attention maps ``M_self`` (sums to 1).
        selected: ``(R, R) bool`` the query positions ``(i, j)`` whose map was averaged (Omega, or the fallback).
        divergence: ``(R, R) float32`` ``D[i, j]``, the symmetric KL between A_cross and ``A_self[i, j]``.
        fallback: True when no map had ``D`` below the threshold and the lowest-``D`` maps were used instead.
        num_selected: number of averaged maps (``|Omega|``, or the fallback count).
        threshold: the divergence threshold applied (``tau``, or ``tau * median(D)`` in relative mode).
    """

    mean_map: torch.Tensor
    selected: torch.Tensor
    divergence: torch.Tensor
    fallback: bool
    num_selected: int
    threshold: float = float("nan")

    def __iter__(self) -> Iterator[torch.Tensor]:
        # The contract is "(averaged map, boolean selection)"; the rest is read by attribute.
        return iter((self.mean_map, self.selected))


def _l1_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Paper eq. 1-2 with ``(x + eps) / sum(x + eps)`` over the last axis ([proposal]: no zero bins for the KL)."""
    x = x + eps
    return x / x.sum(dim=-1, keepdim=True)


def guided_selection(
    cross_map: torch.Tensor,
    self_attn: torch.Tensor,
    *,
    tau: float = 0.9,
    tau_mode: str = "absolute",
    eps: float = 1e-8,
    fallback_fraction: float = 0.01,
) -> GuidedSelection:
    """Steps 4-6 of the hair paper: select the self-attention maps closest to the target's cross-attention.

    Both inputs are L1-normalised as ``(x + eps) / sum(x + eps)``; then
    ``D[i, j] = (KL(A_cross || A_self[i, j]) + KL(A_self[i, j] || A_cross)) / 2`` for all ``(i, j)`` at once with
    :func:`~attnseg.methods.ops.symmetric_kl_matrix` (two matrix products, no per-pixel loop), and
    ``M_self = mean{A_self[i, j] : D[i, j] < t}`` with ``t = tau`` (``tau_mode="absolute"``, the paper) or
    ``t = tau * median(D)`` (``"relative"``).

    Args:
        cross_map: ``(R, R)`` non-negative target map A_cross (any scale; e.g. a weighted sum of minmaxed maps).
        self_attn: ``(R, R, R, R)`` aggregated self-attention ``A[qy, qx, ky, kx]``, each ``[i, j]`` map sums to 1.
        tau: divergence threshold (0.9 absolute, hair paper; see :class:`TargetSegmenter` for the relative default).
        tau_mode: ``"absolute"`` (the paper's ``D < tau``) or ``"relative"`` (``D < tau * median(D)``: the divergences
            of one image set their own scale, which grows with the attention grid and the model's sharpness).
        eps: added to every bin before the L1 normalisation (1e-8, [proposal]); > 0.
        fallback_fraction: when no map passes ``tau``, average the ``max(1, round(fraction * R^2))`` lowest-``D``
            maps (0.01, i.e. 41 of 4096 at R = 64; [proposal]).

    Returns:
        :class:`GuidedSelection` ``(mean_map (R, R) float32, selected (R, R) bool, divergence, fallback,
        num_selected)``; it unpacks as ``(mean_map, selected)``.
    """
    if not isinstance(cross_map, torch.Tensor) or not isinstance(self_attn, torch.Tensor):
        raise ConfigError("cross_map and self_attn must be torch tensors")
    if self_attn.ndim != 4 or tuple(self_attn.shape[:2]) != tuple(self_attn.shape[2:]):
        raise ConfigError(f"self_attn must be (R, R, R, R) (query axes, then key axes), got {tuple(self_attn.shape)}")
    if cross_map.ndim != 2 or tuple(cross_map.shape) != tuple(self_attn.shape[2:]):
        raise ConfigError(
            f"cross_map must be (R, R) matching the key grid of self_attn {tuple(self_attn.shape[2:])}, "
            f"got {tuple(cross_map.shape)}"
        )
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ConfigError(f"tau must be a finite number > 0, got {tau!r}")
    if tau_mode not in _TAU_MODES:
        raise ConfigError(f"tau_mode must be one of {_TAU_MODES}, got {tau_mode!r}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(fallback_fraction, int | float) and 0 < fallback_fraction <= 1):
        raise ConfigError(f"fallback_fraction must be in (0, 1], got {fallback_fraction!r}")
    qh, qw, kh, kw = (int(s) for s in self_attn.shape)
    cross = cross_map.detach().to(torch.float32).reshape(1, kh * kw)
    if bool((cross < 0).any()) or not bool(torch.isfinite(cross).all()):
        raise ConfigError("cross_map must be finite and non-negative")
    flat = self_attn.detach().to(torch.float32).reshape(qh * qw, kh * kw)

    # Steps 4-5: normalise, then all R^2 distances as one (1, R^2) matrix.
    dist = symmetric_kl_matrix(_l1_normalise(cross, eps), _l1_normalise(flat, eps), eps=eps)[0]
    # Step 6: Omega = {D < t}; empty -> the lowest-D maps ([proposal]).
    threshold = tau * float(dist.median()) if tau_mode == "relative" else tau
    selected = dist < threshold
    fallback = not bool(selected.any())
    if fallback:
        k = max(1, min(qh * qw, round(fallback_fraction * qh * qw)))
        selected = torch.zeros_like(selected)
        selected[torch.topk(dist, k, largest=False).indices] = True
    count = int(selected.sum())
    mean_map = (selected.to(torch.float32)[None] @ flat)[0] / count
    return GuidedSelection(
        mean_map=mean_map.reshape(kh, kw),
        selected=selected.reshape(qh, qw),
        divergence=dist.reshape(qh, qw),
        fallback=fallback,
        num_selected=count,
        threshold=threshold,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: the target's cross-attention map
# ----------------------------------------------------------------------------------------------------------------------


def resolve_resolution_weights(
    resolutions: Sequence[int],
    weights: Sequence[float] | Mapping[int, float],
) -> dict[int, float]:
    """Match resolution weights to the resolutions present.

    Args:
        resolutions: grid sides present (any order).
        weights: a mapping ``r -> w`` (resolutions it does not name get 0), or a sequence matched coarse-to-fine to
            the resolutions present: ``weights[0]`` for the coarsest, ... Entries beyond the number of resolutions
            present are dropped from the fine end (so SD 1.x's 4 defaults apply to a 2-level model as its first two).

    Returns:
        ``{r: w}`` for every resolution present, coarse to fine (not normalised).

    Raises:
        ConfigError: a sequence shorter than the resolutions present, or weights that are all 0 on them.
    """
    res = sorted({int(r) for r in resolutions})
    if not res:
        raise ConfigError("no cross-attention resolutions to weight")
    if isinstance(weights, Mapping):
        out = {r: float(weights.get(r, 0.0)) for r in res}
    else:
        seq = [float(w) for w in weights]
        if len(seq) < len(res):
            raise ConfigError(
                f"cross_weights has {len(seq)} entries but {len(res)} resolutions are present {res}; "
                "give one weight per resolution (coarse to fine) or a mapping resolution -> weight"
            )
        out = dict(zip(res, seq, strict=False))
    if sum(out.values()) <= 0:
        raise ConfigError(f"cross_weights give weight 0 to every resolution present {res}: {weights!r}")
    return out


def aggregate_target_cross(
    maps: Mapping[int, torch.Tensor],
    token_indices: Sequence[int],
    weights: Mapping[int, float],
    size: tuple[int, int],
    *,
    grids: Mapping[int, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Step 2: ``A_cross = sum_r w_r minmax(Up(mean_{j in tokens} X_r[:, j]))``.

    Args:
        maps: per resolution ``r`` the head- and layer-mean cross-attention ``(N_r, T)`` (rows sum to 1).
        token_indices: the target's token positions (averaged when a word is split into several tokens).
        weights: ``{r: w_r}``; resolutions without a weight (or with weight 0) are skipped.
        size: ``(H, W)`` of the output (the largest grid; bilinear, half-pixel).
        grids: ``{r: (h, w)}`` token grids; default square ``(r, r)``.

    Returns:
        ``(H, W) float32``, non-negative.
    """
    idx = list(token_indices)
    if not idx:
        raise ConfigError("token_indices must not be empty")
    out = torch.zeros(size, dtype=torch.float32)
    used = 0
    for r, x in maps.items():
        w = float(weights.get(r, 0.0))
        if w == 0:
            continue
        if x.ndim != 2 or max(idx) >= x.shape[1]:
            raise ConfigError(f"cross-attention at resolution {r} must be (N, T) with T > {max(idx)}, got {x.shape}")
        h, wd = grids[r] if grids is not None and r in grids else (r, r)
        if h * wd != x.shape[0]:
            raise ConfigError(f"cross-attention at resolution {r} has {x.shape[0]} positions, not {h}x{wd}")
        m = x.detach().to(torch.float32)[:, idx].mean(dim=1).reshape(h, wd)
        out = out.to(m.device) + w * minmax(key_upsample(m, size), (-2, -1))
        used += 1
    if used == 0:
        raise ConfigError(f"no cross-attention map has a non-zero weight (resolutions {sorted(maps)})")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Step 7: binarisation
# ----------------------------------------------------------------------------------------------------------------------


def otsu_threshold(values: torch.Tensor, *, nbins: int = 256) -> float:
    """Otsu's threshold of ``values`` (``skimage.filters.threshold_otsu``, ``nbins`` bins; hair paper step 7).

    A constant input has no threshold between two classes; its value is returned (then ``values > t`` is empty).
    """
    try:
        from skimage.filters import threshold_otsu
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("Otsu binarisation needs `pip install scikit-image`") from exc
    arr = values.detach().to(torch.float32).cpu().numpy().ravel()
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return hi
    return float(threshold_otsu(arr, nbins=nbins))


# ----------------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------------


def _word_in(text: str, word: str) -> bool:
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


@METHODS.register("target", help="binary mask of one concept: cross-attention-guided self-attention (hair paper)")
class TargetSegmenter:
    """Segment one target concept (e.g. hair) by cross-attention-guided self-attention selection.

    Reference pass ([paper] + [proposal]): VAE posterior mean, no noise, ``t = 0``, one conditional UNet call with
    :attr:`prompt` (see :meth:`run_options`).

    Args (keyword-only):
        target: the word or phrase to segment (``"hair"``, hair paper). Must occur in ``prompt``.
        prompt: fixed prompt naming the target. None: the hair paper's ``"a photo of a man with detailed hair"``
            for ``target="hair"``, else ``"a photo of a {target}"`` [proposal].
        tau: selection threshold, read as ``tau_mode`` says. Default None: :data:`RELATIVE_TAU` (0.5) in relative
            mode, the hair paper's 0.9 in absolute mode.
        tau_mode: ``"relative"`` (default, [proposal]): keep maps with ``D < tau * median(D)``, so the selection means
            the same at every grid and on every model (divergences grow with the grid and with the model's
            sharpness: at the toy model's 16 x 16 grid ``D < 0.9`` keeps most maps, at SD's 64 x 64 a few);
            ``"absolute"``: the paper's ``D < tau`` (with ``tau=0.9``, the ``paper`` preset, reproduces the paper).
        cross_weights: per-resolution weights of the target cross map: a sequence matched coarse-to-fine to the
            resolutions present (default ``(0.3, 0.5, 0.1, 0.1)`` for 8/16/32/64 on SD 1.x, DiffSegmenter's values,
            [proposal] METHODS §4; extra entries are dropped from the fine end), or a mapping ``r -> w`` (missing
            resolutions weigh 0; e.g. iSeg's ``{16: 0.7, 32: 0.3}``).
        layers: which blocks feed both maps: ``"up+mid"`` ([proposal], SD 1.x has no 8x8 up block) or ``"all"``.
            Default None: ``"up+mid"`` for ``guided``/``cross-only``, ``"all"`` for ``diffsegmenter`` (its code
            averages down, mid and up). Models without up/mid blocks (DiTs) always use all layers.
        variant: ``"guided"`` (the paper's method), ``"cross-only"`` (ablation "w/o SA": Otsu on A_cross) or
            ``"diffsegmenter"`` (baseline: ``minmax(S @ c)`` with S the finest self-attention, Otsu).
        binarize: ``"otsu-then-resize"`` (hair paper: Otsu at the attention grid, nearest resize) or
            ``"resize-then-otsu"`` (bilinear resize of the map, then Otsu at the output size).
        fallback_fraction: when nothing passes ``tau``, average this fraction of maps with the lowest divergence
            (0.01, [proposal]).
        eps: L1-normalisation epsilon (1e-8, [proposal]).
        timestep: timestep of the single pass (0, hair paper).

    Example:
        >>> seg = TargetSegmenter(target="hair", prompt="a photo of a man with detailed hair")
        >>> seg.run_options().timestep
        0
    """

    name: ClassVar[str] = "target"
    requires: ClassVar[frozenset[AttentionKind]] = frozenset({"self", "cross"})
    #: With :meth:`run_options` (the reference pass), the settings that reproduce the hair paper.
    paper_preset: ClassVar[dict[str, Any]] = {"tau_mode": "absolute", "tau": PAPER_TAU}
    #: A mode given by the user drops a preset's ``tau``, which was meant for the other mode.
    preset_links: ClassVar[dict[str, tuple[str, ...]]] = {"tau_mode": ("tau",)}

    @property
    def square_grids(self) -> bool:
        """The guided variant aggregates self-attention as DiffSeg does, on square grids only."""
        return self.variant == "guided"

    def __init__(
        self,
        *,
        target: str = "hair",  # hair paper
        prompt: str | None = None,  # hair paper: "a photo of a man with detailed hair"
        tau: float | None = None,  # relative: RELATIVE_TAU = 0.5 [proposal]; absolute: 0.9 (hair paper)
        tau_mode: str = "relative",  # [proposal]; "absolute" = hair paper
        cross_weights: Sequence[float] | Mapping[int, float] = (0.3, 0.5, 0.1, 0.1),  # DiffSegmenter, [proposal]
        layers: str | None = None,  # "up+mid" [proposal]; "all" for the diffsegmenter baseline (its code)
        variant: str = "guided",
        binarize: str = "otsu-then-resize",  # hair paper order
        fallback_fraction: float = 0.01,  # [proposal]
        eps: float = 1e-8,  # [proposal]
        timestep: int = 0,  # hair paper
    ) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"target must be a non-empty word, got {target!r}")
        self.target = target.strip()
        if prompt is None:
            prompt = _HAIR_PROMPT if self.target == "hair" else f"a photo of a {self.target}"
        if not isinstance(prompt, str) or not _word_in(prompt, self.target):
            raise ConfigError(f"prompt must contain the target {self.target!r} as a word, got prompt={prompt!r}")
        self.prompt = prompt
        if tau_mode not in _TAU_MODES:
            raise ConfigError(f"tau_mode must be one of {_TAU_MODES}, got {tau_mode!r}")
        self.tau_mode = tau_mode
        if tau is None:
            tau = RELATIVE_TAU if tau_mode == "relative" else PAPER_TAU
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
            raise ConfigError(f"tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)
        self.cross_weights = self._check_weights(cross_weights)
        if layers is not None and layers not in _LAYERS:
            raise ConfigError(f"layers must be one of {_LAYERS} or None, got {layers!r}")
        if variant not in _VARIANTS:
            raise ConfigError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.layers = layers if layers is not None else ("all" if variant == "diffsegmenter" else "up+mid")
        if binarize not in _BINARIZE:
            raise ConfigError(f"binarize must be one of {_BINARIZE}, got {binarize!r}")
        self.binarize = binarize
        if (
            isinstance(fallback_fraction, bool)
            or not isinstance(fallback_fraction, int | float)
            or not 0 < fallback_fraction <= 1
        ):
            raise ConfigError(f"fallback_fraction must be in (0, 1] (default 0.01), got {fallback_fraction!r}")
        self.fallback_fraction = float(fallback_fraction)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
            raise ConfigError(f"eps must be a finite number > 0 (default 1e-8), got {eps!r}")
        self.eps = float(eps)
        if isinstance(timestep, bool) or not isinstance(timestep, int) or timestep < 0:
            raise ConfigError(f"timestep must be an int >= 0 (default 0), got {timestep!r}")
        self.timestep = timestep

    @staticmethod
    def _check_weights(weights: Sequence[float] | Mapping[int, float]) -> tuple[float, ...] | dict[int, float]:
        def check(w: object, what: str) -> float:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"cross_weights: {what} must be a finite number >= 0, got {w!r}")
            return float(w)

        if isinstance(weights, Mapping):
            if not weights:
                raise ConfigError("cross_weights must not be empty")
            out: dict[int, float] = {}
            for r, w in weights.items():
                if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                    raise ConfigError(f"cross_weights keys must be resolutions (ints >= 1), got {r!r}")
                out[r] = check(w, f"weight of {r}")
            if sum(out.values()) <= 0:
                raise ConfigError("cross_weights must not all be 0")
            return out
        if isinstance(weights, str | bytes) or not isinstance(weights, Sequence) or not weights:
            raise ConfigError(f"cross_weights must be a sequence of weights or a mapping r -> w, got {weights!r}")
        seq = tuple(check(w, f"entry {i}") for i, w in enumerate(weights))
        if sum(seq) <= 0:
            raise ConfigError("cross_weights must not all be 0")
        return seq

    # -- Segmenter protocol ------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The hyper-parameters as a JSON-friendly dict (recorded in every result)."""
        weights = dict(self.cross_weights) if isinstance(self.cross_weights, dict) else list(self.cross_weights)
        return {
            "target": self.target, "prompt": self.prompt, "tau": self.tau, "tau_mode": self.tau_mode,
            "cross_weights": weights,
            "layers": self.layers, "variant": self.variant, "binarize": self.binarize,
            "fallback_fraction": self.fallback_fraction, "eps": self.eps, "timestep": self.timestep,
        }

    def __repr__(self) -> str:
        return f"TargetSegmenter({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def run_options(self) -> RunOptions:
        """Hair paper pass: posterior mean, no noise, ``t = timestep`` (0), the fixed prompt, heads averaged."""
        return RunOptions(
            timestep=self.timestep, add_noise=False, sample_posterior=False, prompt=self.prompt,
            heads="mean", group="resolution",
        )

    def select_layers(self, layers: dict[str, LayerInfo]) -> list[str]:
        """Cross layers (and self layers unless ``cross-only``) of the chosen blocks, in forward order.

        ``diffsegmenter`` takes self-attention only at the finest self grid (the reference's 64x64 layers).
        """
        pool = list(layers.values())
        if self.layers == "up+mid" and any(i.position in ("up", "mid") for i in pool):
            pool = [i for i in pool if i.position in ("up", "mid")]
        chosen = [i for i in pool if i.kind == "cross"]
        if not chosen:
            raise ConfigError(f"the model has no cross-attention layer in the {self.layers!r} blocks")
        if self.variant == "guided":
            chosen += [i for i in pool if i.kind == "self"]
        elif self.variant == "diffsegmenter":
            selfs = [i for i in pool if i.kind == "self"]
            if selfs:
                finest = max(i.num_tokens for i in selfs)
                chosen += [i for i in selfs if i.num_tokens == finest]
        return [i.name for i in sorted(chosen, key=lambda i: i.index)]

    def segment(
        self,
        store: AttentionStore,
        *,
        prompt: Prompt | None = None,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationResult:
        """Binary mask of :attr:`target` from the attention in ``store``.

        Args:
            store: ``cross_attention() -> {r: (N_r, T)}`` and (``guided``, ``diffsegmenter``)
                ``self_attention() -> {r: (N_r, N_r)}``, head/layer means per resolution.
            prompt: the encoded prompt of the pass (to find the target's tokens); required.
            out_size: ``(H, W)`` of the result; default ``store.meta["image_size"]``, else the attention grid.
            generator: unused (the method is deterministic).

        Returns:
            :class:`SegmentationResult`: ``labels (H, W) int64`` in {0 background, 1 target}, ``scores (1, H, W)
            float32`` the continuous map (minmax-normalised, bilinear), ``label_names ("background", target)``;
            ``meta`` has ``num_selected`` (|Omega|), ``fallback``, ``otsu_threshold``, ``token_indices``, the
            resolution weights used and the attention grid.
        """
        from attnseg.prompts import find_word

        if prompt is None:
            raise ConfigError("the target method needs the encoded prompt (segment(store, prompt=...)) to find "
                              f"the tokens of {self.target!r}")
        span = find_word(prompt, self.target)
        cross = store.cross_attention(batch_index=0)
        if not cross:
            raise ConfigError("the store holds no cross-attention; capture the layers chosen by select_layers()")
        grids = {r: store.grid(r) for r in cross}
        weights = resolve_resolution_weights(list(cross), self.cross_weights)
        meta: dict[str, Any] = {
            "target": self.target, "token_indices": list(span.indices), "variant": self.variant,
            "cross_weights": {int(r): w for r, w in weights.items()},
        }

        if self.variant == "guided":
            from attnseg.methods.diffseg import aggregate_self_attention

            selfs = store.self_attention(batch_index=0)
            if not selfs:
                raise ConfigError("variant 'guided' needs self-attention in the store")
            if any(store.grid(r)[0] != store.grid(r)[1] for r in selfs):
                raise ConfigError("variant 'guided' needs square attention grids (DiffSeg's self-attention "
                                  "aggregation); use a square input size, or variant 'cross-only'/'diffsegmenter'")
            attn = aggregate_self_attention(selfs)
            grid = (int(attn.shape[0]), int(attn.shape[1]))
            a_cross = aggregate_target_cross(cross, span.indices, weights, grid, grids=grids).to(attn.device)
            sel = guided_selection(
                a_cross, attn, tau=self.tau, tau_mode=self.tau_mode, eps=self.eps,
                fallback_fraction=self.fallback_fraction,
            )
            del attn
            raw = sel.mean_map
            d = sel.divergence.reshape(-1)
            meta.update({
                "num_selected": sel.num_selected, "fallback": sel.fallback,
                "fallback_count": sel.num_selected if sel.fallback else 0,
                "divergence_min": float(d.min()), "divergence_median": float(d.median()),
                "divergence_threshold": sel.threshold,
            })
        elif self.variant == "cross-only":
            r_max = max(cross, key=lambda r: grids[r][0] * grids[r][1])
            grid = grids[r_max]
            raw = aggregate_target_cross(cross, span.indices, weights, grid, grids=grids)
        else:  # diffsegmenter: c weighted per-resolution minmax map, S finest self map, minmax(S @ c), one product
            selfs = store.self_attention(batch_index=0)
            if not selfs:
                raise ConfigError("variant 'diffsegmenter' needs self-attention in the store")
            r_self = max(selfs, key=lambda r: store.grid(r)[0] * store.grid(r)[1])
            grid = store.grid(r_self)
            c = aggregate_target_cross(cross, span.indices, weights, grid, grids=grids)
            s = selfs[r_self].to(torch.float32)
            raw = (s @ c.reshape(-1).to(s.device)).reshape(grid)
        meta["grid"] = list(grid)

        size = self._out_size(store, out_size, grid)
        score = minmax(raw.to(torch.float32), (-2, -1))
        up = key_upsample(score, size)
        if self.binarize == "otsu-then-resize":
            t = otsu_threshold(score)
            mask = (score > t).to(torch.float32)
            labels = F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0].to(torch.int64)
        else:
            t = otsu_threshold(up)
            labels = (up > t).to(torch.int64)
        meta["otsu_threshold"] = t
        meta["degenerate"] = bool(float(score.max()) <= float(score.min()))
        meta["target_fraction"] = float(labels.float().mean())
        return SegmentationResult(
            labels=labels.cpu(),
            scores=up[None].cpu(),
            label_names=("background", self.target),
            method=self.name,
            params=self.params(),
            meta=meta,
        )

    @staticmethod
    def _out_size(store: AttentionStore, out_size: Sequence[int] | None, grid: tuple[int, int]) -> tuple[int, int]:
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
