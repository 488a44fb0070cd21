"""AttentionStore: reduces attention probabilities as they arrive and keeps only what is asked for.

Maps arrive from :class:`~attnseg.capture.processor.CaptureProcessor` one chunk of heads at a time,
as float32 probabilities ``(B, h, Q, K)`` (rows sum to 1). The store reduces them on write:

- over heads (``heads="mean"``, the default) or keeps them (``heads="all"``);
- over layers of one kind and grid (``group="resolution"``) or keeps one map per layer (``group="layer"``);
- over calls (denoising steps) as a running mean.

So DiffSeg's 16 self-attention layers of SD1.5 at 512 px cost one (4096, 4096) map at 64x64 plus three
smaller ones, never 16 x 8 full maps.

Parts of joint-attention layers (MMDiT) arrive as ``self``/``cross`` maps whose rows are slices of a larger
softmax (``LayerInfo.rows_sum_to_one`` is False). They are stored as they come (raw) and the entry records it;
:meth:`AttentionStore.by_resolution` (and so ``self_attention()``/``cross_attention()``) renormalises such maps
per query row over the keys it holds, so its readers keep getting rows that sum to 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from attnseg.errors import AttnSegError, ConfigError
from attnseg.types import LayerInfo

__all__ = ["AttentionStore"]

_FORMAT = "attnseg.AttentionStore"
_FORMAT_VERSION = 1


def read_store_file(
    path: Path, *, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header and the tensors of a saved store (any store class), with clear errors."""
    from safetensors import safe_open

    if not path.is_file():
        raise AttnSegError(f"attention store file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header_text = (f.metadata() or {}).get("attnseg")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:  # safetensors raises its own error types
        raise AttnSegError(f"{path} is not a readable safetensors file: {exc}") from None
    if header_text is None:
        raise AttnSegError(f"{path} is a safetensors file but not an attnseg attention store")
    header = json.loads(header_text)
    if header.get("version", 0) > _FORMAT_VERSION:
        raise AttnSegError(f"{path} was written by a newer attnseg (format {header['version']})")
    return header, tensors


@dataclass
class _Entry:
    kind: str
    grid: tuple[int, int]
    layers: list[str]
    sum: torch.Tensor | None = None  # (B, Q, K) or (B, H, Q, K)
    count: int = 0
    partial: bool = False  # rows are slices of a larger softmax (joint attention): they do not sum to 1


class AttentionStore:
    """Accumulates reduced attention maps; saved and loaded as safetensors + JSON metadata.

    Args:
        heads: ``"mean"`` averages heads as they arrive; ``"all"`` keeps ``(B, H, Q, K)``.
        group: ``"layer"`` keeps one map per layer; ``"resolution"`` averages all layers of one kind
            (self/cross) and grid into one map as they arrive.
        batch: which batch items to keep, e.g. ``slice(1, 2)`` for the conditional half of a
            classifier-free-guidance batch of 2; None keeps all.
        dtype: storage dtype of the accumulators (float32 by default; float16 halves memory).
        device: where accumulators live (maps are moved there as they arrive).
        meta: free-form JSON-able metadata saved with the store (image size, prompt, timestep...).

    Example:
        >>> store = AttentionStore(group="resolution")
        >>> info = LayerInfo("a.attn1", "self", (2, 2), heads=2, head_dim=4, position="down", index=0, block="a")
        >>> store.add(info, torch.full((1, 2, 4, 4), 0.25))
        >>> store.self_attention()[2].shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        *,
        heads: Literal["mean", "all"] = "mean",
        group: Literal["layer", "resolution"] = "layer",
        batch: slice | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if heads not in ("mean", "all"):
            raise ConfigError(f"heads must be 'mean' or 'all', got {heads!r}")
        if group not in ("layer", "resolution"):
            raise ConfigError(f"group must be 'layer' or 'resolution', got {group!r}")
        self.heads = heads
        self.group = group
        self.batch = batch
        self.dtype = dtype
        self.device = torch.device(device)
        self.meta: dict[str, Any] = dict(meta or {})
        self.layers: dict[str, LayerInfo] = {}
        self._entries: dict[str, _Entry] = {}
        self.features: dict[str, torch.Tensor] = {}
        self._feature_counts: dict[str, int] = {}

    # -- write side (called by capture processors) ----------------------------------------------
    def key(self, layer: LayerInfo) -> str:
        """Storage key of a layer: its name, or ``"<kind>/<h>x<w>"`` when grouping by resolution."""
        if self.group == "layer":
            return layer.name
        return f"{layer.kind}/{layer.grid[0]}x{layer.grid[1]}"

    def add_chunk(
        self,
        layer: LayerInfo,
        probs: torch.Tensor,
        heads: slice,
        out: torch.Tensor | None = None,
        *,
        queries: slice = slice(None),
    ) -> None:
        """Accumulate probabilities of heads ``heads`` and query rows ``queries`` of one call of ``layer``.

        Args:
            probs: ``(B, h, q, K)`` float32, rows sum to 1; ``h = heads.stop - heads.start``.
            heads: which of the layer's heads these are.
            out: ``(B, h, q, d)`` the heads' outputs ``probs @ v`` (unused here; for subclasses).
            queries: which query rows these are (all by default).
        """
        if self.batch is not None:
            probs = probs[self.batch]
        key = self.key(layer)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(kind=layer.kind, grid=layer.grid, layers=[])
        if layer.name not in entry.layers:
            entry.layers.append(layer.name)
            self.layers[layer.name] = layer
        entry.partial = entry.partial or not layer.rows_sum_to_one
        b, k = probs.shape[0], probs.shape[-1]
        q = layer.num_queries
        if entry.sum is None:
            shape = (b, q, k) if self.heads == "mean" else (b, layer.heads, q, k)
            entry.sum = self._zeros(shape, f"the attention maps of {key}")
        elif entry.sum.shape[0] != b or entry.sum.shape[-2:] != (q, k):
            raise AttnSegError(
                f"attention of {layer.name} has {b} x {q} x {k} maps, which do not match the maps already "
                f"stored under {key!r} {tuple(entry.sum.shape)}; use a new store for a new input size or batch"
            )
        if self.heads == "mean":
            target = entry.sum[:, queries]
            if probs.device == self.device and probs.dtype == self.dtype:
                for i in range(probs.shape[1]):  # in place, no (B, q, K) temporary per head
                    target.add_(probs[:, i], alpha=1.0 / layer.heads)
            else:
                target += (probs.sum(1) / layer.heads).to(self.device, self.dtype)
        else:
            if self.group == "resolution" and entry.sum.shape[1] != layer.heads:
                raise ConfigError(f"heads='all' with group='resolution' needs equal head counts at {key}")
            entry.sum[:, heads, queries] += probs.to(self.device, self.dtype)

    def _zeros(self, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """A zero accumulator, refused with a clear error when it cannot fit in the memory available."""
        if self.device.type == "cpu":
            from attnseg.methods.ops import check_memory

            numel = 1
            for n in shape:
                numel *= n
            check_memory(numel * torch.empty((), dtype=self.dtype).element_size(), what)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def end_call(self, layer: LayerInfo) -> None:
        """Mark one call of ``layer`` (all heads) as complete: the running mean's count grows by one."""
        entry = self._entries.get(self.key(layer))
        if entry is not None:
            entry.count += 1

    def add_feature(self, name: str, value: torch.Tensor) -> None:
        """Keep the running mean of a module's output (``(B, N, C)``), e.g. a reference feature."""
        value = value.detach().to(self.device, torch.float32)
        if self.batch is not None:
            value = value[self.batch]
        n = self._feature_counts.get(name, 0)
        self.features[name] = value if n == 0 else self.features[name] + (value - self.features[name]) / (n + 1)
        self._feature_counts[name] = n + 1

    def add(self, layer: LayerInfo, probs: torch.Tensor) -> None:
        """Add a whole call at once: ``probs (B, H, Q, K)`` with all heads of ``layer``."""
        if probs.ndim != 4 or probs.shape[1] != layer.heads or probs.shape[2] != layer.num_queries:
            expected = f"(B, {layer.heads}, Q = {layer.num_queries}, K)"
            raise ConfigError(f"probs must be {expected} for {layer.name}, got {tuple(probs.shape)}")
        self.add_chunk(layer, probs.float(), slice(0, layer.heads))
        self.end_call(layer)

    # -- read side ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.layers.clear()

    def get(self, key: str, batch_index: int | None = 0) -> torch.Tensor:
        """The running mean stored under ``key``: ``(Q, K)`` (or ``(H, Q, K)`` with heads="all") for one
        batch item, or with the batch axis first when ``batch_index`` is None."""
        try:
            entry = self._entries[key]
        except KeyError:
            stored = ", ".join(self._entries) or "none"
            raise AttnSegError(f"no attention stored under {key!r}; stored: {stored}") from None
        if entry.sum is None or entry.count == 0:
            raise AttnSegError(f"attention under {key!r} is incomplete (no finished call)")
        mean = entry.sum.float() / entry.count
        return mean if batch_index is None else mean[batch_index]

    def info(self, key: str) -> tuple[str, tuple[int, int], list[str]]:
        """``(kind, grid, layer names)`` of a key."""
        e = self._entries[key]
        return e.kind, e.grid, list(e.layers)

    def by_resolution(self, kind: str, batch_index: int | None = 0) -> dict[int, torch.Tensor]:
        """Maps of ``kind`` averaged over layers per resolution: ``{r: (N_r, K)}``, largest r first.

        With ``group="layer"`` the per-layer means are averaged here (each layer weighs the same, as
        with ``group="resolution"``). Where the maps are parts of joint attention (rows do not sum to 1), the
        mean is renormalised per query row over its keys (the image tokens of a self map, the text tokens of a
        cross map).
        """
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        partial: set[int] = set()
        for key, e in self._entries.items():
            if e.kind != kind or e.count == 0:
                continue
            r, n = max(e.grid), len(e.layers)
            weighted = self.get(key, batch_index) * n  # an entry's mean covers n layers
            sums[r] = weighted if r not in sums else sums[r] + weighted
            counts[r] = counts.get(r, 0) + n
            if e.partial:
                partial.add(r)
        out = {}
        for r in sorted(sums, reverse=True):
            m = sums[r] / counts[r]
            if r in partial:
                m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            out[r] = m
        return out

    def is_partial(self, key: str) -> bool:
        """Whether the rows stored under ``key`` are slices of a larger softmax (they do not sum to 1)."""
        return self._entries[key].partial

    def self_attention(self, batch_index: int | None = 0) -> dict[int, torch.Tensor]:
        """Self-attention per resolution r: ``{r: (N_r, N_r)}`` float32 (rows sum to 1), mean over heads and layers
        (image->image parts of joint layers renormalised per row)."""
        return self.by_resolution("self", batch_index)

    def cross_attention(self, batch_index: int | None = 0) -> dict[int, torch.Tensor]:
        """Cross-attention per resolution r: ``{r: (N_r, T)}`` float32 (rows sum to 1), mean over heads and layers
        (image->text parts of joint layers renormalised per pixel over the text tokens)."""
        return self.by_resolution("cross", batch_index)

    def grid(self, resolution: int) -> tuple[int, int]:
        for e in self._entries.values():
            if max(e.grid) == resolution:
                return e.grid
        raise AttnSegError(f"no attention stored at resolution {resolution}")

    def nbytes(self) -> int:
        return sum(e.sum.numel() * e.sum.element_size() for e in self._entries.values() if e.sum is not None)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``; the metadata JSON is embedded in its header)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(path), metadata={"attnseg": json.dumps(self._header())})
        return path

    def _tensors(self) -> dict[str, torch.Tensor]:
        """What :meth:`save` writes as tensors (subclasses add their own)."""
        tensors = {key: e.sum.contiguous() for key, e in self._entries.items() if e.sum is not None}
        tensors.update({f"feature:{name}": v.contiguous() for name, v in self.features.items()})
        return tensors

    def _header(self) -> dict[str, Any]:
        """What :meth:`save` writes as JSON metadata (subclasses extend it)."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "heads": self.heads,
            "group": self.group,
            "dtype": str(self.dtype).removeprefix("torch."),
            "entries": {
                key: {"kind": e.kind, "grid": list(e.grid), "layers": e.layers, "count": e.count,
                      **({"partial": True} if e.partial else {})}
                for key, e in self._entries.items()
            },
            "layers": {name: info.to_dict() for name, info in self.layers.items()},
            "features": dict(self._feature_counts),
            "meta": self.meta,
        }

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> AttentionStore:
        """Read a store written by :meth:`save`."""
        path = Path(path)
        header, tensors = read_store_file(path, device=device)
        store = cls(
            heads=header["heads"],
            group=header["group"],
            dtype=getattr(torch, header["dtype"]),
            device=device,
            meta=header.get("meta", {}),
        )
        store.layers = {n: LayerInfo.from_dict(d) for n, d in header["layers"].items()}
        for name, count in header.get("features", {}).items():
            store.features[name] = tensors[f"feature:{name}"]
            store._feature_counts[name] = int(count)
        for key, d in header["entries"].items():
            store._entries[key] = _Entry(
                kind=d["kind"], grid=(d["grid"][0], d["grid"][1]), layers=list(d["layers"]),
                sum=tensors.get(key), count=int(d["count"]), partial=bool(d.get("partial", False)),
            )
        return store

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}:{tuple(e.sum.shape) if e.sum is not None else None}x{e.count}" for k, e in self._entries.items()
        )
        return f"AttentionStore(heads={self.heads!r}, group={self.group!r}, [{parts}])"
