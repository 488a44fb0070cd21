"""The bundled toy-world model end to end: hooks leave it unchanged, and its attention segments scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.tracer import AttentionTracer
from attnseg.eval.metrics import ConfusionMatrix, PerImageHungarian
from attnseg.models.toy import ToyAdapter
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.toyworld import build_toy_model, generate_scene, load_toy_model, scene_seed

SCENES = 12


@pytest.fixture(scope="module")
def trained() -> ToyAdapter:
    return ToyAdapter(load_toy_model())


@pytest.fixture(scope="module")
def untrained(trained) -> ToyAdapter:
    return ToyAdapter(build_toy_model(trained.model.config, seed=1))


@pytest.mark.parametrize("mode", ["reuse", "beside"])
def test_hooked_output_equals_plain(trained, mode):
    scene = generate_scene(scene_seed("test", 0))
    x = trained.preprocess(Image.fromarray(scene.image))
    prompt = trained.encode_prompt(scene.caption)
    plain = trained.denoise(x, 200, prompt)
    with AttentionTracer(trained, mode=mode):
        hooked = trained.denoise(x, 200, prompt)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)


def _diffseg_miou(adapter: ToyAdapter) -> float:
    params = dict(ToyAdapter.recommended["diffseg"])
    run = params.pop("run")
    pipe = AttentionSegmentationPipeline(adapter, "diffseg", **params)
    acc = PerImageHungarian(4)
    for i in range(SCENES):
        scene = generate_scene(scene_seed("test", i))
        result = pipe.run(Image.fromarray(scene.image), prompt=scene.caption, seed=i, **run).result
        acc.update(result.resize(scene.semantic.shape).labels.numpy(), scene.semantic)
    return acc.result().miou


def _goca_miou(adapter: ToyAdapter) -> float:
    classes = ("background", "circle", "square", "triangle")
    cm = ConfusionMatrix(4)
    for i in range(SCENES):
        scene = generate_scene(scene_seed("test", i))
        shapes = sorted({o.shape for o in scene.objects})
        params = dict(ToyAdapter.recommended["goca"])
        run = params.pop("run")
        pipe = AttentionSegmentationPipeline(adapter, "goca", classes=shapes, prompt=scene.caption, **params)
        result = pipe.run(Image.fromarray(scene.image), seed=i, **run).result.resize(scene.semantic.shape)
        lut = np.array([classes.index(n) for n in result.label_names])
        cm.update(lut[result.labels.numpy()], scene.semantic)
    return cm.miou()


def test_diffseg_on_the_trained_model_beats_random_weights(trained, untrained):
    good, random = _diffseg_miou(trained), _diffseg_miou(untrained)
    assert good >= 0.5, good
    assert good - random >= 0.2, (good, random)


def test_cross_attention_on_the_trained_model_beats_random_weights(trained, untrained):
    good, random = _goca_miou(trained), _goca_miou(untrained)
    assert good >= 0.55, good
    assert good - random >= 0.25, (good, random)
