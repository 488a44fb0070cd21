"""Adapter for PixArt-Sigma (and PixArt-alpha): ``PixArtTransformer2DModel`` + SDXL VAE + T5, DDPM schedule.

Each of the transformer's blocks (28 in PixArt-Sigma) has a self-attention ``attn1`` over the image tokens and a
cross-attention ``attn2`` to the T5 text states; both are plain diffusers ``Attention`` modules, so the generic
capture processor reads them. T5 is padded to ``max_sequence_length`` (300) and its padding is masked (the
transformer turns the mask into a bias of -10000), so padding never receives attention. T5 has no start token:
the text sequence is the prompt's pieces, ``</s>``, then padding.

Example:
    >>> adapter = PixArtAdapter.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")  # doctest: +SKIP
    >>> len([i for i in adapter.attention_layers().values() if i.kind == "cross"])  # doctest: +SKIP
    28
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from attnseg.errors import ConfigError, UnsupportedModelError
from attnseg.models.base import ADAPTERS
from attnseg.models.dit import TransformerAdapter
from attnseg.models.spec import DIT_COMPONENTS, Component
from attnseg.types import LayerInfo, Prompt

__all__ = ["PixArtAdapter", "pixart_attention_layers"]


def pixart_attention_layers(
    transformer: torch.nn.Module, grid: tuple[int, int], text_tokens: int
) -> dict[str, LayerInfo]:
    """Every attention layer of a ``PixArtTransformer2DModel`` for an image-token ``grid``, in forward order:
    per block ``attn1`` (self) then ``attn2`` (cross, ``text_tokens`` keys)."""
    layers: dict[str, LayerInfo] = {}
    index = 0
    for i, block in enumerate(transformer.transformer_blocks):
        for attr, kind in (("attn1", "self"), ("attn2", "cross")):
            module = getattr(block, attr, None)
            if module is None:
                continue
            name = f"transformer_blocks.{i}.{attr}"
            heads = int(module.heads)
            layers[name] = LayerInfo(
                name=name, kind=kind, grid=grid, heads=heads, head_dim=int(module.to_q.out_features // heads),
                position="block", index=index, block=f"transformer_blocks.{i}",
                text_tokens=text_tokens if kind == "cross" else 0,
            )
            index += 1
    return layers


@ADAPTERS.register("pixart", help="PixArt-Sigma / PixArt-alpha (PixArtTransformer2DModel + VAE + T5)")
class PixArtAdapter(TransformerAdapter):
    """PixArt family adapter.

    Args:
        transformer: a ``PixArtTransformer2DModel``.
        vae: an ``AutoencoderKL`` (PixArt-Sigma uses SDXL's, 4 channels, scaling 0.13025).
        text_encoder, tokenizer: the T5 encoder and its tokenizer.
        scheduler: any diffusers scheduler with ``alphas_cumprod`` (its training schedule noises latents: DDPM).
        max_sequence_length: T5 tokens (300, the PixArt-Sigma pipeline's default); prompts must fit.
        resolution, crop, name: see :class:`~attnseg.models.dit.TransformerAdapter`.

    Prompts are used as given (the diffusers pipeline's optional caption cleaning is not applied).
    """

    family: ClassVar[str] = "pixart"
    components: ClassVar[tuple[Component, ...]] = DIT_COMPONENTS["pixart"]
    reference_depth: ClassVar[dict[str, int]] = {"transformer_blocks": 28}  # PixArt-Sigma-XL-2-1024-MS
    #: GoCA's PixArt-Sigma settings (METHODS.md §3: config_model_sigma; paper App. G); layer names of the 28-block
    #: reference, mapped to the same relative depth on other configurations
    recommended: ClassVar[dict[str, dict[str, Any]]] = {
        "goca": {
            "reference_layer": "transformer_blocks.13.attn2.to_q",
            "refine_layers": [f"transformer_blocks.{i}.attn1" for i in range(10, 18)],
            "refine_order": 5,
            "timestep": 100,
            "variants": {
                # Vanilla reads blocks 10-17 only on PixArt (METHODS.md §3 Variants); the Baseline's SD 1.5 layers
                # have no PixArt counterpart: the same blocks ([proposal])
                "vanilla": {"cross_layers": [f"transformer_blocks.{i}.attn2" for i in range(10, 18)]},
                "baseline": {"cross_layers": [f"transformer_blocks.{i}.attn2" for i in range(10, 18)]},
            },
        },
        "clustering": {"positions": "all"},
    }

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: Any,
        *,
        max_sequence_length: int = 300,  # PixArt-Sigma pipeline default
        **kwargs: Any,
    ) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            name = type(scheduler).__name__
            raise UnsupportedModelError(f"scheduler {name} has no training schedule (alphas_cumprod)")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be a positive int (default 300), got {max_sequence_length!r}")
        super().__init__(transformer, vae, scheduler, **kwargs)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    # -- description ------------------------------------------------------------------------------------------------
    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        return pixart_attention_layers(self.transformer, self.token_grid(size), self.max_sequence_length)

    # -- inputs -----------------------------------------------------------------------------------------------------
    def prompt_limits(self) -> list[tuple[Any, int, str]]:
        """T5 takes :attr:`max_sequence_length` tokens; a longer prompt is refused, not cut."""
        return [(self.tokenizer, self.max_sequence_length, "the T5 text encoder")]

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Prompt:
        """T5 states ``(1, T, C)`` with ``T = max_sequence_length``; ``extra["attention_mask"] (1, T)`` masks the
        padding as the pipeline does."""
        from attnseg.prompts import tokenize

        self.check_prompt(text)
        tok = tokenize(self.tokenizer, text, self.max_sequence_length)
        ids = torch.tensor([tok.token_ids], device=self.text_encoder.device)
        mask = torch.zeros_like(ids)
        mask[:, : tok.length] = 1
        emb = self.text_encoder(ids, attention_mask=mask)[0]
        return Prompt(text=text, embeddings=emb.to(self.dtype), **tok.fields(), extra={"attention_mask": mask})

    def _check_timestep(self, timestep: float) -> int:
        n = len(self.scheduler.alphas_cumprod)
        t = int(timestep)
        if t != timestep or not 0 <= t < n:
            raise ConfigError(f"timestep must be an int in [0, {n - 1}] (the training schedule), got {timestep}")
        return t

    def add_noise(
        self, latents: torch.Tensor, timestep: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """DDPM forward process: ``sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` (float32 noise from ``generator``)."""
        t = self._check_timestep(timestep)
        gen_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        abar = self.scheduler.alphas_cumprod[t].float()
        noisy = abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.to(latents.device)
        return noisy.to(latents.dtype)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: int, prompt: Prompt) -> torch.Tensor:
        """One transformer pass; returns the noise prediction ``(B, C, h, w)`` (the learned-variance channels of
        PixArt's 8-channel output are dropped)."""
        t = self._check_timestep(timestep)
        b = latents.shape[0]
        emb = prompt.embeddings.to(self.device, self.dtype).expand(b, -1, -1)
        mask = prompt.extra.get("attention_mask")
        if mask is not None:
            mask = mask.to(self.device).expand(b, -1)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.transformer, "use_additional_conditions", False):  # PixArt-alpha 1024: size conditioning
            h, w = latents.shape[-2] * self.latent_scale, latents.shape[-1] * self.latent_scale
            added = {
                "resolution": torch.tensor([[h, w]], device=self.device, dtype=self.dtype).expand(b, -1),
                "aspect_ratio": torch.tensor([[h / w]], device=self.device, dtype=self.dtype).expand(b, -1),
            }
        out = self.transformer(
            latents.to(self.dtype), encoder_hidden_states=emb, encoder_attention_mask=mask,
            timestep=torch.full((b,), t, device=self.device, dtype=torch.long), added_cond_kwargs=added,
        ).sample
        channels = latents.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out
