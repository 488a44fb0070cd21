"""AttentionSegmentationPipeline: adapter + capture + method, from an image to a segmentation."""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import ConfigError
from attnseg.io.geometry import DEFAULT_FIT, Fit, Placement, check_fit, place
from attnseg.io.images import MAX_PIXELS, DecodedImage, read_image
from attnseg.methods.base import RunOptions, Segmenter, create_method

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.capture.memory import CaptureEstimate
    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import LayerInfo, Prompt, SegmentationResult

__all__ = [
    "AttentionSegmentationPipeline",
    "PipelineOutput",
    "PreparedImage",
    "decode_side",
    "part_store_path",
    "prepare_image",
]

#: images are decoded at up to this many times the model input's longer side (at least MIN_DECODE_SIDE px):
#: enough for sharp overlays at the original size, without decoding every pixel of a 24-megapixel photo
DECODE_FACTOR = 4
MIN_DECODE_SIDE = 1024


def decode_side(size: tuple[int, int]) -> int:
    """The longer side images are reduced to while decoding, for a model input of ``size = (H, W)``."""
    return max(DECODE_FACTOR * max(size), MIN_DECODE_SIDE)


@dataclass(frozen=True)
class PreparedImage:
    """An input image, decoded and placed in the model input.

    Attributes:
        decoded: the image as read (upright RGB, maybe reduced while decoding; ``decoded.size`` is the original).
        placement: where it sits in the model input.
        shown: the model input as an RGB image of ``placement.model`` size.
    """

    decoded: DecodedImage
    placement: Placement
    shown: Image.Image


def prepare_image(
    adapter: DiffusionAdapter,
    image: Any,
    *,
    size: tuple[int, int] | None = None,
    fit: Fit = DEFAULT_FIT,
    method: Segmenter | None = None,
    max_pixels: int = MAX_PIXELS,
) -> PreparedImage:
    """Decode ``image`` (path, PIL image, array, tensor or :class:`DecodedImage`) and place it in the model input.

    Args:
        adapter: gives the default ``resolution`` and the ``size_multiple`` that ``fit="native"`` needs.
        size: ``(H, W)`` model input (for ``"native"``: the area to keep); default ``adapter.resolution``.
        fit: see :mod:`attnseg.io.geometry`.
        method: checked for ``square_grids`` when ``fit="native"`` gives a non-square input.
        max_pixels: refuse larger images (see :func:`attnseg.io.images.read_image`).
    """
    fit = check_fit(fit)
    res = tuple(size) if size is not None else tuple(adapter.resolution)
    if fit == "native" and adapter.size_multiple is None:
        raise ConfigError(f"fit 'native' needs a model that accepts any aspect ratio; {adapter.family} models take "
                          f"{res[0]}x{res[1]} only: use fit 'pad' (or 'resize')")
    decoded = image if isinstance(image, DecodedImage) else read_image(
        image, max_side=decode_side(res), max_pixels=max_pixels  # type: ignore[arg-type]
    )
    placement = place(decoded.size, res, fit, multiple=adapter.size_multiple)  # type: ignore[arg-type]
    mh, mw = placement.model
    if mh != mw and method is not None and getattr(method, "square_grids", False):
        raise ConfigError(f"fit 'native' gives a {mw}x{mh} input for this image, but {method.name} needs square "
                          "attention grids: use fit 'pad' (or 'resize', 'crop')")
    return PreparedImage(decoded=decoded, placement=placement, shown=placement.apply(decoded.image))


def part_store_path(path: str | Path | None, index: int) -> Path | None:
    """Where the store of prompt ``index`` goes: ``path`` itself for the first, ``NAME-p2.EXT`` for the second..."""
    if path is None or index == 0:
        return None if path is None else Path(path)
    path = Path(path)
    return path.with_name(f"{path.stem}-p{index + 1}{path.suffix}")


