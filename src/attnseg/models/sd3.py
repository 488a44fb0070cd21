"""Adapter for Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT) + 16-channel VAE + CLIP-L, CLIP-G, T5.

Every block has one joint attention ``attn`` over ``[image tokens, text tokens]`` (**image first**); SD3.5's
first blocks (``dual_attention_layers``) add a second attention ``attn2`` over the image tokens alone. The text
sequence is CLIP (77 tokens: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the T5 width)
followed by T5 (``max_sequence_length``, 256; 77 zero states when the model has no T5).

**Which text tokens methods read.** One word has tokens in both the CLIP and the T5 part. By default
(``read_tokens="clip"``, as Seg4Diff reads SD3's image x CLIP columns) the T5 part is flagged ``special`` in the
:class:`~attnseg.types.Prompt`: word lookup and content tokens come from the CLIP part only, while per-pixel
normalisations over *all* text tokens still see the whole joint sequence. ``read_tokens="t5"`` reads the T5 part
instead (the CLIP part flagged special).

Noise: rectified flow, ``x_t = (1 - sigma) x_0 + sigma * noise`` with ``sigma = t / 1000``
(:class:`~attnseg.models.dit.FlowMatchingNoise`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from attnseg.errors import ConfigError
from attnseg.models.base import ADAPTERS
from attnseg.models.dit import FlowMatchingNoise, TransformerAdapter, joint_layer
from attnseg.models.spec import DIT_COMPONENTS, Component
from attnseg.types import LayerInfo, Prompt

__all__ = ["SD3Adapter", "sd3_attention_layers"]


def sd3_attention_layers(
    transformer: torch.nn.Module, grid: tuple[int, int], text_tokens: int
) -> dict[str, LayerInfo]:
    """Every attention layer of an ``SD3Transformer2DModel`` for an image-token ``grid``, in forward order: per
    block the joint ``attn`` (image first, ``text_tokens`` text tokens) with its parts, then ``attn2`` (self) where
    the block has one."""
    layers: dict[str, LayerInfo] = {}
    index = 0
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        heads = int(attn.heads)
        head_dim = int(attn.to_q.out_features // heads)
        name = f"transformer_blocks.{i}.attn"
        layers.update(joint_layer(LayerInfo(
            name=name, kind="joint", grid=grid, heads=heads, head_dim=head_dim, position="block", index=index,
            block=f"transformer_blocks.{i}", text_tokens=text_tokens, layout=("image", "text"),
        )))
        index += 1
        attn2 = getattr(block, "attn2", None)
        if attn2 is not None:
            name2 = f"transformer_blocks.{i}.attn2"
            heads2 = int(attn2.heads)
            layers[name2] = LayerInfo(
                name=name2, kind="self", grid=grid, heads=heads2, head_dim=int(attn2.to_q.out_features // heads2),
                position="block", index=index, block=f"transformer_blocks.{i}",
            )
            index += 1
    return layers


@ADAPTERS.register("sd3", help="Stable Diffusion 3 / 3.5 (SD3Transformer2DModel + VAE + CLIP-L/G + T5)")
class SD3Adapter(FlowMatchingNoise, TransformerAdapter):
    """SD3 / SD3.5 family adapter.

    Args:
        transformer: an ``SD3Transformer2DModel``.
        vae: the 16-channel ``AutoencoderKL`` (shift 0.0609, scaling 1.5305).
        text_encoder, tokenizer: CLIP-L (``CLIPTextModelWithProjection``) and its tokenizer.
        text_encoder_2, tokenizer_2: CLIP-G and its tokenizer.
        scheduler: the ``FlowMatchEulerDiscreteScheduler`` (its ``num_train_timesteps`` relates t and sigma).
        text_encoder_3, tokenizer_3: T5 and its tokenizer, or None (SD3 then uses zero T5 states).
        max_sequence_length: T5 tokens (256, the SD3 pipeline's default).
        read_tokens: ``"clip"`` (default, Seg4Diff) or ``"t5"``: which part of the text sequence word lookup uses.
        resolution, crop, name: see :class:`~attnseg.models.dit.TransformerAdapter`.
    """

    family: ClassVar[str] = "sd3"
    components: ClassVar[tuple[Component, ...]] = DIT_COMPONENTS["sd3"]
    reference_depth: ClassVar[dict[str, int]] = {"transformer_blocks": 24}  # SD3 / SD3.5 medium
    #: GoCA was not run on SD3; [proposal] settings by analogy with PixArt (reference feature and refinement
    #: blocks at the same relative depth) and t = 260, whose noise-to-signal ratio sigma / (1 - sigma) = 0.35
    #: matches the UNet reference t = 100 (sqrt((1 - a) / a) with SD's schedule)
    recommended: ClassVar[dict[str, dict[str, Any]]] = {
        "goca": {
            "reference_layer": "transformer_blocks.11.attn.to_q",
            "refine_layers": [f"transformer_blocks.{i}.attn:self" for i in range(9, 15)],
            "timestep": 260,
            "variants": {
                "baseline": {"cross_layers": [f"transformer_blocks.{i}.attn:cross" for i in range(9, 15)]},
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
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        scheduler: Any,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer_3: Any = None,
        *,
        max_sequence_length: int = 256,  # SD3 pipeline default
        read_tokens: Literal["clip", "t5"] = "clip",  # Seg4Diff reads the CLIP columns
        **kwargs: Any,
    ) -> None:
        if read_tokens not in ("clip", "t5"):
            raise ConfigError(f"read_tokens must be 'clip' or 't5', got {read_tokens!r}")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ConfigError("text_encoder_3 and tokenizer_3 (T5) come together")
        if read_tokens == "t5" and text_encoder_3 is None:
            raise ConfigError("read_tokens='t5' needs the T5 text encoder (text_encoder_3)")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be a positive int (default 256), got {max_sequence_length!r}")
        super().__init__(transformer, vae, scheduler, **kwargs)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.read_tokens = read_tokens

    # -- description ------------------------------------------------------------------------------------------------
    @property
    def clip_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def text_length(self) -> int:
        """Text tokens in the joint sequence: CLIP, then T5 (or as many zero states as CLIP when there is no T5)."""
        t5 = self.max_sequence_length if self.text_encoder_3 is not None else self.clip_length
        return self.clip_length + t5

    def token_grid(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        grid = super().token_grid(size)
        limit = getattr(self.transformer.config, "pos_embed_max_size", None)
        if limit is not None and max(grid) > int(limit):
            px = int(limit) * self.token_scale
            raise ConfigError(f"size {size or self.resolution} is too large for this model: at most {px} px a side")
        return grid

    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        return sd3_attention_layers(self.transformer, self.token_grid(size), self.text_length)

    # -- inputs -----------------------------------------------------------------------------------------------------
    def prompt_limits(self) -> list[tuple[Any, int, str]]:
        """Both CLIP encoders take :attr:`clip_length` tokens and T5 :attr:`max_sequence_length`; a longer prompt is
        refused, not cut."""
        limits = [(self.tokenizer, self.clip_length, "the CLIP text encoders")]
        if self.tokenizer_3 is not None:
            limits.append((self.tokenizer_3, self.max_sequence_length, "the T5 text encoder"))
        return limits

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Prompt:
        """CLIP-L/G penultimate states (77) and T5 states concatenated as the SD3 pipeline does:
        ``embeddings (1, 77 + T5, joint_attention_dim)``; ``extra["pooled_projections"] (1, 2048)``."""
        from attnseg.prompts import tokenize

        clip_len = self.clip_length
        self.check_prompt(text)
        dev = self.text_encoder.device
        tok = tokenize(self.tokenizer, text, clip_len)
        tok2 = tokenize(self.tokenizer_2, text, clip_len)  # same BPE, other padding: word positions agree
        out1 = self.text_encoder(torch.tensor([tok.token_ids], device=dev), output_hidden_states=True)
        out2 = self.text_encoder_2(torch.tensor([tok2.token_ids], device=dev), output_hidden_states=True)
        clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = torch.cat([out1[0], out2[0]], dim=-1)
        width = int(self.transformer.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if self.text_encoder_3 is not None:
            tok3 = tokenize(self.tokenizer_3, text, self.max_sequence_length)
            t5 = self.text_encoder_3(torch.tensor([tok3.token_ids], device=self.text_encoder_3.device))[0]
            t5_tokens, t5_ids, t5_offsets = tok3.tokens, tok3.token_ids, tok3.offsets
            t5_special, t5_length = tok3.special, tok3.length
        else:
            t5 = torch.zeros((1, clip_len, width), device=clip.device, dtype=clip.dtype)
            t5_tokens, t5_ids = ("",) * clip_len, (0,) * clip_len
            t5_offsets, t5_special, t5_length = ((0, 0),) * clip_len, (True,) * clip_len, 0
        emb = torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=1)
        if self.read_tokens == "clip":
            special = tok.special + (True,) * len(t5_tokens)
            length = tok.length
        else:
            special = (True,) * clip_len + t5_special
            length = clip_len + t5_length
        return Prompt(
            text=text, embeddings=emb.to(self.dtype), tokens=tok.tokens + t5_tokens,
            token_ids=tok.token_ids + t5_ids, offsets=tok.offsets + t5_offsets, special=special, length=length,
            extra={"pooled_projections": pooled.to(self.dtype), "read_tokens": self.read_tokens},
        )

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: float, prompt: Prompt) -> torch.Tensor:
        """One transformer pass at ``timestep`` (``sigma * 1000``); returns the velocity ``(B, 16, h, w)``."""
        self.sigma(timestep)
        b = latents.shape[0]
        emb = prompt.embeddings.to(self.device, self.dtype).expand(b, -1, -1)
        pooled = prompt.extra["pooled_projections"].to(self.device, self.dtype).expand(b, -1)
        return self.transformer(
            hidden_states=latents.to(self.dtype), encoder_hidden_states=emb, pooled_projections=pooled,
            timestep=self._timesteps(timestep, b),
        ).sample
