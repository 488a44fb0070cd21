"""Adapter for Flux.1 (dev and schnell): ``FluxTransformer2DModel`` + 16-channel VAE + CLIP-L (pooled) + T5.

The transformer has 19 double-stream blocks (``transformer_blocks.*.attn``: image and text projected separately,
joint attention over ``[text, image]``, **text first**) and 38 single-stream blocks
(``single_transformer_blocks.*.attn``: the block concatenates ``[text, image]`` and the attention module receives
one sequence; its output goes through the block's ``proj_out`` with the MLP branch). Both apply RoPE from
``txt_ids``/``img_ids`` (text ids are zeros) to q and k. Latents are packed 2x2 into tokens of ``4 * C``
channels, so a 1024 px image gives 128x128 latents and a 64x64 token grid. T5 is padded to 512 tokens without a
mask (padding is attended); CLIP's pooled output conditions the timestep embedding; Flux.1-dev also embeds a
guidance scale.

Noise: rectified flow, ``x_t = (1 - sigma) x_0 + sigma * noise`` with ``sigma = t / 1000``
(:class:`~attnseg.models.dit.FlowMatchingNoise`); multi-step runs use the scheduler's resolution-dependent shift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from attnseg.errors import ConfigError, ImageError, UnsupportedModelError
from attnseg.models.base import ADAPTERS
from attnseg.models.dit import FlowMatchingNoise, TransformerAdapter, joint_layer
from attnseg.models.spec import DIT_COMPONENTS, Component
from attnseg.types import LayerInfo, Prompt

if TYPE_CHECKING:
    from attnseg.prompts import Tokenized

__all__ = ["FluxAdapter", "flux_attention_layers", "pack_latents", "unpack_latents"]

_PACK = 2  # Flux packs 2x2 latent cells into one token
# GoCA's Vanilla cross layers on Flux: blocks 8, 28 and 47 of the 57 (19 double-stream, then single-stream)
_FLUX_VANILLA = ["transformer_blocks.8.attn:cross", "single_transformer_blocks.9.attn:cross",
                 "single_transformer_blocks.28.attn:cross"]


def pack_latents(latents: torch.Tensor, factor: int = _PACK) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, (h/f)(w/f), C f^2)``: each ``f x f`` patch becomes one token (row-major grid),
    channels ordered ``(c, dy, dx)`` as the Flux pipelines pack them."""
    b, c, h, w = latents.shape
    if h % factor or w % factor:
        raise ImageError(f"latents {h}x{w} are not divisible by the packing factor {factor}")
    x = latents.reshape(b, c, h // factor, factor, w // factor, factor).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // factor) * (w // factor), c * factor * factor)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int], factor: int = _PACK) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, h w, C f^2)`` on a token ``grid`` -> ``(B, C, h f, w f)``."""
    b, _, d = tokens.shape
    gh, gw = grid
    c = d // (factor * factor)
    x = tokens.reshape(b, gh, gw, c, factor, factor).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * factor, gw * factor)


