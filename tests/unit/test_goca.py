"""Tests of GoCA (``attnseg.methods.goca``) and its capture store (``attnseg.capture.goca``)."""

from __future__ import annotations

import copy

import pytest
import torch

from attnseg.capture.goca import (
    REFINE_KEY,
    HeadWeightedStore,
    cross_maps,
    layer_scores_of,
    reference_self_maps,
    refine_affinity,
)
from attnseg.capture.store import AttentionStore
from attnseg.errors import AttnSegError, ConfigError
from attnseg.methods.base import METHODS, Segmenter, create_method
from attnseg.methods.goca import (
    GoCA,
    aggregate_cross_attention,
    baseline_cross_layers,
    default_reference_layer,
    default_refine_layers,
    gaussian_blur,
    head_weights,
    layer_scores,
    layer_weights,
    refine_with_self_attention,
    rescale_per_pixel,
    resize_self_attention,
)
from attnseg.types import LayerInfo

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------------
# G4: per-pixel rescaling, by hand
# ----------------------------------------------------------------------------------------------------------------------


def test_rescale_per_pixel_by_hand():
    scores = torch.tensor([
        [0.5, 0.1, 0.3, 0.1],  # content {1, 2}: Z = 0.1 + 0.3 = 0.4 -> (0.1/0.4, 0.3/0.4) = (0.25, 0.75)
        [0.9, 0.0, 0.05, 0.05],  # Z = 0.05 -> (0, 1); the <sos>-like column 0 (0.9) plays no part
        [1.0, 0.0, 0.0, 0.0],  # Z = 0 -> (0, 0): eps keeps the empty row at 0 instead of 0/0
    ])
    out = rescale_per_pixel(scores, [1, 2])
    expected = torch.tensor([[0.25, 0.75], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the order of the content indices is the order of the output columns
    torch.testing.assert_close(rescale_per_pixel(scores, [2, 1])[0], torch.tensor([0.75, 0.25]), atol=1e-6, rtol=0)
    # scaling a non-content column, or a whole row, changes nothing
    scaled = scores.clone()
    scaled[:, 0] *= 10
    scaled[0] *= 3
    torch.testing.assert_close(rescale_per_pixel(scaled, [1, 2]), out, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        rescale_per_pixel(scores, [])
    with pytest.raises(ConfigError):
        rescale_per_pixel(scores, [1, 1])
    with pytest.raises(ConfigError):
        rescale_per_pixel(scores, [4])


# ----------------------------------------------------------------------------------------------------------------------
# G1: head weights, by hand and against the definition
# ----------------------------------------------------------------------------------------------------------------------


def test_head_weights_by_hand():
    # Two heads, one pixel, d = 1: head outputs h0 = 1, h1 = 2.
    outs = torch.tensor([[[1.0]], [[2.0]]])  # (H=2, N=1, d=1)
    # W = I (C = 2): c0 = (1, 0), c1 = (0, 2), o = (1, 2); s = (<c0,o>, <c1,o>) = (1, 4); |o|^2 = 5 -> (0.2, 0.8)
    w = head_weights(outs, torch.eye(2))
    torch.testing.assert_close(w, torch.tensor([[0.2], [0.8]]))
    # W = [1, -1] (C = 1): c0 = 1, c1 = -2, o = -1; s = (-1, 2); |o|^2 = 1 -> (-1, 2): signed, sums to 1
    w_signed = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(head_weights(outs, w_signed), torch.tensor([[-1.0], [2.0]]))
    # clamped: max(s, 0) = (0, 2) -> (0, 1)
    torch.testing.assert_close(head_weights(outs, w_signed, method="dot-product"), torch.tensor([[0.0], [1.0]]))
    # average: 1/H
    torch.testing.assert_close(head_weights(outs, w_signed, method="average"), torch.tensor([[0.5], [0.5]]))
    # W = [2, -1]: c0 = 2, c1 = -2, o = 0 -> uniform ([proposal]); clamped s = (0, 0) -> uniform too
    w_zero = torch.tensor([[2.0, -1.0]])
    torch.testing.assert_close(head_weights(outs, w_zero), torch.tensor([[0.5], [0.5]]))
    torch.testing.assert_close(head_weights(outs, w_zero, method="dot-product"), torch.tensor([[0.5], [0.5]]))
    with pytest.raises(ConfigError):
        head_weights(outs, w_zero, method="cosine")
    with pytest.raises(ConfigError):
        head_weights(outs, torch.ones(2, 3))


def test_head_weights_match_the_definition():
    gen = torch.Generator().manual_seed(0)
    b, h, n, d, c = 2, 3, 5, 4, 6
    outs = torch.randn(b, h, n, d, generator=gen)
    weight = torch.randn(c, h * d, generator=gen)
    w = head_weights(outs, weight)
    assert w.shape == (b, h, n)
    # brute force: c_h(p) = W_h (A_h V_h)[p], o = sum_h c_h, s = <c_h, o>, w = s / sum_h s
    contrib = torch.stack([outs[:, k] @ weight[:, k * d : (k + 1) * d].T for k in range(h)], 1)  # (B, H, N, C)
    o = contrib.sum(1, keepdim=True)
    s = (contrib * o).sum(-1)
    torch.testing.assert_close(w, s / s.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.sum(1), torch.ones(b, n))
    torch.testing.assert_close(head_weights(outs[0], weight), w[0])


# ----------------------------------------------------------------------------------------------------------------------
# G2, G3, G4 blur, G6
# ----------------------------------------------------------------------------------------------------------------------


def test_layer_weights_by_hand():
    # F = 100 I (N = C = 4): F F^T / sqrt(4) = 5000 I, so Pi = softmax rows = I (to float precision).
    feature = 100 * torch.eye(4)
    identity = torch.eye(4)  # u = sum(Pi * I) = 4
    uniform = torch.full((4, 4), 0.25)  # u = sum(Pi) / 4 = 1
    scores = layer_scores(feature, [identity, uniform])
    torch.testing.assert_close(scores, torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(layer_weights(feature, [identity, uniform]), torch.tensor([0.8, 0.2]))
    # all scores <= 0 -> uniform ([proposal])
    torch.testing.assert_close(layer_weights(feature, [torch.zeros(4, 4)] * 2), torch.tensor([0.5, 0.5]))
    # a finer map is resized to the reference grid (2x2) without renormalisation: a 4x4 uniform map -> rows of 4 bins
    # holding 1/16 each -> each row sums to 1/4 -> u = 4 rows * 1/4 = 1 (the resolution-dependent scale of the code)
    fine_uniform = torch.full((16, 16), 1 / 16)
    torch.testing.assert_close(layer_scores(feature, [fine_uniform]), torch.tensor([0.25]))


def test_resize_self_attention_tiles_queries_and_resizes_keys():
    maps = torch.arange(16.0 * 16).reshape(16, 16)  # 4x4 grid
    assert resize_self_attention(maps, (4, 4), (4, 4)) is maps
    down = resize_self_attention(maps, (4, 4), (2, 2))
    # queries: nearest picks query rows 0, 2, 8, 10; keys: bilinear half-pixel halving = mean of 2x2 blocks
    expected = torch.stack([maps[q].reshape(1, 1, 4, 4) for q in (0, 2, 8, 10)])
    expected = torch.nn.functional.avg_pool2d(expected.reshape(4, 1, 4, 4), 2).reshape(4, 4)
    torch.testing.assert_close(down, expected)
    up = resize_self_attention(torch.eye(4), (2, 2), (4, 4))
    assert up.shape == (16, 16)
    torch.testing.assert_close(up[0], up[1])  # query (0,0) and (0,1) share the coarse query (0,0)


def test_aggregate_cross_attention_clamps_and_normalises():
    a = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])  # 2x2 grid, T = 2
    b = torch.tensor([[0.0, 1.0]])  # 1x1 grid: up to 2x2 is constant
    out = aggregate_cross_attention([a, b], [(2, 2), (1, 1)], [1.0, -0.5], (2, 2))
    raw = (a - 0.5 * b).clamp_min(0)
    torch.testing.assert_close(out, raw / raw.sum(1, keepdim=True))


def test_gaussian_blur_kernel():
    constant = torch.full((1, 6, 6), 3.0)
    torch.testing.assert_close(gaussian_blur(constant), constant)
    delta = torch.zeros(9, 9)
    delta[4, 4] = 1.0
    out = gaussian_blur(delta, kernel_size=5, sigma=1.1)
    t = torch.arange(-2.0, 3.0)
    k = torch.exp(-0.5 * (t / 1.1) ** 2)
    k = k / k.sum()
    torch.testing.assert_close(out[2:7, 2:7], k[:, None] * k[None, :])
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)
    assert gaussian_blur(torch.rand(2, 2, 2)).shape == (2, 2, 2)  # too small for reflect padding


def test_refinement_propagates_and_minmaxes():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    torch.testing.assert_close(refine_with_self_attention(maps, torch.eye(4)), maps / 3)
    mix = torch.full((4, 4), 0.25)
    assert float(refine_with_self_attention(maps, mix).abs().max()) == 0.0  # constant -> zeros
    assert refine_with_self_attention(maps, mix, order=0) is maps


# ----------------------------------------------------------------------------------------------------------------------
# HeadWeightedStore
# ----------------------------------------------------------------------------------------------------------------------


def _tensors(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from an object's attributes (dicts, lists, dataclasses)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, seen)]
    if isinstance(obj, list | tuple | set | frozenset):
        return [t for v in obj for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__"):
        return _tensors(vars(obj), seen)
    return []


def test_store_weights_heads_per_call_and_keeps_nothing_per_head():
    gen = torch.Generator().manual_seed(1)
    h, n, t, d, c = 4, 9, 5, 3, 7
    info = LayerInfo("b.attentions.0.transformer_blocks.0.attn2", "cross", (3, 3), h, d, "up", 0, "b")
    weight = torch.randn(c, h * d, generator=gen)
    store = HeadWeightedStore(out_weights={info.name: weight})
    assert store.wants_outputs
    probs = torch.softmax(torch.randn(1, h, n, t, generator=gen), -1)
    outs = torch.randn(1, h, n, d, generator=gen)
    for call in range(2):  # two calls (steps): running mean of identical calls = one call
        store.add_chunk(info, probs[:, :3], slice(0, 3), outs[:, :3])
        assert store.pending_layers() == [info.name]
        store.add_chunk(info, probs[:, 3:], slice(3, 4), outs[:, 3:])
        store.end_call(info)
        assert store.pending_layers() == []
        assert all(x.ndim <= 3 for x in _tensors(store) if x is not weight), f"per-head tensor kept after call {call}"
    expected = torch.einsum("hn,hnt->nt", head_weights(outs[0], weight), probs[0])
    torch.testing.assert_close(cross_maps(store)[info.name], expected)
    with pytest.raises(AttnSegError, match="outputs"):
        store.add_chunk(info, probs, slice(0, h))


def test_store_reduces_self_maps_on_arrival():
    info = LayerInfo("b.attentions.0.transformer_blocks.0.attn1", "self", (4, 4), 2, 8, "up", 0, "b")
    store = HeadWeightedStore(head_method="average", reference_layers={info.name}, reference_grid=(2, 2),
                              refine_layers={info.name}, refine_grid=(4, 4))
    assert not store.wants_outputs
    probs = torch.softmax(torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2)), -1)
    store.add_chunk(info, probs[:, :1], slice(0, 1))
    store.add_chunk(info, probs[:, 1:], slice(1, 2))
    store.end_call(info)
    mean = probs[0].mean(0)
    torch.testing.assert_close(refine_affinity(store), mean)
    torch.testing.assert_close(reference_self_maps(store)[info.name], resize_self_attention(mean, (4, 4), (2, 2)))


# ----------------------------------------------------------------------------------------------------------------------
# GoCA
# ----------------------------------------------------------------------------------------------------------------------


def test_registered_and_run_options():
    assert METHODS.get("goca") is GoCA
    seg = create_method("goca", classes="cat, grass , wall")
    assert isinstance(seg, Segmenter)
    assert seg.classes == ("cat", "grass", "wall")
    opts = seg.run_options()
    assert (opts.timestep, opts.add_noise, opts.sample_posterior, opts.prompt) == (100, True, True, "cat, grass, wall")
    assert GoCA(classes=["cat"], background_objects=["sky"]).prompt == "cat, sky"
    assert GoCA(classes=["cat"], prompt="a cat on the grass").prompt == "a cat on the grass"


def test_hyper_parameter_validation():
    for kwargs, name in [
        ({"classes": ""}, "classes"),
        ({"classes": ["cat", "Cat"]}, "classes"),
        ({"classes": ["cat", 3]}, "classes"),
        ({"classes": ["cat"], "background_objects": ["cat"]}, "background_objects"),
        ({"classes": ["cat", "dog"], "prompt": "a photo of a cat"}, "prompt"),
        ({"classes": ["cat"], "variant": "ours"}, "variant"),
        ({"classes": ["cat"], "head_method": "cosine"}, "head_method"),
        ({"classes": ["cat"], "layer_method": "manual"}, "layer_method"),
        ({"classes": ["cat"], "rescale": "yes"}, "rescale"),
        ({"classes": ["cat"], "background_threshold": float("inf")}, "background_threshold"),
        ({"classes": ["cat"], "background_mode": "min"}, "background_mode"),
        ({"classes": ["cat"], "refine_order": -1}, "refine_order"),
        ({"classes": ["cat"], "reference_layer": ""}, "reference_layer"),
        ({"classes": ["cat"], "refine_layers": []}, "refine_layers"),
        ({"classes": ["cat"], "timestep": -5}, "timestep"),
        ({"classes": ["cat"], "blur_kernel_size": 4}, "blur_kernel_size"),
        ({"classes": ["cat"], "blur_sigma": 0}, "blur_sigma"),
    ]:
        with pytest.raises(ConfigError, match=name):
            GoCA(**kwargs)
    with pytest.raises(ConfigError, match="no parameter"):
        create_method("goca", classes="cat", seed=0)


def test_layer_choices_follow_block_positions(tiny_adapter):
    from diffusers import UNet2DConditionModel

    from attnseg.models.unet import unet_attention_layers
    from attnseg.testing import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    sd15 = unet_attention_layers(unet, (64, 64))  # 512 px
    tb = "transformer_blocks.0"
    assert default_reference_layer(sd15, (64, 64)) == f"up_blocks.2.attentions.1.{tb}.attn2.to_q"
    assert default_refine_layers(sd15) == [
        f"down_blocks.0.attentions.1.{tb}.attn1", f"up_blocks.3.attentions.0.{tb}.attn1",
        f"up_blocks.3.attentions.1.{tb}.attn1",
    ]
    assert baseline_cross_layers(sd15) == [  # "layers 5-12" of 16
        f"down_blocks.2.attentions.0.{tb}.attn2", f"down_blocks.2.attentions.1.{tb}.attn2",
        f"mid_block.attentions.0.{tb}.attn2", f"up_blocks.1.attentions.0.{tb}.attn2",
        f"up_blocks.1.attentions.1.{tb}.attn2", f"up_blocks.1.attentions.2.{tb}.attn2",
        f"up_blocks.2.attentions.0.{tb}.attn2", f"up_blocks.2.attentions.1.{tb}.attn2",
    ]
    assert len(GoCA(classes="cat").select_layers(sd15)) == 32  # 16 cross + their 16 self layers (G6 among them)
    # the tiny model gets the same rule: the up block at latent/2, its second attention
    tiny = tiny_adapter.attention_layers()
    ref = default_reference_layer(tiny, tiny_adapter.latent_size())
    assert ref == f"up_blocks.0.attentions.1.{tb}.attn2.to_q"
    assert GoCA(classes="cat").features(tiny_adapter) == [ref]
    assert GoCA(classes="cat", variant="vanilla").features(tiny_adapter) == []


def test_bad_layer_names(tiny_adapter):
    layers = tiny_adapter.attention_layers()
    with pytest.raises(ConfigError, match="refine_layers"):
        GoCA(classes="cat", refine_layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]).select_layers(layers)
    with pytest.raises(ConfigError, match="reference_layer"):
        GoCA(classes="cat", reference_layer="up_blocks.9.nothing").features(tiny_adapter)


