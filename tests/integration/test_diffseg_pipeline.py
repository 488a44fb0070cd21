"""DiffSeg through the real capture store and the pipeline."""

from __future__ import annotations

import numpy as np
import torch

from attnseg.capture.store import AttentionStore
from attnseg.methods.diffseg import DiffSeg
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.types import LayerInfo


def _regions(r: int) -> torch.Tensor:
    """(r, r) ids of four regions: left half split in two rows, right half split in two columns."""
    ids = torch.zeros(r, r, dtype=torch.long)
    ids[r // 2 :, : r // 2] = 1
    ids[:, r // 2 : 3 * r // 4] = 2
    ids[:, 3 * r // 4 :] = 3
    return ids


def _region_attention(r: int, heads: int) -> torch.Tensor:
    """(1, heads, r*r, r*r) probabilities: each query attends uniformly to its own region."""
    flat = _regions(r).flatten()
    same = (flat[:, None] == flat[None, :]).float()
    probs = same / same.sum(-1, keepdim=True)
    return probs.expand(1, heads, -1, -1).clone()


def _agreement(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels right after mapping each predicted id to its majority true id (one-to-one required)."""
    mapping = {p: np.bincount(truth[pred == p]).argmax() for p in np.unique(pred)}
    assert len(set(mapping.values())) == len(mapping), "two segments map to one region"
    return float((np.vectorize(mapping.get)(pred) == truth).mean())


def test_diffseg_recovers_regions_from_a_real_store(tmp_path):
    store = AttentionStore(group="resolution", meta={"image_size": [64, 64]})
    for i, r in enumerate((16, 8)):
        for k in range(2):  # two layers per resolution, averaged as they arrive
            layer = LayerInfo(f"b{i}.{k}.attn1", "self", (r, r), 2, 8, "up", i, f"b{i}")
            store.add(layer, _region_attention(r, 2))
    store = AttentionStore.load(store.save(tmp_path / "s"))  # the method reads a saved store as well
    result = DiffSeg(kl_thresholds=(0.9, 0.9, 0.9), threshold_mode="absolute", num_anchors=8).segment(store)
    assert result.labels.shape == (64, 64)
    expected = torch.nn.functional.interpolate(_regions(16)[None, None].float(), size=(64, 64), mode="nearest")[0, 0]
    assert result.num_segments == 4
    # bilinear upsampling of soft proposals may move a boundary by a pixel, nothing more
    assert _agreement(result.labels.numpy(), expected.long().numpy()) > 0.97


def test_pipeline_end_to_end_on_tiny_model(tiny_adapter, rgb_image, tmp_path):
    pipe = AttentionSegmentationPipeline(tiny_adapter, "diffseg", num_anchors=4)
    out = pipe.run(rgb_image, seed=0, store_path=tmp_path / "store")
    assert out.image.size == (32, 32)
    assert out.model_result.labels.shape == (32, 32) and out.result.labels.dtype == torch.int64
    assert out.result.size == (48, 40)  # back at the image's own size
    assert out.result.method == "diffseg"
    assert out.store.meta["timestep"] == 300 and out.store.meta["add_noise"] is False
    assert {out.store.info(k)[0] for k in out.store} == {"self"}  # only what DiffSeg needs was captured
    # the saved store reproduces the result without the model
    again = pipe.segment_store(AttentionStore.load(tmp_path / "store.safetensors"))
    assert torch.equal(again.labels, out.model_result.labels)
    # reproducible with a seed
    assert torch.equal(pipe(rgb_image, seed=0).labels, out.result.labels)
