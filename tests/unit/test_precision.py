"""fp16/bf16 capture keeps scores, softmax and reductions in float32; noise is drawn on the CPU generator.

Runs on every device present (the ``device`` fixture).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.processor import CaptureProcessor
from attnseg.capture.store import AttentionStore
from attnseg.types import LayerInfo


class _Spy:
    """A sink that keeps every block it is given."""

    def __init__(self) -> None:
        self.blocks: list[tuple[torch.Tensor, slice, slice]] = []

    def add_chunk(self, layer, probs, heads, out=None, *, queries=slice(None)):
        self.blocks.append((probs.clone(), heads, queries))

    def end_call(self, layer):
        pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probabilities_are_float32_softmax_of_float32_scores(device, dtype):
    """The probabilities equal a float64 softmax of the model's own (half-precision) q and k, to float32 accuracy;
    scores rounded to the model's dtype before the softmax would be off by about 1e-3 here."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("fp16 matmuls are a GPU path; the CPU runs bf16")
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).to(device, dtype).eval()
    n = 64
    info = LayerInfo("a.attn1", "self", (8, 8), heads=2, head_dim=16, position="down", index=0, block="a")
    x = (3 * torch.randn(1, n, 32, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    spy = _Spy()
    with torch.no_grad():
        CaptureProcessor(AttnProcessor2_0(), info, spy, chunk_bytes=4096)(attn, x)
        q = attn.to_q(x).view(1, n, 2, 16).transpose(1, 2).double()
        k = attn.to_k(x).view(1, n, 2, 16).transpose(1, 2).double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    reference = scores.softmax(-1)
    got = torch.zeros_like(reference)
    for probs, heads, queries in spy.blocks:
        assert probs.dtype == torch.float32 and probs.device == device
        got[:, heads, queries] = probs.double()
    assert len(spy.blocks) > 1  # several blocks, so the tiling is exercised
    assert float((got.sum(-1) - 1).abs().max()) < 1e-6
    assert float((got - reference).abs().max()) < 1e-5
    rounded = scores.to(dtype).double().softmax(-1)  # what half-precision scores would give
    assert float((rounded - reference).abs().max()) > 1e-4


def test_bf16_model_stores_float32_maps(device):
    """A bf16 denoiser fills float32 accumulators whose maps are distributions and track the float32 model's."""
    from attnseg.pipeline import AttentionSegmentationPipeline
    from attnseg.testing import tiny_sd_adapter

    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (200, 30, 30)
    image = Image.fromarray(arr)
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        adapter = tiny_sd_adapter(seed=0)
        for module in (adapter.unet, adapter.text_encoder):
            module.to(device, dtype)
        adapter.vae.to(device)
        runs.append(AttentionSegmentationPipeline(adapter, "target", target="cat").run(image, size=(64, 64)).store)
    full, half = runs
    assert half.device == device
    for key in full:
        assert half._entries[key].sum.dtype == torch.float32
        m32, m16 = full.get(key), half.get(key)
        assert m16.dtype == torch.float32 and m16.device == device
        assert float((m16.sum(-1) - 1).abs().max()) < 1e-5  # rows still sum to 1: the softmax was not bf16
        assert float((m16 - m32).abs().max()) <= 0.05 * float(m32.abs().max())


def test_noise_is_drawn_on_the_cpu_generator(device, tiny_adapter):
    """The same seed gives the same noise whatever the latents' device: drawn on the CPU, then moved."""
    latents = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8)
    noisy = tiny_adapter.add_noise(latents.to(device), 500, generator=torch.Generator().manual_seed(7))
    abar = tiny_adapter.scheduler.alphas_cumprod[500].float()
    eps = (noisy.cpu() - abar.sqrt() * latents) / (1 - abar).sqrt()
    expected = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    assert noisy.device == device
    assert torch.allclose(eps, expected, atol=1e-4)


def test_store_accumulates_in_float32_by_default(device):
    info = LayerInfo("a.attn1", "self", (2, 2), heads=2, head_dim=4, position="down", index=0, block="a")
    store = AttentionStore(device=device)
    probs = torch.full((1, 2, 4, 4), 0.25, device=device)
    for _ in range(3):
        store.add(info, probs)
    assert store.get("a.attn1").dtype == torch.float32
    assert torch.equal(store.get("a.attn1").cpu(), torch.full((4, 4), 0.25))