@pytest.fixture(scope="module")
def goca_run(tiny_adapter, tmp_path_factory):
    """One GoCA capture on the tiny model (the store is reused by several tests)."""
    import numpy as np
    from PIL import Image

    from attnseg.pipeline import AttentionSegmentationPipeline

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))
    pipe = AttentionSegmentationPipeline(tiny_adapter, "goca", classes=["cat", "grass"])
    return pipe, pipe.run(image, seed=0)


def test_end_to_end_on_a_tiny_model(goca_run):
    pipe, out = goca_run
    result = out.model_result
    h, w = out.image.size[1], out.image.size[0]
    assert result.labels.shape == (h, w) and result.labels.dtype == torch.int64
    assert set(result.labels.unique().tolist()) <= {0, 1, 2}
    assert result.scores is not None and result.scores.shape == (3, h, w)
    assert result.label_names == ("background", "cat", "grass") and result.method == "goca"
    meta = result.meta
    assert meta["token_indices"] == {"cat": [1], "grass": [3]} and meta["content_tokens"] == [1, 3]
    assert sum(meta["layer_weights"].values()) == pytest.approx(1.0)
    assert len(meta["layer_weights"]) == sum(i.kind == "cross" for i in pipe.adapter.attention_layers().values())
    assert meta["reference_layer"].endswith("attn2.to_q") and meta["dropped"] == []
    assert out.store.meta["timestep"] == 100 and out.store.meta["add_noise"] is True


