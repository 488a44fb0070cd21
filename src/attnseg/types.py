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
    "PART_KINDS",
    "AttentionKind",
    "LayerInfo",
    "Position",
    "Prompt",
    "SegmentationResult",
    "TokenSpan",
]

AttentionKind = Literal["self", "cross", "joint", "reverse"]
Position = Literal["down", "mid", "up", "block", "single"]
Part = Literal["", "image->image", "image->text", "text->image"]
TokenLayout = tuple[str, ...]

#: The kind under which each part of a joint layer reaches stores and methods.
PART_KINDS: dict[str, str] = {"image->image": "self", "image->text": "cross", "text->image": "reverse"}
_PART_SUFFIX = {"image->image": "self", "image->text": "cross", "text->image": "reverse"}


@dataclass(frozen=True)
class LayerInfo:
    """Description of one attention layer of a denoiser, derived from the model's config.

    A joint-attention layer (MMDiT: image and text tokens in one softmax) is described once with
    ``kind="joint"`` and once per **part**, a view on one block of its probabilities that stores and
    methods read like a plain layer: ``image->image`` (``kind="self"``), ``image->text`` (``kind="cross"``)
    and ``text->image`` (``kind="reverse"``). Parts are named ``"<module>:self"``, ``"<module>:cross"`` and
    ``"<module>:reverse"``; their rows come from the softmax over the **whole** joint key set, so they do not
    sum to 1 (``rows_sum_to_one=False``): methods renormalise per pixel over the tokens they use.

    Attributes:
        name: module path inside the denoiser, e.g. ``"down_blocks.0.attentions.0.transformer_blocks.0.attn1"``,
            or ``"<module>:<part kind>"`` for a part of a joint layer.
        kind: ``"self"`` (image -> image), ``"cross"`` (image -> text), ``"joint"`` (MMDiT: one softmax over
            image and text tokens) or ``"reverse"`` (text -> image part of a joint layer).
        grid: ``(h, w)`` token grid of the image tokens for the adapter's current input size.
        heads: number of attention heads.
        head_dim: channels per head.
        position: where the layer sits (``"down"``, ``"mid"``, ``"up"`` for UNets, ``"block"`` for DiT blocks,
            ``"single"`` for single-stream blocks).
        index: order of the layer in the forward pass (0-based; the parts of a joint layer share its index).
        block: the block the layer belongs to (e.g. ``"up_blocks.1"``, ``"transformer_blocks.3"``), for layer
            selection.
        text_tokens: number of text tokens the layer sees (cross and joint layers; 0 for self-attention).
        layout: for joint layers and their parts, the order of the token groups in the joint sequence,
            ``("text", "image")`` (Flux) or ``("image", "text")`` (SD3); empty otherwise.
        joined: the attention module receives text and image as **one** sequence in ``layout`` order
            (single-stream blocks); otherwise image tokens come as ``hidden_states`` and text tokens as
            ``encoder_hidden_states``.
        part: for a part of a joint layer, which block of its probabilities (``"image->image"``,
            ``"image->text"``, ``"text->image"``); ``""`` otherwise.
        module: the attention module that computes this layer (``""``: ``name`` itself).
        rows_sum_to_one: False when rows are a slice of a larger softmax (parts of joint layers).
        output_projection: the linear module whose first ``heads * head_dim`` input columns project the
            heads' concatenated output (``""``: ``"<module>.to_out.0"``); GoCA's head weights read it.
    """

    name: str
    kind: AttentionKind
    grid: tuple[int, int]
    heads: int
    head_dim: int
    position: Position
    index: int
    block: str
    text_tokens: int = 0
    layout: TokenLayout = ()
    joined: bool = False
    part: Part = ""
    module: str = ""
    rows_sum_to_one: bool = True
    output_projection: str = ""

    @property
    def num_tokens(self) -> int:
        """Image tokens of the grid, ``h * w``."""
        return self.grid[0] * self.grid[1]

    @property
    def num_queries(self) -> int:
        """Query rows this layer's maps have: text tokens for ``text->image`` parts, image tokens otherwise."""
        return self.text_tokens if self.kind == "reverse" else self.num_tokens

    @property
    def module_name(self) -> str:
        """The attention module computing this layer."""
        return self.module or self.name

    @property
    def output_module(self) -> str:
        """The linear layer projecting the heads' concatenated output (see :attr:`output_projection`)."""
        return self.output_projection or f"{self.module_name}.to_out.0"

    @property
    def resolution(self) -> int:
        """The larger side of the token grid; the key used to group layers by resolution."""
        return max(self.grid)

    def image_span(self, sequence_length: int) -> tuple[int, int]:
        """``(start, stop)`` of the image tokens in a joint sequence of ``sequence_length`` tokens.

        The image group has :attr:`num_tokens` tokens; the text group takes the rest, in :attr:`layout` order.
        """
        n = self.num_tokens
        if "text" not in self.layout or self.layout.index("image") < self.layout.index("text"):
            return 0, n
        return sequence_length - n, sequence_length

    def part_info(self, part: str) -> LayerInfo:
        """The description of one part (``"image->image"``, ``"image->text"``, ``"text->image"``) of this
        joint layer."""
        if self.kind != "joint":
            raise ValueError(f"{self.name} is a {self.kind} layer; only joint layers have parts")
        if part not in PART_KINDS:
            raise ValueError(f"part must be one of {tuple(PART_KINDS)}, got {part!r}")
        return replace(
            self, name=f"{self.name}:{_PART_SUFFIX[part]}", kind=PART_KINDS[part], part=part,  # type: ignore[arg-type]
            module=self.name, rows_sum_to_one=False,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "grid": list(self.grid),
            "heads": self.heads,
            "head_dim": self.head_dim,
            "position": self.position,
            "index": self.index,
            "block": self.block,
        }
        # fields added with transformer support are written only when set, so stores stay readable by
        # older readers and old stores load with the defaults
        extra = {
            "text_tokens": self.text_tokens, "layout": list(self.layout), "joined": self.joined, "part": self.part,
            "module": self.module, "rows_sum_to_one": self.rows_sum_to_one,
            "output_projection": self.output_projection,
        }
        defaults = {"text_tokens": 0, "layout": [], "joined": False, "part": "", "module": "",
                    "rows_sum_to_one": True, "output_projection": ""}
        d.update({k: v for k, v in extra.items() if v != defaults[k]})
        return d

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
            text_tokens=int(d.get("text_tokens", 0)),
            layout=tuple(d.get("layout", ())),
            joined=bool(d.get("joined", False)),
            part=d.get("part", ""),
            module=d.get("module", ""),
            rows_sum_to_one=bool(d.get("rows_sum_to_one", True)),
            output_projection=d.get("output_projection", ""),
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
        special: per token True for start/end/padding tokens (T5: ``</s>`` and ``<pad>``; it has no start token),
            and for tokens that word lookup must not read (SD3: the T5 part when words are read from CLIP).
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
