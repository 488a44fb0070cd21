"""What the diffusion-transformer adapters (PixArt, SD3, Flux) share: the VAE, image input, noise, loading,
and recommended settings that follow the model's depth.

Each family module (:mod:`~attnseg.models.pixart`, :mod:`~attnseg.models.sd3`, :mod:`~attnseg.models.flux`)
subclasses :class:`TransformerAdapter` and adds its layer description, prompt encoding and denoiser call.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from attnseg.errors import ConfigError, ImageError
from attnseg.models.base import DiffusionAdapter

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.models.loading import Component
    from attnseg.types import LayerInfo

__all__ = ["FlowMatchingNoise", "TransformerAdapter", "joint_layer", "scale_block_names"]

_BLOCK_NAME = re.compile(r"\b(single_transformer_blocks|transformer_blocks)\.(\d+)\b")


def scale_block_names(value: Any, depth: dict[str, int], reference: dict[str, int]) -> Any:
    """Map block indices in layer names from a reference depth to a model's depth (same relative depth).

    ``transformer_blocks.13`` of a 28-block reference is ``transformer_blocks.13`` on 28 blocks and
    ``transformer_blocks.0`` on 2 (``floor(13 * 2 / 28)``). Lists of names keep their order and lose duplicates
    (other lists, e.g. a size ``(64, 64)``, keep every item). Names of
    other containers, and non-string values, are returned unchanged.

    Args:
        value: a name, a list/tuple of names, a dict of such values (recursively), or anything else.
        depth: blocks per container in the model, e.g. ``{"transformer_blocks": 2}``.
        reference: blocks per container in the checkpoint the names were written for.
    """

    def one(name: str) -> str:
        def repl(m: re.Match[str]) -> str:
            container, index = m.group(1), int(m.group(2))
            n, ref = depth.get(container), reference.get(container)
            if not n or not ref or n == ref:
                return m.group(0)
            return f"{container}.{min(n - 1, index * n // ref)}"

        return _BLOCK_NAME.sub(repl, name)

    if isinstance(value, str):
        return one(value)
    if isinstance(value, dict):
        return {k: scale_block_names(v, depth, reference) for k, v in value.items()}
    if isinstance(value, list | tuple):
        out: list[Any] = []
        names = all(isinstance(v, str) for v in value)  # only lists of names lose duplicates, not (64, 64)
        for v in value:
            mapped = scale_block_names(v, depth, reference)
            if not names or mapped not in out:
                out.append(mapped)
        return type(value)(out) if isinstance(value, tuple) else out
    return value


def joint_layer(info: LayerInfo) -> dict[str, LayerInfo]:
    """A joint layer's description followed by its three parts (``image->image``, ``image->text``,
    ``text->image``), keyed by name, for an adapter's :meth:`~attnseg.models.base.DiffusionAdapter.attention_layers`."""
    out = {info.name: info}
    for part in ("image->image", "image->text", "text->image"):
        p = info.part_info(part)
        out[p.name] = p
    return out


