"""AttentionSegmentationPipeline: adapter + capture + method, from an image to a segmentation."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import ConfigError
from attnseg.io.images import load_image, tensor_to_pil
from attnseg.methods.base import RunOptions, Segmenter, create_method

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.capture.memory import CaptureEstimate
    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import LayerInfo, Prompt, SegmentationResult

__all__ = ["AttentionSegmentationPipeline", "PipelineOutput"]


@dataclass(frozen=True)
class PipelineOutput:
    """Everything one image produced.

    Attributes:
        result: the segmentation, at the size of :attr:`image`.
        image: the input as the model saw it (cropped/resized RGB).
        store: the captured attention (save it to re-run methods without the model).
    """

    result: SegmentationResult
    image: Image.Image
    store: AttentionStore


class AttentionSegmentationPipeline:
    """Run a training-free segmentation method on images with a diffusion model.

    Args:
        adapter: a model adapter (see :func:`attnseg.load_model`).
        method: a :class:`~attnseg.methods.base.Segmenter` or a registered method name.
        mode: capture mode, ``"reuse"`` (fast) or ``"beside"`` (bit-identical model outputs).
        preset: when ``method`` is a name, ``"family"`` (default) applies the adapter's recommended settings for
            it (hyper-parameters and run options such as the input size), ``"paper"`` the paper's exact settings;
            see :mod:`attnseg.presets`. Keywords given here win over either.
        **method_kwargs: hyper-parameters when ``method`` is a name.

    Example:
        >>> pipe = AttentionSegmentationPipeline.from_pretrained("toyworld", "diffseg")  # doctest: +SKIP
        >>> out = pipe.run("scene.png", seed=0)  # doctest: +SKIP
        >>> out.result.labels.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        method: Segmenter | str = "diffseg",
        *,
        mode: Literal["reuse", "beside"] = "reuse",
        preset: str = "family",
        **method_kwargs: Any,
    ) -> None:
        from attnseg.presets import ResolvedSettings, resolve_settings

        if isinstance(method, str):
            self.settings = resolve_settings(
                method, getattr(adapter, "recommended", None), preset=preset, params=method_kwargs
            )
            method = create_method(method, **self.settings.params)
        elif method_kwargs:
            raise ConfigError("hyper-parameters are given to the method's constructor, not with a method instance")
        else:
            self.settings = ResolvedSettings(method=method.name, preset="instance")
        self.adapter = adapter
        self.method = method
        self.mode = mode

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

    def capture(self, image: Any, **kwargs: Any) -> tuple[AttentionStore, Image.Image]:
        """One denoiser pass over ``image`` with the method's layers captured (keywords as :meth:`run`).

        Returns the store and the image as the model saw it.
        """
        store, shown, _ = self._capture([image], **kwargs)
        return store, shown[0]

    def estimate(
        self, *, size: tuple[int, int] | None = None, batch: int = 1, prompt: str | None = None
    ) -> CaptureEstimate:
        """The memory a run would need, from the layers' shapes, without running anything.

        Args:
            size: ``(H, W)`` input size (default: the adapter's resolution).
            batch: images per pass (:meth:`run_batch`).
            prompt: overrides the method's prompt (its length sets the cross-attention keys).

        Example:
            >>> est = pipe.estimate(size=(1024, 1024))  # doctest: +SKIP
            >>> est.peak_bytes() / 2**30, est.largest().what  # doctest: +SKIP
        """
        from attnseg.capture.memory import estimate_capture

        opts = self.options(prompt=prompt)
        size = size or self.adapter.resolution
        layers = self.adapter.attention_layers(size)
        selected = {n: layers[n] for n in self.method.select_layers(layers)}
        encoded = self.adapter.encode_prompt(opts.prompt)
        store = self.new_store(selected, {"image_size": list(size), "prompt": opts.prompt})
        return estimate_capture(
            store, selected, batch=batch, text_tokens=int(encoded.embeddings.shape[1]), model_dtype=self.adapter.dtype,
            device=self.adapter.device, method=self.method,
        )

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

    @torch.no_grad()
    def _capture(
        self,
        images: list[Any],
        *,
        prompt: str | None = None,
        timestep: int | None = None,
        add_noise: bool | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[AttentionStore, list[Image.Image], Prompt]:
        from attnseg.capture.memory import check_capture_memory
        from attnseg.devices import synchronize

        opts = self.options(prompt=prompt, timestep=timestep, add_noise=add_noise)
        adapter = self.adapter
        size = self.input_size(size)
        pils = [load_image(image, min_size=1) for image in images]
        if generator is None and seed is not None:
            # a CPU generator: the same seed gives the same draws on every device (adapters draw on the
            # generator's device, then move the noise)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        layers = adapter.attention_layers(size)
        selected = self.method.select_layers(layers)
        text = opts.prompt
        encoded = adapter.encode_prompt(text)
        meta = {
            "image_size": list(size), "prompt": text, "timestep": opts.timestep, "add_noise": opts.add_noise,
            "model": getattr(adapter, "name", ""), "family": adapter.family, "seed": seed,
            "tokens": list(encoded.tokens[: encoded.length]),
        }
        store = self.new_store({n: layers[n] for n in selected}, meta)
        # Refuse a capture that cannot fit before anything heavy runs (image encoder, forward pass).
        estimate = check_capture_memory(
            store, {n: layers[n] for n in selected}, adapter=adapter, method=self.method, batch=len(pils),
            text_tokens=int(encoded.embeddings.shape[1]), size=size,
        )
        store.meta["estimated_peak_bytes"] = estimate.peak_bytes()
        pixels = torch.cat([adapter.preprocess(pil, size) for pil in pils])
        latents = adapter.encode_image(pixels, sample=opts.sample_posterior, generator=generator)
        if opts.add_noise:
            latents = adapter.add_noise(latents, opts.timestep, generator=generator)
        features = getattr(self.method, "features", None)
        synchronize(adapter.device)
        start = time.perf_counter()
        with AttentionTracer(
            adapter, store, select=selected, layers=layers, mode=self.mode,
            features=features(adapter) if features is not None else (),
        ):
            adapter.denoise(latents, opts.timestep, encoded)
        synchronize(adapter.device)
        store.meta["denoise_seconds"] = round(time.perf_counter() - start, 4)
        return store, [tensor_to_pil(p[None]) for p in pixels], encoded

    def segment_store(self, store: AttentionStore, *, prompt: str | None = None) -> SegmentationResult:
        """Run the method on a (possibly loaded) store; the prompt is re-encoded for token lookup."""
        text = prompt if prompt is not None else store.meta.get("prompt", self.method.run_options().prompt)
        encoded = self.adapter.encode_prompt(text) if text or "cross" in self.method.requires else None
        size = tuple(store.meta.get("image_size", ())) or None
        return self.method.segment(store, prompt=encoded, out_size=size).cpu()  # type: ignore[arg-type]

    def run(self, image: Any, *, store_path: str | Path | None = None, **kwargs: Any) -> PipelineOutput:
        """Capture, then segment.

        Args:
            image: a path, PIL image, array or tensor (see :func:`attnseg.io.images.load_image`).
            store_path: also save the captured attention there.
            prompt, timestep, add_noise: override the method's run options.
            seed, generator: every random draw (posterior sample, noise); drawn on a CPU generator by default, so a
                seed gives the same draws on every device.
            size: ``(H, W)`` model input size (default: the preset's, else the adapter's resolution).

        Raises:
            AttnSegError: among others when the capture would not fit in the memory of the model's device (checked
                before the image is encoded).
        """
        return self.run_batch([image], store_path=store_path, **kwargs)[0]

    def run_batch(
        self, images: list[Any], *, store_path: str | Path | None = None, **kwargs: Any
    ) -> list[PipelineOutput]:
        """Capture a batch of images in one denoiser pass, then segment each (keywords as :meth:`run`).

        All images are resized to one ``size``. The noise of the batch is one draw of shape ``(B, ...)``, so image
        ``i`` of a batch does not get the noise it gets alone (with the same seed). Each output's store is a view
        of batch item ``i`` (:meth:`~attnseg.capture.store.AttentionStore.item`); results are on the CPU.

        Args:
            images: the images (paths, PIL images, arrays, tensors).
            store_path: also save the whole batch's store there.
        """
        if not images:
            raise ConfigError("run_batch needs at least one image")
        store, shown, encoded = self._capture(list(images), **kwargs)
        if store_path is not None:
            store.save(store_path)
        outputs = []
        for i, pil in enumerate(shown):
            item = store if len(shown) == 1 else store.item(i)
            start = time.perf_counter()
            result = self.method.segment(item, prompt=encoded, out_size=(pil.size[1], pil.size[0]))
            result = result.cpu()  # outputs are small; the maps stay on the device
            meta = {**result.meta, "segment_seconds": round(time.perf_counter() - start, 4),
                    "denoise_seconds": store.meta.get("denoise_seconds")}
            outputs.append(PipelineOutput(result=replace(result, meta=meta), image=pil, store=item))
        return outputs

    def __call__(self, image: Any, **kwargs: Any) -> SegmentationResult:
        return self.run(image, **kwargs).result