def test_store_keeps_no_per_head_map_after_capture(goca_run):
    _, out = goca_run
    store = out.store
    assert isinstance(store, HeadWeightedStore) and store.pending_layers() == []
    # per-head maps would be (B, H, N, T) / (B, H, N, d); what is left: (B, N, K) maps, (B, N, C) features and the
    # (C, H*d) to_out weights the store refers to
    for x in _tensors(store):
        assert x.ndim <= 3, f"a {tuple(x.shape)} tensor outlived its call"
    for key in store:
        kind, grid, _ = store.info(key)
        got = store.get(key)
        assert got.ndim == 2 and got.shape[0] == grid[0] * grid[1], (key, kind, tuple(got.shape))


def test_invariant_to_the_scale_of_the_start_token(goca_run):
    """Per-pixel rescaling makes the result independent of the <sos> column's scale (the paper's point)."""
    pipe, out = goca_run
    store = copy.deepcopy(out.store)
    # The random model's self-attention is nearly uniform, so S^2 m has a tiny range and the final minmax blows
    # float32 rounding up to ~1e-3; a local affinity (as a trained model has) keeps the check well conditioned.
    r = int(store.meta["goca"]["map_grid"][0])
    ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    store._entries[REFINE_KEY].sum = torch.softmax(-torch.cdist(pos, pos) ** 2 / 2, 1)[None]
    store._entries[REFINE_KEY].count = 1
    prompt = pipe.adapter.encode_prompt(pipe.method.prompt)
    assert prompt.special[0]  # column 0 is <|startoftext|>
    scaled = copy.deepcopy(store)
    for key in cross_maps(scaled):
        scaled._entries[key].sum[..., 0] *= 10  # before G3's renormalisation over all tokens
    size = (out.image.size[1], out.image.size[0])
    ref = pipe.method.segment(store, prompt=prompt, out_size=size)
    got = pipe.method.segment(scaled, prompt=prompt, out_size=size)
    assert torch.equal(ref.labels, got.labels)
    torch.testing.assert_close(ref.scores, got.scores, atol=1e-5, rtol=1e-5)
    # Vanilla (no per-pixel rescaling) is not invariant: its scores move.
    vanilla = GoCA(classes=["cat", "grass"], variant="vanilla")
    v_ref = vanilla.segment(store, prompt=prompt, out_size=size)
    v_got = vanilla.segment(scaled, prompt=prompt, out_size=size)
    assert float((v_ref.scores - v_got.scores).abs().max()) > 1e-3


