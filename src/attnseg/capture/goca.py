"""HeadWeightedStore: GoCA's capture store, which weights heads per pixel and scores layers as maps arrive.

**Cross-attention.** For a cross layer the probabilities of one call arrive in chunks of heads together with the
heads' outputs ``A_h V_h``. GoCA's head weights (G1, :func:`attnseg.methods.goca.head_weights`) need every head's
output, so the chunks of **one** call are kept (``(B, H, N, T')`` and ``(B, H, N, d)``), combined at
:meth:`HeadWeightedStore.end_call` into one head-weighted ``(B, N, T')`` map, and dropped. No per-head map outlives
its call. With ``head_method="average"`` the chunks are averaged as they come (nothing per call).

**Text columns.** GoCA reads only the prompt's tokens; G3 divides every pixel by its sum over **all** ``T`` text
tokens. With ``text_columns=L`` (the prompt's length, padding excluded) the store keeps the first ``L`` columns
(key ``"<layer>"``) and, per pixel, the sum of the others (key ``"<layer>@rest"``, ``(B, N, 1)``). G3's sum over all
tokens then stays exact as long as head weights are non-negative (``"average"``, ``"dot-product"``): every column of
the weighted sum is >= 0, so the clamp at 0 changes none and the dropped columns contribute exactly their sum. Signed
head weights (``"dot-product w/o clamp"``) keep all ``T`` columns. On Flux (512 T5 tokens) this turns 8 MiB per
layer into ``4096 x (L + 1)`` floats.

**Self-attention** is reduced on arrival, block of query rows by block (head sum, ``QueryTile`` by index, ``KeyUp``
of the rows; no renormalisation, ``METHODS.md`` §3 G2, G6), into:

- G2's layer scores ``u_l = sum_{q,k} Pi[q, k] S~_l[q, k]``, one scalar per layer (key ``"<layer>@score"``), where
  ``Pi = softmax(F F^T / sqrt(C))`` comes from the reference feature ``F``, a module output the tracer hands to
  :meth:`HeadWeightedStore.add_feature` during the same forward pass. Once ``F`` has arrived, a later layer's score
  is summed up block by block as its rows arrive (its map is never built); the maps of the layers that run before
  ``F`` are held at the reference grid, in ``reference_map_dtype`` (float16 by default, the precision GoCA's
  reference stores its captured tensors in), scored when ``F`` arrives and dropped. On Flux.1 (reference: block 27 of
  57) that is 28 maps of 32 MiB at its peak instead of 57 maps of 64 MiB kept to the end. Scores are running means
  over calls (each call's map against that call's ``Pi``): for GoCA's single pass they equal the score of the mean
  map against the mean feature, which is what stores before this one computed.
- one mean over the refinement layers at the aggregation grid, for G6 (key ``"refine"``, ``(B, n, n)``).

With ``reference_feature=None`` the reference-grid maps are kept instead (key ``"<layer>@reference"``, store dtype),
as stores saved before layer scores existed hold them; :meth:`attnseg.methods.goca.GoCA.segment` reads either.

Entries keep running means over calls (denoising steps), save and load like any
:class:`~attnseg.capture.store.AttentionStore`, and the read helpers (:func:`cross_maps`, :func:`cross_rest`,
:func:`layer_scores_of`, :func:`reference_self_maps`, :func:`refine_affinity`) work on a store loaded with either
class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.store import AttentionStore, _Entry
from attnseg.errors import AttnSegError, ConfigError, UnsupportedModelError
from attnseg.types import LayerInfo

if TYPE_CHECKING:
    from attnseg.capture.memory import MemoryItem

__all__ = [
    "CROSS_KIND",
    "REFERENCE_KIND",
    "REFINE_KEY",
    "REFINE_KIND",
    "REST_KIND",
    "SCORE_KIND",
    "HeadWeightedStore",
    "cross_maps",
    "cross_rest",
    "layer_scores_of",
    "reference_self_maps",
    "refine_affinity",
]

CROSS_KIND = "cross"
REST_KIND = "cross@rest"
REFERENCE_KIND = "self@reference"
SCORE_KIND = "self@score"
REFINE_KIND = "self@refine"
REFINE_KEY = "refine"
_REFERENCE_SUFFIX = "@reference"
_SCORE_SUFFIX = "@score"
_REST_SUFFIX = "@rest"
#: Signed head weights make columns of the weighted map negative: their padding columns cannot be summed up.
_NON_NEGATIVE_HEADS = ("average", "dot-product")
#: float32 bytes of one block of rows of Pi (and of each temporary beside it) when Pi is computed or used.
_PI_BLOCK_BYTES = 2 * 2**20

_Mode = Literal["await", "score", "keep"]


@dataclass
class _Pending:
    """Per-head tensors of one call of one cross layer (freed at ``end_call``)."""

    probs: torch.Tensor  # (B, H, N, T'): the kept columns, then the sum of the others when some are not kept
    outputs: torch.Tensor  # (B, H, N, d)
    seen: torch.Tensor  # (H,) bool
    cols: int  # kept columns


def _source_rows(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """For each query row of ``size``, the row of ``grid`` that :func:`~attnseg.methods.ops.query_tile` copies."""
    from attnseg.methods.ops import query_tile

    h, w = grid
    return query_tile(torch.arange(h * w).reshape(h, w), size).reshape(-1)


def _block_rows(batch: int, n: int) -> int:
    """Rows of an ``(batch, rows, n)`` float32 block of about :data:`_PI_BLOCK_BYTES`."""
    return max(1, min(n, _PI_BLOCK_BYTES // max(1, batch * n * 4)))


def _pi_rows(feature: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of G2's ``Pi = softmax(F F^T / sqrt(C))`` for a batch of features ``(B, N, C)``, float32.

    The same operations as :func:`attnseg.methods.goca.pseudo_self_attention` (float32 ``F F^T``, divided by
    ``sqrt(C)``, row softmax), cut into blocks of keys so that no float32 copy of the whole feature is made.
    """
    b, n, c = feature.shape
    rows = feature[:, r0:r1].to(torch.float32)
    logits = torch.empty((b, r1 - r0, n), dtype=torch.float32, device=feature.device)
    step = _block_rows(1, c)
    for k0 in range(0, n, step):
        k1 = min(n, k0 + step)
        logits[:, :, k0:k1] = rows @ feature[:, k0:k1].to(torch.float32).transpose(1, 2)
    logits /= math.sqrt(c)
    return torch.softmax(logits, dim=-1)


