"""Both bundled toy-world models end to end: every method with the family's defaults segments unseen scenes well
above the same architecture with random weights and above model-free baselines scored on the same scenes.

Floors are regression floors: each sits below the value measured on these scenes (given in the comment) by a
margin, and far above what random weights give. The benchmark (``benchmarks/toyworld.py``) reports the same
methods on 200 test scenes with intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.tracer import AttentionTracer
from attnseg.eval.metrics import ConfusionMatrix, PerImageHungarian, best_match_iou, label_masks
from attnseg.models.loading import load_model
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.toyworld import baselines as B
from attnseg.toyworld import build_toy_model, generate_scene, scene_seed
from attnseg.toyworld.world import Scene, WorldConfig

torch.set_num_threads(1)
SCENES = 10


@dataclass(frozen=True)
class Quality:
    diffseg: float  # per-image Hungarian mIoU over the classes present, family defaults, caption as prompt
    goca: float  # semantic mIoU, class ids as predicted
    target: float  # mean IoU of one mask per shape word
    clustering: float  # best-match IoU of the mask set, per class present


def _scenes() -> list[Scene]:
    return [generate_scene(scene_seed("test", i)) for i in range(SCENES)]


def _shapes(scene: Scene) -> list[str]:
    return sorted({o.shape for o in scene.objects})


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.logical_and(pred, target).sum() / np.logical_or(pred, target).sum())


def _best_match(masks: np.ndarray, semantic: np.ndarray) -> float:
    _, gt = label_masks(semantic, ignore_index=None)
    return float(np.nanmean(best_match_iou(masks, gt)))


def _quality(adapter: Any) -> Quality:
    world = adapter.model.config.world
    c = len(world.classes)
    hungarian, semantic = PerImageHungarian(c, present_only=True), ConfusionMatrix(c)
    target, clustering = [], []
    for i, scene in enumerate(_scenes()):
        image, shapes = Image.fromarray(scene.image), _shapes(scene)
        out = AttentionSegmentationPipeline(adapter, "diffseg").run(image, prompt=scene.caption, seed=i).result
        hungarian.update(out.labels.numpy(), scene.semantic)
        out = AttentionSegmentationPipeline(adapter, "goca", classes=shapes, prompt=scene.caption).run(
            image, seed=i).result
        lut = np.array([world.classes.index(n) for n in out.label_names])
        semantic.update(lut[out.labels.numpy()], scene.semantic)
        for shape in shapes:
            out = AttentionSegmentationPipeline(adapter, "target", target=shape, prompt=scene.caption).run(
                image, seed=i).result
            target.append(_iou(out.labels.numpy() == 1, scene.semantic == world.classes.index(shape)))
        out = AttentionSegmentationPipeline(adapter, "clustering").run(image, seed=i).result
        clustering.append(_best_match(out.scores.numpy().astype(bool), scene.semantic))
    return Quality(hungarian.result().miou, semantic.miou(), float(np.mean(target)), float(np.mean(clustering)))


def _baselines() -> Quality:
    """Model-free baselines on the same scenes, each under the rule of the method it is compared with."""
    scenes = _scenes()
    hungarian = PerImageHungarian(len(WorldConfig().classes), present_only=True)
    whole, pooled = [], []
    for scene in scenes:
        hungarian.update(B.kmeans_rgb(scene.image, len(np.unique(scene.semantic))), scene.semantic)
        for shape in _shapes(scene):
            mask = scene.semantic == WorldConfig().classes.index(shape)
            whole.append(_iou(np.ones_like(mask), mask))
        pooled.append(_best_match(B.kmeans_rgb_pooled(scene.image), scene.semantic))
    return Quality(hungarian.result().miou, float("nan"), float(np.mean(whole)), float(np.mean(pooled)))


@pytest.fixture(scope="module")
def measured(request) -> tuple[str, Quality, Quality]:
    """(model name, trained quality, random-weight quality); the model name comes from the test's parameter."""
    trained = load_model(request.param)
    model = build_toy_model(trained.model.config, seed=1)
    for module in model.modules().values():
        module.eval()
    untrained = type(trained)(model)
    return request.param, _quality(trained), _quality(untrained)


@pytest.fixture(scope="module")
def baselines() -> Quality:
    return _baselines()


def test_hooked_output_equals_plain() -> None:
    adapter = load_model("toyworld")
    scene = generate_scene(scene_seed("test", 0))
    x = adapter.preprocess(Image.fromarray(scene.image))
    prompt = adapter.encode_prompt(scene.caption)
    plain = adapter.denoise(x, 200, prompt)
    for mode in ("reuse", "beside"):
        with AttentionTracer(adapter, mode=mode):
            hooked = adapter.denoise(x, 200, prompt)
        torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)


# Measured on these 10 scenes (trained / random weights): UNet DiffSeg 0.563 / 0.204, GoCA 0.500 / 0.125, target
# 0.473 / 0.184, clustering 0.673 / 0.593; Flux DiffSeg 0.428 / 0.150, GoCA 0.228 / 0.147, target 0.304 / 0.177,
# clustering 0.614 / 0.553. A Flux toy whose words do not follow the shapes (a bidirectional text encoder, as
# first trained) gave GoCA 0.12 and the target method 0.11 on 200 test scenes: these floors fail it.
FLOORS: dict[str, dict[str, tuple[float, float]]] = {  # method -> (floor, margin over random weights)
    "toyworld": {"diffseg": (0.48, 0.25), "goca": (0.42, 0.25), "target": (0.4, 0.2), "clustering": (0.6, 0.04)},
    "toyworld-flux": {"diffseg": (0.4, 0.2), "goca": (0.2, 0.05), "target": (0.25, 0.08), "clustering": (0.56, 0.03)},
}
CASES = [(name, method) for name, floors in FLOORS.items() for method in floors]


@pytest.mark.parametrize(("measured", "method"), CASES, indirect=["measured"])
def test_defaults_segment_far_above_random_weights(measured, method) -> None:
    name, good, random = measured
    floor, margin = FLOORS[name][method]
    assert getattr(good, method) >= floor, (name, good)
    assert getattr(good, method) - getattr(random, method) >= margin, (good, random)


@pytest.mark.parametrize("measured", ["toyworld"], indirect=True)
def test_unet_defaults_beat_model_free_baselines_on_the_same_scenes(measured, baselines) -> None:
    """DiffSeg against RGB k-means with k = the number of classes present (an oracle k), same Hungarian rule;
    the target method against marking the whole image (0.563 vs 0.487 and 0.473 vs 0.195 measured)."""
    _, good, _ = measured  # the Flux toy's DiffSeg is below this k-means here (0.465 vs 0.487): not asserted
    assert good.diffseg >= baselines.diffseg + 0.04, (good, baselines)
    assert good.target >= baselines.target + 0.15, (good, baselines)
