"""Core data types shared across attnseg.

Shape notation in docstrings: ``(H, W) int64`` is a label map; ``probs: (B, heads, Q, K)`` are
attention probabilities whose rows (last axis) sum to 1; ``N = h * w`` tokens of a grid flattened
row-major (token ``i`` is ``(i // w, i % w)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "AttentionKind",
    "LayerInfo",
    "Position",
    "Prompt",
    "SegmentationResult",
    "TokenSpan",
]

AttentionKind = Literal["self", "cross", "joint"]
Position = Literal["down", "mid", "up", "block", "single"]


@dataclass(frozen=True)
class LayerInfo:
    """Description of one attention layer of a denoiser, derived from the model's config.

    Attributes:
        name: module path inside the denoiser, e.g. ``"down_blocks.0.attentions.0.transformer_blocks.0.attn1"``.
        kind: ``"self"`` (image -> image), ``"cross"`` (image -> text) or ``"joint"`` (MMDiT).
        grid: ``(h, w)`` token grid of the image queries for the adapter's current input size.
        heads: number of attention heads.
        head_dim: channels per head.
        position: where the layer sits (``"down"``, ``"mid"``, ``"up"`` for UNets, ``"block"`` for DiTs).
        index: order of the layer in the forward pass (0-based).
        block: the block the layer belongs to (e.g. ``"up_blocks.1"``), for layer selection.
    """

    name: str
    kind: AttentionKind
    grid: tuple[int, int]
    heads: int
    head_dim: int
    position: Position
    index: int
    block: str

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def resolution(self) -> int:
        """The larger side of the token grid; the key used to group layers by resolution."""
        return max(self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "grid": list(self.grid),
            "heads": self.heads,
            "head_dim": self.head_dim,
            "position": self.position,
            "index": self.index,
            "block": self.block,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        return cls(
            name=d["name"],
            kind=d["kind"],
            grid=(int(d["grid"][0]), int(d["grid"][1])),
            heads=int(d["heads"]),
            head_dim=int(d["head_dim"]),
            position=d["position"],
            index=int(d["index"]),
            block=d["block"],
        )


@dataclass(frozen=True)
class TokenSpan:
    """Where a word or phrase of a prompt lands in the token sequence.

    Attributes:
        text: the word or phrase as given.
        start, end: character span in the prompt.
        indices: token positions (in the text encoder's sequence, start token included).
    """

    text: str
    start: int
    end: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Prompt:
    """An encoded prompt.

    Attributes:
        text: the prompt string ("" allowed).
        embeddings: ``(1, T, C)`` text-encoder hidden states fed to cross-attention.
        tokens: the token strings, length ``T`` (padding included).
        token_ids: ``(T,)`` ids.
        offsets: per token the ``(start, end)`` character span in ``text``; ``(0, 0)`` for special tokens.
        special: per token True for start/end/padding tokens.
        length: number of non-padding tokens (start and end included).
        extra: model-specific conditioning (e.g. SDXL pooled embeddings).
    """

    text: str
    embeddings: torch.Tensor
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    length: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Prompt(text={self.text!r}, length={self.length}, T={len(self.tokens)})"


@dataclass(frozen=True)
class SegmentationResult:
    """The output of a segmentation method.

    Attributes:
        labels: ``(H, W) int64`` segment or class id per pixel (``-1`` never occurs).
        scores: optional ``(K, H, W) float32`` per-segment/class scores (continuous maps), or ``(M, H, W) bool``
            possibly overlapping masks for mask-set methods (principal-component clustering).
        label_names: optional name per id (``label_names[i]`` names id ``i``).
        method: name of the method that produced it.
        params: the method's hyper-parameters.
        meta: anything else worth recording (timings, fallbacks taken, token indices...).
    """

    labels: torch.Tensor
    scores: torch.Tensor | None = None
    label_names: tuple[str, ...] | None = None
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.labels.shape[-2:]
        return int(h), int(w)

    @property
    def num_segments(self) -> int:
        return int(self.labels.unique().numel())

    def masks(self) -> dict[int, torch.Tensor]:
        """One boolean ``(H, W)`` mask per id present in :attr:`labels`."""
        return {int(i): self.labels == i for i in self.labels.unique().tolist()}

    def resize(self, size: tuple[int, int]) -> SegmentationResult:
        """Resize to ``(H, W)``: nearest for labels, bilinear for scores."""
        import torch
        import torch.nn.functional as F

        labels = F.interpolate(self.labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        scores = None
        if self.scores is not None and self.scores.dtype == torch.bool:
            scores = F.interpolate(self.scores[None].float(), size=size, mode="nearest")[0] > 0.5
        elif self.scores is not None:
            scores = F.interpolate(self.scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        return replace(self, labels=labels, scores=scores)

    def cpu(self) -> SegmentationResult:
        """The result with its tensors on the host (``self`` when they already are)."""
        on_host = self.labels.device.type == "cpu" and (self.scores is None or self.scores.device.type == "cpu")
        if on_host:
            return self
        scores = self.scores.cpu() if self.scores is not None else None
        return replace(self, labels=self.labels.cpu(), scores=scores)

    def labels_numpy(self) -> np.ndarray:
        return self.labels.cpu().numpy()

    def to_json(self) -> dict[str, Any]:
        """Per-segment summary: id, name, area (pixels and fraction) and bounding box ``[x0, y0, x1, y1]``."""
        from attnseg.io.export import segment_summary

        return segment_summary(self)

    def save(self, out_dir: str | Path, *, image: Any = None, stem: str = "image") -> dict[str, Path]:
        """Write the label PNG, the JSON summary and (with ``image``) a colour overlay to ``out_dir``."""
        from attnseg.io.export import save_result

        return save_result(self, out_dir, image=image, stem=stem)

    def summary_json(self) -> str:
        return json.dumps(self.to_json(), indent=2)
