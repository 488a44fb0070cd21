"""Adapter for the Stable Diffusion UNet family: SD 1.x, SD 2.x and SDXL (latent diffusion, CLIP text)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from attnseg.errors import ConfigError, ImageError, UnsupportedModelError
from attnseg.io.images import pil_to_tensor, resize_image
from attnseg.models.base import ADAPTERS, DiffusionAdapter
from attnseg.types import LayerInfo, Prompt

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["UNetAdapter", "unet_attention_layers", "unet_size_multiple"]


def _halve(size: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = size
    for _ in range(times):  # a stride-2 conv with padding 1 rounds up
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def unet_size_multiple(unet: torch.nn.Module) -> int:
    """``2 ** d`` for a UNet that downsamples ``d`` times: latent sides that are multiples of it halve exactly
    at every level, so every attention grid keeps the input's aspect ratio."""
    return 2 ** sum(getattr(block, "downsamplers", None) is not None for block in getattr(unet, "down_blocks", []))


def unet_attention_layers(unet: torch.nn.Module, latent_size: tuple[int, int]) -> dict[str, LayerInfo]:
    """Describe every attention layer of a ``UNet2DConditionModel`` for latents of ``latent_size``.

    The token grid of each block is derived from the blocks' own down/up-samplers, so any
    configuration (SD1.x, SD2.x, SDXL, the toy model, tiny test models) is described correctly.
    """
    from diffusers.models.attention_processor import Attention

    down_blocks = list(getattr(unet, "down_blocks", []))
    levels_before: dict[str, int] = {}
    level = 0
    for i, block in enumerate(down_blocks):
        levels_before[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    levels_before["mid_block"] = level
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        levels_before[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None) is not None:
            level -= 1

    layers: dict[str, LayerInfo] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or not name.rsplit(".", 1)[-1].startswith("attn"):
            continue
        parts = name.split(".")
        block = "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])
        if block not in levels_before:
            continue
        position = "mid" if block == "mid_block" else block.split("_")[0]
        kind = "cross" if module.is_cross_attention else "self"
        heads = int(module.heads)
        head_dim = int(module.to_q.out_features // heads)
        layers[name] = LayerInfo(
            name=name, kind=kind, grid=_halve(latent_size, levels_before[block]), heads=heads, head_dim=head_dim,
            position=position, index=0, block=block,  # type: ignore[arg-type]
        )
    # Modules are registered down, up, mid; the forward pass runs down, mid, up.
    rank = {"down": 0, "mid": 1, "up": 2}
    ordered = sorted(layers.values(), key=lambda i: rank[i.position])  # stable: keeps order within a position
    return {i.name: replace(i, index=k) for k, i in enumerate(ordered)}


@ADAPTERS.register("unet", help="Stable Diffusion 1.x / 2.x / XL (UNet2DConditionModel + AutoencoderKL + CLIP)")
class UNetAdapter(DiffusionAdapter):
    """Stable Diffusion UNet family adapter.

    Args:
        unet: a ``UNet2DConditionModel``.
        vae: an ``AutoencoderKL``.
        text_encoder, tokenizer: CLIP text encoder and tokenizer.
        scheduler: any diffusers scheduler with ``alphas_cumprod`` (its training schedule noises latents).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``).
        resolution: default ``(H, W)`` input size; by default ``unet.config.sample_size * latent_scale``.
        crop: ``"center-crop"`` (DiffSeg's reference) or ``"resize"`` (squash, GoCA's reference).
        name: model id or path, recorded in results.

    Example:
        >>> adapter = UNetAdapter.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
    """

    family: ClassVar[str] = "unet"

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: Any,
        *,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any = None,
        resolution: tuple[int, int] | int | None = None,
        crop: Literal["center-crop", "resize"] = "center-crop",
        name: str = "",
    ) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            name = type(scheduler).__name__
            raise UnsupportedModelError(f"scheduler {name} has no training schedule (alphas_cumprod)")
        self.denoiser = unet
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.crop = crop
        self.name = name
        self.is_sdxl = text_encoder_2 is not None
        if self.is_sdxl and tokenizer_2 is None:
            raise ConfigError("text_encoder_2 needs tokenizer_2")
        if resolution is None:
            sample = unet.config.sample_size
            sample = sample if isinstance(sample, (tuple, list)) else (sample, sample)
            resolution = (int(sample[0]) * self.latent_scale, int(sample[1]) * self.latent_scale)
        elif isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self._check_tokenizer(tokenizer, text_encoder)

    @staticmethod
    def _check_tokenizer(tokenizer: Any, text_encoder: torch.nn.Module) -> None:
        # A tokenizer built without its files can come back with only its special tokens.
        vocab = len(tokenizer)
        expected = getattr(text_encoder.config, "vocab_size", None)
        if vocab <= 2 or (expected is not None and vocab > expected):
            raise ConfigError(
                f"the tokenizer has {vocab} tokens but the text encoder expects {expected}: its vocabulary files "
                "were not loaded (pass vocab= and merges=, or load it with from_pretrained)"
            )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> UNetAdapter:
        """Wrap a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` already in memory."""
        return cls(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
            text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
            **kwargs,
        )

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
    ) -> UNetAdapter:
        """Load from a Hub model id or a local diffusers folder (``model_index.json`` + components)."""
        from attnseg.models.loading import load_components

        comps = load_components(
            id_or_path, family="unet", dtype=dtype, device=device, local_files_only=local_files_only, revision=revision
        )
        return cls(**comps, name=id_or_path, **kwargs)

    # -- description ------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Any input whose sides are multiples of the latent cell times the UNet's downsampling (64 for SD)."""
        return self.latent_scale * unet_size_multiple(self.unet)

    def latent_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = size or self.resolution
        s = self.latent_scale
        return h // s, w // s

    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        return unet_attention_layers(self.unet, self.latent_size(size))

    # -- inputs -----------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or self.resolution
        s = self.latent_scale
        if size[0] % s or size[1] % s:
            raise ImageError(f"input size {size} must be a multiple of {s} (the VAE's downsampling)")
        return pil_to_tensor(resize_image(image, size, self.crop)).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        from attnseg.models.base import vae_latents

        return vae_latents(self.vae, pixels, dtype=self.dtype, sample=sample, generator=generator)

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Prompt:
        from attnseg.prompts import tokenize

        tok = tokenize(self.tokenizer, text)
        ids = torch.tensor([tok.token_ids], device=self.device)
        if not self.is_sdxl:
            emb = self.text_encoder(ids)[0]
            return Prompt(text=text, embeddings=emb.to(self.dtype), **tok.fields())
        # SDXL: penultimate hidden states of both encoders, concatenated on channels; the second one's
        # pooled output and the size/crop ids condition the time embedding.
        tok2 = tokenize(self.tokenizer_2, text)  # same BPE, other padding: word positions agree
        ids2 = torch.tensor([tok2.token_ids], device=self.device)
        out1 = self.text_encoder(ids, output_hidden_states=True)
        out2 = self.text_encoder_2(ids2, output_hidden_states=True)
        emb = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2.text_embeds if hasattr(out2, "text_embeds") else out2[0]
        return Prompt(text=text, embeddings=emb.to(self.dtype), **tok.fields(), extra={"text_embeds": pooled})

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def add_noise(
        self, latents: torch.Tensor, timestep: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with the scheduler's training schedule, in float32.

        ``eps`` is drawn in float32 on the **generator's** device (the CPU for the pipeline's seeded generator, and
        for no generator), then moved to the latents' device: a seed gives the same noise on the CPU, CUDA and
        MPS, at the cost of one host-to-device copy of a latent-sized tensor.
        """
        self._check_timestep(timestep)
        draw_on = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=torch.float32)
        abar = self.scheduler.alphas_cumprod[timestep].float().to(latents.device)
        noisy = abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.to(latents.device)
        return noisy.to(latents.dtype)

    def _check_timestep(self, timestep: int) -> None:
        n = len(self.scheduler.alphas_cumprod)
        if not 0 <= int(timestep) < n:
            raise ConfigError(f"timestep must be in [0, {n - 1}] (the training schedule), got {timestep}")

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: int, prompt: Prompt) -> torch.Tensor:
        self._check_timestep(timestep)
        b = latents.shape[0]
        cond = prompt.embeddings.to(self.device, self.dtype).expand(b, -1, -1)
        t = torch.full((b,), int(timestep), device=self.device, dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            h, w = (latents.shape[-2] * self.latent_scale, latents.shape[-1] * self.latent_scale)
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(b, -1)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": prompt.extra["text_embeds"].to(self.device, self.dtype).expand(b, -1),
                "time_ids": time_ids,
            }
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=cond, **kwargs).sample
