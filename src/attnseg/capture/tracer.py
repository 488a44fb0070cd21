"""AttentionTracer: installs capture processors on selected layers and always restores the originals."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from attnseg.capture.joint import JOINT_PROCESSORS, JointCaptureProcessor
from attnseg.capture.processor import CaptureProcessor
from attnseg.capture.store import AttentionStore
from attnseg.errors import AttnSegError, ConfigError

if TYPE_CHECKING:
    import torch

    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import LayerInfo

__all__ = ["AttentionTracer", "expand_joint", "select_layers"]

_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()

Selector = Callable[["LayerInfo"], bool] | Iterable[str] | str | None


def select_layers(layers: dict[str, LayerInfo], select: Selector = None) -> dict[str, LayerInfo]:
    """Filter layer descriptions.

    ``select`` is None (all), a kind (``"self"``, ``"cross"``, ``"joint"``, ``"reverse"``), an iterable of layer
    names, or a predicate on :class:`~attnseg.types.LayerInfo`. A selected joint layer stands for all its parts
    (see :func:`expand_joint`).
    """
    if select is None:
        return dict(layers)
    if isinstance(select, str):
        if select not in ("self", "cross", "joint", "reverse"):
            raise ConfigError(f"layer selection {select!r} is not a kind (self, cross, joint, reverse)")
        return {n: i for n, i in layers.items() if i.kind == select}
    if callable(select):
        return {n: i for n, i in layers.items() if select(i)}
    names = list(select)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ConfigError(f"unknown attention layers: {', '.join(unknown[:5])}")
    return {n: layers[n] for n in names}


def expand_joint(selected: dict[str, LayerInfo], layers: dict[str, LayerInfo]) -> dict[str, LayerInfo]:
    """Replace each selected joint layer by its parts (described in ``layers``, or derived from it): sinks
    receive parts, never whole joint maps."""
    out: dict[str, LayerInfo] = {}
    for name, info in selected.items():
        if info.kind != "joint":
            out[name] = info
            continue
        parts = [i for i in layers.values() if i.module == name and i.part]
        if not parts:
            parts = [info.part_info(p) for p in ("image->image", "image->text", "text->image")]
        out.update({p.name: p for p in parts})
    return out


class AttentionTracer:
    """Context manager that captures attention of selected layers into a store.

    Only the selected modules get a capture processor (:class:`~attnseg.capture.processor.CaptureProcessor`, or
    :class:`~attnseg.capture.joint.JointCaptureProcessor` for joint attention and for modules run by a
    joint-contract processor); every other layer keeps its processor (the fused fast path). Selecting a part of a
    joint layer (``"<module>:self"``...) installs one processor on the module that feeds every selected part. On
    exit, normal or by exception, the original processors are restored. Tracing the same model twice at once is
    refused.

    Args:
        model: an adapter, or the denoiser module itself (then ``layers`` must be given).
        store: where maps go (a new :class:`AttentionStore` on the denoiser's device by default).
        select: which layers (see :func:`select_layers`).
        layers: layer descriptions; by default ``adapter.attention_layers(size)``.
        size: pixel size of the input the layers are prepared for (adapter only).
        mode: ``"reuse"`` (one attention computation) or ``"beside"`` (bit-identical outputs).
        chunk_bytes: bound on one block of probabilities (None: the processor's per-device default).
        want_outputs: pass per-head outputs to the store (default: the store's ``wants_outputs``).
        features: names of modules whose outputs go to ``store.add_feature`` (e.g. a reference
            feature such as a layer's ``to_q``); forward hooks, removed on exit. The output of a joint
            module that receives text and image as one sequence is cut to its image tokens.

    Example:
        >>> with AttentionTracer(adapter, select="self") as tracer:  # doctest: +SKIP
        ...     adapter.denoise(latents, 300, prompt)
        >>> tracer.store.self_attention()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: DiffusionAdapter | torch.nn.Module,
        store: AttentionStore | None = None,
        *,
        select: Selector = None,
        layers: dict[str, LayerInfo] | None = None,
        size: tuple[int, int] | None = None,
        mode: Literal["reuse", "beside"] = "reuse",
        chunk_bytes: int | None = None,
        want_outputs: bool | None = None,
        features: Iterable[str] = (),
    ) -> None:
        from torch import nn

        if isinstance(model, nn.Module):
            if layers is None:
                raise ConfigError("tracing a bare module needs `layers` (use an adapter to describe them)")
            self.denoiser = model
        else:
            self.denoiser = model.denoiser
            if layers is None:
                layers = model.attention_layers(size)
        if mode not in ("reuse", "beside"):
            raise ConfigError(f"mode must be 'reuse' or 'beside', got {mode!r}")
        self.all_layers = dict(layers)
        self.layers = expand_joint(select_layers(layers, select), self.all_layers)
        if not self.layers:
            raise ConfigError("the layer selection matched no attention layer")
        if store is None:  # on the model's device: maps accumulate where they are computed
            first = next(self.denoiser.parameters(), None)
            store = AttentionStore(device=first.device if first is not None else "cpu")
        self.store = store
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        # sinks that need per-head outputs (GoCA head weights, per-head PCA) say so themselves
        self.want_outputs = bool(getattr(self.store, "wants_outputs", False)) if want_outputs is None else want_outputs
        self.features = list(features)
        self._saved: dict[str, Any] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> AttentionTracer:
        if self.denoiser in _ACTIVE:
            raise AttnSegError("this model is already being traced; tracers cannot be nested")
        _ACTIVE.add(self.denoiser)
        try:
            for name, (info, parts) in self._modules().items():
                module = self.denoiser.get_submodule(name)
                if not hasattr(module, "set_processor"):
                    raise AttnSegError(f"{name} is not an attention module with a processor")
                original = module.processor
                self._saved[name] = original
                kwargs = {"mode": self.mode, "chunk_bytes": self.chunk_bytes, "want_outputs": self.want_outputs}
                if parts or type(original).__name__ in JOINT_PROCESSORS:
                    processor: Any = JointCaptureProcessor(
                        original, info, parts or {"image->image": info}, self.store, **kwargs
                    )
                else:
                    processor = CaptureProcessor(original, info, self.store, **kwargs)
                module.set_processor(processor)
            for name in self.features:
                self._hooks.append(self.denoiser.get_submodule(name).register_forward_hook(self._feature_hook(name)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _modules(self) -> dict[str, tuple[LayerInfo, dict[str, LayerInfo]]]:
        """Per attention module: its description and the parts captured from it (none for plain layers)."""
        modules: dict[str, tuple[LayerInfo, dict[str, LayerInfo]]] = {}
        for name, info in self.layers.items():
            if not info.part:
                modules[name] = (info, {})
                continue
            source = self.all_layers.get(info.module)
            if source is None:  # a part carries its joint layer's description
                source = replace(info, name=info.module, kind="joint", part="", module="", rows_sum_to_one=True)
            if source.kind != "joint":
                raise AttnSegError(f"{name} is a part of {info.module!r}, which is not a joint-attention layer")
            modules.setdefault(info.module, (source, {}))[1][info.part] = info
        return modules

    def _feature_hook(self, name: str) -> Callable[..., None]:
        info = self.all_layers.get(name)
        if info is None:  # described only through its parts
            info = next((i for i in self.all_layers.values() if i.module == name), None)
        joined = info is not None and info.joined

        def hook(module: Any, args: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            if joined and value.ndim == 3:  # one sequence of text and image tokens: keep the image tokens
                start, stop = info.image_span(int(value.shape[1]))
                value = value[:, start:stop]
            self.store.add_feature(name, value)

        return hook

    def _restore(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        try:
            for name, original in self._saved.items():
                self.denoiser.get_submodule(name).set_processor(original)
        finally:
            self._saved.clear()
            _ACTIVE.discard(self.denoiser)

    @property
    def active(self) -> bool:
        return bool(self._saved)
