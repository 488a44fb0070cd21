"""Every method on every device present: results agree with a float64 CPU reference, maps stay on the model's
device, and nothing large goes to the host during capture or post-processing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.tracer import AttentionTracer
from attnseg.methods.base import create_method
from attnseg.pipeline import AttentionSegmentationPipeline

METHODS = {
    # thresholds low enough that the tiny random model gives a few dozen segments (its maps are nearly uniform)
    "diffseg": {"kl_thresholds": (0.001, 0.0002), "num_anchors": 8},
    "goca": {"classes": ["cat", "dog"]},
    "target": {"target": "cat"},
    "clustering": {},
}

#: Stated bound: the labels of a float32 run and of the float64 reference may differ where float differences flip a
#: merge or a near-tie argmax (the tiny random model's maps are nearly uniform); each segment of one must match a
#: segment of the other with this mean best IoU.
IOU_BOUND = 0.9
#: Maps (store contents) agree to this fraction of the reference's largest value.
MAP_TOLERANCE = 1e-5


@pytest.fixture()
def scene() -> Image.Image:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (200, 30, 30)
    arr[:, 32:] = (30, 30, 200)
    arr[20:44, 20:44] = (30, 200, 30)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def reference_adapter():
    """The tiny model with its denoiser and text encoder in float64 on the CPU (the VAE stays float32 so that its
    posterior sample draws the same numbers as the float32 runs)."""
    from attnseg.testing import tiny_sd_adapter

    adapter = tiny_sd_adapter(seed=0)
    adapter.unet.double()
    adapter.text_encoder.double()
    return adapter


@pytest.fixture()
def no_tf32():
    """TF32 convolutions (a CUDA default) and matmuls would round to 10 mantissa bits; the agreement is stated for
    full float32."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = conv
    torch.set_float32_matmul_precision(matmul)


def _mean_best_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ious = []
    for i in a.unique():
        m = a == i
        ious.append(max(float((m & (b == j)).sum() / (m | (b == j)).sum()) for j in b.unique()))
    return sum(ious) / len(ious)


def _on(device: torch.device, tiny_adapter):
    adapter = copy.deepcopy(tiny_adapter)
    for module in (adapter.unet, adapter.vae, adapter.text_encoder):
        module.to(device)
    return adapter


@pytest.mark.parametrize("name", list(METHODS))
def test_results_agree_with_a_float64_cpu_reference(device, name, tiny_adapter, reference_adapter, scene, no_tf32):
    adapter = _on(device, tiny_adapter)
    out = AttentionSegmentationPipeline(adapter, name, **METHODS[name]).run(scene, size=(64, 64), seed=0)
    ref = AttentionSegmentationPipeline(reference_adapter, name, **METHODS[name]).run(scene, size=(64, 64), seed=0)

    # placement: maps on the model's device, results on the host
    assert out.store.device == device
    assert all(e.sum.device == device for e in out.store._entries.values() if e.sum is not None)
    assert out.result.labels.device.type == "cpu"

    assert out.store.keys() == ref.store.keys()
    for key in ref.store:
        got, want = out.store.get(key).cpu().double(), ref.store.get(key).double()
        assert float((got - want).abs().max()) <= MAP_TOLERANCE * float(want.abs().max()), key
    labels, ref_labels = out.result.labels, ref.result.labels
    assert labels.shape == ref_labels.shape == (64, 64)
    assert min(_mean_best_iou(labels, ref_labels), _mean_best_iou(ref_labels, labels)) >= IOU_BOUND


def test_a_batch_segments_each_image_as_alone(device, tiny_adapter, scene, no_tf32):
    """run_batch: one pass for several images; each image's maps equal those of a run on it alone (DiffSeg adds
    no noise, so the batch changes nothing but kernel rounding)."""
    adapter = _on(device, tiny_adapter)
    pipe = AttentionSegmentationPipeline(adapter, "diffseg", **METHODS["diffseg"])
    flipped = scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    batch = pipe.run_batch([scene, flipped], size=(64, 64))
    for img, out in zip((scene, flipped), batch, strict=True):
        alone = pipe.run(img, size=(64, 64))
        for key in alone.store:
            assert torch.allclose(out.store.get(key), alone.store.get(key), atol=1e-6, rtol=1e-4)
        # batched kernels round differently (1e-7): a near-tie can flip, hence the IoU bound
        labels, ref = out.result.labels, alone.result.labels
        assert min(_mean_best_iou(labels, ref), _mean_best_iou(ref, labels)) >= IOU_BOUND


@pytest.mark.parametrize("name", list(METHODS))
def test_capture_moves_nothing_to_the_host(name, tiny_adapter):
    """The whole capture loop runs on the meta device: any copy to the host, ``.item()`` or ``bool()`` on a map
    inside the loop raises there, so this proves each method's store accumulates where the model runs."""
    adapter = copy.deepcopy(tiny_adapter)
    adapter.unet.to("meta")
    assert adapter.device.type == "meta"
    method = create_method(name, **METHODS[name])
    layers = adapter.attention_layers((64, 64))
    selected = method.select_layers(layers)
    pipe = AttentionSegmentationPipeline(adapter, method)
    store = pipe.new_store({n: layers[n] for n in selected}, {"image_size": [64, 64]})
    assert store.device.type == "meta"
    features = getattr(method, "features", None)
    latents = torch.zeros(1, 4, 32, 32, device="meta")
    prompt = torch.zeros(1, 77, 32, device="meta")
    with torch.no_grad(), AttentionTracer(
        adapter, store, select=selected, layers=layers, features=features(adapter) if features else ()
    ):
        adapter.unet(latents, torch.full((1,), 10, device="meta"), encoder_hidden_states=prompt)
    assert len(store) > 0
    assert all(e.sum.device.type == "meta" for e in store._entries.values() if e.sum is not None)


@pytest.mark.parametrize("name", list(METHODS))
def test_post_processing_moves_only_small_tensors_to_the_host(name, tiny_adapter, scene, monkeypatch):
    """Every tensor a method explicitly sends to the host while segmenting (``.cpu()``, ``.numpy()``, ``.to("cpu")``:
    NumPy/scikit steps, the outputs) is far smaller than the maps it reads: the heavy steps run where the maps are.
    Recorded on any device, the CPU included, since these calls are what would copy on an accelerator."""
    pipe = AttentionSegmentationPipeline(tiny_adapter, name, **METHODS[name])
    (store,), encoded = pipe._capture([pipe.prepare(scene, size=(64, 64))], seed=0)
    largest_map = max(info.num_tokens for info in tiny_adapter.attention_layers((64, 64)).values()) ** 2
    moved: list[int] = []
    originals = {attr: getattr(torch.Tensor, attr) for attr in ("cpu", "numpy", "to")}

    def spy_cpu(self, *args, **kwargs):
        moved.append(self.numel())
        return originals["cpu"](self, *args, **kwargs)

    def spy_numpy(self, *args, **kwargs):
        moved.append(self.numel())
        return originals["numpy"](self, *args, **kwargs)

    def spy_to(self, *args, **kwargs):
        # an explicit "cpu" (a torch.device taken from another tensor is a move only where that tensor lives)
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and target.startswith("cpu"):
            moved.append(self.numel())
        return originals["to"](self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    monkeypatch.setattr(torch.Tensor, "numpy", spy_numpy)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    result = pipe.method.segment(store, prompt=encoded, out_size=(64, 64))
    monkeypatch.undo()
    assert result.labels.shape == (64, 64)
    assert max(moved, default=0) < largest_map // 8, (max(moved), largest_map)
