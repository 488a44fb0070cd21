"""Every write path of ``AttentionStore`` against one literal reduction (``tests/reference/capture_literal.py``).

Paths: in place (same device and dtype), copied across dtype, copied across device (``cpu:0`` is another
``torch.device`` than ``cpu``, so CPU tensors take the path that GPU maps take into a CPU store), chunked heads,
chunked query rows, per-head maps (``heads="all"``), layers grouped by resolution, batch selection, the running mean
over calls, and the running mean of features. Expected values are float64 loops over the same tensors.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import pytest
import torch

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


def layer(name: str = "l.attn1", kind: str = "self", grid: tuple[int, int] = (2, 3), heads: int = 4) -> LayerInfo:
    return LayerInfo(name, kind, grid, heads=heads, head_dim=8, position="down", index=0, block="l")  # type: ignore[arg-type]


def probs(b: int, h: int, q: int, k: int, seed: int) -> torch.Tensor:
    """Rows that sum to 1 with very different values, so that any wrong weight shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, h, q, k, generator=g), -1)


def feed(
    store: AttentionStore,
    info: LayerInfo,
    p: torch.Tensor,
    head_splits: tuple[int, ...] = (),
    query_splits: tuple[int, ...] = (),
) -> None:
    """One call of ``info``: ``p (B, H, Q, K)`` handed over in blocks (heads cut at ``head_splits``, query rows at
    ``query_splits``), then the call is closed, as the capture processor does."""
    hb = [0, *head_splits, p.shape[1]]
    qb = [0, *query_splits, p.shape[2]]
    for h0, h1 in itertools.pairwise(hb):
        for q0, q1 in itertools.pairwise(qb):
            block = p[:, h0:h1, q0:q1]
            if query_splits:
                store.add_chunk(info, block, slice(h0, h1), queries=slice(q0, q1))
            else:
                store.add_chunk(info, block, slice(h0, h1))
    store.end_call(info)


def check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # float32 sums of 4 terms: ~1e-7 relative; float16 storage rounds each entry to 2^-11 relative
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=tol, atol=tol)


# (store dtype, store device): the first is the in-place path, the others copy across dtype or device
PATHS = [
    pytest.param(torch.float32, "cpu", id="in-place"),
    pytest.param(torch.float64, "cpu", id="cross-dtype"),
    pytest.param(torch.float16, "cpu", id="cross-dtype-half"),
    pytest.param(torch.float32, "cpu:0", id="cross-device"),
]
# (head splits, query splits) of a 4-head, 6-query call: unequal head blocks catch a divisor taken from the block
CHUNKS = [
    pytest.param((), (), id="whole"),
    pytest.param((1, 3), (), id="heads-1-2-1"),
    pytest.param((), (1, 4), id="rows-1-3-2"),
    pytest.param((3,), (2, 5), id="heads-3-1-rows-2-3-1"),
    pytest.param((1, 2, 3), (1, 2, 3, 4, 5), id="one-by-one"),
]


@pytest.mark.parametrize(("dtype", "device"), PATHS)
@pytest.mark.parametrize(("head_splits", "query_splits"), CHUNKS)
@pytest.mark.parametrize("heads", ["mean", "all"])
def test_every_write_path_equals_the_literal_reduction(dtype, device, head_splits, query_splits, heads):
    info = layer()
    calls = [probs(2, 4, 6, 5, seed) for seed in range(3)]  # three denoising steps
    store = AttentionStore(heads=heads, dtype=dtype, device=device)
    for p in calls:
        feed(store, info, p, head_splits, query_splits)
    assert store.get("l.attn1").dtype == torch.float32
    expected = lit.store_mean_literal(calls, heads)
    check(store.get("l.attn1", batch_index=None), expected, dtype)
    check(store.get("l.attn1", batch_index=1), expected[1], dtype)
    stored = store._entries["l.attn1"].sum
    assert stored is not None and stored.dtype == dtype
    # the path taken: in place only when the maps' device and dtype are the store's
    in_place = calls[0].device == store.device and calls[0].dtype == store.dtype
    assert in_place == (device == "cpu" and dtype == torch.float32)


