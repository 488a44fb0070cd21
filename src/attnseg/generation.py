"""Capture attention over several denoising steps: light img2img on real images, and text-to-image generation.

Both run the denoiser through the :class:`~attnseg.models.base.DiffusionAdapter` interface only
(``encode_image``, ``encode_prompt``, ``add_noise``, ``denoise``, ``decode``) plus a diffusers scheduler
for the step grid, and capture attention at the **last** denoiser call only: the tracer is entered around
that call, so earlier steps run on the fused fast path.

- :func:`img2img_capture`: the paper's real-image setting (Stillger et al. §5; ``METHODS.md`` §5):
  strength 0.05, empty prompt, no CFG; the timestep grid comes from a DDIM (or DDPM) scheduler built from
  ``adapter.scheduler.config``.
- :func:`generate`: text-to-image with classifier-free guidance; the conditional pass of the last step is
  captured, the image decoded, and the method run on the capture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.memory import check_capture_memory
from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import ConfigError, UnsupportedModelError
from attnseg.io.images import tensor_to_pil
from attnseg.methods.base import Segmenter, create_method

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.io.geometry import Fit, Placement
    from attnseg.methods.clustering import ClusteringResult
    from attnseg.models.base import DiffusionAdapter
    from attnseg.types import LayerInfo, Prompt, SegmentationResult

__all__ = ["CaptureOutput", "GenerationOutput", "generate", "img2img_capture", "make_scheduler"]

SchedulerKind = Literal["ddim", "ddpm"]


@dataclass(frozen=True)
class CaptureOutput:
    """What :func:`img2img_capture` captured.

    Attributes:
        store: the attention captured at the last denoiser call (its ``meta`` logs the timesteps).
        image: the input as the model saw it (placed: letterboxed, resized or cropped RGB).
        timesteps: the timesteps run, in order; the first is the one the clean latent was noised to, the
            last the captured call.
        placement: where the image sat in the model input (maps back to the original size with
            ``placement.result_to_original``).
        source: the input as decoded (upright RGB, maybe reduced while decoding).
    """

    store: AttentionStore
    image: Image.Image
    timesteps: tuple[int | float, ...]
    placement: Placement | None = None
    source: Image.Image | None = None


@dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` produced.

    Attributes:
        image: the generated image (RGB).
        store: the attention captured at the last step (conditional half by default).
        result: the method's segmentation of the generated image, at the image size.
        clustering: the full :class:`~attnseg.methods.clustering.ClusteringResult` when the method has a
            ``cluster`` method (principal-component clustering), else None.
        timesteps: the timesteps run.
    """

    image: Image.Image
    store: AttentionStore
    result: SegmentationResult
    clustering: ClusteringResult | None
    timesteps: tuple[int | float, ...]


def make_scheduler(
    adapter: DiffusionAdapter, scheduler: SchedulerKind | Any = "ddim", *, size: tuple[int, int] | None = None
) -> Any:
    """A fresh sampling scheduler on the adapter's training schedule.

    Args:
        adapter: its ``scheduler.config`` (a diffusers scheduler's) gives betas, prediction type, timestep
            spacing and offset. An adapter with a ``sampling_scheduler(kind, size)`` method (flow-matching models)
            builds its own for a named kind.
        scheduler: ``"ddim"`` (deterministic, eta 0) or ``"ddpm"`` (stochastic), built with ``from_config`` from
            the adapter's config; or a diffusers scheduler instance, used as it is.
        size: ``(H, W)`` of the run (resolution-dependent schedules).

    Returns:
        A diffusers scheduler (``set_timesteps`` not yet called).
    """
    own = getattr(adapter, "sampling_scheduler", None)
    if isinstance(scheduler, str) and own is not None:
        return own(scheduler, size)
    if not isinstance(scheduler, str):
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise ConfigError(f"scheduler must be 'ddim', 'ddpm' or a diffusers scheduler, got {scheduler!r}")
        return scheduler
    if scheduler not in ("ddim", "ddpm"):
        raise ConfigError(f"scheduler must be 'ddim', 'ddpm' or a diffusers scheduler, got {scheduler!r}")
    config = getattr(getattr(adapter, "scheduler", None), "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(adapter).__name__} has no diffusers scheduler (adapter.scheduler.config) to build the step grid "
            "from; pass scheduler= a diffusers scheduler instance with the model's training schedule"
        )
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
    return cls.from_config(config)


