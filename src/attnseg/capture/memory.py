"""How much memory a capture will take, from the layers' shapes alone, checked before the forward pass.

A capture holds, at its peak:

- **kept** tensors, from the first captured layer until the result is made: the store's accumulators (every
  selected layer at once where they coexist: one map per storage key), per-head component maps, features;
- **capture** transients of one layer call (layers run one after another, so only the largest call counts):
  one block of float32 scores and probabilities (:func:`~attnseg.capture.processor.block_plan`, counted three
  times: scores, probabilities and one store-side temporary), the float32 copy of the queries under fp16/bf16, the
  layer's per-head outputs, and the per-head buffers of stores that need every head of a call (GoCA's head
  weights, the PCA store's head blocks);
- **post-processing** transients of the method (after the forward pass): reading the store (float32 copies of
  its maps) and method-specific tensors such as DiffSeg's and the target method's ``(R, R, R, R)`` aggregate.

Peak = kept + max(largest capture call, post-processing), per device (a few items, e.g. scikit-learn's k-means
input, live on the host). The model's own weights and activations are not counted: the check leaves room for
them (:func:`attnseg.devices.default_check_fraction`).

:func:`estimate_capture` builds the estimate; :meth:`CaptureEstimate.check` refuses it, with one line that names
the size and the fix, when it does not fit in the memory available on its device. The pipeline calls both before
the image is even encoded.

Stores describe their own tensors (``AttentionStore.memory_items``, overridden by the per-method stores); methods'
post-processing is described here, per method name (:func:`register_post_estimate`), so that a new method adds
its estimate with a few lines.

Example:
    >>> from attnseg.capture.store import AttentionStore
    >>> from attnseg.types import LayerInfo
    >>> info = LayerInfo("a.attn1", "self", (64, 64), heads=8, head_dim=40, position="up", index=0, block="a")
    >>> est = estimate_capture(AttentionStore(group="resolution"), {info.name: info}, text_tokens=77)
    >>> est.kept_bytes() == 4096 * 4096 * 4
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.errors import AttnSegError

if TYPE_CHECKING:
    from attnseg.capture.store import AttentionStore
    from attnseg.types import LayerInfo

__all__ = [
    "CaptureEstimate",
    "MemoryItem",
    "check_capture_memory",
    "estimate_capture",
    "key_tokens",
    "nbytes",
    "query_tokens",
    "register_post_estimate",
]

Phase = Literal["kept", "capture", "post"]

#: (method, store, selected layers, batch, text tokens) -> post-processing items
PostEstimate = Callable[[Any, "AttentionStore", Mapping[str, "LayerInfo"], int, int], list["MemoryItem"]]

_POST_ESTIMATES: dict[str, PostEstimate] = {}

#: Scores, probabilities and one store-side temporary of one block exist at once.
_BLOCKS_AT_ONCE = 3


@dataclass(frozen=True)
class MemoryItem:
    """One tensor (or group of tensors) of the estimate.

    Attributes:
        what: what it is, for messages (``"the self-attention at 64x64 maps"``).
        nbytes: its size in bytes.
        phase: ``"kept"`` (for the whole capture and post-processing), ``"capture"`` (transient during the largest
            layer call) or ``"post"`` (transient during post-processing).
        device: where it lives (``"cpu"``, ``"cuda:0"``...).
        layer: for ``"capture"`` items of a store, the layer whose call holds it (only the largest call counts).
    """

    what: str
    nbytes: int
    phase: Phase
    device: str = "cpu"
    layer: str = ""


def nbytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    numel = 1
    for n in shape:
        numel *= int(n)
    return numel * torch.empty((), dtype=dtype).element_size()


def key_tokens(layer: LayerInfo, text_tokens: int) -> int:
    """Keys a layer's maps have: its image tokens (self, and the text->image part of a joint layer), the text tokens
    (cross, and the image->text part), both (a whole joint layer: its softmax runs over ``N + T`` keys)."""
    t = int(text_tokens) or layer.text_tokens
    if layer.kind in ("self", "reverse"):
        return layer.num_tokens
    if layer.kind == "cross":
        return t
    return layer.num_tokens + t


def query_tokens(layer: LayerInfo, text_tokens: int) -> int:
    """Query rows a layer's maps have: the text tokens for the text->image part of a joint layer, else the image
    tokens."""
    return (int(text_tokens) or layer.text_tokens) if layer.kind == "reverse" else layer.num_tokens


def register_post_estimate(name: str) -> Callable[[PostEstimate], PostEstimate]:
    """Register the post-processing estimate of the method registered as ``name``."""

    def deco(fn: PostEstimate) -> PostEstimate:
        _POST_ESTIMATES[name] = fn
        return fn

    return deco


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class CaptureEstimate:
    """The memory a capture will hold, item by item (see the module docstring for how items combine).

    Attributes:
        items: every item.
        device: the device of the forward pass.
        layers: number of captured layers.
    """

    items: tuple[MemoryItem, ...]
    device: str
    layers: int = 0
    notes: tuple[str, ...] = field(default=())

    def devices(self) -> list[str]:
        """Devices that hold items, the forward pass's first."""
        found = [self.device]
        for it in self.items:
            if it.device not in found:
                found.append(it.device)
        return found

    def _phase(self, phase: Phase, device: str | None) -> list[MemoryItem]:
        dev = self.device if device is None else device
        return [it for it in self.items if it.phase == phase and it.device == dev]

    def kept_bytes(self, device: str | None = None) -> int:
        """Bytes kept for the whole capture on ``device`` (default: the forward pass's)."""
        return sum(it.nbytes for it in self._phase("kept", device))

    def capture_bytes(self, device: str | None = None) -> int:
        """Transient bytes of the largest layer call."""
        return sum(it.nbytes for it in self._phase("capture", device))

    def post_bytes(self, device: str | None = None) -> int:
        """Transient bytes of the post-processing."""
        return sum(it.nbytes for it in self._phase("post", device))

    def peak_bytes(self, device: str | None = None) -> int:
        """Kept + max(capture, post-processing) on ``device`` (default: the forward pass's)."""
        return self.kept_bytes(device) + max(self.capture_bytes(device), self.post_bytes(device))

    def largest(self, device: str | None = None) -> MemoryItem | None:
        """The largest item on ``device``."""
        dev = self.device if device is None else device
        on = [it for it in self.items if it.device == dev]
        return max(on, key=lambda it: it.nbytes) if on else None

    def check(self, what: str = "capturing attention", *, fraction: float | None = None) -> None:
        """Refuse (``AttnSegError``, one line naming the size and the fix) when the peak does not fit on a device.

        Args:
            what: the work, for the message (e.g. ``"capturing attention at 4096x4096 px"``).
            fraction: share of the available memory allowed (default per device, see
                :func:`attnseg.methods.ops.check_memory`).
        """
        from attnseg.methods.ops import check_memory

        for dev in self.devices():
            peak = self.peak_bytes(dev)
            if peak == 0:
                continue
            big = self.largest(dev)
            detail = f" (largest: {big.what}, {_format_bytes(big.nbytes)})" if big is not None else ""
            check_memory(peak, f"{what}{detail}", device=dev, fraction=fraction)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary: per device kept / capture / post / peak bytes, and every item."""
        return {
            "device": self.device,
            "layers": self.layers,
            "per_device": {
                dev: {
                    "kept_bytes": self.kept_bytes(dev), "capture_bytes": self.capture_bytes(dev),
                    "post_bytes": self.post_bytes(dev), "peak_bytes": self.peak_bytes(dev),
                }
                for dev in self.devices()
            },
            "items": [{"what": it.what, "bytes": it.nbytes, "phase": it.phase, "device": it.device}
                      for it in self.items],
            "notes": list(self.notes),
        }


def _takes_query_blocks(store: Any) -> bool:
    return "queries" in inspect.signature(store.add_chunk).parameters


def _processor_items(
    layers: Mapping[str, LayerInfo],
    *,
    batch: int,
    text_tokens: int,
    model_dtype: torch.dtype,
    chunk_bytes: int | None,
    device: torch.device,
    split_queries: bool,
    want_outputs: bool,
) -> list[MemoryItem]:
    """The capture processors' transients of the largest layer call.

    A part of a joint layer (``"<module>:self"``...) is captured by the module's one call, which computes the
    softmax over the whole joint key set, ``N + T`` keys, for the image rows and then the text rows
    (:class:`~attnseg.capture.joint.JointCaptureProcessor`); the parts of one module count once.
    """
    from attnseg.capture.processor import block_plan

    half = model_dtype in (torch.float16, torch.bfloat16)
    calls: dict[str, tuple[LayerInfo, list[int], int, int]] = {}  # module -> (info, query groups, keys, rows)
    for info in layers.values():
        if info.part:  # one joint call per module, whatever parts it feeds
            t = int(text_tokens) or info.text_tokens
            n = info.num_tokens
            calls.setdefault(info.module_name, (info, [n, t], n + t, n + t))
        else:
            k = key_tokens(info, text_tokens)
            calls[info.name] = (info, [info.num_tokens], k, info.num_tokens)
    best: tuple[int, list[MemoryItem]] = (0, [])
    for name, (info, groups, k, rows_all) in calls.items():
        blocks = []
        for rows in groups:
            if rows <= 0:
                continue
            heads, q_rows = block_plan(
                batch, info.heads, rows, k, chunk_bytes=chunk_bytes, device_type=device.type,
                split_queries=split_queries,
            )
            blocks.append((heads, q_rows))
        heads, rows = max(blocks, key=lambda hr: hr[0] * hr[1])
        block = nbytes((batch, heads, rows, k))
        items = [MemoryItem(f"blocks of float32 scores and probabilities of {name}",
                            _BLOCKS_AT_ONCE * block, "capture", str(device))]
        per_head = (batch, info.heads, rows_all, info.head_dim)
        items.append(MemoryItem(f"the per-head outputs of {name}", nbytes(per_head, model_dtype),
                                "capture", str(device)))
        if half:
            items.append(MemoryItem(f"the float32 queries of {name}", nbytes(per_head), "capture", str(device)))
        if want_outputs:
            items.append(MemoryItem(f"a block of per-head outputs of {name}",
                                    nbytes((batch, heads, rows, info.head_dim), model_dtype), "capture", str(device)))
        total = sum(it.nbytes for it in items)
        if total > best[0]:
            best = (total, items)
    return best[1]


def _largest_call(items: list[MemoryItem]) -> list[MemoryItem]:
    """Keep the ``kept`` and ``post`` items and, of the ``capture`` items, those of the layer whose call holds the
    most (layers run one after another)."""
    out = [it for it in items if it.phase != "capture"]
    groups: dict[str, list[MemoryItem]] = {}
    for it in items:
        if it.phase == "capture":
            groups.setdefault(it.layer, []).append(it)
    if groups:
        out += max(groups.values(), key=lambda g: sum(it.nbytes for it in g))
    return out


def estimate_capture(
    store: AttentionStore,
    layers: Mapping[str, LayerInfo],
    *,
    batch: int = 1,
    text_tokens: int = 0,
    model_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_bytes: int | None = None,
    want_outputs: bool | None = None,
    method: Any = None,
) -> CaptureEstimate:
    """The memory a capture of ``layers`` into ``store`` will need, from shapes alone (nothing is allocated).

    Args:
        store: the (empty) store the capture will fill; it describes its own tensors (``memory_items``).
        layers: the layers that will be captured (e.g. ``{n: layers[n] for n in method.select_layers(layers)}``);
            a whole joint layer counts as its parts, as the tracer captures it.
            The processor's largest call and the store's largest call are added even when they are different
            layers (an upper bound).
        batch: batch items of the forward pass (2 for a classifier-free-guidance batch).
        text_tokens: length ``T`` of the text sequence (keys of cross-attention).
        model_dtype: the denoiser's dtype (fp16/bf16 queries are copied to float32 for the scores).
        device: where the forward pass runs (default: the store's device).
        chunk_bytes: the tracer's ``chunk_bytes`` (None: the processor's per-device default).
        want_outputs: whether per-head outputs go to the store (default: the store's ``wants_outputs``).
        method: the segmentation method, for its post-processing (looked up by its ``name``; unknown methods get
            the reading of the store only).

    Returns:
        A :class:`CaptureEstimate`; call :meth:`~CaptureEstimate.check` to refuse it when it does not fit.
    """
    from attnseg.capture.tracer import expand_joint
    from attnseg.devices import as_device

    layers = expand_joint(dict(layers), dict(layers))  # a joint layer is captured as its parts (as the tracer does)
    dev = as_device(device if device is not None else store.device)
    if batch < 1:
        raise AttnSegError(f"batch must be >= 1, got {batch}")
    wants = bool(getattr(store, "wants_outputs", False)) if want_outputs is None else want_outputs
    store_items = store.memory_items(layers, batch=batch, text_tokens=text_tokens)
    items = _largest_call(store_items)
    items += _processor_items(
        layers, batch=batch, text_tokens=text_tokens, model_dtype=model_dtype, chunk_bytes=chunk_bytes, device=dev,
        split_queries=_takes_query_blocks(store), want_outputs=wants,
    )
    notes: list[str] = []
    if method is not None:
        name = str(getattr(method, "name", ""))
        post = _POST_ESTIMATES.get(name, _reading_only)
        items += post(method, store, layers, batch, text_tokens)
        if name not in _POST_ESTIMATES:
            notes.append(f"no post-processing estimate for method {name!r}: counted the reading of the store only")
    return CaptureEstimate(items=tuple(items), device=str(dev), layers=len(layers), notes=tuple(notes))


# -- post-processing of the built-in methods ---------------------------------------------------------------------------


def _reading(store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, text_tokens: int) -> MemoryItem:
    """Reading a store makes float32 copies of its maps (running means divided by their counts)."""
    kept = [it for it in store.memory_items(layers, batch=batch, text_tokens=text_tokens) if it.phase == "kept"]
    size = sum(it.nbytes for it in kept)
    itemsize = torch.empty((), dtype=store.dtype).element_size()
    return MemoryItem("float32 copies of the maps read from the store", size * 4 // itemsize, "post", str(store.device))


def _reading_only(
    method: Any, store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, text_tokens: int
) -> list[MemoryItem]:
    return [_reading(store, layers, batch, text_tokens)]


def _aggregate_items(store: AttentionStore, layers: Mapping[str, LayerInfo], who: str) -> list[MemoryItem]:
    """DiffSeg's ``(R, R, R, R)`` aggregate at the largest self-attention grid: the aggregate, one resized
    resolution and the merge's (or the selection's) float32 working copies, three R^4 tensors in all."""
    selfs = [i for i in layers.values() if i.kind == "self"]
    if not selfs:
        return []
    side = max(max(i.grid) for i in selfs)
    n = side * side
    return [MemoryItem(f"{who}'s (R, R, R, R) self-attention aggregate at {side}x{side} (3 float32 copies)",
                       3 * nbytes((n, n)), "post", str(store.device))]


@register_post_estimate("diffseg")
def _diffseg(
    method: Any, store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, tt: int
) -> list[MemoryItem]:
    items = [_reading(store, layers, batch, tt), *_aggregate_items(store, layers, "DiffSeg")]
    if getattr(method, "refine", False):
        side = max(max(i.grid) for i in layers.values() if i.kind == "self")
        n = side * side
        items.append(MemoryItem("the k-means refinement's copy of the aggregate (scikit-learn, on the host)",
                                2 * nbytes((n, n)), "post", "cpu"))
    return items


@register_post_estimate("target")
def _target(
    method: Any, store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, tt: int
) -> list[MemoryItem]:
    items = [_reading(store, layers, batch, tt)]
    if getattr(method, "variant", "guided") == "guided":
        items += _aggregate_items(store, layers, "the target method")
    return items


@register_post_estimate("goca")
def _goca(
    method: Any, store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, tt: int
) -> list[MemoryItem]:
    items = [_reading(store, layers, batch, tt)]
    grid = getattr(store, "reference_grid", None)
    if grid is not None and not getattr(store, "scores_on_arrival", False):  # G2 from kept maps, after the pass
        n = grid[0] * grid[1]
        items.append(MemoryItem(f"GoCA's pseudo self-attention at {grid[0]}x{grid[1]} and one resized layer map",
                                3 * nbytes((n, n)), "post", str(store.device)))
    return items


@register_post_estimate("clustering")
def _clustering(
    method: Any, store: AttentionStore, layers: Mapping[str, LayerInfo], batch: int, tt: int
) -> list[MemoryItem]:
    items = [_reading(store, layers, batch, tt)]
    if not layers:
        return items
    side = max(max(i.grid) for i in layers.values())
    k = int(getattr(store, "n_components", getattr(method, "n_components", 3)))
    dim = sum(i.heads for i in layers.values()) * k
    feats = nbytes((side * side, dim))
    items.append(MemoryItem(f"the clustering features ({side * side} x {dim})", feats, "post", str(store.device)))
    items.append(MemoryItem("k-means' copy of the features (scikit-learn, on the host)", 2 * feats, "post", "cpu"))
    return items


def check_capture_memory(
    store: AttentionStore,
    layers: Mapping[str, LayerInfo],
    *,
    adapter: Any,
    method: Any = None,
    batch: int = 1,
    text_tokens: int = 0,
    size: tuple[int, int] | None = None,
    chunk_bytes: int | None = None,
) -> CaptureEstimate:
    """:func:`estimate_capture` for ``adapter``'s device and dtype, then :meth:`CaptureEstimate.check`.

    Call it before anything heavy (the image encoder, the forward pass): a capture that cannot fit is refused in
    about the time it takes to read the layers' shapes.

    Args:
        store, layers, method, batch, text_tokens, chunk_bytes: as :func:`estimate_capture`.
        adapter: its ``device`` runs the forward pass and its ``dtype`` is the model's.
        size: the ``(H, W)`` pixel input size, named in the message.

    Returns:
        The estimate (it fits).

    Raises:
        AttnSegError: one line with the size needed, the memory available on the device and the fix.
    """
    est = estimate_capture(
        store, layers, batch=batch, text_tokens=text_tokens, model_dtype=adapter.dtype, device=adapter.device,
        chunk_bytes=chunk_bytes, method=method,
    )
    where = f" at {size[0]}x{size[1]} px" if size is not None else ""
    name = getattr(method, "name", "")
    est.check(f"capturing {len(layers)} attention layers{' for ' + name if name else ''}{where}")
    return est
