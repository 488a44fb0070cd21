"""The capture processor against literal attention (``tests/reference/capture_literal.py``), block by block.

A stand-alone diffusers ``Attention`` module (self and cross, with and without the module's own scale, with an
attention mask) is called once under a :class:`CaptureProcessor`; the probabilities the store receives are compared
with ``softmax(q k^T * scale)`` computed one row at a time in float64, for several block sizes (whole heads, one head
and 16 query rows at a time). A module with a custom processor (as LoRA or IP-Adapter install) keeps that processor's
output under capture, in both modes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from attnseg.capture.processor import CaptureProcessor
from attnseg.capture.store import AttentionStore
from attnseg.types import LayerInfo

torch.set_num_threads(1)


def _load(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lit = _load("capture_literal")

GRID = (5, 6)  # 30 queries: blocks of 16 rows leave a short last block
HEADS, DIM = 3, 4
CONTEXT, CONTEXT_DIM = 7, 10


class Shifted(AttnProcessor2_0):
    """A custom processor whose output differs from the plain one (as a LoRA or IP-Adapter processor's does)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **k)
        return 1.5 * out + 0.25


def module(kind: str, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    cross = CONTEXT_DIM if kind == "cross" else None
    attn = Attention(query_dim=HEADS * DIM, cross_attention_dim=cross, heads=HEADS, dim_head=DIM, bias=False)
    return attn.eval()


def inputs(kind: str, seed: int = 1, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, GRID[0] * GRID[1], HEADS * DIM, generator=g)
    context = torch.randn(batch, CONTEXT, CONTEXT_DIM, generator=g) if kind == "cross" else None
    return hidden, context


def info(kind: str) -> LayerInfo:
    return LayerInfo("m", kind, GRID, heads=HEADS, head_dim=DIM, position="up", index=0, block="b")  # type: ignore[arg-type]


class Recorder:
    """A sink that keeps every block it gets (and the query slices), then the assembled maps."""

    def __init__(self) -> None:
        self.blocks: list[tuple[slice, slice, torch.Tensor, torch.Tensor | None]] = []
        self.calls = 0

    def add_chunk(self, layer, probs, heads, out=None, *, queries=slice(None)):
        self.blocks.append((heads, queries, probs.clone(), None if out is None else out.clone()))

    def end_call(self, layer):
        self.calls += 1

    def assembled(self, b: int, n: int, m: int) -> torch.Tensor:
        full = torch.full((b, HEADS, n, m), float("nan"))
        for heads, queries, probs, _ in self.blocks:
            full[:, heads, queries] = probs
        return full


def run(attn: Attention, proc, hidden, context, mask=None) -> torch.Tensor:
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=context, attention_mask=mask)


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("original", [AttnProcessor, AttnProcessor2_0])
# one self-attention row of one head is 2 items x 30 keys x 4 bytes = 240 bytes; a block holds at least 16 rows
@pytest.mark.parametrize("chunk_bytes", [1, 2 * 16 * 240, 2**30], ids=["1-head-16-rows", "2-heads-16-rows", "all"])
def test_blocks_hold_the_literal_probabilities(kind, original, chunk_bytes):
    attn = module(kind)
    hidden, context = inputs(kind)
    sink = Recorder()
    plain = run(attn, original(), hidden, context)
    hooked = run(attn, CaptureProcessor(original(), info(kind), sink, chunk_bytes=chunk_bytes), hidden, context)
    m = CONTEXT if kind == "cross" else GRID[0] * GRID[1]
    got = sink.assembled(2, GRID[0] * GRID[1], m)
    expected = lit.attention_literal(hidden, hidden if context is None else context, attn.to_q.weight,
                                     attn.to_k.weight, HEADS)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert sink.calls == 1
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    # block sizes as asked: one head and 16 rows, two heads (all rows), or everything at once
    sizes = {(h.stop - h.start, q.stop - q.start) for h, q, _, _ in sink.blocks}
    want = {1: {(1, 16), (1, 14)}, 7680: {(2, 16), (2, 14), (1, 16), (1, 14)}, 2**30: {(3, 30)}}[chunk_bytes]
    if kind == "cross":  # rows of 7 keys (56 bytes): 7680 bytes hold 3 heads x 45 rows
        want = {1: {(1, 16), (1, 14)}, 7680: {(3, 30)}, 2**30: {(3, 30)}}[chunk_bytes]
    assert sizes == want


def test_module_scale_and_mask_are_applied():
    attn = module("cross")
    attn.scale = 0.9  # AttnProcessor uses the module's scale; AttnProcessor2_0 leaves it to SDPA (1/sqrt(d))
    hidden, context = inputs("cross")
    mask = torch.zeros(2, 1, CONTEXT)  # an additive bias per key, as the UNet makes of an encoder mask
    mask[0, :, 5:] = -1e4  # the first item may not look at its last two tokens
    mask[1, :, 0] = -2.0
    for original, scale in ((AttnProcessor, 0.9), (AttnProcessor2_0, None)):
        sink = Recorder()
        plain = run(attn, original(), hidden, context, mask)
        hooked = run(attn, CaptureProcessor(original(), info("cross"), sink, chunk_bytes=1), hidden, context, mask)
        expected = lit.attention_literal(hidden, context, attn.to_q.weight, attn.to_k.weight, HEADS, scale=scale,
                                         mask=mask[:, 0])
        torch.testing.assert_close(sink.assembled(2, 30, CONTEXT).double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)


def test_outputs_passed_to_the_sink_are_each_heads_probs_times_values():
    attn = module("cross")
    hidden, context = inputs("cross")
    sink = Recorder()
    run(attn, CaptureProcessor(AttnProcessor2_0(), info("cross"), sink, chunk_bytes=1, want_outputs=True), hidden,
        context)
    v = (context.double() @ attn.to_v.weight.double().T).view(2, CONTEXT, HEADS, DIM).transpose(1, 2)
    for heads, _, probs, out in sink.blocks:
        assert out is not None
        torch.testing.assert_close(out.double(), probs.double() @ v[:, heads], rtol=1e-5, atol=1e-6)
    no_outputs = Recorder()
    run(attn, CaptureProcessor(AttnProcessor2_0(), info("cross"), no_outputs, chunk_bytes=1), hidden, context)
    assert all(out is None for *_, out in no_outputs.blocks)


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("mode", ["reuse", "beside"])
def test_a_custom_processor_keeps_its_output_under_capture(kind, mode):
    """The module's own processor computes the output (beside), and its effect is not lost."""
    attn = module(kind)
    hidden, context = inputs(kind)
    plain = run(attn, AttnProcessor2_0(), hidden, context)
    custom = run(attn, Shifted(), hidden, context)
    assert not torch.allclose(custom, plain, atol=1e-3)  # the custom effect is real
    store = AttentionStore(heads="all")
    proc = CaptureProcessor(Shifted(), info(kind), store, mode=mode, chunk_bytes=1)
    assert proc.mode == "beside"
    hooked = run(attn, proc, hidden, context)
    assert torch.equal(hooked, custom)
    expected = lit.attention_literal(hidden, hidden if context is None else context, attn.to_q.weight,
                                     attn.to_k.weight, HEADS)
    torch.testing.assert_close(store.get("m", None).double(), expected, rtol=1e-5, atol=1e-6)


def test_plain_processor_in_beside_mode_is_bit_identical():
    attn = module("self")
    hidden, _ = inputs("self")
    plain = run(attn, AttnProcessor2_0(), hidden, None)
    store = AttentionStore()
    hooked = run(attn, CaptureProcessor(AttnProcessor2_0(), info("self"), store, mode="beside"), hidden, None)
    assert torch.equal(hooked, plain)
    expected = lit.head_mean_literal(lit.attention_literal(hidden, hidden, attn.to_q.weight, attn.to_k.weight, HEADS))
    torch.testing.assert_close(store.get("m", None).double(), expected, rtol=1e-5, atol=1e-6)


def test_tracer_keeps_a_custom_processor_on_the_model(tiny_adapter):
    """Through the tracer on a model: the custom processor's effect survives and it is put back afterwards."""
    from attnseg.capture.tracer import AttentionTracer

    adapter = tiny_adapter
    name = next(n for n, i in adapter.attention_layers().items() if i.kind == "self")
    mod = adapter.denoiser.get_submodule(name)
    original = mod.processor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, *adapter.latent_size()), generator=g)
    prompt = adapter.encode_prompt("a cat")
    with torch.no_grad():
        plain = adapter.denoise(latents, 300, prompt)
        custom_proc = Shifted()
        mod.set_processor(custom_proc)
        try:
            custom = adapter.denoise(latents, 300, prompt)
            assert not torch.allclose(custom, plain, atol=1e-4)
            for mode in ("reuse", "beside"):
                with AttentionTracer(adapter, select=[name], mode=mode) as tracer:
                    hooked = adapter.denoise(latents, 300, prompt)
                assert torch.equal(hooked, custom)
                assert mod.processor is custom_proc
                assert tracer.store.get(name).shape == (adapter.attention_layers()[name].num_tokens,) * 2
        finally:
            mod.set_processor(original)