def _resolve_method(method: Segmenter | str) -> Segmenter:
    return create_method(method) if isinstance(method, str) else method


def _make_store(
    method: Segmenter, adapter: DiffusionAdapter, layers: dict[str, LayerInfo], meta: dict[str, Any]
) -> AttentionStore:
    make_store = getattr(method, "make_store", None)
    if make_store is not None:
        return make_store(adapter, layers, meta)
    opts = method.run_options()
    return AttentionStore(heads=opts.heads, group=opts.group, meta=meta, device=adapter.device)  # type: ignore[arg-type]


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    return generator


def _decode(adapter: DiffusionAdapter, latents: torch.Tensor) -> torch.Tensor:
    """``adapter.decode``; a pixel-space adapter (``latent_scale == 1``) without one already holds the image."""
    try:
        return adapter.decode(latents)
    except NotImplementedError:
        if adapter.latent_scale == 1 and latents.shape[1] == 3:
            return latents.float().clamp(-1, 1)
        raise UnsupportedModelError(f"{type(adapter).__name__} cannot decode latents into an image") from None


def _timestep(t: Any) -> int | float:
    """A grid timestep as the adapters take it: an int on integer grids (DDPM/DDIM), a float on flow grids."""
    value = float(t)
    return int(value) if value.is_integer() else value


def _step(sched: Any, eps: torch.Tensor, t: Any, latents: torch.Tensor, generator: torch.Generator | None) -> Any:
    out = sched.step(eps.to(latents.dtype), t, latents, generator=generator)
    return out.prev_sample


@torch.no_grad()
def img2img_capture(
    adapter: DiffusionAdapter,
    image: Any,
    method: Segmenter | str = "clustering",
    *,
    strength: float | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    prompt: str | None = None,
    size: tuple[int, int] | None = None,
    scheduler: SchedulerKind | Any = "ddim",
    mode: Literal["reuse", "beside"] = "reuse",
    fit: Fit = "pad",
) -> CaptureOutput:
    """Light img2img on a real image, capturing the method's layers at the last denoiser call (paper §5).

    As diffusers' img2img: the step grid of ``num_inference_steps`` is built, its last
    ``int(num_inference_steps * strength)`` steps are kept, the clean latent is noised to the first kept
    timestep (``adapter.add_noise``), and the kept steps are run without CFG (guidance 1). Only the last
    call is traced. With the defaults (40 steps, strength 0.05) two steps run, e.g. t = 26 then t = 1 for
    a "leading" grid with offset 1 (SD's configs); the timesteps are logged in ``store.meta``.

    Args:
        adapter: any adapter; its ``scheduler.config`` defines the grid (see :func:`make_scheduler`).
        image: path, PIL image or array (see :func:`attnseg.io.images.load_image`).
        method: the method (or its registered name) whose layers and store are used.
        strength: fraction of the grid to run; default the method's ``img2img_strength``, else 0.05 (paper).
        num_inference_steps: grid size; default the method's ``num_inference_steps``, else 40 ([proposal]).
        seed, generator: seed the noise (and DDPM steps); ``generator`` wins.
        prompt: default the method's prompt (empty, as in the paper).
        size: ``(H, W)`` input size; default ``adapter.resolution`` (with ``fit="native"``: the area kept).
        scheduler: ``"ddim"`` (default), ``"ddpm"`` or a diffusers scheduler instance.
        mode: capture mode (see :class:`~attnseg.capture.tracer.AttentionTracer`).
        fit: how the image is placed in the model input (``"pad"``, ``"resize"``, ``"crop"``, ``"native"``;
            see :mod:`attnseg.io.geometry`).

    Returns:
        :class:`CaptureOutput`; segment with ``method.cluster(out.store)`` or ``method.segment(out.store)`` (at
        the model input size; ``out.placement.result_to_original`` brings a result to the image's size).
    """
    from attnseg.pipeline import prepare_image

    method = _resolve_method(method)
    strength = float(strength if strength is not None else getattr(method, "img2img_strength", 0.05))
    steps = num_inference_steps if num_inference_steps is not None else getattr(method, "num_inference_steps", 40)
    if not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ConfigError(
            f"strength={strength} x num_inference_steps={steps} runs no step (int({steps * strength:g}) = 0); "
            "raise either"
        )
    prepared = prepare_image(adapter, image, size=size, fit=fit, method=method)
    size = prepared.placement.model  # the schedule may depend on it (flow matching's resolution shift)
    sched = make_scheduler(adapter, scheduler, size=size)
    sched.set_timesteps(steps)
    order = int(getattr(sched, "order", 1))
    timesteps = list(sched.timesteps[(steps - kept) * order :])
    ts = tuple(_timestep(t) for t in timesteps)

    opts = method.run_options()
    text = opts.prompt if prompt is None else prompt
    generator = _generator(seed, generator)
    encoded = adapter.encode_prompt(text)
    layers = adapter.attention_layers(size)
    selected = method.select_layers(layers)
    meta: dict[str, Any] = {
        "capture": "img2img", "image_size": list(size), "prompt": text, "strength": strength,
        "num_inference_steps": steps, "scheduler": type(sched).__name__, "timesteps": list(ts),
        "noised_to": ts[0], "captured_timestep": ts[-1], "guidance_scale": 1.0, "seed": seed,
        "model": getattr(adapter, "name", ""), "family": adapter.family,
        "tokens": list(encoded.tokens[: encoded.length]), "geometry": prepared.placement.to_dict(),
    }
    store = _make_store(method, adapter, {n: layers[n] for n in selected}, meta)
    # refused before the image encoder and the steps run when the capture cannot fit
    check_capture_memory(store, {n: layers[n] for n in selected}, adapter=adapter, method=method,
                         text_tokens=int(encoded.embeddings.shape[1]), size=size)
    pixels = adapter.preprocess(prepared.shown, size)
    latents = adapter.encode_image(pixels, sample=opts.sample_posterior, generator=generator)
    latents = adapter.add_noise(latents, ts[0], generator=generator)
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        if i == len(timesteps) - 1:
            with AttentionTracer(adapter, store, select=selected, layers=layers, mode=mode):
                adapter.denoise(latents, _timestep(t), encoded)
            break  # the captured call's update is never used
        eps = adapter.denoise(latents, _timestep(t), encoded)
        latents = _step(sched, eps, t, latents, generator)
    store.meta["denoise_seconds"] = round(time.perf_counter() - start, 4)
    return CaptureOutput(store=store, image=prepared.shown, timesteps=ts, placement=prepared.placement,
                         source=prepared.decoded.image)