@pytest.mark.parametrize(("dtype", "device"), PATHS)
def test_group_by_resolution_weighs_every_layer_and_call_alike(dtype, device):
    # two layers of one grid with different head counts (a head mean per layer, then a mean over layers), and a
    # layer of another grid that must not leak into it
    a, b = layer("a.attn1", heads=4), layer("b.attn1", heads=2)
    other = layer("c.attn1", grid=(1, 2), heads=4)
    pa = [probs(1, 4, 6, 6, s) for s in (0, 1)]
    pb = [probs(1, 2, 6, 6, s) for s in (2, 3)]
    pc = probs(1, 4, 2, 2, 4)
    store = AttentionStore(group="resolution", dtype=dtype, device=device)
    for step in range(2):
        feed(store, a, pa[step], (1,), (2,))
        feed(store, b, pb[step])
        feed(store, other, pc, (2,))
    assert store.keys() == ["self/2x3", "self/1x2"]
    expected = lit.running_mean_literal([lit.head_mean_literal(p) for p in (*pa, *pb)])
    check(store.get("self/2x3"), expected[0], dtype)
    check(store.get("self/1x2"), lit.head_mean_literal(pc)[0], dtype)
    assert store.info("self/2x3") == ("self", (2, 3), ["a.attn1", "b.attn1"])
    # by_resolution keys by the larger grid side and sorts largest first
    assert list(store.self_attention()) == [3, 2]
    check(store.self_attention()[3], expected[0], dtype)


def test_by_resolution_of_per_layer_entries_averages_layers_equally():
    a, b = layer("a.attn1", heads=4), layer("b.attn1", heads=2)
    cross = layer("x.attn2", kind="cross", heads=4)
    pa = [probs(1, 4, 6, 6, s) for s in (0, 1, 2)]  # a: three calls
    pb = [probs(1, 2, 6, 6, 3)]  # b: one call
    px = probs(1, 4, 6, 7, 4)
    store = AttentionStore(group="layer")
    for p in pa:
        feed(store, a, p, (2,))
    feed(store, b, pb[0])
    feed(store, cross, px, (), (3,))
    mean_a = lit.store_mean_literal(pa)[0]
    mean_b = lit.store_mean_literal(pb)[0]
    # each layer weighs the same, whatever its number of calls or heads
    check(store.self_attention()[3], (mean_a + mean_b) / 2, torch.float32)
    check(store.cross_attention()[3], lit.head_mean_literal(px)[0], torch.float32)
    assert set(store.self_attention()) == {3} and set(store.cross_attention()) == {3}


def test_batch_selection_keeps_the_selected_items_only():
    info = layer()
    calls = [probs(3, 4, 6, 5, s) for s in (5, 6)]
    for heads in ("mean", "all"):
        store = AttentionStore(heads=heads, batch=slice(1, 3), dtype=torch.float64)  # the copy path
        for p in calls:
            feed(store, info, p, (1,), (4,))
        expected = lit.store_mean_literal([p[1:3] for p in calls], heads)
        check(store.get("l.attn1", batch_index=None), expected, torch.float64)


def test_add_is_one_call_with_all_heads():
    info = layer(heads=3)
    calls = [probs(1, 3, 6, 4, s).double() for s in (7, 8)]  # float64 maps: add() casts them to float32
    store = AttentionStore()
    for p in calls:
        store.add(info, p)
    check(store.get("l.attn1"), lit.store_mean_literal(calls)[0], torch.float32)


def test_an_unfinished_call_is_not_counted():
    info = layer()
    store = AttentionStore()
    p = probs(1, 4, 6, 5, 9)
    feed(store, info, p)
    store.add_chunk(info, probs(1, 4, 6, 5, 10)[:, :2], slice(0, 2))  # a second call, half done
    from attnseg.errors import AttnSegError

    empty = AttentionStore()
    empty.add_chunk(info, p[:, :1], slice(0, 1))
    with pytest.raises(AttnSegError, match="incomplete"):
        empty.get("l.attn1")
    # the half call adds to the sum but the count is still 1: the reader sees it, as documented by end_call
    assert store._entries["l.attn1"].count == 1


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_features_keep_the_running_mean_over_calls(device):
    g = torch.Generator().manual_seed(11)
    values = [torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    store = AttentionStore(batch=slice(0, 2), device=device)
    for n, v in enumerate(values, start=1):
        store.add_feature("f", v)
        expected = lit.running_mean_literal([x[0:2] for x in values[:n]])
        torch.testing.assert_close(store.features["f"].double(), expected, rtol=1e-6, atol=1e-6)
        assert store._feature_counts["f"] == n
    assert store.features["f"].dtype == torch.float32
    # another feature has its own count
    store.add_feature("g", values[0][:, :1])
    torch.testing.assert_close(store.features["g"], values[0][0:2, :1].float())


def test_features_through_the_tracer_equal_the_mean_of_the_module_outputs(tiny_adapter):
    from attnseg.capture.tracer import AttentionTracer

    adapter = tiny_adapter
    name = next(n for n, i in adapter.attention_layers().items() if i.kind == "cross")
    feature = f"{name}.to_q"
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, *adapter.latent_size()), generator=g)
    prompt = adapter.encode_prompt("a cat")
    seen: list[torch.Tensor] = []
    handle = adapter.denoiser.get_submodule(feature).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with AttentionTracer(adapter, select="cross", features=[feature]) as tracer:
            for t in (100, 500, 900):  # three steps with different outputs
                adapter.denoise(latents, t, prompt)
    finally:
        handle.remove()
    assert len(seen) == 3 and not torch.equal(seen[0], seen[2])
    torch.testing.assert_close(tracer.store.features[feature].double(), lit.running_mean_literal(seen),
                               rtol=1e-6, atol=1e-6)
    # and the hook is gone after the tracer
    adapter.denoise(latents, 100, prompt)
    assert tracer.store._feature_counts[feature] == 3


