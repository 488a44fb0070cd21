"""Property tests (Hypothesis) of the attention store and the capture processor.

- Any cutting of a call into blocks of heads and query rows gives the literal maps, for every store setting.
- The running mean over calls (steps) equals the literal mean, for maps and features.
- Hooked outputs equal the unhooked module's, with the plain processor (reuse and beside) and with a custom processor
  (whose effect survives), for any block size.

The profile in ``tests/conftest.py`` derandomises the examples (the same ones on every run) and keeps them few.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from hypothesis import given
from hypothesis import strategies as st

from attnseg.capture.processor import CaptureProcessor
from attnseg.capture.store import AttentionStore
from attnseg.types import LayerInfo

torch.set_num_threads(1)


def _load(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_p", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lit = _load("capture_literal")


@st.composite
def cuts(draw: st.DrawFn, n: int) -> tuple[int, ...]:
    """Sorted distinct cut points strictly inside ``0..n`` (any partition of ``range(n)`` into blocks)."""
    inner = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
    return tuple(sorted(inner))


def _blocks(n: int, points: tuple[int, ...]) -> list[slice]:
    edges = [0, *points, n]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


@st.composite
def calls(draw: st.DrawFn):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 4))
    gh, gw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    maps = [torch.softmax(3 * torch.randn(b, h, gh * gw, k, generator=g), -1) for _ in range(steps)]
    plans = [(draw(cuts(h)), draw(cuts(gh * gw))) for _ in range(steps)]  # each step cut its own way
    return (gh, gw), maps, plans


@given(
    data=calls(),
    heads=st.sampled_from(["mean", "all"]),
    group=st.sampled_from(["layer", "resolution"]),
    path=st.sampled_from([(torch.float32, "cpu"), (torch.float64, "cpu"), (torch.float32, "cpu:0")]),
)
def test_any_blocks_of_heads_and_rows_give_the_literal_mean_over_steps(data, heads, group, path):
    grid, maps, plans = data
    h = maps[0].shape[1]
    info = LayerInfo("x.attn1", "self", grid, heads=h, head_dim=4, position="up", index=0, block="x")
    store = AttentionStore(heads=heads, group=group, dtype=path[0], device=path[1])
    for p, (head_cuts, row_cuts) in zip(maps, plans, strict=True):
        for hs in _blocks(h, head_cuts):
            for qs in _blocks(p.shape[2], row_cuts):
                store.add_chunk(info, p[:, hs, qs], hs, queries=qs)
        store.end_call(info)
    key = store.keys()[0]
    expected = lit.store_mean_literal(maps, heads)
    torch.testing.assert_close(store.get(key, batch_index=None).double(), expected, rtol=1e-6, atol=1e-6)


@given(steps=st.integers(1, 6), seed=st.integers(0, 2**16), keep=st.sampled_from([None, slice(0, 1), slice(1, 3)]))
def test_feature_mean_over_steps_is_the_literal_mean(steps, seed, keep):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(3, 4, 2, generator=g) * (i + 1) for i in range(steps)]
    store = AttentionStore(batch=keep)
    for v in values:
        store.add_feature("f", v)
    sel = (lambda v: v) if keep is None else (lambda v: v[keep])
    expected = lit.running_mean_literal([sel(v) for v in values])
    torch.testing.assert_close(store.features["f"].double(), expected, rtol=1e-5, atol=1e-5)


class Scaled(AttnProcessor2_0):
    """A custom processor (as LoRA or IP-Adapter install) whose output differs from the plain one."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **k)
        return self.gain * out + 0.1


@given(
    kind=st.sampled_from(["self", "cross"]),
    heads=st.integers(1, 3),
    side=st.integers(2, 6),
    chunk_bytes=st.sampled_from([1, 64, 1024, 2**20, None]),
    mode=st.sampled_from(["reuse", "beside"]),
    original=st.sampled_from(["AttnProcessor", "AttnProcessor2_0", "custom"]),
    seed=st.integers(0, 2**16),
)
def test_hooked_output_equals_the_unhooked_module(kind, heads, side, chunk_bytes, mode, original, seed):
    torch.manual_seed(seed)
    dim = 4
    attn = Attention(query_dim=heads * dim, cross_attention_dim=6 if kind == "cross" else None, heads=heads,
                     dim_head=dim, bias=False).eval()
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(2, side * side, heads * dim, generator=g)
    context = torch.randn(2, 5, 6, generator=g) if kind == "cross" else None

    def make():
        plain = {"AttnProcessor": AttnProcessor, "AttnProcessor2_0": AttnProcessor2_0}
        return plain[original]() if original in plain else Scaled(1.7)

    with torch.no_grad():
        attn.set_processor(make())
        unhooked = attn(hidden, encoder_hidden_states=context)
        info = LayerInfo("m", kind, (side, side), heads=heads, head_dim=dim, position="up", index=0, block="b")
        store = AttentionStore(heads="all")
        attn.set_processor(CaptureProcessor(make(), info, store, mode=mode, chunk_bytes=chunk_bytes))
        hooked = attn(hidden, encoder_hidden_states=context)
    if mode == "beside" or original == "custom":
        assert torch.equal(hooked, unhooked)  # the module's own processor made the output
    else:
        torch.testing.assert_close(hooked, unhooked, rtol=1e-5, atol=1e-6)
    if original == "custom":  # and its effect is there: the plain processor gives another output
        attn.set_processor(AttnProcessor2_0())
        with torch.no_grad():
            plain = attn(hidden, encoder_hidden_states=context)
        torch.testing.assert_close(hooked, 1.7 * plain + 0.1, rtol=1e-5, atol=1e-5)
    expected = lit.attention_literal(hidden, hidden if context is None else context, attn.to_q.weight,
                                     attn.to_k.weight, heads)
    torch.testing.assert_close(store.get("m", None).double(), expected, rtol=1e-5, atol=1e-6)
