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
    "save_tiny_transformer",
    "t5_tokenizer",
    "tiny_flux_components",
    "tiny_pixart_components",
    "tiny_sd3_components",
    "tiny_sd_adapter",
    "tiny_sd_components",
    "tiny_transformer_adapter",
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


# -- diffusion transformers -------------------------------------------------------------------------------------------

# Words of the tiny T5 vocabulary (the prompts of the tests and examples), punctuation included.
_T5_WORDS = (
    "a", "an", "the", "photo", "picture", "image", "of", "with", "and", "on", "in", "at", "is", "cat", "dog",
    "grass", "wall", "sky", "tree", "person", "car", "road", "man", "hair", "detailed", "red", "blue", "green",
    "background", "house", "water", "field", "table", "chair", "bird", "horse", "boat", ",", ".", "(", ")", "-",
)


def t5_tokenizer(model_max_length: int = 32, *, vocab_size: int = 120, extra_text: tuple[str, ...] = ()) -> Any:
    """A small T5-style tokenizer trained offline: a sentencepiece **unigram** model learnt from sentences of a
    fixed word list (plus ``extra_text``), wrapped as a fast ``T5TokenizerFast`` (``<pad>`` 0, ``</s>`` 1, ``<unk>``
    2, no start token, ``</s>`` appended, ``"▁"`` word-boundary pieces). Words outside the list split into several
    pieces, as rare words do in T5's vocabulary.

    Needs the ``sentencepiece`` package (``pip install attnseg[test]``).
    """
    import io
    import random

    try:
        import sentencepiece as spm
    except ImportError as exc:  # pragma: no cover - a test dependency
        raise AttnSegError("the tiny T5 tokenizer is trained with sentencepiece: pip install sentencepiece") from exc
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_T5_WORDS) for _ in range(8)) for _ in range(400)] + list(extra_text)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=model_max_length,
    )


def _t5_encoder(vocab: int, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, is_encoder_decoder=False)
    return T5EncoderModel(config).eval()


def _tiny_vae(latent_channels: int, **kwargs: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8, **kwargs,
    ).eval()


def _clip_text(with_projection: bool, hidden: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _frozen(comps: dict[str, Any]) -> dict[str, Any]:
    for v in comps.values():
        if isinstance(v, torch.nn.Module):
            v.requires_grad_(False)
    return comps


def tiny_pixart_components(*, seed: int = 0, sample_size: int = 16, layers: int = 2) -> dict[str, Any]:
    """Random PixArt-style components with the real block types: ``PixArtTransformer2DModel`` (2 heads x 8,
    patch 2, learned variance), a 4-channel VAE (x2), a T5 encoder over :func:`t5_tokenizer`, DDPM schedule."""
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    t5_dim = 32
    comps = {
        "transformer": PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=16, caption_channels=t5_dim, sample_size=sample_size, patch_size=2,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False,
            interpolation_scale=1,
        ).eval(),
        "vae": _tiny_vae(4, scaling_factor=0.13025),
        "text_encoder": _t5_encoder(len(tokenizer), t5_dim),
        "tokenizer": tokenizer,
        "scheduler": DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    }
    return _frozen(comps)


def tiny_sd3_components(*, seed: int = 0, sample_size: int = 16, layers: int = 2, t5: bool = True) -> dict[str, Any]:
    """Random SD3.5-style components: ``SD3Transformer2DModel`` (joint blocks, the first with SD3.5's second
    attention, q/k RMS norms, 2 heads x 8), CLIP-L and CLIP-G with projections over the real CLIP tokenizer, T5
    (optional), a 4-channel VAE with shift and scale, flow-matching scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    clip_dim, joint = 16, 32
    comps: dict[str, Any] = {
        "transformer": SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16,
            pooled_projection_dim=2 * clip_dim, pos_embed_max_size=sample_size, dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ).eval(),
        "vae": _tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": _clip_text(True, clip_dim),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": _clip_text(True, clip_dim),
        "tokenizer_2": clip_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if t5:
        tok = t5_tokenizer()
        comps["tokenizer_3"] = tok
        comps["text_encoder_3"] = _t5_encoder(len(tok), joint)
    return _frozen(comps)


def tiny_flux_components(
    *, seed: int = 0, layers: int = 2, single_layers: int = 2, guidance: bool = True
) -> dict[str, Any]:
    """Random Flux-style components: ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE over
    2 + 2 + 4 channels, 2 heads x 8, guidance embedding like Flux.1-dev), CLIP (pooled), T5 over
    :func:`t5_tokenizer` (32 tokens), a 4-channel VAE with shift and scale (packed 2x2 into 16 channels), and the
    dynamic-shift flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    t5_dim, clip_dim = 32, 16
    comps = {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=t5_dim, pooled_projection_dim=clip_dim,
            guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
        ).eval(),
        "vae": _tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": _clip_text(False, clip_dim),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": _t5_encoder(len(tokenizer), t5_dim),
        "tokenizer_2": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    }
    return _frozen(comps)


_TINY = {"pixart": tiny_pixart_components, "sd3": tiny_sd3_components, "flux": tiny_flux_components}


def tiny_transformer_adapter(family: str, *, resolution: int = 32, **kwargs: Any) -> Any:
    """A tiny random adapter of a transformer family (``"pixart"``, ``"sd3"``, ``"flux"``) at ``resolution`` px."""
    from attnseg.models import import_builtin_adapters
    from attnseg.models.base import ADAPTERS

    import_builtin_adapters()
    comps = _TINY[family](**kwargs)
    return ADAPTERS.get(family)(**comps, resolution=resolution, name=f"tiny-random-{family}")


def save_tiny_transformer(path: str | Path, family: str, **kwargs: Any) -> Path:
    """Write a tiny random model of a transformer family as a diffusers folder (``model_index.json`` + components)."""
    from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

    comps = _TINY[family](**kwargs)
    pipe_cls = {"pixart": PixArtSigmaPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    path = Path(path)
    pipe_cls(**comps).save_pretrained(path)
    return path