def test_save_and_load_keep_sums_counts_and_features(tmp_path):
    info = layer()
    calls = [probs(1, 4, 6, 5, s) for s in (12, 13)]
    store = AttentionStore(heads="all", dtype=torch.float64)
    for p in calls:
        feed(store, info, p, (2,), (3,))
    store.add_feature("f", torch.ones(1, 2, 3))
    store.add_feature("f", 3 * torch.ones(1, 2, 3))
    loaded = AttentionStore.load(store.save(tmp_path / "s"))
    assert loaded.heads == "all" and loaded.dtype == torch.float64
    check(loaded.get("l.attn1"), lit.store_mean_literal(calls, "all")[0], torch.float64)
    torch.testing.assert_close(loaded.features["f"], torch.full((1, 2, 3), 2.0))
    assert loaded._feature_counts == {"f": 2} and loaded._entries["l.attn1"].count == 2


def test_read_errors_name_what_is_stored_and_grid_finds_the_resolution():
    from attnseg.errors import AttnSegError

    store = AttentionStore(group="resolution")
    with pytest.raises(AttnSegError, match="stored: none"):
        store.get("self/2x3")
    feed(store, layer(grid=(2, 3)), probs(1, 4, 6, 6, 0))
    feed(store, layer("c.attn2", kind="cross", grid=(4, 1)), probs(1, 4, 4, 7, 1))
    with pytest.raises(AttnSegError, match=r"stored: self/2x3, cross/4x1$"):
        store.get("x")
    assert store.grid(3) == (2, 3) and store.grid(4) == (4, 1)
    with pytest.raises(AttnSegError, match="resolution 2"):
        store.grid(2)


@pytest.mark.parametrize("heads", ["mean", "all"])
def test_maps_from_an_accelerator_are_moved_to_the_store(heads):
    """Maps computed on a GPU are moved to the store's device before they are added (every GPU run with a CPU store
    takes this path). Checked with fake tensors (devices and shapes, no data), so it runs without a GPU: adding a
    ``cuda`` tensor to a CPU accumulator fails there as it does on a GPU machine."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    info = layer()
    with FakeTensorMode():
        p = torch.empty(2, 4, 6, 5, device="cuda")
        store = AttentionStore(heads=heads)  # on the CPU
        # heads 0 and 1-3, query rows 0-1 and 2-5 (narrow: fake CUDA tensors cannot be sliced with [] here)
        for h0, h in ((0, 1), (1, 3)):
            for q0, q in ((0, 2), (2, 4)):
                block = p.narrow(1, h0, h).narrow(2, q0, q)
                store.add_chunk(info, block, slice(h0, h0 + h), queries=slice(q0, q0 + q))
        store.end_call(info)
        stored = store._entries["l.attn1"].sum
        assert stored is not None and stored.device == torch.device("cpu")


def test_features_from_an_accelerator_are_moved_to_the_store():
    """Module outputs computed on a GPU are kept on the store's device (fake CUDA tensors, as above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        store = AttentionStore()  # on the CPU
        for _ in range(2):  # the first value is kept as it is, the second goes into the running mean
            store.add_feature("f", torch.empty(1, 6, 4, device="cuda", dtype=torch.float16))
        assert store.features["f"].device == torch.device("cpu") and store.features["f"].dtype == torch.float32


