"""The Flux-architecture toy model through the Flux adapter: description, unchanged outputs, every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from attnseg.capture.tracer import AttentionTracer
from attnseg.models.loading import load_model
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.toyworld.flux import build_toy_flux_model, default_toy_flux_config
from attnseg.toyworld.model import save_toy_model
from attnseg.toyworld.world import WorldConfig, generate_scene, scene_seed

torch.set_num_threads(1)
WORLD = WorldConfig(image_size=16, size_range=(0.2, 0.3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    config = default_toy_flux_config(image_size=16, width=32, heads=2, double_layers=2, single_layers=2,
                                     text_width=16, world=WORLD)
    return save_toy_model(build_toy_flux_model(config, seed=0), tmp_path_factory.mktemp("flux") / "m",
                          {"steps": 0}, dtype="float32")


@pytest.fixture(scope="module")
def adapter(folder):
    return load_model(str(folder))


def test_a_flux_toy_folder_loads_as_the_flux_family(adapter, folder) -> None:
    from attnseg.models.flux import FluxAdapter
    from attnseg.models.spec import describe_model

    assert isinstance(adapter, FluxAdapter) and adapter.family == "toyworld-flux"
    assert adapter.latent_scale == 1 and adapter.token_grid() == (8, 8)
    layers = adapter.attention_layers()
    joint = [i for i in layers.values() if i.kind == "joint"]
    assert [i.name for i in joint] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                       "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert all(i.layout == ("text", "image") and i.grid == (8, 8) for i in joint)
    assert [i.joined for i in joint] == [False, False, True, True]
    spec = describe_model(str(folder))  # from the configuration alone, before loading
    assert spec.family == "toyworld-flux" and spec.patch_size == 2 and spec.resolution == (16, 16)


def test_t5_layout_tokens_and_pooled_projection(adapter) -> None:
    prompt = adapter.encode_prompt("a red circle")
    assert prompt.tokens[:4] == ("a", "red", "circle", "<eos>") and prompt.special[:4] == (False,) * 3 + (True,)
    # the adapter conditions exactly as the model was trained (words-only: zero pooled projection)
    ids = torch.tensor([prompt.token_ids])
    states, pooled = adapter.model.condition(ids)
    torch.testing.assert_close(prompt.embeddings, states)
    torch.testing.assert_close(prompt.extra["pooled_projections"], pooled)
    assert adapter.model.config.words_only and torch.count_nonzero(pooled) == 0
    assert torch.count_nonzero(prompt.embeddings[0, prompt.length - 1]) == 0  # <eos> carries nothing


def test_flux_conditioning_pools_the_mean_state(tmp_path) -> None:
    """A model trained with Flux's conditioning (configs without the text flags) gets the mean state over the
    caption's words and ``</s>`` as its pooled projection."""
    from dataclasses import replace

    config = default_toy_flux_config(image_size=16, width=32, heads=2, double_layers=1, single_layers=1,
                                     text_width=16, world=WORLD)
    config = replace(config, words_only=False, causal_text=False)
    folder = save_toy_model(build_toy_flux_model(config, seed=0), tmp_path / "m", {"steps": 0}, dtype="float32")
    prompt = load_model(str(folder)).encode_prompt("a red circle")
    states = prompt.embeddings[0]
    torch.testing.assert_close(prompt.extra["pooled_projections"][0], states[: prompt.length].mean(0))
    assert torch.count_nonzero(states[prompt.length - 1]) > 0


@pytest.mark.parametrize("mode", ["reuse", "beside"])
def test_capture_leaves_the_output_unchanged(adapter, mode) -> None:
    scene = generate_scene(scene_seed("test", 0), WORLD)
    x = adapter.encode_image(adapter.preprocess(Image.fromarray(scene.image)))
    prompt = adapter.encode_prompt(scene.caption)
    plain = adapter.denoise(x, 400, prompt)
    with AttentionTracer(adapter, mode=mode):
        hooked = adapter.denoise(x, 400, prompt)
    if mode == "beside":
        assert torch.equal(hooked, plain)
    else:
        torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["diffseg", "goca", "target", "clustering"])
def test_every_method_runs_with_the_family_defaults(adapter, method) -> None:
    scene = generate_scene(scene_seed("test", 1), WORLD)
    shapes = sorted({o.shape for o in scene.objects})
    kwargs = {"goca": {"classes": shapes, "prompt": scene.caption},
              "target": {"target": shapes[0], "prompt": scene.caption}}.get(method, {})
    out = AttentionSegmentationPipeline(adapter, method, **kwargs).run(Image.fromarray(scene.image), seed=0)
    assert out.result.labels.shape == (16, 16)
    assert out.store.meta["family"] == "toyworld-flux"
