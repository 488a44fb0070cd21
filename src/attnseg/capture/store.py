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

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.errors import AttnSegError, ConfigError, StoreError
from attnseg.io.atomic import atomic_path
from attnseg.types import LayerInfo

if TYPE_CHECKING:
    from attnseg.capture.memory import MemoryItem

__all__ = ["AttentionStore", "read_store_file", "read_store_header", "save_store_file"]

_FORMAT = "attnseg.AttentionStore"
_FORMAT_VERSION = 1


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is a damaged attention store ({what}); delete it and capture it again "
                      "(segment --save-store, or evaluate --cache-stores)")


def parse_store_header(path: Path, text: str | None) -> dict[str, Any]:
    """The attnseg JSON header of a store file, checked: valid JSON, an object, an attnseg format, a known version."""
    if text is None:
        raise StoreError(f"{path} is a safetensors file but not an attnseg attention store (no attnseg header)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"its header is not valid JSON: {exc.msg}") from None
    if not isinstance(header, dict):
        raise _damaged(path, f"its header is a JSON {type(header).__name__}, not an object")
    fmt = header.get("format", _FORMAT)
    if not isinstance(fmt, str) or not fmt.startswith("attnseg."):
        raise _damaged(path, f"unknown format {fmt!r}")
    version = header.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _damaged(path, f"version {version!r} is not a number")
    if version > _FORMAT_VERSION:
        raise StoreError(f"{path} was written by a newer attnseg (format {version}); upgrade attnseg to read it")
    return header


def store_dtype(path: Path, name: Any) -> torch.dtype:
    """The torch dtype a header names (``"float32"``), or a :class:`StoreError`."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise _damaged(path, f"unknown dtype {name!r}")
    return dtype


@contextmanager
def header_fields(path: Path) -> Iterator[None]:
    """Turn a missing or malformed header field (KeyError, TypeError, ValueError...) into one :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except KeyError as exc:
        raise _damaged(path, f"its header lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise _damaged(path, f"a header field is malformed: {exc}") from None


def read_store_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The checked JSON header and the tensor shapes of a saved store, without reading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"attention store file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            text = (f.metadata() or {}).get("attnseg")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise StoreError(f"{path} is not a readable safetensors file ({_first_line(exc)}); give a store saved by "
                         "attnseg (segment --save-store)") from None
    return parse_store_header(path, text), shapes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def read_store_file(
    path: Path, *, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header and the tensors of a saved store (any store class), with clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"attention store file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header_text = (f.metadata() or {}).get("attnseg")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:  # safetensors raises its own error types
        raise StoreError(f"{path} is not a readable safetensors file ({_first_line(exc)}); give a store saved by "
                         "attnseg (segment --save-store)") from None
    return parse_store_header(path, header_text), tensors


def save_store_file(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write a store atomically: a temporary file in the same folder, then a rename (a crash or a full disk leaves
    the old file or none, never half a file). ``path`` keeps the suffix it was given; ``.safetensors`` is added
    only when it has none."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"attnseg": json.dumps(header)})
    return path


def _check_entry(path: Path, key: str, entry: _Entry) -> None:
    """A loaded entry must have its tensor (subclasses store other layouts, so the shape is theirs to check)."""
    if entry.sum is None:
        raise _damaged(path, f"entry {key!r} has no tensor")
    if entry.count < 0:
        raise _damaged(path, f"entry {key!r} has a negative count")


def _describe_key(key: str) -> str:
    """``"self/64x64"`` -> ``"self-attention at 64x64"``; a layer name stays as it is."""
    kind, sep, grid = key.partition("/")
    return f"{kind}-attention at {grid}" if sep else key


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
        device: where accumulators live (maps are moved there as they arrive). Put it on the device that runs the
            model (the pipeline does): accumulating there moves nothing to the host during the forward pass.
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
        from attnseg.devices import as_device

        self.device = as_device(device)  # "cuda" -> "cuda:<current>", so that it compares equal to tensors' devices
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
        """A zero accumulator, refused with a clear error when it cannot fit in the memory available on the
        store's device."""
        from attnseg.methods.ops import check_memory

        numel = 1
        for n in shape:
            numel *= n
        check_memory(numel * torch.empty((), dtype=self.dtype).element_size(), what, device=self.device)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def kept_batch(self, batch: int) -> int:
        """How many of a forward pass's ``batch`` items this store keeps (its ``batch`` slice applied)."""
        return len(range(batch)[self.batch]) if self.batch is not None else batch

    def memory_items(
        self, layers: Mapping[str, LayerInfo], *, batch: int = 1, text_tokens: int = 0
    ) -> list[MemoryItem]:
        """What this store will hold when ``layers`` are captured, from their shapes alone (nothing is allocated).

        Used by :func:`attnseg.capture.memory.estimate_capture` before the forward pass. Subclasses that keep other
        tensors override it.

        Args:
            layers: the layers that will be captured.
            batch: batch items of the forward pass (before the store's ``batch`` slice).
            text_tokens: length ``T`` of the text sequence (the keys of cross-attention).

        Returns:
            ``"kept"`` items: one accumulator per storage key, ``(B, Q, K)`` (or ``(B, H, Q, K)`` with
            ``heads="all"``) in the store's dtype.
        """
        from attnseg.capture.memory import MemoryItem, key_tokens, nbytes, query_tokens

        b = self.kept_batch(batch)
        shapes: dict[str, tuple[int, ...]] = {}
        for info in layers.values():
            q, k = query_tokens(info, text_tokens), key_tokens(info, text_tokens)
            shape = (b, q, k) if self.heads == "mean" else (b, info.heads, q, k)
            shapes.setdefault(self.key(info), shape)
        return [
            MemoryItem(f"the {_describe_key(key)} maps", nbytes(shape, self.dtype), "kept", str(self.device))
            for key, shape in shapes.items()
        ]

    def item(self, index: int) -> AttentionStore:
        """A store holding batch item ``index`` only, as views of this store's tensors (no copy).

        With a batch of images captured in one forward pass, ``store.item(i)`` is what a method reads to segment
        image ``i`` (methods read batch item 0).
        """
        new = copy.copy(self)
        new._entries = {
            key: replace(e, sum=None if e.sum is None else e.sum[index : index + 1]) for key, e in self._entries.items()
        }
        new.features = {name: v[index : index + 1] for name, v in self.features.items()}
        new._feature_counts = dict(self._feature_counts)
        new.layers = dict(self.layers)
        new.meta = dict(self.meta)
        new.batch = None
        return new

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
        """Write ``path`` in the safetensors format (the metadata JSON is embedded in its header), atomically.

        The file name is kept as given (``x.attn`` stays ``x.attn``); ``.safetensors`` is added only to a name
        without a suffix. Returns the path written.
        """
        return save_store_file(path, self._tensors(), self._header())

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
        with header_fields(path):
            meta = header.get("meta", {})
            if not isinstance(meta, dict):
                raise _damaged(path, "its meta is not an object")
            store = cls(
                heads=header["heads"],
                group=header["group"],
                dtype=store_dtype(path, header["dtype"]),
                device=device,
                meta=meta,
            )
            store.layers = {n: LayerInfo.from_dict(d) for n, d in header["layers"].items()}
            for name, count in header.get("features", {}).items():
                store.features[name] = tensors[f"feature:{name}"]
                store._feature_counts[name] = int(count)
            for key, d in header["entries"].items():
                grid = (int(d["grid"][0]), int(d["grid"][1]))
                entry = _Entry(kind=str(d["kind"]), grid=grid, layers=list(d["layers"]), sum=tensors.get(key),
                               count=int(d["count"]), partial=bool(d.get("partial", False)))
                _check_entry(path, key, entry)
                store._entries[key] = entry
        return store

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}:{tuple(e.sum.shape) if e.sum is not None else None}x{e.count}" for k, e in self._entries.items()
        )
        return f"AttentionStore(heads={self.heads!r}, group={self.group!r}, [{parts}])"