class HeadWeightedStore(AttentionStore):
    """Capture store for GoCA: per-pixel head-weighted cross maps, layer scores, the refinement affinity.

    Args:
        out_weights: per cross layer name, ``to_out[0].weight`` ``(C, H * d)`` (needed unless ``head_method`` is
            ``"average"``); kept by reference, not copied.
        head_method: G1 method (see :data:`attnseg.methods.goca.HEAD_METHODS`).
        reference_layers: self layers whose G2 score is computed (their maps resized to ``reference_grid``).
        reference_grid: ``(h, w)`` of the reference feature.
        reference_feature: name of the module whose output is G2's reference feature (what the tracer passes to
            :meth:`add_feature`); layers are then scored on arrival. None keeps one reference-grid map per layer
            instead (the stores' behaviour before layer scores: 57 x 64 MiB on Flux.1 at 1024 px).
        reference_map_dtype: dtype of the maps held until the reference feature arrives (float16, as GoCA's
            reference stores captured tensors; float32 doubles their memory and removes their rounding).
        text_columns: keep only the first ``text_columns`` columns of cross maps plus, per pixel, the sum of the others
            (see the module docstring); None keeps every column. Needs non-negative head weights.
        refine_layers: self layers averaged (resized to ``refine_grid``) into G6's affinity.
        refine_grid: ``(h, w)`` of the aggregated maps.
        batch: which batch items to keep (e.g. ``slice(1, 2)`` for a CFG batch's conditional half).
        dtype, device: of the accumulators.
        meta: JSON-able metadata saved with the store.
        heads, group: accepted for :meth:`load` compatibility; the store always keeps one head-reduced map per layer.

    Example:
        >>> store = HeadWeightedStore(head_method="average")
        >>> info = LayerInfo("b.attn2", "cross", (2, 2), heads=2, head_dim=4, position="up", index=0, block="b")
        >>> store.add(info, torch.full((1, 2, 4, 3), 1 / 3))
        >>> cross_maps(store)["b.attn2"].shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        *,
        out_weights: Mapping[str, torch.Tensor] | None = None,
        head_method: str = "dot-product w/o clamp",
        reference_layers: Iterable[str] = (),
        reference_grid: tuple[int, int] | None = None,
        reference_feature: str | None = None,
        reference_map_dtype: torch.dtype = torch.float16,
        text_columns: int | None = None,
        refine_layers: Iterable[str] = (),
        refine_grid: tuple[int, int] | None = None,
        batch: slice | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
        heads: Literal["mean", "all"] = "mean",
        group: Literal["layer", "resolution"] = "layer",
    ) -> None:
        from attnseg.methods.goca import HEAD_METHODS

        super().__init__(heads="mean", group="layer", batch=batch, dtype=dtype, device=device, meta=meta)
        if head_method not in HEAD_METHODS:
            raise ConfigError(f"head_method must be one of {HEAD_METHODS}, got {head_method!r}")
        self.head_method = head_method
        self.out_weights = dict(out_weights or {})
        self.reference_layers = frozenset(reference_layers)
        self.refine_layers = frozenset(refine_layers)
        if self.reference_layers and reference_grid is None:
            raise ConfigError("reference_layers need reference_grid")
        if self.refine_layers and refine_grid is None:
            raise ConfigError("refine_layers need refine_grid")
        self.reference_grid = tuple(reference_grid) if reference_grid is not None else None
        self.refine_grid = tuple(refine_grid) if refine_grid is not None else None
        if reference_feature is not None and (not isinstance(reference_feature, str) or not reference_feature):
            raise ConfigError(f"reference_feature must be a module name or None, got {reference_feature!r}")
        self.reference_feature = reference_feature
        if not (isinstance(reference_map_dtype, torch.dtype) and reference_map_dtype.is_floating_point):
            raise ConfigError(f"reference_map_dtype must be a floating torch dtype, got {reference_map_dtype!r}")
        self.reference_map_dtype = reference_map_dtype
        if text_columns is not None:
            if isinstance(text_columns, bool) or not isinstance(text_columns, int) or text_columns < 1:
                raise ConfigError(f"text_columns must be a positive int or None, got {text_columns!r}")
            if head_method not in _NON_NEGATIVE_HEADS:
                raise ConfigError(
                    f"text_columns needs non-negative head weights ({' or '.join(_NON_NEGATIVE_HEADS)}); with "
                    f"{head_method!r} the padding columns cannot be summed up exactly: leave text_columns=None"
                )
        self.text_columns = text_columns
        # Per-head outputs are only needed to weight heads by their contribution.
        self.wants_outputs = head_method != "average"
        self._pending: dict[str, _Pending] = {}
        # G2 state of the forward pass in progress (see the module docstring)
        self._awaiting: dict[str, torch.Tensor] = {}  # layer -> (B, n_r, n_r) map held until the feature arrives
        self._call_mode: dict[str, _Mode] = {}  # reference layers whose call is open
        self._call_scores: dict[str, torch.Tensor] = {}  # layer -> (B,) float32 score of the open call
        self._pi: torch.Tensor | None = None  # (B, n_r, n_r) float32, between the feature and the last layer
        self._scored: set[str] = set()  # layers scored against the current feature
        self._rows_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scores_on_arrival(self) -> bool:
        """Whether G2's layers are scored during capture (no reference-grid map kept)."""
        return self.reference_feature is not None and bool(self.reference_layers)

    # -- write side --------------------------------------------------------------------------------------------------

    def _entry(self, key: str, kind: str, grid: tuple[int, int], layer: str, shape: tuple[int, ...],
               dtype: torch.dtype | None = None) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(kind=kind, grid=grid, layers=[])
        if layer not in entry.layers:
            entry.layers.append(layer)
        if entry.sum is None:
            entry.sum = self._alloc(shape, f"the maps of {key}", dtype or self.dtype)
        elif tuple(entry.sum.shape) != shape:
            raise AttnSegError(
                f"{layer}: a map of shape {shape} does not match the {tuple(entry.sum.shape)} already stored under "
                f"{key!r}; use a new store for a new input size or batch"
            )
        return entry

    def _alloc(self, shape: tuple[int, ...], what: str, dtype: torch.dtype) -> torch.Tensor:
        """A zero tensor, refused with a clear error when it cannot fit on the store's device."""
        from attnseg.methods.ops import check_memory

        numel = 1
        for n in shape:
            numel *= n
        check_memory(numel * torch.empty((), dtype=dtype).element_size(), what, device=self.device)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _kept_columns(self, t: int) -> int:
        """How many of ``t`` text columns a cross map keeps (the rest are summed into one column when fewer)."""
        return t if self.text_columns is None else min(t, self.text_columns)

    def memory_items(
        self, layers: Mapping[str, LayerInfo], *, batch: int = 1, text_tokens: int = 0
    ) -> list[MemoryItem]:
        """The store's tensors for a capture of ``layers``, from shapes (see ``AttentionStore.memory_items``).

        Kept: per cross layer one head-weighted ``(B, N, L)`` map (``L`` = ``text_columns``, or all ``T``) and, with
        ``text_columns``, the ``(B, N, 1)`` sum of the other columns; per reference layer a ``(B, 1, 1)`` float32
        score (or, with ``reference_feature=None``, its ``(B, n_r, n_r)`` map); one ``(B, n_g, n_g)`` refinement
        affinity.

        Transient (``"capture"``, one group per moment): the maps of the reference layers that run up to the
        reference feature's layer, ``(B, n_r, n_r)`` each in ``reference_map_dtype``, held until the feature arrives,
        with the blocks of ``Pi`` that score them; then ``Pi`` itself ``(B, n_r, n_r)`` float32 until the forward pass
        ends. Per call of a cross layer with per-pixel head weights: the per-head maps and outputs
        ``(B, H, N, L')`` + ``(B, H, N, d)`` and the head-weight products. Per block of query rows of a self layer:
        the head sum and its resized rows at each target grid.
        """
        from attnseg.capture.memory import MemoryItem, key_tokens, nbytes
        from attnseg.capture.processor import block_plan

        b = self.kept_batch(batch)
        dev = str(self.device)
        items: list[MemoryItem] = []
        refine_n = 0
        ref_index = self._reference_index(layers)
        awaiting = 0
        for info in layers.values():
            n = info.num_tokens
            if info.kind == "cross":
                t = key_tokens(info, text_tokens)
                cols = self._kept_columns(t)
                kept = nbytes((b, n, cols), self.dtype)
                items.append(MemoryItem(f"the head-weighted maps of {info.name}", kept, "kept", dev, info.name))
                if cols < t:
                    rest = nbytes((b, n, 1), self.dtype)
                    what = f"the other text columns' sum of {info.name}"
                    items.append(MemoryItem(what, rest, "kept", dev, info.name))
                if self.head_method != "average":
                    width = cols + (cols < t)
                    c = info.heads * info.head_dim
                    per_call = nbytes((b, info.heads, n, width)) + nbytes((b, info.heads, n, info.head_dim))
                    per_call += 2 * nbytes((b, n, c)) + 2 * nbytes((b, info.heads, n)) + nbytes((b, n, width))
                    items.append(MemoryItem(f"the per-head maps and outputs of one call of {info.name}", per_call,
                                            "capture", dev, info.name))
            elif info.kind == "self" and (info.name in self.reference_layers or info.name in self.refine_layers):
                keys = n + (int(text_tokens) or info.text_tokens) if info.part else key_tokens(info, text_tokens)
                _, rows = block_plan(batch, info.heads, n, keys, device_type=self.device.type)
                per_block = nbytes((b, rows, n))  # the block's head sum
                targets = ((self.reference_layers, self.reference_grid), (self.refine_layers, self.refine_grid))
                for wanted, grid in targets:
                    if info.name in wanted and grid is not None:
                        g = grid[0] * grid[1]
                        tiled = rows * max(1, -(-g // n))  # query rows after QueryTile (repeated when coarser)
                        per_block += nbytes((b, rows, g)) + 2 * nbytes((b, min(tiled, g), g))
                items.append(MemoryItem(f"a block of rows of {info.name}, summed over heads and resized", per_block,
                                        "capture", dev, info.name))
                if info.name in self.reference_layers and self.reference_grid is not None:
                    g = self.reference_grid[0] * self.reference_grid[1]
                    if not self.scores_on_arrival:
                        items.append(MemoryItem(f"the reference-grid map of {info.name}",
                                                nbytes((b, g, g), self.dtype), "kept", dev, info.name))
                    else:
                        items.append(MemoryItem(f"the layer score of {info.name}", nbytes((b, 1, 1)),
                                                "kept", dev, info.name))
                        if ref_index is None or info.index <= ref_index:
                            awaiting += nbytes((b, g, g), self.reference_map_dtype)
                if info.name in self.refine_layers and self.refine_grid is not None:
                    refine_n = self.refine_grid[0] * self.refine_grid[1]
        if self.scores_on_arrival and self.reference_grid is not None:
            g = self.reference_grid[0] * self.reference_grid[1]
            # Pi's block, the logits beside it, a float32 copy of a map's rows and the product
            blocks = 4 * nbytes((b, _block_rows(b, g), g))
            moment = f"{self.reference_feature} arrives"
            if awaiting:
                items.append(MemoryItem(
                    f"the G2 maps of the layers up to {self.reference_feature} ({self.reference_map_dtype}), held "
                    "until it arrives, and the blocks of Pi that score them", awaiting + blocks, "capture", dev,
                    moment))
            items.append(MemoryItem(f"Pi of {self.reference_feature}, from its arrival to the last layer",
                                    nbytes((b, g, g)) + blocks, "capture", dev, f"after {moment}"))
        if refine_n:
            affinity = nbytes((b, refine_n, refine_n), self.dtype)
            items.append(MemoryItem("the refinement affinity", affinity, "kept", dev))
        return items

    def _reference_index(self, layers: Mapping[str, LayerInfo]) -> int | None:
        """Forward index of the attention layer that computes the reference feature (None: not among ``layers``)."""
        ref = self.reference_feature
        if ref is None:
            return None
        found = [i.index for i in layers.values() if ref == i.module_name or ref.startswith(i.module_name + ".")]
        return max(found) if found else None

    def add_chunk(
        self,
        layer: LayerInfo,
        probs: torch.Tensor,
        heads: slice,
        out: torch.Tensor | None = None,
        *,
        queries: slice = slice(None),
    ) -> None:
        """Take the probabilities ``(B, h, q, K)`` (and outputs ``(B, h, q, d)``) of heads ``heads`` and query
        rows ``queries`` of one call."""
        if self.batch is not None:
            probs = probs[self.batch]
            out = out[self.batch] if out is not None else None
        self.layers[layer.name] = layer
        if layer.kind == "cross":
            self._add_cross(layer, probs, heads, out, queries)
        elif layer.kind == "self":
            self._add_self(layer, probs, queries)
        else:
            raise UnsupportedModelError(f"{layer.name}: GoCA's store handles self and cross layers, not {layer.kind!r}")

    # -- cross-attention ----------------------------------------------------------------------------------------------

    def _split_columns(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``probs (..., T)`` -> the kept columns ``(..., L)`` and the sum of the others ``(..., 1)`` (None if none)."""
        t = probs.shape[-1]
        cols = self._kept_columns(t)
        if cols == t:
            return probs, None
        return probs[..., :cols], probs[..., cols:].sum(-1, keepdim=True)

    def _add_cross(
        self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None, queries: slice
    ) -> None:
        b, t = probs.shape[0], probs.shape[-1]
        n = layer.num_tokens
        cols = self._kept_columns(t)
        if self.head_method == "average":
            kept, rest = self._split_columns(probs)
            entry = self._entry(layer.name, CROSS_KIND, layer.grid, layer.name, (b, n, cols))
            assert entry.sum is not None
            entry.sum[:, queries] += (kept.sum(1) / layer.heads).to(self.device, self.dtype)
            if rest is not None:
                rest_entry = self._entry(layer.name + _REST_SUFFIX, REST_KIND, layer.grid, layer.name, (b, n, 1))
                assert rest_entry.sum is not None
                rest_entry.sum[:, queries] += (rest.sum(1) / layer.heads).to(self.device, self.dtype)
            return
        if out is None:
            raise AttnSegError(f"{layer.name}: head method {self.head_method!r} needs the heads' outputs; "
                               "trace with want_outputs=True (the tracer reads the store's wants_outputs)")
        if layer.name not in self.out_weights:
            raise AttnSegError(f"{layer.name}: no to_out weight was given to the store for this cross layer")
        pending = self._pending.get(layer.name)
        width = cols + (cols < t)
        if pending is None:
            d = out.shape[-1]
            pending = self._pending[layer.name] = _Pending(
                probs=torch.empty((b, layer.heads, n, width), dtype=torch.float32, device=self.device),
                outputs=torch.empty((b, layer.heads, n, d), dtype=torch.float32, device=self.device),
                seen=torch.zeros(layer.heads, dtype=torch.bool), cols=cols,
            )
        kept, rest = self._split_columns(probs)
        pending.probs[:, heads, queries, :cols] = kept.to(self.device, torch.float32)
        if rest is not None:
            pending.probs[:, heads, queries, cols:] = rest.to(self.device, torch.float32)
        pending.outputs[:, heads, queries] = out.to(self.device, torch.float32)
        if queries.stop is None or queries.stop >= n:  # the last block of rows of these heads
            pending.seen[heads] = True

    def _finish_cross(self, layer: LayerInfo, pending: _Pending) -> None:
        from attnseg.methods.goca import head_weights

        if not bool(pending.seen.all()):
            raise AttnSegError(f"{layer.name}: the call ended before every head arrived")
        w = head_weights(pending.outputs, self.out_weights[layer.name], method=self.head_method)  # (B, H, N)
        weighted = torch.einsum("bhn,bhnt->bnt", w, pending.probs)
        b, n, width = weighted.shape
        cols = pending.cols
        entry = self._entry(layer.name, CROSS_KIND, layer.grid, layer.name, (b, n, cols))
        assert entry.sum is not None
        entry.sum += weighted[..., :cols].to(self.dtype)
        if cols < width:
            rest = self._entry(layer.name + _REST_SUFFIX, REST_KIND, layer.grid, layer.name, (b, n, 1))
            assert rest.sum is not None
            rest.sum += weighted[..., cols:].to(self.dtype)

    # -- self-attention -----------------------------------------------------------------------------------------------

    def _resized_rows(
        self, part: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], q0: int, q1: int
    ) -> tuple[slice | torch.Tensor, torch.Tensor] | None:
        """Rows ``q0:q1`` of a self map ``(B, q, N)`` resized to ``size``: the target rows they fill (a slice or an
        index tensor) and those rows ``(B, r, H*W)``; None when no target row comes from them.

        Row by row what :func:`~attnseg.methods.goca.resize_self_attention` does to the whole map: ``QueryTile``
        (target row ``i`` copies source row ``src[i]``) and ``KeyUp`` of each row, no renormalisation.
        """
        from attnseg.methods.ops import key_upsample

        if tuple(grid) == tuple(size):
            return slice(q0, q1), part
        key = (tuple(grid), tuple(size), q0, q1, part.device)
        cached = self._rows_cache.get(key)
        if cached is None:  # worked out on the host from shapes alone, once per block of rows
            src = _source_rows(grid, size)
            targets = ((src >= q0) & (src < q1)).nonzero().squeeze(1)
            cached = self._rows_cache[key] = (targets.to(part.device), (src[targets] - q0).to(part.device))
        targets, sources = cached
        if targets.numel() == 0:
            return None
        b, q, _ = part.shape
        up = key_upsample(part.reshape(b * q, grid[0], grid[1]), size).reshape(b, q, size[0] * size[1])
        return targets, up[:, sources]

    def _add_self(self, layer: LayerInfo, probs: torch.Tensor, queries: slice) -> None:
        name = layer.name
        in_ref = name in self.reference_layers
        in_refine = name in self.refine_layers
        if not (in_ref or in_refine):
            return
        q0, q1, _ = queries.indices(layer.num_tokens)
        # these heads' share of the head mean, for rows q0:q1 (every step below is linear in it)
        part = (probs.sum(1) / layer.heads).to(self.device, torch.float32)  # (B, q, N)
        b = part.shape[0]
        if in_ref:
            assert self.reference_grid is not None
            mode = self._call_mode.get(name) or self._begin_reference_call(layer, b)
            got = self._resized_rows(part, layer.grid, self.reference_grid, q0, q1)
            if got is not None:
                rows, values = got
                if mode == "score":
                    assert self._pi is not None
                    self._call_scores[name] += (self._pi[:, rows] * values).sum((1, 2))
                else:
                    target = self._reference_target(layer, mode, b)
                    target[:, rows] += values  # one rounding to the target's dtype per block
        if in_refine:
            assert self.refine_grid is not None
            got = self._resized_rows(part, layer.grid, self.refine_grid, q0, q1)
            if got is not None:
                rows, values = got
                g = self.refine_grid[0] * self.refine_grid[1]
                entry = self._entry(REFINE_KEY, REFINE_KIND, self.refine_grid, name, (b, g, g))
                assert entry.sum is not None
                entry.sum[:, rows] += values

    def _begin_reference_call(self, layer: LayerInfo, b: int) -> _Mode:
        """Decide, at the first block of a call, where a reference layer's rows go."""
        name = layer.name
        mode: _Mode
        if self.reference_feature is None:
            mode = "keep"
        else:
            if self._pi is not None and name in self._scored:  # the layer runs again: a new forward pass began
                self._end_forward()
            if self._pi is not None:
                mode = "score"
                self._call_scores[name] = torch.zeros(b, dtype=torch.float32, device=self.device)
            else:
                if name in self._awaiting:
                    raise AttnSegError(
                        f"{name}: a new call began before the reference feature {self.reference_feature!r} of the "
                        "previous one arrived; hook it into the tracer (features=GoCA.features(adapter))"
                    )
                mode = "await"
        self._call_mode[name] = mode
        return mode

    def _reference_target(self, layer: LayerInfo, mode: _Mode, b: int) -> torch.Tensor:
        assert self.reference_grid is not None
        g = self.reference_grid[0] * self.reference_grid[1]
        if mode == "keep":
            entry = self._entry(layer.name + _REFERENCE_SUFFIX, REFERENCE_KIND, self.reference_grid, layer.name,
                                (b, g, g))
            assert entry.sum is not None
            return entry.sum
        target = self._awaiting.get(layer.name)
        if target is None:
            target = self._awaiting[layer.name] = self._alloc(
                (b, g, g), f"the self-attention of {layer.name} until the reference feature arrives",
                self.reference_map_dtype,
            )
        return target

    def _add_score(self, name: str, score: torch.Tensor) -> None:
        """One call's score ``(B,)`` of a reference layer, into its running mean."""
        b = score.shape[0]
        entry = self._entry(name + _SCORE_SUFFIX, SCORE_KIND, (1, 1), name, (b, 1, 1), torch.float32)
        assert entry.sum is not None
        entry.sum += score.reshape(b, 1, 1).to(entry.sum.device)
        entry.count += 1
        self._scored.add(name)

    def _end_forward(self) -> None:
        """Forget the reference feature of a finished forward pass."""
        self._pi = None
        self._scored.clear()

    def add_feature(self, name: str, value: torch.Tensor) -> None:
        """A module's output; the reference feature ``F`` (``(B, N_r, C)``, or ``(B, C, h, w)``) scores the layers
        held until now and is kept as ``Pi`` for the layers after it (other features: ``AttentionStore``'s running
        mean)."""
        if name != self.reference_feature or not self.reference_layers:
            super().add_feature(name, value)
            return
        assert self.reference_grid is not None
        value = value.detach()
        if self.batch is not None:
            value = value[self.batch]
        if value.ndim == 4:  # (B, C, h, w) module output
            value = value.flatten(2).transpose(1, 2)
        g = self.reference_grid[0] * self.reference_grid[1]
        if value.ndim != 3 or value.shape[1] != g:
            raise AttnSegError(
                f"the reference feature {name!r} has shape {tuple(value.shape)}, not (B, {g}, C) for the "
                f"{self.reference_grid[0]}x{self.reference_grid[1]} reference grid"
            )
        feature = value.to(self.device)
        if self._pi is not None:  # the feature of a new forward pass, before any reference layer ran again
            self._end_forward()
        ready = [n for n in self._awaiting if n not in self._call_mode]
        b = feature.shape[0]
        step = _block_rows(b, g)
        if ready:  # score the held maps block by block of Pi's rows, then drop them
            scores = {n: torch.zeros(b, dtype=torch.float32, device=self.device) for n in ready}
            for r0 in range(0, g, step):
                r1 = min(g, r0 + step)
                pi = _pi_rows(feature, r0, r1)
                for n in ready:
                    rows = self._awaiting[n][:, r0:r1].to(torch.float32)
                    scores[n] += (pi * rows).sum((1, 2))
                del pi
            for n in ready:
                del self._awaiting[n]
                self._add_score(n, scores[n])
        if self.reference_layers <= self._scored:  # no layer left to score in this pass
            self._end_forward()
            return
        pi_all = self._alloc((b, g, g), f"the pseudo self-attention of {name}", torch.float32)
        for r0 in range(0, g, step):  # the same blocks as above: the same values
            r1 = min(g, r0 + step)
            pi_all[:, r0:r1] = _pi_rows(feature, r0, r1)
        self._pi = pi_all

    def _score_held(self, name: str) -> None:
        """Score a held map against the current ``Pi`` (its call was open when the feature arrived)."""
        assert self._pi is not None
        held = self._awaiting.pop(name)
        b, g, _ = held.shape
        score = torch.zeros(b, dtype=torch.float32, device=self.device)
        step = _block_rows(b, g)
        for r0 in range(0, g, step):
            r1 = min(g, r0 + step)
            score += (self._pi[:, r0:r1] * held[:, r0:r1].to(torch.float32)).sum((1, 2))
        self._add_score(name, score)

    def end_call(self, layer: LayerInfo) -> None:
        """Finish one call of ``layer``: combine the heads of a cross layer, score or hold a reference layer's map,
        and advance the running means."""
        name = layer.name
        pending = self._pending.pop(name, None)
        if pending is not None:
            self._finish_cross(layer, pending)
            del pending
        keys = []
        if layer.kind == "cross":
            keys += [name, name + _REST_SUFFIX]
        else:
            mode = self._call_mode.pop(name, None)
            if mode == "score":
                self._add_score(name, self._call_scores.pop(name))
                if self.reference_layers <= self._scored:
                    self._end_forward()
            elif mode == "await" and self._pi is not None:
                self._score_held(name)
            elif mode == "keep":
                keys.append(name + _REFERENCE_SUFFIX)
            if name in self.refine_layers:
                keys.append(REFINE_KEY)
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.count += 1

    def clear(self) -> None:
        super().clear()
        self._pending.clear()
        self._awaiting.clear()
        self._call_mode.clear()
        self._call_scores.clear()
        self._end_forward()

    def pending_layers(self) -> list[str]:
        """Cross layers whose call is in progress (per-head tensors held); empty between calls."""
        return list(self._pending)

    def awaiting_reference(self) -> list[str]:
        """Reference layers whose maps are held until the reference feature arrives (empty after a whole pass)."""
        return list(self._awaiting)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}:{tuple(e.sum.shape) if e.sum is not None else None}x{e.count}" for k, e in self._entries.items()
        )
        return f"HeadWeightedStore(head_method={self.head_method!r}, [{parts}])"


# -- read side (any AttentionStore holding these entries, e.g. after AttentionStore.load) ------------------------------


def _by_kind(store: AttentionStore, kind: str, batch_index: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in store:
        k, _, _ = store.info(key)
        if k == kind:
            out[key] = store.get(key, batch_index)
    return out


def cross_maps(store: AttentionStore, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """Head-weighted cross-attention per layer, ``{layer: (N_l, L) float32}``, in capture (forward) order; ``L`` is
    every text token, or the store's ``text_columns`` (then :func:`cross_rest` holds the others' sum)."""
    return _by_kind(store, CROSS_KIND, batch_index)


def cross_rest(store: AttentionStore, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """Per cross layer kept with ``text_columns``, the per-pixel sum of the other text columns, ``{layer: (N_l, 1)}``
    (empty when every column was kept)."""
    maps = _by_kind(store, REST_KIND, batch_index)
    return {k.removesuffix(_REST_SUFFIX): v for k, v in maps.items()}


def layer_scores_of(store: AttentionStore, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """G2's scores computed during capture, ``{self layer: () float32}`` (empty for stores that kept the maps)."""
    scores = _by_kind(store, SCORE_KIND, batch_index)
    return {k.removesuffix(_SCORE_SUFFIX): v.reshape(()) for k, v in scores.items()}


def reference_self_maps(store: AttentionStore, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """Head-mean self-attention per layer resized to the reference grid, ``{self layer: (n_r, n_r) float32}``, for
    stores made with ``reference_feature=None`` (and stores saved before layer scores)."""
    maps = _by_kind(store, REFERENCE_KIND, batch_index)
    return {k.removesuffix(_REFERENCE_SUFFIX): v for k, v in maps.items()}


def refine_affinity(store: AttentionStore, batch_index: int = 0) -> torch.Tensor | None:
    """G6's affinity ``S``: the mean over the refinement layers, ``(N, N) float32`` at the map grid, or None."""
    maps = _by_kind(store, REFINE_KIND, batch_index)
    return maps.get(REFINE_KEY)
