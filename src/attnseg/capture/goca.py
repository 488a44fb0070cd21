"""HeadWeightedStore: GoCA's capture store, which weights heads per pixel as maps arrive.

For a cross-attention layer the probabilities of one call arrive in chunks of heads together with the heads'
outputs ``A_h V_h``. GoCA's head weights (G1, :func:`attnseg.methods.goca.head_weights`) need every head's output,
so the chunks of **one** call are kept (``(B, H, N, T)`` and ``(B, H, N, d)``: 10 + 5 MiB for an SD 1.5 64x64
layer), combined at :meth:`HeadWeightedStore.end_call` into one head-weighted ``(B, N, T)`` map, and dropped. No
per-head map outlives its call.

Self-attention is reduced on arrival, chunk by chunk (head mean, then a linear resize), into:

- one map per layer at the reference feature's grid, for G2's layer weights (key ``"<layer>@reference"``);
- one mean over the refinement layers at the aggregation grid, for G6 (key ``"refine"``).

Both are ``KeyUp``/``QueryTile`` resizes without renormalisation (``METHODS.md`` §3 G2, G6). Entries keep running
means over calls (denoising steps), save and load like any :class:`~attnseg.capture.store.AttentionStore`, and the
read helpers :func:`cross_maps`, :func:`reference_self_maps` and :func:`refine_affinity` work on a store loaded with
either class.
"""

from __future__ import annotations

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
    "HeadWeightedStore",
    "cross_maps",
    "reference_self_maps",
    "refine_affinity",
]

CROSS_KIND = "cross"
REFERENCE_KIND = "self@reference"
REFINE_KIND = "self@refine"
REFINE_KEY = "refine"
_REFERENCE_SUFFIX = "@reference"


@dataclass
class _Pending:
    """Per-head tensors of one call of one cross layer (freed at ``end_call``)."""

    probs: torch.Tensor  # (B, H, N, T)
    outputs: torch.Tensor  # (B, H, N, d)
    seen: torch.Tensor  # (H,) bool


