"""The Flux-architecture toy model: diffusers' ``FluxTransformer2DModel`` with a tiny config, in pixel space.

Everything that makes the Flux transformer Flux is kept: double-stream blocks with joint attention (text
first) followed by single-stream blocks over the concatenated sequence, RoPE positions from ``img_ids`` (row,
column) and ``txt_ids`` (zeros), a T5-layout text encoder (``transformers.T5EncoderModel``; no start token,
``</s>`` then padding), 2x2 packing of the image into tokens, and rectified-flow training
(``x_t = (1 - sigma) x_0 + sigma * noise``, the model predicts ``noise - x_0``). Only the sizes are small, and
the "latents" are the pixels in [-1, 1] (no VAE): a 32 px scene is a 16x16 token grid of 12 channels
(3 colours x 2 x 2).

The text path is where the toy departs from Flux.1, whose 4.7 B-parameter T5 learned on billions of captions
to give each word its own meaning: a toy encoder trained from scratch with the transformer does not. Read
bidirectionally, every word's state carries the whole caption, and the pooled vector hands the caption to every
image token through the modulation; trained so, the toy's word maps did not follow the shapes (AUROC of a shape
word's cross-attention over the shape's pixels 0.36-0.62 in every block and head). The shipped model reads the
caption left to right (``causal_text``, as CLIP) and conditions on the words alone (``words_only``: the states
after the words and the pooled projection are zeros), the same text path as the UNet toy. Configs without these
flags load as Flux's conditioning.

On disk it uses the toy-model layout of :mod:`attnseg.toyworld.model` (``model.safetensors`` with
``transformer.*`` and ``text_encoder.*`` weights, ``config.json`` with ``"arch": "flux"``, ``meta.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnseg.errors import AttnSegError
from attnseg.toyworld.tokenizer import WordTokenizer
from attnseg.toyworld.world import WorldConfig, world_words

if TYPE_CHECKING:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5EncoderModel

__all__ = [
    "PACK",
    "ToyFluxConfig",
    "ToyFluxModel",
    "build_toy_flux_model",
    "default_toy_flux_config",
    "image_ids",
    "pack",
    "unpack",
]

PACK = 2
"""Pixels per token along each side (Flux packs 2x2 latent cells into one token)."""


@dataclass(frozen=True)
class ToyFluxConfig:
    """The exact configuration of a Flux-architecture toy model (what ``config.json`` holds).

    Attributes:
        world: the toy world the model is trained on.
        tokenizer: ``{"vocab": [...], "max_length": T, "start_token": False}`` (T5 layout).
        transformer: keyword arguments of ``FluxTransformer2DModel``.
        text_encoder: keyword arguments of ``T5Config``.
        scheduler: keyword arguments of ``FlowMatchEulerDiscreteScheduler``.
        words_only: how the caption conditions the transformer. False: as Flux, every T5 state (words, ``</s>``,
            padding) enters the joint attention and their mean is the pooled projection. True: the states of
            ``</s>`` and the padding are replaced by zeros and the pooled projection is zero, so the caption
            reaches an image token only by attending to its words (in a bidirectional encoder every state
            summarises the whole caption, and the pooled vector hands it to every token through the modulation;
            either lets the model read the caption without binding words to places). Configs written without
            the field read False.
        causal_text: the T5 encoder reads the caption left to right (a causal mask, as CLIP), so a word's
            state carries only the words before it: "circle" in "a striped red circle" then stands for that one
            object, as in the UNet toy. False (Flux's T5, and configs written without the field): bidirectional.
    """

    world: WorldConfig
    tokenizer: dict[str, Any]
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)
    words_only: bool = False
    causal_text: bool = False

    arch = "flux"

    @property
    def image_size(self) -> int:
        return self.world.image_size

    def to_dict(self) -> dict[str, Any]:
        from attnseg.toyworld.model import FORMAT_VERSION, _jsonable

        return {
            "format": FORMAT_VERSION,
            "arch": self.arch,
            "world": self.world.to_dict(),
            "tokenizer": dict(self.tokenizer),
            "transformer": _jsonable(self.transformer),
            "text_encoder": _jsonable(self.text_encoder),
            "scheduler": _jsonable(self.scheduler),
            "words_only": self.words_only,
            "causal_text": self.causal_text,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyFluxConfig:
        from attnseg.toyworld.model import FORMAT_VERSION

        if d.get("format") != FORMAT_VERSION or d.get("arch") != cls.arch:
            raise AttnSegError(f"not a Flux toy model config (format {d.get('format')!r}, arch {d.get('arch')!r})")
        transformer = dict(d["transformer"])
        if "axes_dims_rope" in transformer:
            transformer["axes_dims_rope"] = tuple(transformer["axes_dims_rope"])
        return cls(
            world=WorldConfig.from_dict(d["world"]),
            tokenizer=dict(d["tokenizer"]),
            transformer=transformer,
            text_encoder=dict(d["text_encoder"]),
            scheduler=dict(d["scheduler"]),
            words_only=bool(d.get("words_only", False)),
            causal_text=bool(d.get("causal_text", False)),
        )


def default_toy_flux_config(
    *,
    image_size: int = 32,
    width: int = 128,
    heads: int = 4,
    double_layers: int = 3,
    single_layers: int = 3,
    text_width: int = 64,
    text_layers: int = 2,
    max_length: int | None = None,
    world: WorldConfig | None = None,
    words_only: bool = True,
    causal_text: bool = True,
) -> ToyFluxConfig:
    """The shipped architecture, with the knobs that matter exposed.

    Args:
        image_size: image side in pixels; the token grid is ``image_size / 2`` per side.
        width: the transformer's inner width (``heads * head_dim``).
        heads: attention heads of every block.
        double_layers, single_layers: double-stream (joint) and single-stream blocks.
        text_width, text_layers: the T5 encoder's width and depth (4 heads, gated-GELU MLP 2x wide).
        max_length: text length ``T``; default = the longest caption the world can produce + 1 (``</s>``).
        world: the toy world; default ``WorldConfig(image_size=image_size)``.
        words_only, causal_text: see :class:`ToyFluxConfig`.
    """
    from attnseg.toyworld.model import _longest_caption

    world = world or WorldConfig(image_size=image_size)
    if world.image_size != image_size:
        raise ValueError(f"image_size {image_size} differs from world.image_size {world.image_size}")
    if image_size % PACK:
        raise ValueError(f"image_size must be a multiple of {PACK}, got {image_size}")
    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads {heads}")
    head_dim = width // heads
    if head_dim < 8 or head_dim % 4:
        raise ValueError(f"head_dim = width / heads must be a multiple of 4 and >= 8, got {head_dim}")
    if text_width % 4:
        raise ValueError(f"text_width must be a multiple of 4 (heads), got {text_width}")
    if max_length is None:
        max_length = _longest_caption(world) + 1
    tokenizer = WordTokenizer(world_words(world), max_length=max_length, start_token=False)
    # RoPE axes (id, row, column) in Flux's proportions (16, 56, 56) / 128, rounded to even sizes.
    axis = head_dim * 7 // 16 // 2 * 2
    rope = (head_dim - 2 * axis, axis, axis)
    transformer = {
        "patch_size": 1,
        "in_channels": 3 * PACK * PACK,
        "out_channels": 3 * PACK * PACK,
        "num_layers": double_layers,
        "num_single_layers": single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": text_width,
        "pooled_projection_dim": text_width,
        "guidance_embeds": False,
        "axes_dims_rope": rope,
    }
    text = {
        "vocab_size": len(tokenizer),
        "d_model": text_width,
        "d_kv": text_width // 4,
        "d_ff": 2 * text_width,
        "num_layers": text_layers,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": max_length,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": tokenizer.pad_id,
        "eos_token_id": tokenizer.eos_id,
        "decoder_start_token_id": tokenizer.pad_id,
    }
    scheduler = {"num_train_timesteps": 1000, "shift": 1.0}
    return ToyFluxConfig(world=world, tokenizer=tokenizer.to_dict(), transformer=transformer, text_encoder=text,
                         scheduler=scheduler, words_only=words_only, causal_text=causal_text)


def pack(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/2)(W/2), 4C)`` tokens, row-major, as Flux packs latents."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``height x width`` image."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    x = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(grid: tuple[int, int], *, device: Any = None) -> torch.Tensor:
    """``(h*w, 3)`` Flux image position ids ``(0, row, column)`` of a token grid."""
    import torch

    h, w = grid
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


@dataclass
class ToyFluxModel:
    """A loaded Flux-architecture toy model.

    Attributes:
        transformer: the ``FluxTransformer2DModel`` (input: packed pixels ``(B, N, 12)``).
        text_encoder: the ``T5EncoderModel``.
        tokenizer: the word tokenizer (T5 layout: no start token).
        scheduler: the ``FlowMatchEulerDiscreteScheduler`` (sigmas for sampling).
        config: the exact configuration.
        meta: the training record (``meta.json``), empty for an untrained model.
    """

    transformer: FluxTransformer2DModel
    text_encoder: T5EncoderModel
    tokenizer: WordTokenizer
    scheduler: FlowMatchEulerDiscreteScheduler
    config: ToyFluxConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> FluxTransformer2DModel:
        return self.transformer

    def condition(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` token ids -> T5 states ``(B, T, C)`` and pooled ``(B, C)``.

        As Flux (both flags off): no mask, pooled = the mean state over the non-padding tokens (the caption's words
        and ``</s>``). ``config.causal_text`` masks each token's view of the tokens after it; ``config.words_only``
        zeroes the states after the words and the pooled vector (see :class:`ToyFluxConfig`).
        """
        import torch

        mask = None
        if self.config.causal_text:
            t = ids.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            mask = causal[None, None].expand(ids.shape[0], 1, t, t)
        states = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.config.words_only:
            words = ((ids != self.tokenizer.pad_id) & (ids != self.tokenizer.eos_id)).to(states.dtype)[..., None]
            states = states * words
        return states, self.pool(ids, states)

    def pool(self, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The pooled projection ``(B, C)`` of :meth:`condition`'s ``states`` for token ids ``ids``: zeros with
        ``config.words_only``, else the mean state over the non-padding tokens."""
        import torch

        if self.config.words_only:
            return torch.zeros_like(states[:, 0])
        keep = (ids != self.tokenizer.pad_id).to(states.dtype)[..., None]
        return (states * keep).sum(1) / keep.sum(1).clamp_min(1)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        ids = torch.tensor(self.tokenizer.batch(texts), device=self.text_encoder.device)
        return self.condition(ids)

    def predict(
        self, noisy: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """Velocity ``noise - x_0`` predicted for ``noisy (B, 3, H, W)`` at ``sigma (B,)`` in [0, 1]."""
        import torch

        _b, _, h, w = noisy.shape
        grid = (h // PACK, w // PACK)
        txt_ids = torch.zeros(states.shape[1], 3, device=noisy.device)
        out = self.transformer(
            hidden_states=pack(noisy),
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=image_ids(grid, device=noisy.device),
            txt_ids=txt_ids,
        ).sample
        return unpack(out, h, w)

    # -- training (see attnseg.toyworld.train) ---------------------------------------------------
    def draw(self, pixels: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random draws of one training step: sigma (logit-normal, as SD3/Flux training) and noise."""
        import torch

        b = pixels.shape[0]
        sigma = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(pixels.shape, generator=gen)
        return {"sigma": sigma.to(pixels.device), "noise": noise.to(pixels.device)}

    def loss(
        self, pixels: torch.Tensor, ids: torch.Tensor, draws: dict[str, torch.Tensor], *, bf16: bool = True
    ) -> torch.Tensor:
        """Rectified-flow loss: ``|| v(x_t) - (noise - x_0) ||^2`` with ``x_t = (1 - s) x_0 + s noise``
        (text encoder and transformer under bf16 autocast)."""
        import torch

        s = draws["sigma"].view(-1, 1, 1, 1)
        noisy = (1 - s) * pixels + s * draws["noise"]
        with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            states, pooled = self.condition(ids)
            pred = self.predict(noisy, draws["sigma"], states, pooled)
        return torch.nn.functional.mse_loss(pred.float(), draws["noise"] - pixels)

    # -- weights ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules by their weight-name prefix."""
        return {"transformer": self.transformer, "text_encoder": self.text_encoder}

    def state_dict(self) -> dict[str, torch.Tensor]:
        from attnseg.toyworld.model import module_state_dict

        return module_state_dict(self.modules())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from attnseg.toyworld.model import load_module_state_dict

        load_module_state_dict(self.modules(), state)


def build_toy_flux_model(config: ToyFluxConfig, *, seed: int | None = 0) -> ToyFluxModel:
    """Construct a Flux toy model from ``config`` with freshly initialised weights (``seed`` fixes them)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config.transformer)
    text_encoder = T5EncoderModel(T5Config(**config.text_encoder))
    scheduler = FlowMatchEulerDiscreteScheduler(**config.scheduler)
    tokenizer = WordTokenizer.from_dict(config.tokenizer)
    return ToyFluxModel(transformer, text_encoder, tokenizer, scheduler, config)
