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

    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import Prompt, SegmentationResult

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
        **method_kwargs: hyper-parameters when ``method`` is a name; they override the model family's
            recommended settings (``adapter.method_defaults(method)``, e.g. GoCA's reference layers on Flux).

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
        **method_kwargs: Any,
    ) -> None:
        if isinstance(method, str):  # the family's recommended settings, under the explicit ones
            settings = getattr(adapter, "method_settings", None)
            params = settings(method, method_kwargs)[0] if settings is not None else method_kwargs
            method = create_method(method, **params)
        elif method_kwargs:
            raise ConfigError("hyper-parameters are given to the method's constructor, not with a method instance")
        self.adapter = adapter
        self.method = method
        self.mode = mode

    @classmethod
    def from_pretrained(
        cls, model: str, method: Segmenter | str = "diffseg", *, dtype: str | torch.dtype = "float32",
        device: str = "cpu", **method_kwargs: Any,
    ) -> AttentionSegmentationPipeline:
        from attnseg.models.loading import load_model

        return cls(load_model(model, dtype=dtype, device=device), method, **method_kwargs)

    def options(self, **overrides: Any) -> RunOptions:
        """The method's run options with non-None ``overrides`` applied."""
        return replace(self.method.run_options(), **{k: v for k, v in overrides.items() if v is not None})

    def capture(self, image: Any, **kwargs: Any) -> tuple[AttentionStore, Image.Image]:
        """One denoiser pass over ``image`` with the method's layers captured (keywords as :meth:`run`).

        Returns the store and the image as the model saw it.
        """
        store, shown, _ = self._capture(image, **kwargs)
        return store, shown

    @torch.no_grad()
    def _capture(
        self,
        image: Any,
        *,
        prompt: str | None = None,
        timestep: int | None = None,
        add_noise: bool | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[AttentionStore, Image.Image, Prompt]:
        opts = self.options(prompt=prompt, timestep=timestep, add_noise=add_noise)
        adapter = self.adapter
        size = size or adapter.resolution
        pil = load_image(image, min_size=1)
        pixels = adapter.preprocess(pil, size)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        layers = adapter.attention_layers(size)
        selected = self.method.select_layers(layers)
        text = opts.prompt
        encoded = adapter.encode_prompt(text)
        latents = adapter.encode_image(pixels, sample=opts.sample_posterior, generator=generator)
        if opts.add_noise:
            latents = adapter.add_noise(latents, opts.timestep, generator=generator)
        meta = {
            "image_size": list(size), "prompt": text, "timestep": opts.timestep, "add_noise": opts.add_noise,
            "model": getattr(adapter, "name", ""), "family": adapter.family, "seed": seed,
            "tokens": list(encoded.tokens[: encoded.length]),
        }
        make_store = getattr(self.method, "make_store", None)
        if make_store is not None:
            store = make_store(adapter, {n: layers[n] for n in selected}, meta)
        else:
            store = AttentionStore(heads=opts.heads, group=opts.group, meta=meta)  # type: ignore[arg-type]
        features = getattr(self.method, "features", None)
        start = time.perf_counter()
        with AttentionTracer(
            adapter, store, select=selected, layers=layers, mode=self.mode,
            features=features(adapter) if features is not None else (),
        ):
            adapter.denoise(latents, opts.timestep, encoded)
        store.meta["denoise_seconds"] = round(time.perf_counter() - start, 4)
        return store, tensor_to_pil(pixels), encoded

    def segment_store(self, store: AttentionStore, *, prompt: str | None = None) -> SegmentationResult:
        """Run the method on a (possibly loaded) store; the prompt is re-encoded for token lookup."""
        text = prompt if prompt is not None else store.meta.get("prompt", self.method.run_options().prompt)
        encoded = self.adapter.encode_prompt(text) if text or "cross" in self.method.requires else None
        size = tuple(store.meta.get("image_size", ())) or None
        return self.method.segment(store, prompt=encoded, out_size=size)  # type: ignore[arg-type]

    def run(self, image: Any, *, store_path: str | Path | None = None, **kwargs: Any) -> PipelineOutput:
        """Capture, then segment.

        Args:
            image: a path, PIL image, array or tensor (see :func:`attnseg.io.images.load_image`).
            store_path: also save the captured attention there.
            prompt, timestep, add_noise: override the method's run options.
            seed, generator: every random draw (posterior sample, noise).
            size: ``(H, W)`` model input size (default: the adapter's resolution).
        """
        store, shown, encoded = self._capture(image, **kwargs)
        if store_path is not None:
            store.save(store_path)
        start = time.perf_counter()
        result = self.method.segment(store, prompt=encoded, out_size=(shown.size[1], shown.size[0]))
        meta = {**result.meta, "segment_seconds": round(time.perf_counter() - start, 4),
                "denoise_seconds": store.meta.get("denoise_seconds")}
        return PipelineOutput(result=replace(result, meta=meta), image=shown, store=store)

    def __call__(self, image: Any, **kwargs: Any) -> SegmentationResult:
        return self.run(image, **kwargs).result

