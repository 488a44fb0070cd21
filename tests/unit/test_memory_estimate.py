"""The whole-capture memory estimate: by hand on real configs, against the stores a capture really fills, and the
pipeline's refusal before the forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.memory import estimate_capture, key_tokens
from attnseg.capture.processor import block_plan
from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import AttnSegError
from attnseg.methods.base import create_method
from attnseg.models.unet import unet_attention_layers
from attnseg.pipeline import AttentionSegmentationPipeline
from attnseg.testing import SD15_UNET_CONFIG

MiB = 2**20

METHODS = {
    "diffseg": {},
    "goca": {"classes": ["cat", "dog"]},
    "target": {"target": "cat"},
    "clustering": {},
}


def _meta_sd15_layers(latent: int):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet_attention_layers(unet, (latent, latent))


@pytest.fixture()
def image() -> Image.Image:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (200, 30, 30)
    arr[:, 32:] = (30, 30, 200)
    return Image.fromarray(arr)


def test_sd15_diffseg_estimate_by_hand():
    """SD1.5 at 512 px, DiffSeg, fp16 on the CPU: every figure computed by hand from the architecture."""
    layers = _meta_sd15_layers(64)
    method = create_method("diffseg")
    selected = {n: layers[n] for n in method.select_layers(layers)}
    est = estimate_capture(AttentionStore(group="resolution"), selected, text_tokens=77,
                           model_dtype=torch.float16, device="cpu", method=method)
    # one float32 accumulator per resolution: 4096^2 + 1024^2 + 256^2 + 64^2 floats
    kept = (4096**2 + 1024**2 + 256**2 + 64**2) * 4
    assert est.kept_bytes() == kept
    # largest call, a 64x64 layer (8 heads, 40 channels) with 4 MiB blocks: 8 heads x 32 rows x 4096 keys
    # float32 = 4 MiB, three of them; outputs (8, 4096, 40) fp16 = 2.5 MiB; float32 queries 5 MiB
    assert est.capture_bytes() == 3 * 4 * MiB + 8 * 4096 * 40 * 2 + 8 * 4096 * 40 * 4
    # post-processing: float32 copies of the maps read + three (64, 64, 64, 64) float32 tensors (768 MiB)
    assert est.post_bytes() == kept + 3 * 4096**2 * 4
    assert est.peak_bytes() == kept + est.post_bytes()
    assert "aggregate at 64x64" in est.largest().what


def test_sd15_at_1024_px_is_refused_on_a_small_card(monkeypatch):
    import attnseg.methods.ops as ops

    layers = _meta_sd15_layers(128)
    method = create_method("diffseg")
    selected = {n: layers[n] for n in method.select_layers(layers)}
    est = estimate_capture(AttentionStore(group="resolution", device="cuda:0"), selected, text_tokens=77,
                           model_dtype=torch.float16, device="cuda:0", method=method)
    # the aggregate alone is 3 * 128^4 * 4 bytes = 3 GiB
    assert est.post_bytes() > 3 * 2**30
    small_card = lambda device=None: 4 * 2**30 if "cuda" in str(device) else 10**15  # noqa: E731
    monkeypatch.setattr(ops, "available_memory_bytes", small_card)
    with pytest.raises(AttnSegError, match=r"on cuda:0"):
        est.check("capturing")
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 80 * 2**30)
    est.check("capturing")


def test_store_slice_of_a_cfg_batch_keeps_one_item():
    layers = _meta_sd15_layers(64)
    selected = {n: i for n, i in layers.items() if i.kind == "cross"}
    one = estimate_capture(AttentionStore(), selected, batch=1, text_tokens=77).kept_bytes()
    cond = estimate_capture(AttentionStore(batch=slice(1, 2)), selected, batch=2, text_tokens=77).kept_bytes()
    both = estimate_capture(AttentionStore(), selected, batch=2, text_tokens=77).kept_bytes()
    assert cond == one and both == 2 * one
    # 16 cross layers, one (N, 77) map each: 5 at each of 64, 32, 16 and 1 at 8
    assert one == (5 * 4096 + 5 * 1024 + 5 * 256 + 64) * 77 * 4


@pytest.mark.parametrize("name", list(METHODS))
def test_kept_estimate_equals_what_the_store_holds(tiny_adapter, image, name):
    """The estimate, made from shapes before the pass, equals the bytes the store holds after it."""
    pipe = AttentionSegmentationPipeline(tiny_adapter, name, **METHODS[name])
    est = pipe.estimate(size=(64, 64))
    out = pipe.run(image, size=(64, 64), seed=0)
    assert est.kept_bytes() == out.store.nbytes() > 0
    assert out.store.meta["estimated_peak_bytes"] == est.peak_bytes()


class _SpyStore(AttentionStore):
    def __init__(self) -> None:
        super().__init__(group="layer")
        self.blocks: dict[str, set[tuple[int, ...]]] = {}

    def add_chunk(self, layer, probs, heads, out=None, *, queries=slice(None)):
        self.blocks.setdefault(layer.name, set()).add(tuple(probs.shape))
        super().add_chunk(layer, probs, heads, out, queries=queries)


@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_processor_cuts_the_blocks_the_estimate_plans(tiny_adapter, chunk_bytes):
    layers = tiny_adapter.attention_layers((64, 64))
    store = _SpyStore()
    emb = tiny_adapter.encode_prompt("a cat")
    t = int(emb.embeddings.shape[1])
    with AttentionTracer(tiny_adapter, store, layers=layers, chunk_bytes=chunk_bytes):
        tiny_adapter.denoise(torch.zeros(1, 4, 32, 32), 10, emb)
    for name, info in layers.items():
        k = key_tokens(info, t)
        heads, rows = block_plan(1, info.heads, info.num_tokens, k, chunk_bytes=chunk_bytes)
        assert max(store.blocks[name]) == (1, heads, rows, k), name


def test_pipeline_refuses_before_encoding_the_image(tiny_adapter, image, monkeypatch):
    import attnseg.methods.ops as ops

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before the memory check")

    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 16 * 2**30)
    monkeypatch.setattr(tiny_adapter, "encode_image", must_not_run)
    monkeypatch.setattr(tiny_adapter, "denoise", must_not_run)
    pipe = AttentionSegmentationPipeline(tiny_adapter, "diffseg")
    with pytest.raises(AttnSegError) as info:
        pipe.run(image, size=(1024, 1024))  # a 512x512 attention grid: 256 Ki tokens
    msg = str(info.value)
    assert "1024x1024 px" in msg and "--size" in msg and "GiB" in msg and "\n" not in msg


def test_pipeline_check_is_the_estimated_peak(tiny_adapter, image, monkeypatch):
    """With exactly twice the estimated peak available (the host's 50%) the run goes; with less it is refused."""
    import attnseg.methods.ops as ops

    pipe = AttentionSegmentationPipeline(tiny_adapter, "diffseg")
    peak = pipe.estimate(size=(64, 64)).peak_bytes()
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 2 * peak - 2)
    with pytest.raises(AttnSegError, match="64x64 px"):
        pipe.run(image, size=(64, 64))
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 2 * peak)
    assert pipe.run(image, size=(64, 64)).result.labels.shape == (64, 64)


def test_cli_refuses_a_huge_size_in_one_line(tmp_path, monkeypatch):
    """``attnseg segment scene.png --model toyworld --size 4096``: exit 2, one line, no forward pass."""
    from typer.testing import CliRunner

    from attnseg.cli.app import app
    from attnseg.models.toy import ToyAdapter

    def must_not_run(*args, **kwargs):
        raise AssertionError("the forward pass ran")

    monkeypatch.setattr(ToyAdapter, "denoise", must_not_run)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "scene.png")
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "scene.png"), "--model", "toyworld", "--size", "4096",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    # the refusal comes after the line naming the loaded model (the layers' shapes come from the model)
    lines = [line for line in res.output.strip().splitlines() if line and not line.startswith("model: toyworld")]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "4096x4096 px" in lines[0] and "--size" in lines[0]