class HeadWeightedStore(AttentionStore):
    """Capture store for GoCA: per-pixel head-weighted cross maps, reduced self maps, the reference feature.

    Args:
        out_weights: per cross layer name, ``to_out[0].weight`` ``(C, H * d)`` (needed unless ``head_method`` is
            ``"average"``); kept by reference, not copied.
        head_method: G1 method (see :data:`attnseg.methods.goca.HEAD_METHODS`).
        reference_layers: self layers kept (resized to ``reference_grid``) for G2's layer weights.
        reference_grid: ``(h, w)`` of the reference feature.
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
        # Per-head outputs are only needed to weight heads by their contribution.
        self.wants_outputs = head_method != "average"
        self._pending: dict[str, _Pending] = {}
        self._pending_self: dict[str, torch.Tensor] = {}

    # -- write side --------------------------------------------------------------------------------------------------

    def _entry(self, key: str, kind: str, grid: tuple[int, int], layer: str, shape: tuple[int, ...]) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(kind=kind, grid=grid, layers=[])
        if layer not in entry.layers:
            entry.layers.append(layer)
        if entry.sum is None:
            entry.sum = self._zeros(shape, f"the maps of {key}")
        elif tuple(entry.sum.shape) != shape:
            raise AttnSegError(
                f"{layer}: a map of shape {shape} does not match the {tuple(entry.sum.shape)} already stored under "
                f"{key!r}; use a new store for a new input size or batch"
            )
        return entry

    def memory_items(
        self, layers: Mapping[str, LayerInfo], *, batch: int = 1, text_tokens: int = 0
    ) -> list[MemoryItem]:
        """The store's tensors for a capture of ``layers``, from shapes (see ``AttentionStore.memory_items``).

        Kept: one head-weighted ``(B, N, T)`` map per cross layer, one ``(B, n_r, n_r)`` map per reference layer,
        one ``(B, n_g, n_g)`` refinement affinity. Per call (transient): a cross layer's per-head probabilities and
        outputs ``(B, H, N, T)`` + ``(B, H, N, d)`` and the head-weight products; a self layer's head mean
        ``(B, N, N)`` and its resized copies.
        """
        from attnseg.capture.memory import MemoryItem, nbytes

        b = self.kept_batch(batch)
        dev = str(self.device)
        items: list[MemoryItem] = []
        refine_n = 0
        for info in layers.values():
            n = info.num_tokens
            if info.kind == "cross":
                kept = nbytes((b, n, text_tokens), self.dtype)
                items.append(MemoryItem(f"the head-weighted maps of {info.name}", kept, "kept", dev))
                if self.head_method != "average":
                    c = info.heads * info.head_dim
                    per_call = nbytes((b, info.heads, n, text_tokens)) + nbytes((b, info.heads, n, info.head_dim))
                    per_call += 2 * nbytes((b, n, c)) + 2 * nbytes((b, info.heads, n)) + nbytes((b, n, text_tokens))
                    items.append(MemoryItem(f"the per-head maps and outputs of one call of {info.name}", per_call,
                                            "capture", dev, info.name))
            elif info.kind == "self" and (info.name in self.reference_layers or info.name in self.refine_layers):
                per_call = nbytes((b, n, n))
                targets = ((self.reference_layers, self.reference_grid), (self.refine_layers, self.refine_grid))
                for wanted, grid in targets:
                    if info.name in wanted and grid is not None:
                        g = grid[0] * grid[1]
                        per_call += nbytes((b, g, n)) + 2 * nbytes((b, g, g))
                items.append(MemoryItem(f"the head mean of one call of {info.name} and its resized copies", per_call,
                                        "capture", dev, info.name))
                if info.name in self.reference_layers and self.reference_grid is not None:
                    g = self.reference_grid[0] * self.reference_grid[1]
                    items.append(MemoryItem(f"the reference-grid map of {info.name}", nbytes((b, g, g), self.dtype),
                                            "kept", dev))
                if info.name in self.refine_layers and self.refine_grid is not None:
                    refine_n = self.refine_grid[0] * self.refine_grid[1]
        if refine_n:
            affinity = nbytes((b, refine_n, refine_n), self.dtype)
            items.append(MemoryItem("the refinement affinity", affinity, "kept", dev))
        return items

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

    def _add_cross(
        self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None, queries: slice
    ) -> None:
        b, t = probs.shape[0], probs.shape[-1]
        n = layer.num_tokens
        if self.head_method == "average":
            entry = self._entry(layer.name, CROSS_KIND, layer.grid, layer.name, (b, n, t))
            assert entry.sum is not None
            entry.sum[:, queries] += (probs.sum(1) / layer.heads).to(self.device, self.dtype)
            return
        if out is None:
            raise AttnSegError(f"{layer.name}: head method {self.head_method!r} needs the heads' outputs; "
                               "trace with want_outputs=True (the tracer reads the store's wants_outputs)")
        if layer.name not in self.out_weights:
            raise AttnSegError(f"{layer.name}: no to_out weight was given to the store for this cross layer")
        pending = self._pending.get(layer.name)
        if pending is None:
            d = out.shape[-1]
            pending = self._pending[layer.name] = _Pending(
                probs=torch.empty((b, layer.heads, n, t), dtype=torch.float32, device=self.device),
                outputs=torch.empty((b, layer.heads, n, d), dtype=torch.float32, device=self.device),
                seen=torch.zeros(layer.heads, dtype=torch.bool),
            )
        pending.probs[:, heads, queries] = probs.to(self.device, torch.float32)
        pending.outputs[:, heads, queries] = out.to(self.device, torch.float32)
        if queries.stop is None or queries.stop >= n:  # the last block of rows of these heads
            pending.seen[heads] = True

    def _add_self(self, layer: LayerInfo, probs: torch.Tensor, queries: slice) -> None:
        if layer.name not in self.reference_layers and layer.name not in self.refine_layers:
            return
        # head mean of this call, block by block; resized at end_call, when every query row is there
        b, n = probs.shape[0], layer.num_tokens
        mean = self._pending_self.get(layer.name)
        if mean is None:
            mean = self._pending_self[layer.name] = self._zeros((b, n, n), f"the self-attention of {layer.name}")
        mean[:, queries] += (probs.sum(1) / layer.heads).to(self.device, torch.float32)

    def _finish_self(self, layer: LayerInfo, mean: torch.Tensor) -> None:
        from attnseg.methods.goca import resize_self_attention

        in_ref = layer.name in self.reference_layers
        in_refine = layer.name in self.refine_layers
        b = mean.shape[0]
        if in_ref:
            assert self.reference_grid is not None
            g = self.reference_grid
            reduced = resize_self_attention(mean, layer.grid, g)
            n = g[0] * g[1]
            entry = self._entry(layer.name + _REFERENCE_SUFFIX, REFERENCE_KIND, g, layer.name, (b, n, n))
            assert entry.sum is not None
            entry.sum += reduced.to(self.dtype)
        if in_refine:
            assert self.refine_grid is not None
            g = self.refine_grid
            reduced = resize_self_attention(mean, layer.grid, g)
            n = g[0] * g[1]
            entry = self._entry(REFINE_KEY, REFINE_KIND, g, layer.name, (b, n, n))
            assert entry.sum is not None
            entry.sum += reduced.to(self.dtype)

    def end_call(self, layer: LayerInfo) -> None:
        """Finish one call of ``layer``: combine the heads of a cross layer, then advance the running means."""
        pending_self = self._pending_self.pop(layer.name, None)
        if pending_self is not None:
            self._finish_self(layer, pending_self)
            del pending_self
        pending = self._pending.pop(layer.name, None)
        if pending is not None:
            from attnseg.methods.goca import head_weights

            if not bool(pending.seen.all()):
                raise AttnSegError(f"{layer.name}: the call ended before every head arrived")
            w = head_weights(pending.outputs, self.out_weights[layer.name], method=self.head_method)  # (B, H, N)
            weighted = torch.einsum("bhn,bhnt->bnt", w, pending.probs)
            del pending
            b, n, t = weighted.shape
            entry = self._entry(layer.name, CROSS_KIND, layer.grid, layer.name, (b, n, t))
            assert entry.sum is not None
            entry.sum += weighted.to(self.dtype)
        keys = []
        if layer.kind == "cross":
            keys.append(layer.name)
        else:
            if layer.name in self.reference_layers:
                keys.append(layer.name + _REFERENCE_SUFFIX)
            if layer.name in self.refine_layers:
                keys.append(REFINE_KEY)
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.count += 1

    def clear(self) -> None:
        super().clear()
        self._pending.clear()

    def pending_layers(self) -> list[str]:
        """Layers whose call is in progress (per-head tensors held); empty between calls."""
        return list(self._pending)

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
    """Head-weighted cross-attention per layer, ``{layer: (N_l, T) float32}``, in capture (forward) order."""
    return _by_kind(store, CROSS_KIND, batch_index)


def reference_self_maps(store: AttentionStore, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """Head-mean self-attention per layer resized to the reference grid, ``{self layer: (n_r, n_r) float32}``."""
    maps = _by_kind(store, REFERENCE_KIND, batch_index)
    return {k.removesuffix(_REFERENCE_SUFFIX): v for k, v in maps.items()}


def refine_affinity(store: AttentionStore, batch_index: int = 0) -> torch.Tensor | None:
    """G6's affinity ``S``: the mean over the refinement layers, ``(N, N) float32`` at the map grid, or None."""
    maps = _by_kind(store, REFINE_KIND, batch_index)
    return maps.get(REFINE_KEY)
