"""Adapters and loading: layer descriptions derived from configs, loading from folders, clear errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from attnseg.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from attnseg.models.loading import load_model
from attnseg.models.unet import UNetAdapter, unet_attention_layers
from attnseg.testing import SD15_UNET_CONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sd15_layers_match_the_reference_architecture():
    layers = unet_attention_layers(_meta_unet(SD15_UNET_CONFIG), (64, 64))  # 512 px / 8
    selfs = [i for i in layers.values() if i.kind == "self"]
    assert len(selfs) == 16 and len(layers) == 32
    assert Counter(i.grid for i in selfs) == {(64, 64): 5, (32, 32): 5, (16, 16): 5, (8, 8): 1}
    assert {i.heads for i in layers.values()} == {8}
    assert {i.grid[0]: i.head_dim for i in selfs} == {64: 40, 32: 80, 16: 160, 8: 160}
    # forward order: down, mid, up
    order = [i.position for i in sorted(layers.values(), key=lambda i: i.index)]
    assert order == ["down"] * 12 + ["mid"] * 2 + ["up"] * 18
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1"].grid == (8, 8)
    assert layers["up_blocks.3.attentions.2.transformer_blocks.0.attn2"].kind == "cross"


def test_sd21_heads_per_resolution():
    layers = unet_attention_layers(_meta_unet(SD21_UNET_CONFIG), (96, 96))  # 768 px
    heads = {i.grid[0]: i.heads for i in layers.values() if i.kind == "self"}
    assert heads == {96: 5, 48: 10, 24: 20, 12: 20}
    assert {i.head_dim for i in layers.values()} == {64}


def test_sdxl_has_70_blocks_at_two_resolutions():
    layers = unet_attention_layers(_meta_unet(SDXL_UNET_CONFIG), (128, 128))  # 1024 px
    selfs = [i for i in layers.values() if i.kind == "self"]
    assert len(selfs) == 70
    assert Counter(i.grid for i in selfs) == {(64, 64): 10, (32, 32): 60}
    assert {i.grid[0]: i.heads for i in selfs} == {64: 10, 32: 20}


def test_non_square_input_grid(tiny_adapter):
    layers = tiny_adapter.attention_layers((48, 32))
    assert {i.grid for i in layers.values()} == {(24, 16), (12, 8)}


def test_load_from_local_folder(tiny_sd_dir, rgb_image):
    adapter = load_model(str(tiny_sd_dir))
    assert isinstance(adapter, UNetAdapter)
    assert adapter.resolution == (32, 32) and adapter.latent_scale == 2
    assert len(adapter.tokenizer) == 49408
    from PIL import Image

    pixels = adapter.preprocess(Image.open(rgb_image))
    assert pixels.shape == (1, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    latents = adapter.encode_image(pixels)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(adapter.add_noise(latents, 500, generator=g1), adapter.add_noise(latents, 500, generator=g2))
    out = adapter.denoise(latents, 300, adapter.encode_prompt(""))
    assert out.shape == latents.shape


def test_loading_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json is missing"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="local folder"):
        load_model("some-user/some-model-that-is-not-cached")
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ModelNotFoundError, match="has no PixArt transformer"):
        load_model(str(pixart))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnsupportedModelError, match="KandinskyPipeline"):
        load_model(str(other))
    with pytest.raises(ConfigError, match="dtype"):
        load_model(str(other), dtype="float64")


def test_timestep_and_tokenizer_validation(tiny_adapter):
    latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ConfigError, match="timestep"):
        tiny_adapter.denoise(latents, 1000, tiny_adapter.encode_prompt(""))

    class Empty:
        def __len__(self):
            return 2

    a = tiny_adapter
    with pytest.raises(ConfigError, match="vocabulary files"):
        UNetAdapter(a.unet, a.vae, a.text_encoder, Empty(), a.scheduler)


def test_sdxl_prompt_has_pooled_embedding(tiny_xl_adapter):
    p = tiny_xl_adapter.encode_prompt("a red car")
    assert p.embeddings.shape[-1] == 2 * 32 and p.extra["text_embeds"].shape == (1, 32)