@pytest.mark.parametrize("mode", ["reuse", "beside"])
def test_vae_style_module_with_4d_input_group_norm_spatial_norm_and_residual(mode):
    """A module with every optional part (4-D input, group norm, spatial norm fed by ``temb``, residual, output
    rescale): the hooked output equals the plain one, and the maps are those of the normalised input."""
    torch.manual_seed(3)
    heads, c = 2, 32  # spatial norm's group norm has 32 groups
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads, bias=True, norm_num_groups=4, spatial_norm_dim=5,
                     residual_connection=True, rescale_output_factor=2.0).eval()
    layer = LayerInfo("m", "self", GRID, heads=heads, head_dim=c // heads, position="mid", index=0, block="b")
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, c, *GRID, generator=g)
    temb = torch.randn(2, 5, 2, 3, generator=g)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        plain = attn(hidden, temb=temb)
        store = AttentionStore(heads="all")
        proc = CaptureProcessor(AttnProcessor2_0(), layer, store, mode=mode, chunk_bytes=1)
        assert proc.mode == mode
        attn.set_processor(proc)
        hooked = attn(hidden, temb=temb)
        normed = attn.spatial_norm(hidden, temb).flatten(2).transpose(1, 2)
        normed = attn.group_norm(normed.transpose(1, 2)).transpose(1, 2)
    assert hooked.shape == hidden.shape
    if mode == "beside":
        assert torch.equal(hooked, plain)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    w_q = attn.to_q.weight
    q_bias = attn.to_q.bias.detach().double()
    k_bias = attn.to_k.bias.detach().double()
    # biases folded in as an extra input channel of ones
    ones = torch.ones(*normed.shape[:2], 1)
    x = torch.cat([normed, ones], -1)
    expected = lit.attention_literal(x, x, torch.cat([w_q, q_bias[:, None].float()], 1),
                                     torch.cat([attn.to_k.weight, k_bias[:, None].float()], 1), heads)
    torch.testing.assert_close(store.get("m", None).double(), expected, rtol=1e-4, atol=1e-5)