def test_per_head_maps_grouped_by_resolution_need_equal_head_counts():
    from attnseg.errors import ConfigError

    store = AttentionStore(heads="all", group="resolution")
    feed(store, layer("a.attn1", heads=4), probs(1, 4, 6, 5, 0))
    with pytest.raises(ConfigError, match="equal head counts"):
        feed(store, layer("b.attn1", heads=2), probs(1, 2, 6, 5, 1))  # same grid, fewer heads


class _Blocks(AttentionStore):
    """Records the head slices handed to ``add_chunk`` (subclasses such as the head-weighted store read them)."""

    def __init__(self) -> None:
        super().__init__()
        self.slices: list[slice] = []

    def add_chunk(self, layer, probs, heads, out=None, *, queries=slice(None)):
        self.slices.append(heads)
        super().add_chunk(layer, probs, heads, out, queries=queries)


def test_add_hands_over_every_head_by_its_index_range():
    store = _Blocks()
    store.add(layer(heads=3), probs(1, 3, 6, 4, 0))
    assert store.slices == [slice(0, 3)]


def test_item_is_one_batch_item_with_the_layers_features_and_meta():
    info = layer()
    calls = [probs(3, 4, 6, 5, s) for s in (1, 2)]
    store = AttentionStore(heads="all", batch=slice(0, 3), meta={"prompt": "a cat"})
    for p in calls:
        feed(store, info, p, (2,))
    store.add_feature("f", torch.arange(3.0 * 2 * 2).reshape(3, 2, 2))
    one = store.item(1)
    expected = lit.store_mean_literal(calls, "all")
    assert one.get("l.attn1", batch_index=None).shape == (1, 4, 6, 5)
    check(one.get("l.attn1"), expected[1], torch.float32)
    torch.testing.assert_close(one.features["f"], torch.arange(4.0, 8.0).reshape(1, 2, 2))
    assert one.layers == {"l.attn1": info} and one.meta == {"prompt": "a cat"} and one.batch is None
    one.meta["prompt"] = "a dog"  # the copy's dictionaries are its own
    assert store.meta["prompt"] == "a cat"
    check(store.get("l.attn1", batch_index=2), expected[2], torch.float32)  # the original is unchanged


def test_kept_batch_applies_the_batch_slice():
    assert AttentionStore().kept_batch(4) == 4
    assert AttentionStore(batch=slice(1, 2)).kept_batch(2) == 1
    assert AttentionStore(batch=slice(1, None)).kept_batch(4) == 3


def test_maps_in_another_dtype_are_averaged_in_float32_and_rounded_once():
    """Into a float16 store, a call's head mean is computed in float32 and rounded to float16 once (adding the heads
    one by one in float16 would round after every head)."""
    info = layer()
    p = probs(2, 4, 6, 5, 21)
    store = AttentionStore(dtype=torch.float16)
    feed(store, info, p)
    stored = store._entries["l.attn1"].sum
    assert stored is not None
    assert torch.equal(stored, (p.sum(1) / 4).to(torch.float16))
    sequential = torch.zeros(2, 6, 5, dtype=torch.float16)
    for i in range(4):
        sequential.add_(p[:, i], alpha=0.25)
    assert not torch.equal(sequential, stored)  # so the two ways can be told apart here


def test_by_resolution_reads_the_batch_item_asked_for():
    a, b = layer("a.attn1"), layer("b.attn1")
    pa, pb = probs(2, 4, 6, 6, 30), probs(2, 4, 6, 6, 31)
    store = AttentionStore()
    feed(store, a, pa)
    feed(store, b, pb)
    expected = (lit.head_mean_literal(pa) + lit.head_mean_literal(pb)) / 2  # (B, Q, K): layers weigh alike
    check(store.self_attention(batch_index=1)[3], expected[1], torch.float32)
    check(store.self_attention(batch_index=None)[3], expected, torch.float32)


def test_add_names_the_shape_it_expects():
    from attnseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"probs must be \(B, 3, Q = 6, K\) for l.attn1, got \(1, 2, 6, 4\)"):
        AttentionStore().add(layer(heads=3), probs(1, 2, 6, 4, 0))