def test_saved_store_gives_the_same_result(goca_run, tmp_path):
    pipe, out = goca_run
    path = out.store.save(tmp_path / "goca.safetensors")
    loaded = AttentionStore.load(path)
    again = pipe.segment_store(loaded)
    assert torch.equal(again.labels, out.model_result.labels)
    torch.testing.assert_close(again.scores, out.model_result.scores)
    reloaded = HeadWeightedStore.load(path)
    assert torch.equal(pipe.segment_store(reloaded).labels, out.model_result.labels)
    with pytest.raises(ConfigError, match="make_store"):
        pipe.method.segment(AttentionStore(), prompt=pipe.adapter.encode_prompt("cat, grass"))


@pytest.mark.parametrize("variant", ["goca", "vanilla", "baseline"])
def test_variants_and_background_objects_run(tiny_adapter, rgb_image, variant):
    from attnseg.pipeline import AttentionSegmentationPipeline

    pipe = AttentionSegmentationPipeline(
        tiny_adapter, "goca", classes="cat, grass", background_objects=["sky"], variant=variant,
        background_mode="max", refine_order=1,
    )
    out = pipe.run(rgb_image, seed=0)
    result = out.result
    assert set(result.labels.unique().tolist()) <= {0, 1, 2}
    assert result.scores is not None and result.scores.shape[0] == 3
    assert float(result.scores[0].min()) >= 0.5 - 1e-6  # max(threshold, support)
    assert result.meta["token_indices"]["sky"] == [5]
    stored = out.store.meta["goca"]
    if variant == "baseline":
        assert len(stored["cross_layers"]) < sum(i.kind == "cross" for i in tiny_adapter.attention_layers().values())
    assert (stored["head_method"] == "average") == (variant != "goca")
    # automatic layer weights: one score per cross layer, computed during capture (no reference feature kept)
    assert (variant == "goca") == bool(layer_scores_of(out.store)) and not out.store.features


