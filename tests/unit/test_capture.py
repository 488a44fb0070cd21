"""Attention capture: outputs unchanged, only selected layers hooked, processors restored, store reductions."""

from __future__ import annotations

import pytest
import torch

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import AttnSegError, ConfigError
from attnseg.types import LayerInfo


def _inputs(adapter, text="a photo of a cat"):
    g = torch.Generator().manual_seed(0)
    size = adapter.resolution
    pixels = torch.rand((1, 3, *size), generator=g) * 2 - 1
    latents = adapter.encode_image(pixels)
    return latents, adapter.encode_prompt(text)


def _processor_types(adapter):
    return {name: type(p).__name__ for name, p in adapter.denoiser.attn_processors.items()}


@pytest.mark.parametrize("mode", ["reuse", "beside"])
@pytest.mark.parametrize("xl", [False, True])
def test_hooked_output_equals_plain(tiny_adapter, tiny_xl_adapter, mode, xl):
    adapter = tiny_xl_adapter if xl else tiny_adapter
    latents, prompt = _inputs(adapter)
    plain = adapter.denoise(latents, 300, prompt)
    with AttentionTracer(adapter, mode=mode) as tracer:
        hooked = adapter.denoise(latents, 300, prompt)
    if mode == "beside":
        assert torch.equal(hooked, plain)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    assert len(tracer.store) == len(adapter.attention_layers())


def test_probabilities_match_explicit_softmax(tiny_adapter):
    """The captured map equals softmax(q k^T / sqrt(d)) computed by hand for one layer."""
    adapter = tiny_adapter
    latents, prompt = _inputs(adapter)
    layers = adapter.attention_layers()
    name = next(n for n, i in layers.items() if i.kind == "cross")
    module = adapter.denoiser.get_submodule(name)
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["e"] = kwargs.get("encoder_hidden_states")

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with AttentionTracer(adapter, select=[name], mode="beside") as tracer:
            adapter.denoise(latents, 300, prompt)
    finally:
        handle.remove()
    h, e = seen["h"], seen["e"]
    heads = module.heads
    q = module.to_q(h).view(1, -1, heads, layers[name].head_dim).transpose(1, 2)
    k = module.to_k(e).view(1, -1, heads, layers[name].head_dim).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / layers[name].head_dim**0.5, dim=-1).mean(1)[0]
    torch.testing.assert_close(tracer.store.get(name), expected, rtol=1e-5, atol=1e-6)


def test_only_selected_layers_are_hooked_and_restored(tiny_adapter):
    adapter = tiny_adapter
    before = _processor_types(adapter)
    latents, prompt = _inputs(adapter)
    with AttentionTracer(adapter, select="self") as tracer:
        during = _processor_types(adapter)
        adapter.denoise(latents, 10, prompt)
    hooked = {n for n, t in during.items() if t == "CaptureProcessor"}
    assert hooked == {f"{n}.processor" for n, i in adapter.attention_layers().items() if i.kind == "self"}
    assert all(during[n] == before[n] for n in before if n not in hooked)  # the rest keep the fused path
    assert _processor_types(adapter) == before
    assert {tracer.store.info(k)[0] for k in tracer.store} == {"self"}


def test_restored_on_exception_and_refuses_nesting(tiny_adapter):
    adapter = tiny_adapter
    before = adapter.denoiser.attn_processors
    with pytest.raises(RuntimeError, match="boom"), AttentionTracer(adapter):
        raise RuntimeError("boom")
    assert adapter.denoiser.attn_processors == before
    with AttentionTracer(adapter), pytest.raises(AttnSegError, match="nested"), AttentionTracer(adapter):
        pass
    assert adapter.denoiser.attn_processors == before
    with AttentionTracer(adapter):  # usable again after the refused nesting
        pass


def test_wrong_input_size_is_reported(tiny_adapter):
    adapter = tiny_adapter
    latents, prompt = _inputs(adapter)
    small = latents[..., :8, :8]
    with pytest.raises(AttnSegError, match="prepare the tracer"), AttentionTracer(adapter):
        adapter.denoise(small, 10, prompt)
    with AttentionTracer(adapter, size=(16, 16)) as tracer:
        adapter.denoise(small, 10, prompt)
    assert max(tracer.store.self_attention()) == 8