@dataclass(frozen=True)
class PipelineOutput:
    """Everything one image produced.

    Attributes:
        model_result: the segmentation at the model input size (as the method returned it).
        image: the model input as the model saw it (placed: letterboxed, resized or cropped RGB).
        store: the captured attention (save it to re-run methods without the model); the first prompt's when the
            method's classes were spread over several prompts.
        placement: where the image sat in the model input (None: the model input was the image).
        source: the input as decoded (upright RGB; reduced while decoding when large).
        stores: every prompt's store, in order (``(store,)`` for one prompt).
    """

    model_result: SegmentationResult
    image: Image.Image
    store: AttentionStore
    placement: Placement | None = None
    source: Image.Image | None = None
    stores: tuple[AttentionStore, ...] = ()

    @cached_property
    def result(self) -> SegmentationResult:
        """The segmentation at the original image's pixel size (labels nearest, scores bilinear), computed on
        first use; ``meta["geometry"]`` records the fit, the model input size and the boxes."""
        p = self.placement
        if p is None or self.model_result.size != p.model:
            return self.model_result
        return p.result_to_original(self.model_result)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the original image."""
        return self.placement.original if self.placement is not None else self.model_result.size


class _FanOut:
    """One capture sink for a batch: hands every chunk to one store per batch item (each store keeps its own
    item through its ``batch`` slice)."""

    def __init__(self, stores: Sequence[AttentionStore]) -> None:
        self.stores = list(stores)
        self.wants_outputs = any(getattr(s, "wants_outputs", False) for s in self.stores)
        if not all("queries" in inspect.signature(s.add_chunk).parameters for s in self.stores):
            self.add_chunk = self._add_whole_heads  # type: ignore[method-assign]

    def add_chunk(
        self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None = None,
        *, queries: slice = slice(None),
    ) -> None:
        for s in self.stores:
            s.add_chunk(layer, probs, heads, out, queries=queries)

    def _add_whole_heads(
        self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None = None
    ) -> None:
        for s in self.stores:
            s.add_chunk(layer, probs, heads, out)

    def end_call(self, layer: LayerInfo) -> None:
        for s in self.stores:
            s.end_call(layer)

    def add_feature(self, name: str, value: torch.Tensor) -> None:
        for s in self.stores:
            s.add_feature(name, value)


class AttentionSegmentationPipeline:
    """Run a training-free segmentation method on images with a diffusion model.

    Args:
        adapter: a model adapter (see :func:`attnseg.load_model`).
        method: a :class:`~attnseg.methods.base.Segmenter` or a registered method name.
        mode: capture mode, ``"reuse"`` (fast) or ``"beside"`` (bit-identical model outputs).
        fit: how images are placed in the model input (default ``"pad"``: nothing lost, see
            :mod:`attnseg.io.geometry`); :meth:`run` can override it per call.
        preset: when ``method`` is a name, ``"family"`` (default) applies the model family's settings for it
            (``adapter.method_defaults``: hyper-parameters, the variant's overrides, layer names mapped to the
            model's depth, and run options such as the input size), ``"paper"`` the paper's exact settings; see
            :func:`attnseg.presets.resolve_settings`. Keywords given here win over either.
        **method_kwargs: hyper-parameters when ``method`` is a name.

    Example:
        >>> pipe = AttentionSegmentationPipeline.from_pretrained("toyworld", "diffseg")  # doctest: +SKIP
        >>> out = pipe.run("panorama.jpg", seed=0)  # doctest: +SKIP
        >>> out.result.size == out.size  # masks at the photo's own size  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        method: Segmenter | str = "diffseg",
        *,
        mode: Literal["reuse", "beside"] = "reuse",
        fit: Fit = DEFAULT_FIT,
        preset: str = "family",
        **method_kwargs: Any,
    ) -> None:
        from attnseg.presets import ResolvedSettings, resolve_settings

        if isinstance(method, str):
            self.settings = resolve_settings(method, adapter, preset=preset, params=method_kwargs)
            method = create_method(method, **self.settings.params)
        elif method_kwargs:
            raise ConfigError("hyper-parameters are given to the method's constructor, not with a method instance")
        else:
            self.settings = ResolvedSettings(method=method.name, preset="instance")
        self.adapter = adapter
        self.method = method
        self.mode = mode
        self.fit = check_fit(fit)
        self._parts: tuple[Segmenter, tuple[Segmenter, ...]] | None = None  # see prompt_parts

    @classmethod
    def from_pretrained(
        cls, model: str, method: Segmenter | str = "diffseg", *, dtype: str | torch.dtype = "float32",
        device: str = "cpu", preset: str = "family", **method_kwargs: Any,
    ) -> AttentionSegmentationPipeline:
        from attnseg.models.loading import load_model

        return cls(load_model(model, dtype=dtype, device=device), method, preset=preset, **method_kwargs)

    def options(self, **overrides: Any) -> RunOptions:
        """The method's run options, then the preset's (:attr:`settings`), then non-None ``overrides``."""
        preset = {k: v for k, v in self.settings.run.items() if k != "size"}
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self.method.run_options(), **{**preset, **given})

    def input_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The model input ``(H, W)``: ``size``, else the preset's, else the adapter's resolution."""
        if size is not None:
            return (int(size[0]), int(size[1]))
        preset = self.settings.run.get("size")
        return (int(preset[0]), int(preset[1])) if preset is not None else tuple(self.adapter.resolution)

    def new_store(self, selected: dict[str, LayerInfo], meta: dict[str, Any]) -> AttentionStore:
        """The method's store (``make_store``) or a plain one, on the adapter's device: maps accumulate where they
        are computed and nothing large goes to the host during the forward pass."""
        make_store = getattr(self.method, "make_store", None)
        if make_store is not None:
            return make_store(self.adapter, selected, meta)
        opts = self.method.run_options()
        return AttentionStore(
            heads=opts.heads, group=opts.group, meta=meta, device=self.adapter.device,  # type: ignore[arg-type]
        )

    def estimate(
        self, *, size: tuple[int, int] | None = None, batch: int = 1, prompt: str | None = None
    ) -> CaptureEstimate:
        """The memory a run would need, from the layers' shapes, without running anything.

        Args:
            size: ``(H, W)`` input size (default: :meth:`input_size`).
            batch: images per pass (:meth:`run_batch`).
            prompt: overrides the method's prompt (its length sets the cross-attention keys).

        Example:
            >>> est = pipe.estimate(size=(1024, 1024))  # doctest: +SKIP
            >>> est.peak_bytes() / 2**30, est.largest().what  # doctest: +SKIP
        """
        from attnseg.capture.memory import estimate_capture

        opts = self.options(prompt=prompt)
        size = self.input_size(size)
        layers = self.adapter.attention_layers(size)
        selected = {n: layers[n] for n in self.method.select_layers(layers)}
        encoded = self.adapter.encode_prompt(opts.prompt)
        store = self.new_store(selected, {"image_size": list(size), "prompt": opts.prompt,
                                          "tokens": list(encoded.tokens[: encoded.length])})
        return estimate_capture(
            store, selected, batch=batch, text_tokens=int(encoded.embeddings.shape[1]), model_dtype=self.adapter.dtype,
            device=self.adapter.device, method=self.method,
        )

    def prepare(self, image: Any, *, size: tuple[int, int] | None = None, fit: Fit | None = None,
                max_pixels: int = MAX_PIXELS) -> PreparedImage:
        """Decode and place one image (see :func:`prepare_image`); a :class:`PreparedImage` is returned as is."""
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(self.adapter, image, size=self.input_size(size), fit=fit or self.fit, method=self.method,
                             max_pixels=max_pixels)

    def capture(self, image: Any, **kwargs: Any) -> tuple[AttentionStore, Image.Image]:
        """One denoiser pass over ``image`` with the method's layers captured (keywords as :meth:`run`).

        Returns the store and the image as the model saw it.
        """
        prepared = self.prepare(image, size=kwargs.pop("size", None), fit=kwargs.pop("fit", None))
        (store,), _ = self._capture([prepared], **kwargs)
        return store, prepared.shown

    @torch.no_grad()
    def _capture(
        self,
        batch: Sequence[PreparedImage],
        *,
        prompt: str | None = None,
        timestep: int | None = None,
        add_noise: bool | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[list[AttentionStore], Prompt]:
        """One denoiser pass over a batch of prepared images of one model size; one store per image.

        Every image draws its randomness (posterior sample, noise) from its own generator seeded with ``seed``
        (or from ``generator`` for a batch of one), so a batch gives each image what a run of one gives it.
        """
        sizes = {p.placement.model for p in batch}
        if len(sizes) != 1:
            raise ConfigError(f"a batch runs at one model input size; got {sorted(sizes)}")
        if generator is not None and len(batch) > 1:
            raise ConfigError("generator= serves one image; give batches a seed")
        from attnseg.capture.memory import check_capture_memory
        from attnseg.devices import synchronize

        size = sizes.pop()
        opts = self.options(prompt=prompt, timestep=timestep, add_noise=add_noise)
        adapter = self.adapter
        # CPU generators: the same seed gives the same draws on every device (adapters draw on the generator's
        # device, then move the noise)
        generators: list[torch.Generator | None] = [
            generator if generator is not None else
            (torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None)
            for _ in batch
        ]
        layers = adapter.attention_layers(size)
        selected = self.method.select_layers(layers)
        chosen = {n: layers[n] for n in selected}
        text = opts.prompt
        encoded = adapter.encode_prompt(text)
        stores: list[AttentionStore] = []
        for i, prepared in enumerate(batch):
            meta = {
                "image_size": list(size), "prompt": text, "timestep": opts.timestep, "add_noise": opts.add_noise,
                "model": getattr(adapter, "name", ""), "family": adapter.family, "seed": seed,
                "tokens": list(encoded.tokens[: encoded.length]), "geometry": prepared.placement.to_dict(),
            }
            store = self.new_store(chosen, meta)
            if len(batch) > 1:
                store.batch = slice(i, i + 1)
            stores.append(store)
        # Refuse a capture that cannot fit before anything heavy runs (image encoder, forward pass).
        estimate = check_capture_memory(
            stores[0], chosen, adapter=adapter, method=self.method, batch=len(batch),
            text_tokens=int(encoded.embeddings.shape[1]), size=size,
        )
        for store in stores:
            store.meta["estimated_peak_bytes"] = estimate.peak_bytes()
        pixels = torch.cat([adapter.preprocess(p.shown, size) for p in batch])
        if opts.sample_posterior:
            latents = torch.cat([
                adapter.encode_image(pixels[i : i + 1], sample=True, generator=g) for i, g in enumerate(generators)
            ])
        else:
            latents = adapter.encode_image(pixels, sample=False)
        if opts.add_noise:
            latents = torch.cat([
                adapter.add_noise(latents[i : i + 1], opts.timestep, generator=g) for i, g in enumerate(generators)
            ])
        features = getattr(self.method, "features", None)
        sink: Any = stores[0] if len(stores) == 1 else _FanOut(stores)
        synchronize(adapter.device)
        start = time.perf_counter()
        with AttentionTracer(
            adapter, sink, select=selected, layers=layers, mode=self.mode,
            features=features(adapter) if features is not None else (),
        ):
            adapter.denoise(latents, opts.timestep, encoded)
        synchronize(adapter.device)
        seconds = round(time.perf_counter() - start, 4)
        for store in stores:
            store.batch = None
            store.meta["denoise_seconds"] = seconds
            if len(stores) > 1:
                store.meta["batch_size"] = len(stores)
        return stores, encoded

    def segment_store(self, store: AttentionStore, *, prompt: str | None = None) -> SegmentationResult:
        """Run the method on a (possibly loaded) store; the prompt is re-encoded for token lookup."""
        text = prompt if prompt is not None else store.meta.get("prompt", self.method.run_options().prompt)
        encoded = self.adapter.encode_prompt(text) if text or "cross" in self.method.requires else None
        size = tuple(store.meta.get("image_size", ())) or None
        return self.method.segment(store, prompt=encoded, out_size=size).cpu()  # type: ignore[arg-type]

    # -- methods whose classes are spread over several prompts ---------------------------------------------------

    def with_method(self, method: Segmenter) -> AttentionSegmentationPipeline:
        """This pipeline (adapter, mode, fit, preset settings) with another method instance, e.g. one prompt part of
        :meth:`prompt_parts`."""
        other = copy.copy(self)
        other.method = method
        other._parts = None
        return other

    def prompt_fitting(self, text: str, words: Any) -> list[bool]:
        """Per word of ``words``: does the model's text encoder see all of it in ``text``
        (:meth:`~attnseg.models.base.DiffusionAdapter.prompt_fitting`)?"""
        fitting = getattr(self.adapter, "prompt_fitting", None)
        if fitting is not None:
            return list(fitting(text, words))
        from attnseg.prompts import words_within

        return words_within(self.adapter.encode_prompt(text), words)

    def prompt_parts(self) -> list[Segmenter]:
        """The method once per prompt: ``[method]``, or several parts when its classes do not fit in one prompt of
        the model's text encoder (a method that can spread them implements ``split_prompts``, e.g. GoCA).

        Computed once per method instance (the prompts are encoded to see what the tokenizer keeps)."""
        cached = getattr(self, "_parts", None)
        if cached is not None and cached[0] is self.method:
            return list(cached[1])
        split = getattr(self.method, "split_prompts", None)
        parts = [self.method] if split is None else list(split(self.prompt_fitting))
        self._parts = (self.method, tuple(parts))
        return list(parts)

    def _segment(self, prepared: PreparedImage, store: AttentionStore, encoded: Prompt) -> PipelineOutput:
        start = time.perf_counter()
        result = self.method.segment(store, prompt=encoded, out_size=prepared.placement.model)
        result = result.cpu()  # outputs are small; the maps stay on the device
        meta = {**result.meta, "segment_seconds": round(time.perf_counter() - start, 4),
                "denoise_seconds": store.meta.get("denoise_seconds")}
        return PipelineOutput(model_result=replace(result, meta=meta), image=prepared.shown, store=store,
                              placement=prepared.placement, source=prepared.decoded.image, stores=(store,))

    def _combine(self, prepared: PreparedImage, outputs: Sequence[PipelineOutput]) -> PipelineOutput:
        """One image's output from its prompt parts' outputs (the method's ``combine_parts`` merges the results)."""
        if len(outputs) == 1:  # the method's prompt holds every class
            output = outputs[0]
            if not hasattr(self.method, "split_prompts"):
                return output
            result = output.model_result
            return replace(output, model_result=replace(result, meta={**result.meta, "prompts": 1}))
        result = self.method.combine_parts([o.model_result for o in outputs])  # type: ignore[attr-defined]
        timings = {
            key: round(sum(o.model_result.meta.get(key) or 0.0 for o in outputs), 4)
            for key in ("segment_seconds", "denoise_seconds")
        }
        return PipelineOutput(
            model_result=replace(result, meta={**result.meta, **timings}), image=prepared.shown,
            store=outputs[0].store, placement=prepared.placement, source=prepared.decoded.image,
            stores=tuple(o.store for o in outputs),
        )

    def _run_group(
        self, batch: Sequence[PreparedImage], *, store_path: str | Path | None = None, **kwargs: Any
    ) -> list[PipelineOutput]:
        """Capture and segment prepared images of one model input size in one denoiser pass per prompt part."""
        parts = self.prompt_parts()
        if len(parts) > 1:
            if kwargs.get("prompt") is not None:
                raise ConfigError("the classes are spread over several prompts, so a prompt cannot be given to run()")
            if kwargs.get("generator") is not None:
                raise ConfigError("several prompts are captured: give a seed, not a generator, so each draws the same")
        per_image: list[list[PipelineOutput]] = [[] for _ in batch]
        for index, part in enumerate(parts):
            pipe = self if part is self.method else self.with_method(part)
            stores, encoded = pipe._capture(batch, **kwargs)
            if store_path is not None:
                stores[0].save(part_store_path(store_path, index))  # type: ignore[arg-type]
            for outputs, prepared, store in zip(per_image, batch, stores, strict=True):
                outputs.append(pipe._segment(prepared, store, encoded))
        return [self._combine(prepared, outputs) for prepared, outputs in zip(batch, per_image, strict=True)]

    def run(
        self, image: Any, *, store_path: str | Path | None = None, size: tuple[int, int] | None = None,
        fit: Fit | None = None, **kwargs: Any,
    ) -> PipelineOutput:
        """Capture, then segment.

        Classes beyond one prompt's token limit are spread over several prompts (one capture per prompt, the
        method's ``combine_parts`` merges the results; ``result.meta["prompts"]`` says how many), never dropped.

        Args:
            image: a path, PIL image, array, tensor (see :func:`attnseg.io.images.read_image`) or
                :class:`PreparedImage`.
            store_path: also save the captured attention there (several prompts: ``NAME-p2.EXT``... for the others).
            size: ``(H, W)`` model input size (default: the preset's, else the adapter's resolution; with
                ``fit="native"`` the area kept).
            fit: ``"pad"``, ``"resize"``, ``"crop"`` or ``"native"`` (default: the pipeline's).
            prompt, timestep, add_noise: override the method's run options (no prompt when the classes are spread
                over several prompts).
            seed, generator: every random draw (posterior sample, noise); drawn on a CPU generator by default, so a
                seed gives the same draws on every device. Several prompts take a seed, not a generator (each
                prompt's capture draws the same).

        Returns:
            :class:`PipelineOutput`; ``.result`` is at the original image's size.

        Raises:
            AttnSegError: among others when the capture would not fit in the memory of the model's device (checked
                before the image is encoded).
        """
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image, size=size, fit=fit)
        (output,) = self._run_group([prepared], store_path=store_path, **kwargs)
        return output

    def run_batch(self, images: Sequence[Any], *, size: tuple[int, int] | None = None, fit: Fit | None = None,
                  **kwargs: Any) -> list[PipelineOutput]:
        """:meth:`run` on several images with one denoiser pass per model input size (images of one size run
        together as a batch; with classes spread over several prompts, one pass per size and prompt). Each image's
        output equals what :meth:`run` gives it, up to floating-point rounding. ``generator`` is not accepted
        (give ``seed``); stores are not saved (use :meth:`run`)."""
        prepared = [im if isinstance(im, PreparedImage) else self.prepare(im, size=size, fit=fit) for im in images]
        outputs: list[PipelineOutput | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.placement.model, []).append(i)
        for indices in groups.values():
            for i, output in zip(indices, self._run_group([prepared[i] for i in indices], **kwargs), strict=True):
                outputs[i] = output
        return [o for o in outputs if o is not None]

    def __call__(self, image: Any, **kwargs: Any) -> SegmentationResult:
        """The segmentation of ``image`` at its own pixel size (keywords as :meth:`run`)."""
        return self.run(image, **kwargs).result