def test_no_refinement_and_a_custom_prompt(tiny_adapter, rgb_image):
    from attnseg.pipeline import AttentionSegmentationPipeline

    pipe = AttentionSegmentationPipeline(
        tiny_adapter, "goca", classes=["cat", "potted plant"], prompt="a cat next to a potted plant",
        refine_order=0, head_method="dot-product",
    )
    out = pipe.run(rgb_image, seed=0)
    assert refine_affinity(out.store) is None
    assert out.result.meta["token_indices"]["potted plant"] == [6, 7]  # both sub-words, averaged
    assert out.model_result.labels.shape == (out.image.size[1], out.image.size[0])
    assert out.result.size == (48, 40)


def test_classes_cut_off_by_the_tokenizer_are_dropped(tiny_adapter, rgb_image):
    from attnseg.pipeline import AttentionSegmentationPipeline

    classes = [f"thing{i}" for i in range(40)]  # far more than 77 tokens once comma-joined
    pipe = AttentionSegmentationPipeline(tiny_adapter, "goca", classes=classes)
    # the pipeline spreads them over several prompts: none is dropped
    spread = pipe.run(rgb_image, seed=0).result
    assert spread.meta["prompts"] > 1 and spread.meta["dropped"] == []
    assert spread.label_names == ("background", *classes)
    # GoCA.segment on the one prompt the tokenizer cut drops the cut classes, says so, and never predicts them
    store, _ = pipe.capture(rgb_image, seed=0)
    result = pipe.segment_store(store)
    dropped = result.meta["dropped"]
    assert dropped and dropped == classes[-len(dropped):]
    assert int(result.labels.max()) <= len(classes) - len(dropped)  # a dropped class is never predicted
    assert result.scores is not None and result.scores.shape[0] == len(classes) + 1
    assert result.meta["warnings"]


