"""Tiny randomly initialised models for tests, examples and offline demos.

Nothing here is trained: attention of these models means nothing. They exercise every code path
(loading, capture, methods, CLI) offline in seconds, as diffusers' own tests do.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from attnseg.errors import AttnSegError

__all__ = [
    "SD15_UNET_CONFIG",
    "SD21_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "clip_tokenizer",
    "save_tiny_sd",
    "tiny_sd_adapter",
    "tiny_sd_components",
]


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=False))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = importlib.util.find_spec("open_clip")  # the package is not imported: only its data file is read
    if spec is None or spec.origin is None:
        raise AttnSegError("the CLIP vocabulary ships in open_clip_torch: pip install --no-deps open_clip_torch")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    num_merges = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2, merges, 2 specials = 49408
    merges = [tuple(m.split()) for m in lines[1 : num_merges + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab_list)}, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """The real CLIP BPE tokenizer (SD1.x's), built offline from the vocabulary open_clip_torch ships."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token="<|endoftext|>")
    if len(tok) != len(vocab):
        raise AttnSegError(f"CLIP tokenizer came back with {len(tok)} tokens instead of {len(vocab)}")
    return tok


def tiny_sd_components(
    *, seed: int = 0, sample_size: int = 16, xl: bool = False, block_out_channels: tuple[int, ...] = (32, 64)
) -> dict[str, Any]:
    """Random SD-style components (UNet, VAE, CLIP text encoder, real CLIP tokenizer, DDPM scheduler).

    The UNet has cross-attention in every block, ``len(block_out_channels)`` resolutions and 2 heads;
    the VAE downsamples by 2 per extra level (x2 for the default two levels).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    n = len(block_out_channels)
    text_dim = 32
    text_config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=text_dim, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=text_dim,
    )
    unet_kwargs: dict[str, Any] = {}
    comps: dict[str, Any] = {"tokenizer": tokenizer}
    if xl:
        comps["text_encoder"] = CLIPTextModel(text_config).eval()
        comps["text_encoder_2"] = CLIPTextModelWithProjection(text_config).eval()
        comps["tokenizer_2"] = clip_tokenizer()
        unet_kwargs = {
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": text_dim + 6 * 8, "cross_attention_dim": 2 * text_dim,
        }
    else:
        comps["text_encoder"] = CLIPTextModel(text_config).eval()
        unet_kwargs = {"cross_attention_dim": text_dim}
    comps["unet"] = UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=1, sample_size=sample_size, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        attention_head_dim=2, norm_num_groups=8, **unet_kwargs,
    ).eval()
    comps["vae"] = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=sample_size * 2,
    ).eval()
    comps["scheduler"] = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for k in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if k in comps:
            comps[k].requires_grad_(False)
    return comps


def tiny_sd_adapter(**kwargs: Any) -> Any:
    """A :class:`~attnseg.models.unet.UNetAdapter` over :func:`tiny_sd_components`."""
    from attnseg.models.unet import UNetAdapter

    return UNetAdapter(**tiny_sd_components(**kwargs), name="tiny-random-sd")


def save_tiny_sd(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny random SD (or SDXL with ``xl=True``) as a diffusers folder loadable by ``from_pretrained``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps = tiny_sd_components(**kwargs)
    path = Path(path)
    if "text_encoder_2" in comps:
        pipe = StableDiffusionXLPipeline(**comps)
    else:
        pipe = StableDiffusionPipeline(
            **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(path)
    return path


# Public UNet configurations of the reference checkpoints (from their unet/config.json), so that
# full-size architectures can be built offline with random weights (benchmarks) or on the meta
# device (layer-description tests).
SD15_UNET_CONFIG: dict[str, Any] = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64,
}
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "sample_size": 96,
}
SDXL_UNET_CONFIG: dict[str, Any] = {
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "in_channels": 4,
    "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 128,
}
