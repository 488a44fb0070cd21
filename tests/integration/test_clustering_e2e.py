"""Principal-component clustering end to end on the tiny random SD: pipeline, img2img capture, generation."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

from attnseg.capture.pca import PCAHeadStore
from attnseg.errors import ConfigError
from attnseg.generation import generate, img2img_capture, make_scheduler
from attnseg.methods.base import RunOptions
from attnseg.methods.clustering import ClusteringResult, PCAClustering
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.testing import tiny_sd_adapter
from attnseg.types import SegmentationResult


@pytest.fixture(scope="module")
def adapter():
    return tiny_sd_adapter(seed=0)


@pytest.mark.parametrize(("mode", "reading"), [("reuse", "outputs"), ("beside", "outputs"), ("reuse", "probs")])
def test_pipeline_end_to_end_and_store_round_trip(adapter, rgb_image, tmp_path, mode, reading):
    pipe = AttentionSegmentationPipeline(adapter, "clustering", mode=mode, ks=(2, 3), reading=reading)
    out = pipe.run(rgb_image, store_path=tmp_path / "store")
    h, w = adapter.resolution
    assert out.model_result.labels.shape == (h, w) and out.result.labels.dtype == torch.int64
    assert out.result.size == (48, 40)  # back at the image's own size
    assert out.result.method == "clustering" and out.result.meta["k"] == 3
    assert 1 <= out.result.num_segments <= 3
    assert isinstance(out.store, PCAHeadStore)
    layers = adapter.attention_layers()
    assert set(out.store.keys()) == {n for n, i in layers.items() if i.kind == "self" and i.position == "up"}
    # the saved store reproduces the segmentation without the model
    loaded = PCAHeadStore.load(tmp_path / "store.safetensors")
    again = pipe.segment_store(loaded)
    assert torch.equal(again.labels, out.model_result.labels)
    full = pipe.method.cluster(loaded)
    assert isinstance(full, ClusteringResult) and full.ks == (2, 3)
    assert full.pca_rgb_image().mode == "RGB"


def test_img2img_capture_runs_the_kept_steps_and_captures_the_last(adapter, rgb_image):
    method = PCAClustering(ks=(2, 3), num_inference_steps=8, img2img_strength=0.25)
    out = img2img_capture(adapter, rgb_image, method, seed=0)
    sched = make_scheduler(adapter)
    sched.set_timesteps(8)
    expected = tuple(int(t) for t in sched.timesteps[-2:])  # int(8 * 0.25) = 2 kept steps
    assert out.timesteps == expected
    meta = out.store.meta
    assert meta["timesteps"] == list(expected) and meta["captured_timestep"] == expected[-1]
    assert meta["noised_to"] == expected[0] and meta["capture"] == "img2img" and meta["prompt"] == ""
    for name in out.store:
        assert out.store.captured_call(name) == 0 and out.store._calls[name] == 1  # traced once: the last call
    assert out.image.size == (adapter.resolution[1], adapter.resolution[0])
    result = method.cluster(out.store)
    assert result.meta["timesteps"] == list(expected)
    # reproducible with the same seed
    again = img2img_capture(adapter, rgb_image, method, seed=0)
    for name in out.store:
        assert torch.equal(again.store.components(name), out.store.components(name))
    # explicit arguments win over the method's defaults; too little strength runs nothing
    assert len(img2img_capture(adapter, rgb_image, method, num_inference_steps=4, strength=0.5).timesteps) == 2
    with pytest.raises(ConfigError, match="runs no step"):
        img2img_capture(adapter, rgb_image, method, num_inference_steps=10, strength=0.05)


def test_generate_with_guidance_captures_the_conditional_half(adapter):
    method = PCAClustering(ks=(2, 3))
    out = generate(adapter, "a red square", method, num_inference_steps=2, guidance_scale=7.5, seed=0)
    assert isinstance(out.image, Image.Image) and out.image.size == (adapter.resolution[1], adapter.resolution[0])
    assert isinstance(out.clustering, ClusteringResult)
    assert isinstance(out.result, SegmentationResult) and out.result.labels.shape == adapter.resolution
    assert out.store.batch_size == 1 and out.store.meta["batch_items"] == ["cond"]
    assert len(out.timesteps) == 2 and out.store.meta["captured_timestep"] == out.timesteps[-1]
    assert {item for *_, item in out.clustering.heads} == {"cond"}

    # the conditional call alone (two calls per step) sees the same attention as the batch's second half
    two = generate(adapter, "a red square", method, num_inference_steps=2, seed=0, batched=False)
    for name in out.store:
        torch.testing.assert_close(two.store.components(name), out.store.components(name), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        torch.tensor(list(two.image.getdata())).float(), torch.tensor(list(out.image.getdata())).float(), atol=2, rtol=0
    )

    both = generate(adapter, "a red square", PCAClustering(ks=(2,), cfg_half="both"), num_inference_steps=2)
    assert both.store.batch_size == 2 and both.store.meta["batch_items"] == ["uncond", "cond"]
    assert both.clustering is not None and len(both.clustering.heads) == 2 * len(out.clustering.heads)
    with pytest.raises(ConfigError, match="batched"):
        generate(adapter, "x", PCAClustering(cfg_half="both"), num_inference_steps=1, batched=False)

    single = generate(adapter, "a red square", method, num_inference_steps=1, guidance_scale=1.0)
    assert single.store.batch_size == 1


class _MeanSelfAttention:
    """A minimal method without make_store/cluster: the plain store path of :func:`generate`."""

    name: ClassVar[str] = "test-mean"
    requires: ClassVar[frozenset[str]] = frozenset({"self"})

    def run_options(self) -> RunOptions:
        return RunOptions()

    def select_layers(self, layers: dict[str, Any]) -> list[str]:
        return [n for n, i in layers.items() if i.kind == "self"]

    def segment(self, store, *, prompt=None, out_size=None, generator=None) -> SegmentationResult:
        r, attn = next(iter(store.self_attention().items()))
        labels = attn.argmax(dim=1).reshape(r, r)
        return SegmentationResult(labels=labels, method=self.name)


def test_generate_works_with_any_method(adapter):
    out = generate(adapter, "a cat", _MeanSelfAttention(), num_inference_steps=1)  # type: ignore[arg-type]
    assert out.clustering is None and out.result.method == "test-mean"
    assert out.store.batch == slice(1, 2)


def test_segment_carries_the_merged_masks_of_every_k(tiny_adapter, rgb_image) -> None:
    """Best-match protocols score the merged mask set of all k, which travels as boolean scores."""
    from attnseg.pipeline import AttentionSegmentationPipeline

    result = AttentionSegmentationPipeline(tiny_adapter, "clustering", ks=(2, 3)).run(rgb_image, seed=0).result
    assert result.scores is not None and result.scores.dtype == torch.bool
    assert result.scores.shape[1:] == result.labels.shape and result.meta["scores_are_masks"]
    assert set(result.meta["mask_k"]) <= {2, 3} and len(result.meta["mask_k"]) == result.scores.shape[0]
    resized = result.resize((64, 64))
    assert resized.scores.dtype == torch.bool and resized.scores.shape[1:] == (64, 64)