def image_ids(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(h w, 3)`` RoPE position ids of the image tokens: ``(0, row, col)``, row-major."""
    gh, gw = grid
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, 3)


def flux_attention_layers(
    transformer: torch.nn.Module, grid: tuple[int, int], text_tokens: int
) -> dict[str, LayerInfo]:
    """Every attention layer of a ``FluxTransformer2DModel`` for an image-token ``grid``, in forward order:
    the double-stream blocks' joint attention (text first), then the single-stream blocks' (one joined sequence,
    text first; the output projection is the block's ``proj_out``), each with its parts."""
    layers: dict[str, LayerInfo] = {}
    index = 0
    for container, position, joined in (
        ("transformer_blocks", "block", False), ("single_transformer_blocks", "single", True),
    ):
        for i, block in enumerate(getattr(transformer, container)):
            attn = block.attn
            head_dim = int(attn.head_dim)
            name = f"{container}.{i}.attn"
            layers.update(joint_layer(LayerInfo(
                name=name, kind="joint", grid=grid, heads=int(attn.to_q.out_features // head_dim), head_dim=head_dim,
                position=position, index=index, block=f"{container}.{i}",  # type: ignore[arg-type]
                text_tokens=text_tokens, layout=("text", "image"), joined=joined,
                output_projection=f"{container}.{i}.proj_out" if joined else "",
            )))
            index += 1
    return layers


@ADAPTERS.register("flux", help="Flux.1 dev / schnell (FluxTransformer2DModel + VAE + CLIP-L + T5)")
class FluxAdapter(FlowMatchingNoise, TransformerAdapter):
    """Flux.1 family adapter.

    Args:
        transformer: a ``FluxTransformer2DModel``.
        vae: the 16-channel ``AutoencoderKL`` (shift 0.1159, scaling 0.3611); None for a pixel-space subclass.
        text_encoder, tokenizer: CLIP-L (its pooled output conditions the timestep embedding).
        text_encoder_2, tokenizer_2: T5 and its tokenizer (the text tokens of the joint attention).
        scheduler: the ``FlowMatchEulerDiscreteScheduler`` (its config gives the grid and the dynamic shift).
        max_sequence_length: T5 tokens (default: the T5 tokenizer's limit, at most 512 as the Flux pipelines).
        guidance_scale: the embedded guidance of guidance-distilled models (Flux.1-dev); 1.0 by default, GoCA's
            reading setting (``FluxImg2ImgPipeline(guidance_scale=1)``); the text-to-image pipeline's default is
            3.5. Ignored by models without a guidance embedding (schnell).
        resolution, crop, name: see :class:`~attnseg.models.dit.TransformerAdapter` (default 1024 px).

    Override points (a subclass replaces these and inherits capture and the layer description unchanged):

    - **Image space**: :attr:`latent_scale`, :attr:`latent_channels`, :meth:`encode_image` and :meth:`decode`
      (VAE latents here; a pixel-space model returns the pixels, ``latent_scale = 1``, 3 channels packed 2x2 into
      12 per token). :meth:`preprocess` only needs :attr:`token_scale`.
    - **Prompt**: :meth:`tokenize_prompt` (tokenizer and length limit -> :class:`~attnseg.prompts.Tokenized`),
      :meth:`text_states` (ids -> the text states the transformer attends to) and :meth:`pooled_projection`
      (CLIP's pooled output here; e.g. the mean of the text states). :meth:`encode_prompt` chains them.
    - **Schedule**: :meth:`sigma` (timestep -> noise level), :meth:`add_noise`, and :meth:`sampling_scheduler`
      / :meth:`shift_mu` for multi-step runs.

    Example:
        >>> adapter = FluxAdapter.from_pretrained("black-forest-labs/FLUX.1-dev")  # doctest: +SKIP
        >>> adapter.describe()["layers"]  # doctest: +SKIP
        {'joint': 57}
    """

    family: ClassVar[str] = "flux"
    components: ClassVar[tuple[Component, ...]] = DIT_COMPONENTS["flux"]
    reference_depth: ClassVar[dict[str, int]] = {"transformer_blocks": 19, "single_transformer_blocks": 38}
    #: GoCA's Flux settings (METHODS.md §3: config_model_flux; paper App. G): uniform heads, layer weights from the
    #: image part of single-stream block 8's attention output (block 27 of 57), refinement from double-stream blocks
    #: 12 and 18, order 2; t = 407 is sigma = 0.407, the noise level of the reference's first transformer call
    #: (FluxImg2ImgPipeline, strength 0.15, 28 steps, shift mu = 1.15 at 1024 px). Layer names of Flux.1's
    #: 19 + 38 blocks, mapped to the same relative depth on other configurations.
    recommended: ClassVar[dict[str, dict[str, Any]]] = {
        "goca": {
            "head_method": "average",
            "reference_layer": "single_transformer_blocks.8.attn",
            "refine_layers": ["transformer_blocks.12.attn:self", "transformer_blocks.18.attn:self"],
            "refine_order": 2,
            "timestep": 407,
            "variants": {
                # Vanilla reads blocks 8, 28 and 47 of 57 on Flux (METHODS.md §3 Variants); Baseline: the same
                # ([proposal]: its SD 1.5 layers have no Flux counterpart)
                "vanilla": {"cross_layers": _FLUX_VANILLA},
                "baseline": {"cross_layers": _FLUX_VANILLA},
            },
        },
        "clustering": {"positions": "all"},
        # guidance-distilled: no classifier-free guidance batch
        "generate": {"guidance_scale": 1.0},
    }
    default_sample_size: ClassVar[int] = 128  # FluxPipeline: 128 latent cells (1024 px)

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module | None,
        text_encoder: torch.nn.Module | None,
        tokenizer: Any,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        scheduler: Any,
        *,
        max_sequence_length: int | None = None,
        guidance_scale: float = 1.0,  # GoCA's reading setting (FluxImg2ImgPipeline guidance_scale=1)
        **kwargs: Any,
    ) -> None:
        self.vae = vae
        self.transformer = transformer
        in_channels = int(transformer.config.in_channels)
        if in_channels != self.latent_channels * _PACK * _PACK:
            raise UnsupportedModelError(
                f"the transformer takes {in_channels} channels per token, not {self.latent_channels} latent channels "
                f"packed {_PACK}x{_PACK}"
            )
        if max_sequence_length is None:
            limit = int(getattr(tokenizer_2, "model_max_length", 512) or 512)
            max_sequence_length = min(limit, 512)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be a positive int (default 512), got {max_sequence_length!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        super().__init__(transformer, vae, scheduler, **kwargs)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)

    # -- description ------------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of one latent cell (override point: 3 in pixel space)."""
        return int(self.vae.config.latent_channels)

    @property
    def patch_size(self) -> int:
        return _PACK

    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        return flux_attention_layers(self.transformer, self.token_grid(size), self.max_sequence_length)

    # -- prompt (override points) -----------------------------------------------------------------------------------
    def tokenize_prompt(self, text: str) -> Tokenized:
        """T5 tokens padded to :attr:`max_sequence_length` (no start token; ``</s>`` then padding); a prompt that
        does not fit is an error."""
        from attnseg.prompts import tokenize

        self.check_prompt(text)
        return tokenize(self.tokenizer_2, text, self.max_sequence_length)

    def prompt_limits(self) -> list[tuple[Any, int, str]]:
        """T5 takes :attr:`max_sequence_length` tokens; a longer prompt is refused, not cut (CLIP's pooled vector
        reads the first 77 tokens, as the pipelines)."""
        return [(self.tokenizer_2, self.max_sequence_length, "the T5 text encoder")]

    def text_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(1, T)`` ids -> ``(1, T, joint_attention_dim)`` T5 states (no attention mask, as the pipeline)."""
        return self.text_encoder_2(token_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]

    def pooled_projection(self, text: str, states: torch.Tensor) -> torch.Tensor:
        """``(1, pooled_projection_dim)``: CLIP's pooled output for ``text`` (77 tokens, truncated as the
        pipeline)."""
        from attnseg.prompts import tokenize

        tok = tokenize(self.tokenizer, text)
        ids = torch.tensor([tok.token_ids], device=self.text_encoder.device)
        return self.text_encoder(ids, output_hidden_states=False).pooler_output

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Prompt:
        """``embeddings (1, T, C)`` the T5 states; ``extra["pooled_projections"]`` the pooled vector."""
        tok = self.tokenize_prompt(text)
        ids = torch.tensor([tok.token_ids], device=self.device)
        states = self.text_states(ids)
        pooled = self.pooled_projection(text, states)
        return Prompt(text=text, embeddings=states.to(self.dtype), **tok.fields(),
                      extra={"pooled_projections": pooled.to(self.dtype)})

    # -- schedule (override points) ---------------------------------------------------------------------------------
    def shift_mu(self, size: tuple[int, int] | None = None) -> float:
        """The resolution-dependent shift ``mu`` of the scheduler config for pixel input ``size`` (linear in the
        number of image tokens between ``base_image_seq_len``/``base_shift`` and ``max_image_seq_len``/``max_shift``,
        as the Flux pipelines compute it)."""
        cfg = self.scheduler.config
        gh, gw = self.token_grid(size)
        n = gh * gw
        base_len, max_len = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
        base_shift, max_shift = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
        slope = (max_shift - base_shift) / (max_len - base_len)
        return n * slope + base_shift - slope * base_len

    def sampling_scheduler(self, kind: str = "euler", size: tuple[int, int] | None = None) -> Any:
        """A Euler flow scheduler whose ``set_timesteps(n)`` gives the Flux pipelines' grid for ``size``:
        ``sigmas = linspace(1, 1/n, n)`` shifted with :meth:`shift_mu`."""
        import numpy as np

        base = super().sampling_scheduler(kind, size)
        if not base.config.get("use_dynamic_shifting", False):
            return base
        mu = self.shift_mu(size)
        set_timesteps = base.set_timesteps

        def flux_grid(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
            n = int(num_inference_steps or 0)
            if "sigmas" not in kwargs and "timesteps" not in kwargs and n > 0:
                kwargs["sigmas"] = np.linspace(1.0, 1.0 / n, n)
            kwargs.setdefault("mu", mu)
            set_timesteps(num_inference_steps, device, **kwargs)

        base.set_timesteps = flux_grid
        return base

    # -- the model --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: float, prompt: Prompt) -> torch.Tensor:
        """One transformer pass at ``timestep`` (``sigma * 1000``; the transformer is fed ``sigma``, as the
        pipelines do); latents packed 2x2, RoPE ids for the token grid; returns the unpacked velocity
        ``(B, C, h, w)``."""
        sigma = self.sigma(timestep)
        b, _, h, w = latents.shape
        grid = (h // _PACK, w // _PACK)
        tokens = pack_latents(latents.to(self.dtype))
        emb = prompt.embeddings.to(self.device, self.dtype).expand(b, -1, -1)
        pooled = prompt.extra["pooled_projections"].to(self.device, self.dtype).expand(b, -1)
        kwargs: dict[str, Any] = {}
        if getattr(self.transformer.config, "guidance_embeds", False):
            kwargs["guidance"] = torch.full((b,), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=emb, pooled_projections=pooled,
            timestep=torch.full((b,), sigma, device=self.device, dtype=self.dtype),
            img_ids=image_ids(grid, self.device, self.dtype),
            txt_ids=torch.zeros(emb.shape[1], 3, device=self.device, dtype=self.dtype),
            **kwargs,
        ).sample
        return unpack_latents(out, grid)

    def __repr__(self) -> str:
        d = self.depth()
        blocks = f"{d.get('transformer_blocks', 0)}+{d.get('single_transformer_blocks', 0)}"
        return f"FluxAdapter(blocks={blocks}, resolution={self.resolution}, T={self.max_sequence_length})"