def test_balance_by_resolution_keeps_each_resolutions_uniform_share() -> None:
    from attnseg.methods.goca import balance_by_resolution

    # Two layers at 16 (weights 0.1, 0.3), two at 8 (0.6, 0.0): each resolution keeps 1/2 of the total.
    out = balance_by_resolution(torch.tensor([0.1, 0.3, 0.6, 0.0]), [16, 16, 8, 8])
    torch.testing.assert_close(out, torch.tensor([0.125, 0.375, 0.5, 0.0]))
    # A resolution whose weights are all zero shares its part uniformly; three layers at 32, one at 16.
    out = balance_by_resolution(torch.tensor([0.0, 0.0, 0.0, 1.0]), [32, 32, 32, 16])
    torch.testing.assert_close(out, torch.tensor([0.25, 0.25, 0.25, 0.25]))
    with pytest.raises(ConfigError):
        balance_by_resolution(torch.tensor([1.0, 2.0]), [8])


def test_rescale_floor_is_relative_to_the_median_mass() -> None:
    from attnseg.methods.goca import rescale_per_pixel

    # Content tokens 1 and 2; Z = 1.0, 0.5, 0.1 (median 0.5).
    scores = torch.tensor([[5.0, 0.6, 0.4], [5.0, 0.5, 0.0], [5.0, 0.05, 0.05]])
    plain = rescale_per_pixel(scores, [1, 2], eps=0.0)
    torch.testing.assert_close(plain, torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]]))
    floored = rescale_per_pixel(scores, [1, 2], eps=0.0, floor=1.0)
    torch.testing.assert_close(floored, torch.tensor([[0.4, 0.4 / 1.5], [0.5, 0.0], [0.05 / 0.6, 0.05 / 0.6]]))
    # One content token: the reference gives 1 everywhere (no information); the floor keeps the map's shape.
    single = rescale_per_pixel(scores, [1], eps=0.0, floor=1.0)[:, 0]
    assert single[0] > single[1] > single[2]
    assert torch.equal(rescale_per_pixel(scores, [1], eps=0.0)[:, 0], torch.ones(3))
    with pytest.raises(ConfigError, match="floor"):
        rescale_per_pixel(scores, [1], floor=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Edges: dtypes, batches, trivial kernels, bad indices
# ----------------------------------------------------------------------------------------------------------------------


def test_balanced_weights_are_float32_whatever_comes_in() -> None:
    from attnseg.methods.goca import balance_by_resolution

    out = balance_by_resolution(torch.tensor([0.1, 0.3, 0.6, 0.0], dtype=torch.float64), [16, 16, 8, 8])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.125, 0.375, 0.5, 0.0]))