def _stack_prompts(uncond: Prompt, cond: Prompt) -> Prompt:
    """One prompt whose embeddings (and tensor extras) hold ``[uncond, cond]`` on the batch axis."""
    extra = {
        k: torch.cat([uncond.extra[k], v]) if isinstance(v, torch.Tensor) and k in uncond.extra else v
        for k, v in cond.extra.items()
    }
    return replace(cond, embeddings=torch.cat([uncond.embeddings, cond.embeddings]), extra=extra)


def _latent_shape(adapter: DiffusionAdapter, size: tuple[int, int]) -> tuple[int, int, int, int]:
    s = adapter.latent_scale
    if size[0] % s or size[1] % s:
        raise ConfigError(f"size {size} must be a multiple of the adapter's latent scale {s}")
    channels = getattr(getattr(adapter.denoiser, "config", None), "in_channels", None)
    if channels is None:  # no config: encode a grey image once to learn the latent shape
        from PIL import Image as PILImage

        grey = PILImage.new("RGB", (size[1], size[0]), (128, 128, 128))
        return tuple(adapter.encode_image(adapter.preprocess(grey, size)).shape)  # type: ignore[return-value]
    return (1, int(channels), size[0] // s, size[1] // s)


@torch.no_grad()
def generate(
    adapter: DiffusionAdapter,
    prompt: str,
    method: Segmenter | str = "clustering",
    *,
    num_inference_steps: int = 80,
    guidance_scale: float = 7.5,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    negative_prompt: str = "",
    size: tuple[int, int] | None = None,
    scheduler: SchedulerKind | Any = "ddim",
    batched: bool = True,
    mode: Literal["reuse", "beside"] = "reuse",
) -> GenerationOutput:
    """Text-to-image with classifier-free guidance; capture at the last step, decode, segment.

    Each step predicts ``eps = eps_u + g (eps_c - eps_u)``. With ``batched=True`` (default) the unconditional
    and conditional passes run as one batch ``[uncond, cond]`` and the store keeps the half named by the
    method's ``cfg_half`` (``"cond"`` by default; ``"both"`` keeps both, the predecessor's behaviour) through
    its ``batch`` slice; with ``batched=False`` they are two calls and only the chosen one is traced. With
    ``guidance_scale <= 1`` one conditional call runs per step.

    Args:
        adapter: any adapter that can ``decode`` (pixel-space adapters without it return their samples); its
            ``scheduler.config`` defines the grid.
        prompt: the text prompt (the paper: a BLIP caption plus "; class, class").
        method: the method (or registered name); default principal-component clustering.
        num_inference_steps: steps (80: the predecessor's setting; the paper's is unconfirmed).
        guidance_scale: CFG scale (7.5: the predecessor's).
        seed, generator: seed the initial noise (the predecessor uses 2024 + sample index).
        negative_prompt: the unconditional prompt ("" as in diffusers).
        size: ``(H, W)`` image size; default ``adapter.resolution``.
        scheduler: ``"ddim"`` (default), ``"ddpm"`` or a diffusers scheduler instance.
        batched: one batched CFG call per step (default) or two calls.
        mode: capture mode.

    Returns:
        :class:`GenerationOutput` with the image, the store and the segmentation (and the
        :class:`~attnseg.methods.clustering.ClusteringResult` for the clustering method).
    """
    method = _resolve_method(method)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    cfg = guidance_scale > 1.0
    half = getattr(method, "cfg_half", "cond")
    if cfg and not batched and half == "both":
        raise ConfigError("cfg_half='both' needs batched=True (both halves in one call)")
    size = size or adapter.resolution
    sched = make_scheduler(adapter, scheduler, size=size)
    sched.set_timesteps(num_inference_steps)
    timesteps = list(sched.timesteps)
    ts = tuple(_timestep(t) for t in timesteps)

    generator = _generator(seed, generator)
    shape = _latent_shape(adapter, size)
    noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    latents = (noise * float(getattr(sched, "init_noise_sigma", 1.0))).to(adapter.device, adapter.dtype)
    cond = adapter.encode_prompt(prompt)
    uncond = adapter.encode_prompt(negative_prompt) if cfg else None
    both = _stack_prompts(uncond, cond) if cfg and batched and uncond is not None else None

    layers = adapter.attention_layers(size)
    selected = method.select_layers(layers)
    if cfg and batched:
        batch = {"cond": slice(1, 2), "uncond": slice(0, 1), "both": None}[half]
        items = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}[half]
    else:
        batch, items = None, [half if cfg else "cond"]
    meta: dict[str, Any] = {
        "capture": "generate", "image_size": list(size), "prompt": prompt, "negative_prompt": negative_prompt,
        "guidance_scale": float(guidance_scale), "num_inference_steps": num_inference_steps,
        "scheduler": type(sched).__name__, "timesteps": list(ts), "captured_timestep": ts[-1], "seed": seed,
        "batch_items": items, "model": getattr(adapter, "name", ""), "family": adapter.family,
        "tokens": list(cond.tokens[: cond.length]),
    }
    store = _make_store(method, adapter, {n: layers[n] for n in selected}, meta)
    store.batch = batch
    check_capture_memory(store, {n: layers[n] for n in selected}, adapter=adapter, method=method,
                         batch=2 if cfg and batched else 1, text_tokens=int(cond.embeddings.shape[1]), size=size)

    def traced(last: bool, x: torch.Tensor, t: int | float, p: Prompt) -> torch.Tensor:
        if not last:
            return adapter.denoise(x, t, p)
        with AttentionTracer(adapter, store, select=selected, layers=layers, mode=mode):
            return adapter.denoise(x, t, p)

    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        x = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        tv = _timestep(t)
        if not cfg:
            eps = traced(last, x, tv, cond)
        elif batched:
            assert both is not None
            eps_u, eps_c = traced(last, torch.cat([x, x]), tv, both).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            assert uncond is not None
            eps_u = traced(last and half == "uncond", x, tv, uncond)
            eps_c = traced(last and half == "cond", x, tv, cond)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = _step(sched, eps, t, latents, generator)
    store.meta["denoise_seconds"] = round(time.perf_counter() - start, 4)
    image = tensor_to_pil(_decode(adapter, latents))

    clustering = None
    cluster = getattr(method, "cluster", None)
    if cluster is not None:
        clustering = cluster(store, out_size=size)
        result = clustering.to_segmentation()
    else:
        result = method.segment(store, prompt=cond, out_size=size)
    return GenerationOutput(image=image, store=store, result=result.cpu(), clustering=clustering, timesteps=ts)