def test_beside_mode_passes_the_mask_and_temb_to_the_original_processor():
    attn = module("cross")
    hidden, context = inputs("cross")
    mask = torch.zeros(2, 1, CONTEXT)
    mask[0, :, 4:] = -1e4
    plain = run(attn, Shifted(), hidden, context, mask)
    assert not torch.allclose(plain, run(attn, Shifted(), hidden, context), atol=1e-3)  # the mask matters
    store = AttentionStore()
    hooked = run(attn, CaptureProcessor(Shifted(), info("cross"), store), hidden, context, mask)
    assert torch.equal(hooked, plain)


def test_plain_processors_keep_the_mode_asked_for():
    for original in (AttnProcessor(), AttnProcessor2_0()):
        assert CaptureProcessor(original, info("self"), AttentionStore()).mode == "reuse"
        assert CaptureProcessor(original, info("self"), AttentionStore(), mode="beside").mode == "beside"
    assert CaptureProcessor(Shifted(), info("self"), AttentionStore(), mode="reuse").mode == "beside"


class WholeHeads:
    """A sink whose ``add_chunk`` takes no ``queries``: it must get every query row of a head at once."""

    def __init__(self) -> None:
        self.blocks: list[tuple[slice, torch.Tensor, torch.Tensor | None]] = []
        self.layers: list[object] = []
        self.ended: list[object] = []

    def add_chunk(self, layer, probs, heads, out=None):
        self.layers.append(layer)
        self.blocks.append((heads, probs.clone(), None if out is None else out.clone()))

    def end_call(self, layer):
        self.ended.append(layer)