def test_chunking_gives_same_maps(tiny_adapter):
    adapter = tiny_adapter
    latents, prompt = _inputs(adapter)
    stores = []
    for chunk in (1, 2**30):  # one head at a time vs all heads at once
        with AttentionTracer(adapter, AttentionStore(heads="all"), chunk_bytes=chunk) as tracer:
            adapter.denoise(latents, 10, prompt)
        stores.append(tracer.store)
    for key in stores[0]:
        torch.testing.assert_close(stores[0].get(key), stores[1].get(key))


def _layer(name="l.attn1", kind="self", grid=(2, 2), heads=2):
    return LayerInfo(name, kind, grid, heads=heads, head_dim=4, position="down", index=0, block="l")


def _probs(b, h, q, k, seed):
    return torch.softmax(torch.randn(b, h, q, k, generator=torch.Generator().manual_seed(seed)), -1)


def test_store_reduces_heads_layers_and_steps():
    a, b = _layer("a.attn1"), _layer("b.attn1")
    p = [_probs(1, 2, 4, 4, s) for s in range(4)]
    by_layer = AttentionStore(group="layer")
    by_res = AttentionStore(group="resolution")
    for store in (by_layer, by_res):
        store.add(a, p[0])
        store.add(b, p[1])
        store.add(a, p[2])  # a second step: running mean
        store.add(b, p[3])
    torch.testing.assert_close(by_layer.get("a.attn1"), (p[0] + p[2]).mean(1)[0] / 2)
    expected = (p[0] + p[1] + p[2] + p[3]).mean(1)[0] / 4
    torch.testing.assert_close(by_res.get("self/2x2"), expected)
    torch.testing.assert_close(by_layer.self_attention()[2], expected)
    torch.testing.assert_close(by_res.self_attention()[2], expected)
    torch.testing.assert_close(by_res.self_attention()[2].sum(-1), torch.ones(4))
    assert by_res.nbytes() == 4 * 4 * 4  # one (1, 4, 4) float32 map, whatever the number of layers


def test_store_keeps_heads_and_selects_batch():
    layer = _layer()
    p = _probs(2, 2, 4, 4, 0)
    store = AttentionStore(heads="all", batch=slice(1, 2))  # conditional half of a CFG batch
    store.add(layer, p)
    torch.testing.assert_close(store.get("l.attn1"), p[1])
    with pytest.raises(ConfigError):
        store.add(layer, p[:, :1])
    with pytest.raises(ConfigError, match="Q = 4"):
        store.add(layer, _probs(2, 2, 9, 9, 1))
    with pytest.raises(AttnSegError, match="do not match"):
        store.add(layer, _probs(2, 2, 4, 9, 1))


def test_store_save_load_round_trip(tmp_path, tiny_adapter):
    adapter = tiny_adapter
    latents, prompt = _inputs(adapter)
    store = AttentionStore(group="resolution", meta={"prompt": prompt.text, "image_size": [32, 32]})
    with AttentionTracer(adapter, store):
        adapter.denoise(latents, 10, prompt)
    path = store.save(tmp_path / "att")
    assert path.suffix == ".safetensors"
    loaded = AttentionStore.load(path)
    assert loaded.keys() == store.keys()
    assert loaded.meta == store.meta and loaded.layers == store.layers
    for key in store:
        assert torch.equal(loaded.get(key), store.get(key))
    for r, m in store.cross_attention().items():
        assert torch.equal(loaded.cross_attention()[r], m)


def test_store_load_errors(tmp_path):
    with pytest.raises(AttnSegError, match="not found"):
        AttentionStore.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AttnSegError, match="not a readable"):
        AttentionStore.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(AttnSegError, match="not an attnseg attention store"):
        AttentionStore.load(other)


def test_store_refuses_maps_that_do_not_fit(monkeypatch):
    import attnseg.methods.ops as ops

    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 100)
    with pytest.raises(AttnSegError, match=r"attention maps of l\.attn1 needs about"):
        AttentionStore().add(_layer(), _probs(1, 2, 4, 4, 0))