def test_a_half_precision_store_adds_each_call_in_its_own_dtype():
    """Each call's head mean is converted to the store's dtype, then added there (float16 + float16); adding the
    float32 mean to the float16 sum would round once instead of twice, and differ."""
    info = layer()
    calls = [probs(2, 4, 6, 5, s) for s in (40, 41, 42)]
    store = AttentionStore(dtype=torch.float16)
    for p in calls:
        feed(store, info, p)
    stored = store._entries["l.attn1"].sum
    assert stored is not None
    in_dtype = torch.zeros(2, 6, 5, dtype=torch.float16)
    mixed = torch.zeros(2, 6, 5, dtype=torch.float16)
    for p in calls:
        in_dtype += (p.sum(1) / 4).to(torch.float16)
        mixed += p.sum(1) / 4
    assert torch.equal(stored, in_dtype)
    assert not torch.equal(in_dtype, mixed)  # so the two can be told apart here


def test_a_call_with_another_batch_size_or_map_size_is_refused():
    from attnseg.errors import AttnSegError

    store = AttentionStore()
    feed(store, layer(), probs(2, 4, 6, 5, 0))
    with pytest.raises(AttnSegError, match="do not match the maps already stored"):
        feed(store, layer(), probs(1, 4, 6, 5, 1))  # same maps, one batch item
    with pytest.raises(AttnSegError, match="do not match the maps already stored"):
        store.add_chunk(layer(grid=(2, 3)), probs(2, 4, 6, 7, 2), slice(0, 4))  # same batch, 7 keys


def test_iterating_a_store_gives_its_keys_and_keys_are_described_in_words():
    from attnseg.capture.store import _describe_key

    store = AttentionStore(group="resolution")
    feed(store, layer("a.attn1"), probs(1, 4, 6, 5, 0))
    feed(store, layer("c.attn2", kind="cross", grid=(1, 2)), probs(1, 4, 2, 7, 1))
    assert list(store) == store.keys() == ["self/2x3", "cross/1x2"]
    assert _describe_key("self/2x3") == "self-attention at 2x3"
    assert _describe_key("down.0.attn1") == "down.0.attn1"


def test_a_batch_item_can_be_saved_with_its_features(tmp_path):
    store = AttentionStore(batch=slice(0, 2))
    info = layer()
    feed(store, info, probs(2, 4, 6, 5, 3))
    for v in (torch.zeros(2, 3, 4), torch.ones(2, 3, 4)):
        store.add_feature("f", v)
    back = AttentionStore.load(store.item(1).save(tmp_path / "item1"))
    check(back.get("l.attn1"), store.get("l.attn1", batch_index=1).double(), torch.float32)
    torch.testing.assert_close(back.features["f"], torch.full((1, 3, 4), 0.5))
    assert back._feature_counts == {"f": 2}


def test_by_resolution_renormalises_only_the_parts_of_joint_layers():
    """Rows of a joint layer's part are slices of a larger softmax: their layer mean is divided by its row sums
    (over the keys of the part); a plain layer's rows are returned as stored, even when they do not sum to 1."""
    import dataclasses

    joint = dataclasses.replace(layer("j.attn", kind="cross", heads=2), rows_sum_to_one=False)  # 2 x 3 grid
    plain = layer("p.attn2", kind="cross", heads=2, grid=(4, 4))
    g = torch.Generator().manual_seed(7)
    part = torch.rand(1, 2, 6, 5, generator=g) * torch.linspace(0.1, 0.9, 6).view(1, 1, 6, 1)  # rows sum to < 1
    scaled = probs(1, 2, 16, 5, 8) * 0.5
    store = AttentionStore()
    feed(store, joint, part)
    feed(store, plain, scaled)
    maps = store.cross_attention()
    mean = part[0].double().mean(0)
    check(maps[3], mean / mean.sum(-1, keepdim=True), torch.float32)
    check(maps[4], scaled[0].double().mean(0), torch.float32)  # not renormalised: rows sum to 0.5
    batched = store.by_resolution("cross", batch_index=None)  # (B, Q, K): the sums run over the last axis
    check(batched[3][0], mean / mean.sum(-1, keepdim=True), torch.float32)


def test_an_accumulator_that_does_not_fit_is_refused_naming_its_entry(monkeypatch):
    """The check before allocating names what needs the memory (the entry's key) and the memory on the device."""
    from attnseg.errors import AttnSegError
    from attnseg.methods import ops

    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 100)  # 100 bytes free
    store = AttentionStore()
    with pytest.raises(AttnSegError, match=r"^the attention maps of l.attn1 needs about .* GiB available on the host"):
        feed(store, layer(grid=(3, 3)), probs(1, 4, 9, 9, 0))