@pytest.mark.parametrize("want_outputs", [True, False])
def test_sinks_without_query_blocks_get_whole_heads_with_their_outputs(want_outputs):
    attn = module("cross")
    hidden, context = inputs("cross")
    sink = WholeHeads()
    layer = info("cross")
    run(attn, CaptureProcessor(AttnProcessor2_0(), layer, sink, chunk_bytes=1, want_outputs=want_outputs),
        hidden, context)
    assert sink.layers == [layer] * 3 and sink.ended == [layer]  # every block and the end name the layer
    expected = lit.attention_literal(hidden, context, attn.to_q.weight, attn.to_k.weight, HEADS)
    v = (context.double() @ attn.to_v.weight.double().T).view(2, CONTEXT, HEADS, DIM).transpose(1, 2)
    assert [(h.start, h.stop) for h, _, _ in sink.blocks] == [(0, 1), (1, 2), (2, 3)]
    for heads, probs, out in sink.blocks:
        assert probs.shape[2] == GRID[0] * GRID[1]
        torch.testing.assert_close(probs.double(), expected[:, heads], rtol=1e-5, atol=1e-6)
        if want_outputs:
            assert out is not None
            torch.testing.assert_close(out.double(), probs.double() @ v[:, heads], rtol=1e-5, atol=1e-6)
        else:
            assert out is None


def test_upcast_attention_computes_scores_in_float32():
    """A bf16 module with ``upcast_attention``: scores from the bf16 projections in float32 (bf16 scores would be
    off by about 1e-2)."""
    torch.manual_seed(5)
    attn = Attention(query_dim=HEADS * DIM, heads=HEADS, dim_head=DIM, bias=False, upcast_attention=True)
    attn = attn.eval().to(torch.bfloat16)
    hidden, _ = inputs("self")
    hidden = (4 * hidden).to(torch.bfloat16)  # large scores, so that bf16 rounding of them would show
    sink = Recorder()
    run(attn, CaptureProcessor(AttnProcessor(), info("self"), sink, chunk_bytes=2**30), hidden, None)
    with torch.no_grad():
        q = attn.to_q(hidden).view(2, -1, HEADS, DIM).transpose(1, 2)
        k = attn.to_k(hidden).view(2, -1, HEADS, DIM).transpose(1, 2)
    q = (q * attn.scale).double()  # the processor scales q in bf16, then multiplies in float32
    scores = q @ k.double().transpose(-1, -2)
    expected = torch.softmax(scores, -1)
    torch.testing.assert_close(sink.assembled(2, 30, 30).double(), expected, rtol=1e-4, atol=1e-5)


def test_a_mask_with_one_row_per_query_is_cut_with_the_query_blocks():
    """A self-attention mask ``(B, Q, Q)`` (one bias row per query) goes with the rows of each block of 16."""
    attn = module("self")
    hidden, _ = inputs("self")
    n = GRID[0] * GRID[1]
    mask = -4.0 * torch.rand(2, n, n, generator=torch.Generator().manual_seed(3))
    sink = Recorder()
    plain = run(attn, AttnProcessor(), hidden, None, mask)
    hooked = run(attn, CaptureProcessor(AttnProcessor(), info("self"), sink, chunk_bytes=1), hidden, None, mask)
    expected = lit.attention_literal(hidden, hidden, attn.to_q.weight, attn.to_k.weight, HEADS, mask=mask)
    torch.testing.assert_close(sink.assembled(2, n, n).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    assert {q.stop - q.start for _, q, _, _ in sink.blocks} == {16, 14}  # the rows were cut


def test_upcast_attention_scores_come_from_float32_copies_whatever_the_dtype():
    """diffusers' ``upcast_attention`` computes scores from float32 copies of q and k, also for a float64 module;
    so does the capture. Inputs where it shows: q = (A (1 + 2^-30), -A) loses its 2^-30 in float32, so its score
    with the key (A, A) is 0 in float32 (probabilities 1/2, 1/2) but 2^10 / sqrt(2) in float64 (probabilities 1, 0)."""
    attn = Attention(query_dim=2, cross_attention_dim=2, heads=1, dim_head=2, bias=False, upcast_attention=True)
    attn = attn.eval().to(torch.float64)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(2))
        attn.to_k.weight.copy_(torch.eye(2))
    a = 2.0**10
    hidden = torch.tensor([[[a * (1 + 2.0**-30), -a], [a * (1 + 2.0**-30), -a]]], dtype=torch.float64)
    context = torch.tensor([[[a, a], [0.0, 0.0]]], dtype=torch.float64)
    layer = LayerInfo("m", "cross", (1, 2), heads=1, head_dim=2, position="up", index=0, block="b")  # type: ignore[arg-type]
    sink = Recorder()
    plain = run(attn, AttnProcessor(), hidden, context)
    hooked = run(attn, CaptureProcessor(AttnProcessor(), layer, sink), hidden, context)
    (_, _, probs, _), = sink.blocks
    assert torch.equal(probs, torch.full((1, 1, 2, 2), 0.5))
    torch.testing.assert_close(hooked, plain, rtol=1e-12, atol=0)