def test_head_weights_of_half_precision_outputs_are_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    outs = torch.randn(3, 5, 4, generator=gen).to(torch.bfloat16)  # a model run in bfloat16
    weight = torch.randn(6, 12, generator=gen)
    w = head_weights(outs, weight)
    assert w.dtype == torch.float32
    # bfloat16 -> float32 is exact, so the float32 computation on the same values is the reference
    torch.testing.assert_close(w, head_weights(outs.float(), weight), rtol=0, atol=0)


def test_resize_self_attention_of_a_batch_is_the_batch_of_resizes() -> None:
    gen = torch.Generator().manual_seed(2)
    maps = torch.softmax(torch.randn(2, 16, 16, generator=gen), -1)  # two items on a 4x4 grid
    out = resize_self_attention(maps, (4, 4), (2, 2))
    assert out.shape == (2, 4, 4)
    for i in range(2):
        torch.testing.assert_close(out[i], resize_self_attention(maps[i], (4, 4), (2, 2)))


def test_gaussian_blur_with_a_one_tap_kernel_is_the_identity() -> None:
    maps = torch.arange(12.0).reshape(3, 4)
    out = gaussian_blur(maps, kernel_size=1)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert torch.equal(out, maps)
    assert torch.equal(gaussian_blur(maps[None], kernel_size=1), maps[None])


def test_rescale_per_pixel_refuses_negative_and_out_of_range_tokens() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    with pytest.raises(ConfigError, match="T > 2"):
        rescale_per_pixel(scores, [-1, 2])  # a negative index would silently pick the last column
    with pytest.raises(ConfigError, match="T > 1"):
        rescale_per_pixel(scores[None], [1])  # 3-D


def test_head_weights_are_uniform_unless_the_output_norm_exceeds_the_smallest_float32():
    # head 0 outputs 2^-63, head 1 outputs 0, W = I: o = (2^-63, 0), |o|^2 = 2^-126, the smallest normal float32
    outs = torch.tensor([[[2.0**-63]], [[0.0]]])
    assert float(outs[0, 0, 0] ** 2) == torch.finfo(torch.float32).tiny
    torch.testing.assert_close(head_weights(outs, torch.eye(2)), torch.tensor([[0.5], [0.5]]), rtol=0, atol=0)
    # twice as large: |o|^2 = 2^-124 > tiny, so s / |o|^2 = (1, 0)
    torch.testing.assert_close(head_weights(2 * outs, torch.eye(2)), torch.tensor([[1.0], [0.0]]), rtol=0, atol=0)


def test_layer_scores_on_non_square_grids_and_named_maps():
    """Reference feature on a 2x3 grid and self maps on the same grid (no resizing), given as a mapping: the scores
    are ``sum(Pi * S_l)`` with ``Pi = softmax(F F^T / sqrt(C))`` in float64."""
    g = torch.Generator().manual_seed(4)
    feature = torch.randn(6, 5, generator=g)
    maps = {k: torch.softmax(torch.randn(6, 6, generator=g), -1) for k in ("a", "b")}
    f = feature.double()
    pi = torch.softmax(f @ f.T / 5**0.5, -1)
    expected = torch.stack([(pi * maps[k].double()).sum() for k in ("a", "b")])
    grids = {"a": (2, 3), "b": (2, 3)}
    scores = layer_scores(feature, maps, reference_grid=(2, 3), grids=grids)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-7)
    weights = layer_weights(feature, maps, reference_grid=(2, 3), grids=grids)
    torch.testing.assert_close(weights.double(), expected / expected.sum(), rtol=1e-6, atol=1e-7)
    # the same as a sequence with a sequence of grids
    torch.testing.assert_close(layer_scores(feature, [maps["a"], maps["b"]], reference_grid=(2, 3),
                                            grids=[(2, 3), (2, 3)]), scores)