class FlowMatchingNoise:
    """The rectified-flow forward process of SD3 and Flux: ``x_t = (1 - sigma) x_0 + sigma * noise``.

    ``timestep`` is on the scheduler's training grid, where ``timesteps = sigmas * num_train_timesteps``
    (``FlowMatchEulerDiscreteScheduler``), so ``sigma = timestep / num_train_timesteps``; the denoiser is fed the
    same ``timestep``. Resolution-dependent shifting (Flux) changes which timesteps a sampler visits, not this
    relation; :meth:`sampling_scheduler` applies it for multi-step runs.
    """

    scheduler: Any
    device: torch.device

    @property
    def num_train_timesteps(self) -> int:
        return int(getattr(self.scheduler.config, "num_train_timesteps", 1000))

    def sigma(self, timestep: float) -> float:
        """The noise level of ``timestep``: ``timestep / num_train_timesteps``, checked to lie in [0, 1].

        Override point: a model whose scheduler relates the two differently overrides this method.
        """
        n = self.num_train_timesteps
        t = float(timestep)
        if not 0 <= t <= n:
            raise ConfigError(f"timestep must be in [0, {n}] (sigma = timestep / {n}), got {timestep}")
        return t / n

    def add_noise(
        self, latents: torch.Tensor, timestep: float, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(1 - sigma) x_0 + sigma * noise`` with ``sigma = sigma(timestep)``; the noise is drawn from
        ``generator`` (on the generator's device, then moved), in float32."""
        sigma = self.sigma(timestep)
        gen_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noisy = (1.0 - sigma) * latents.float() + sigma * noise.to(latents.device)
        return noisy.to(latents.dtype)

    def sampling_scheduler(self, kind: str = "euler", size: tuple[int, int] | None = None) -> Any:
        """A fresh ``FlowMatchEulerDiscreteScheduler`` from the model's scheduler config, for multi-step runs
        (img2img capture, generation). ``kind`` is accepted for the UNet adapters' ``"ddim"``/``"ddpm"`` names and
        ignored: flow models step with Euler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)


class TransformerAdapter(DiffusionAdapter):
    """Base of the latent diffusion-transformer adapters: VAE in and out, image resizing, loading.

    Subclasses set :attr:`family`, :attr:`components` (what ``from_pretrained`` loads), :attr:`reference_depth`
    (blocks per container of the checkpoint :attr:`recommended` was written for) and implement the layer
    description, prompt encoding, noise and the denoiser call.

    Args:
        transformer: the diffusers transformer (the denoiser).
        vae: an ``AutoencoderKL`` (its ``scaling_factor`` and ``shift_factor`` are applied).
        scheduler: the pipeline's scheduler (its config gives the training schedule).
        resolution: default ``(H, W)`` input size; by default ``transformer.config.sample_size * latent_scale``
            (the family's default when the config has none).
        crop: ``"center-crop"`` or ``"resize"`` (squash; GoCA's reference).
        name: model id or path, recorded in results.
    """

    components: ClassVar[tuple[Component, ...]] = ()
    reference_depth: ClassVar[dict[str, int]] = {}
    #: default sample size (latent cells) when the transformer config has none
    default_sample_size: ClassVar[int] = 128

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module | None,
        scheduler: Any,
        *,
        resolution: tuple[int, int] | int | None = None,
        crop: Literal["center-crop", "resize"] = "center-crop",
        name: str = "",
    ) -> None:
        if crop not in ("center-crop", "resize"):
            raise ConfigError(f"crop must be 'center-crop' or 'resize', got {crop!r}")
        self.denoiser = transformer
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.crop = crop
        self.name = name
        if resolution is None:
            sample = getattr(transformer.config, "sample_size", None) or self.default_sample_size
            sample = sample if isinstance(sample, tuple | list) else (sample, sample)
            resolution = (int(sample[0]) * self.latent_scale, int(sample[1]) * self.latent_scale)
        elif isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))

    # -- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> TransformerAdapter:
        """Wrap a diffusers pipeline already in memory (its components, by name)."""
        comps = {c.name: getattr(pipe, c.name, None) for c in cls.components}
        return cls(**comps, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        local_files_only: bool | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> TransformerAdapter:
        """Load from a Hub model id or a local diffusers folder (``model_index.json`` + components)."""
        from attnseg.models.loading import load_pipeline_components

        comps = load_pipeline_components(
            id_or_path, cls.components, family=cls.family, dtype=dtype, device=device,
            local_files_only=local_files_only, revision=revision,
        )
        return cls(**comps, name=id_or_path, **kwargs)

    # -- description ------------------------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell: ``2 ** (levels - 1)`` of the VAE (8 for the SD/SDXL/Flux VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def token_scale(self) -> int:
        """Pixels per image token along a side (latent scale x patch size)."""
        return self.latent_scale * self.patch_size

    @property
    def patch_size(self) -> int:
        return int(getattr(self.transformer.config, "patch_size", 1) or 1)

    def latent_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = size or self.resolution
        return h // self.latent_scale, w // self.latent_scale

    def token_grid(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(h, w)`` grid of image tokens for pixel input ``size``."""
        h, w = size or self.resolution
        s = self.token_scale
        if h < s or w < s:
            raise ConfigError(f"size {(h, w)} is smaller than one image token ({s} px)")
        return h // s, w // s

    def depth(self) -> dict[str, int]:
        """Blocks per container of this model (for mapping :attr:`recommended` layer names)."""
        return {c: len(getattr(self.transformer, c)) for c in self.reference_depth if hasattr(self.transformer, c)}

    def method_defaults(self, method: str, *, variant: str | None = None) -> dict[str, Any]:
        """:attr:`recommended` settings for ``method``, with layer names mapped to this model's depth
        (:func:`scale_block_names`): the reference checkpoint's names on the reference architecture."""
        params = super().method_defaults(method, variant=variant)
        return scale_block_names(copy.deepcopy(params), self.depth(), self.reference_depth)

    # -- inputs -----------------------------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        from attnseg.io.images import pil_to_tensor, resize_image

        size = size or self.resolution
        s = self.token_scale
        if size[0] % s or size[1] % s:
            raise ImageError(f"input size {size} must be a multiple of {s} (one image token of this model)")
        return pil_to_tensor(resize_image(image, size, self.crop)).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(latents - shift_factor) * scaling_factor``, ``(B, C, H/8, W/8)``."""
        from attnseg.models.base import vae_latents

        return vae_latents(self.vae, pixels, dtype=self.dtype, device=self.device, sample=sample, generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def _timesteps(self, timestep: float, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(timestep), device=self.device, dtype=self.dtype)