def test_block_plan_by_hand_on_the_cpu_and_on_accelerators():
    from attnseg.capture.processor import block_plan

    # 2 items x 4096 keys x 4 bytes = 32 KiB per row of one head; at least 16 rows per block
    # CPU, 4 MiB: 8 heads x 16 rows = 4 MiB, so 8 heads and 16 rows
    assert block_plan(2, 8, 4096, 4096, device_type="cpu") == (8, 16)
    # accelerator, 256 MiB: all 8 heads, 256 MiB / (32 KiB x 8) = 1024 rows
    assert block_plan(2, 8, 4096, 4096, device_type="cuda") == (8, 1024)
    assert block_plan(2, 8, 4096, 4096, device_type="mps") == (8, 1024)
    # an explicit budget wins: 1 MiB holds 2 heads of 16 rows, then 1 MiB / 64 KiB = 16 rows
    assert block_plan(2, 8, 4096, 4096, chunk_bytes=2**20, device_type="cuda") == (2, 16)
    # whole heads when the sink takes no query blocks
    assert block_plan(2, 8, 4096, 4096, device_type="cpu", split_queries=False) == (1, 4096)


def test_reuse_mode_casts_the_attention_output_to_the_query_dtype():
    """As diffusers' processors do (``hidden_states.to(query.dtype)``), the heads' output goes to ``to_out`` in the
    query's dtype: a module whose value projection runs in float64 still feeds its float32 ``to_out``."""
    attn = module("cross")
    w_v = attn.to_v.weight.detach().double()

    class Float64Values(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.double() @ w_v.T

    attn.to_v = Float64Values()
    hidden, context = inputs("cross")
    store = AttentionStore()
    with torch.no_grad():
        out = run(attn, CaptureProcessor(AttnProcessor(), info("cross"), store), hidden, context)
        probs = lit.attention_literal(hidden, context, attn.to_q.weight, attn.to_k.weight, HEADS)
        v = (context.double() @ w_v.T).view(2, CONTEXT, HEADS, DIM).transpose(1, 2)
        heads = (probs @ v).transpose(1, 2).reshape(2, GRID[0] * GRID[1], HEADS * DIM)
        expected = attn.to_out[0](heads.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_query_and_key_norms_are_applied():
    """A module with ``qk_norm`` (as SD3 and Flux have): q and k are layer-normalised per head before the scores."""
    torch.manual_seed(6)
    attn = Attention(query_dim=HEADS * DIM, heads=HEADS, dim_head=DIM, bias=False, qk_norm="layer_norm").eval()
    hidden, _ = inputs("self")
    sink = Recorder()
    plain = run(attn, AttnProcessor2_0(), hidden, None)
    hooked = run(attn, CaptureProcessor(AttnProcessor2_0(), info("self"), sink, chunk_bytes=1), hidden, None)
    n = GRID[0] * GRID[1]

    def per_head_normed(w: torch.Tensor) -> torch.Tensor:  # float64, by hand: (x - mean) / sqrt(var + 1e-5)
        x = (hidden.double() @ w.detach().double().T).view(2, n, HEADS, DIM).transpose(1, 2)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5)

    q, k = per_head_normed(attn.to_q.weight), per_head_normed(attn.to_k.weight)
    expected = torch.softmax(q @ k.transpose(-1, -2) / DIM**0.5, -1)
    torch.testing.assert_close(sink.assembled(2, n, n).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
