"""Tests of the target (hair-paper) method: ``attnseg.methods.target``."""

from __future__ import annotations

import pytest
import torch

from attnseg.capture.store import AttentionStore
from attnseg.errors import ConfigError, TokenNotFoundError
from attnseg.methods.base import METHODS, Segmenter, create_method
from attnseg.methods.target import (
    GuidedSelection,
    TargetSegmenter,
    aggregate_target_cross,
    guided_selection,
    otsu_threshold,
    resolve_resolution_weights,
)
from attnseg.prompts import tokenize
from attnseg.types import LayerInfo, Prompt

torch.set_num_threads(1)

R = 16
PROMPT = "a photo of a man with detailed hair"


def target_region(r: int = R) -> torch.Tensor:
    """``(r, r) bool``: an off-centre rectangle (the "hair")."""
    mask = torch.zeros(r, r, dtype=torch.bool)
    mask[2 : r // 2, 3 : r - 4] = True
    return mask


def region_self_attention(mask: torch.Tensor) -> torch.Tensor:
    """``(r, r, r, r)``: queries in the region attend uniformly to the region, the others to the rest."""
    r = mask.shape[0]
    flat = mask.reshape(-1).float()
    inside = flat / flat.sum()
    outside = (1 - flat) / (1 - flat).sum()
    rows = torch.where(mask.reshape(-1, 1), inside[None], outside[None])
    return rows.reshape(r, r, r, r)


def smooth_self_attention(r: int = R, width: float = 2.0) -> torch.Tensor:
    """``(r, r, r, r)``: Gaussian locality, each query map sums to 1 (no map matches a blob exactly)."""
    ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    d2 = torch.cdist(pos, pos) ** 2
    rows = torch.softmax(-d2 / (2 * width**2), dim=1)
    return rows.reshape(r, r, r, r)


def encode(clip_tokenizer, text: str) -> Prompt:
    tok = tokenize(clip_tokenizer, text)
    return Prompt(text=text, embeddings=torch.zeros(1, len(tok.tokens), 4), **tok.fields())


def synthetic_store(mask: torch.Tensor, hair_index: int, num_tokens: int = 77, heads: int = 2) -> AttentionStore:
    """A resolution-grouped store with one self and one cross layer whose maps encode ``mask``."""
    r = mask.shape[0]
    n = r * r
    store = AttentionStore(group="resolution", meta={"image_size": [2 * r, 2 * r]})
    info_self = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", (r, r), heads, 8, "up", 0,
                          "up_blocks.1")
    info_cross = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", (r, r), heads, 8, "up", 1,
                           "up_blocks.1")
    self_rows = region_self_attention(mask).reshape(n, n)
    store.add(info_self, self_rows.expand(1, heads, n, n).clone())
    cross = torch.full((n, num_tokens), 0.5 / (num_tokens - 1))
    cross[:, hair_index] = torch.where(mask.reshape(-1), 0.5, 0.05)
    cross = cross / cross.sum(1, keepdim=True)
    store.add(info_cross, cross.expand(1, heads, n, num_tokens).clone())
    return store


# ----------------------------------------------------------------------------------------------------------------------
# guided_selection
# ----------------------------------------------------------------------------------------------------------------------


def test_selection_recovers_the_target_region():
    mask = target_region()
    attn = region_self_attention(mask)
    sel = guided_selection(mask.float(), attn)
    assert isinstance(sel, GuidedSelection)
    mean_map, selected = sel  # the contract: (averaged map, boolean selection)
    assert selected.dtype == torch.bool and selected.shape == (R, R)
    assert torch.equal(selected, mask)
    assert not sel.fallback and sel.num_selected == int(mask.sum())
    assert mean_map.shape == (R, R)
    torch.testing.assert_close(mean_map.sum(), torch.tensor(1.0))
    # the averaged map is the region's uniform distribution, so Otsu recovers the region exactly
    assert torch.equal(mean_map > otsu_threshold(mean_map), mask)
    # divergence ~0 inside (identical distributions up to eps), large outside
    assert float(sel.divergence[mask].max()) < 1e-4
    assert float(sel.divergence[~mask].min()) > 5


def test_selection_is_monotone_in_tau():
    attn = smooth_self_attention()
    blob = torch.zeros(R, R)
    blob[4:9, 5:12] = 1.0
    previous = torch.zeros(R, R, dtype=torch.bool)
    counts = []
    for tau in (0.5, 1.0, 2.0, 4.0, 8.0):
        sel = guided_selection(blob, attn, tau=tau, fallback_fraction=1.0)
        if sel.fallback:
            continue
        assert bool((previous & ~sel.selected).sum() == 0), "a larger tau must keep every map a smaller one kept"
        previous = sel.selected
        counts.append(sel.num_selected)
        assert torch.equal(sel.selected, sel.divergence < tau)
    assert len(counts) >= 3 and counts == sorted(counts) and counts[0] < counts[-1]


def test_fallback_when_nothing_passes_tau():
    attn = smooth_self_attention()
    blob = torch.zeros(R, R)
    blob[4:9, 5:12] = 1.0
    sel = guided_selection(blob, attn, tau=1e-6)
    expected = round(0.01 * R * R)  # 2.56 -> 3 maps
    assert sel.fallback and sel.num_selected == expected
    lowest = torch.topk(sel.divergence.reshape(-1), expected, largest=False).indices
    assert torch.equal(sel.selected.reshape(-1).nonzero().reshape(-1).sort().values, lowest.sort().values)
    flat = attn.reshape(R * R, R * R)
    torch.testing.assert_close(sel.mean_map.reshape(-1), flat[lowest].mean(0))
    assert guided_selection(blob, attn, tau=1e-6, fallback_fraction=0.05).num_selected == round(0.05 * R * R)


def test_selection_input_validation():
    attn = smooth_self_attention(8)
    with pytest.raises(ConfigError, match="self_attn"):
        guided_selection(torch.ones(8, 8), attn.reshape(64, 64))
    with pytest.raises(ConfigError, match="cross_map"):
        guided_selection(torch.ones(4, 4), attn)
    with pytest.raises(ConfigError, match="tau"):
        guided_selection(torch.ones(8, 8), attn, tau=0)
    with pytest.raises(ConfigError, match="non-negative"):
        guided_selection(-torch.ones(8, 8), attn)
    with pytest.raises(ConfigError, match="fallback_fraction"):
        guided_selection(torch.ones(8, 8), attn, fallback_fraction=0)


# ----------------------------------------------------------------------------------------------------------------------
# cross map and weights
# ----------------------------------------------------------------------------------------------------------------------


def test_resolution_weights_are_matched_coarse_to_fine():
    assert resolve_resolution_weights([64, 8, 32, 16], (0.3, 0.5, 0.1, 0.1)) == {8: 0.3, 16: 0.5, 32: 0.1, 64: 0.1}
    # a 2-level model takes the first (coarsest) two of the SD 1.x defaults
    assert resolve_resolution_weights([16, 8], (0.3, 0.5, 0.1, 0.1)) == {8: 0.3, 16: 0.5}
    assert resolve_resolution_weights([8, 16, 32], {16: 0.7, 32: 0.3}) == {8: 0.0, 16: 0.7, 32: 0.3}
    with pytest.raises(ConfigError, match="entries"):
        resolve_resolution_weights([8, 16, 32], (0.5, 0.5))
    with pytest.raises(ConfigError, match="weight 0"):
        resolve_resolution_weights([8], {16: 1.0})


def _literal_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "reference" / "diffseg_literal.py"
    spec = importlib.util.spec_from_file_location("_diffseg_literal_t", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def target_cross_literal(maps, tokens, weights, size, grids=None):
    """``sum_r w_r minmax(Up(mean_j X_r[:, j]))`` in float64: the token mean column by column, a bilinear resize
    built one output index at a time, a minmax by hand."""
    import numpy as np

    literal = _literal_module()
    out = np.zeros(size)
    for r, x in maps.items():
        w = weights.get(r, 0.0)
        if w == 0:
            continue
        h, wd = grids[r] if grids else (r, r)
        col = np.zeros(x.shape[0])
        for j in tokens:
            col += x[:, j].double().numpy()
        col /= len(tokens)
        up = literal.bilinear_resize(col.reshape(h, wd), *size)
        out += w * (up - up.min()) / (up.max() - up.min())
    return out


def test_target_cross_map_is_a_weighted_sum_of_minmaxed_maps():
    t = 5
    coarse = torch.zeros(4, t)
    coarse[:, 2] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # 2x2 grid
    fine = torch.zeros(16, t)
    fine[:, 2] = torch.arange(16.0)
    out = aggregate_target_cross({2: coarse, 4: fine}, [2], {2: 0.25, 4: 0.75}, (4, 4))
    assert out.shape == (4, 4)
    # each minmaxed map spans [0, 1]; the sum spans [0, 1] with these weights, fine map exactly at its corners
    assert float(out.min()) == pytest.approx(0.0) and float(out.max()) == pytest.approx(1.0)
    torch.testing.assert_close(out[0, 0], torch.tensor(0.0))
    # every entry, by hand: the coarse 2x2 map upsampled to 4x4 (half-pixel bilinear) is [0, .25, .75, 1] along a
    # row of [0, 1] and [0, .5, 1.5, 2] down a column; minmaxed by 3; the fine map is arange(16) / 15
    ramp = torch.tensor([0.0, 0.25, 0.75, 1.0])
    coarse_up = (ramp[None, :] + 2 * ramp[:, None]) / 3
    expected = 0.25 * coarse_up + 0.75 * torch.arange(16.0).reshape(4, 4) / 15
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("weights", [{4: 0.6, 8: 0.3, 16: 0.1}, {4: 0.05, 8: 0.9, 16: 0.05}, {4: 0.0, 8: 1.0, 16: 2.0}])
def test_target_cross_map_matches_the_literal_sum_with_weights_that_matter(weights):
    """Three resolutions whose maps peak in different places: every weight changes the result."""
    g = torch.Generator().manual_seed(3)
    t = 6
    maps = {}
    for r in (4, 8, 16):
        logits = torch.randn(r * r, t, generator=g)
        logits[:, 2] += torch.linspace(0, 3, r * r) * (1 if r != 8 else -1)  # opposite trends at 8
        maps[r] = torch.softmax(logits, -1)
    tokens = [2, 4]  # a word split in two tokens: the columns are averaged
    out = aggregate_target_cross(maps, tokens, weights, (16, 16))
    expected = target_cross_literal(maps, tokens, weights, (16, 16))
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    # the weights matter: equal weights give another map
    equal = aggregate_target_cross(maps, tokens, {r: 1.0 for r in maps}, (16, 16))
    assert float((equal - out).abs().max()) > 0.05


def test_target_cross_map_on_non_square_grids():
    g = torch.Generator().manual_seed(4)
    maps = {3: torch.softmax(torch.randn(6, 4, generator=g), -1), 6: torch.softmax(torch.randn(24, 4, generator=g), -1)}
    grids = {3: (2, 3), 6: (4, 6)}
    weights = {3: 0.7, 6: 0.3}
    out = aggregate_target_cross(maps, [1], weights, (4, 6), grids=grids)
    expected = target_cross_literal(maps, [1], weights, (4, 6), grids)
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="positions"):
        aggregate_target_cross(maps, [1], weights, (4, 6), grids={3: (3, 3), 6: (4, 6)})
    with pytest.raises(ConfigError, match="non-zero weight"):
        aggregate_target_cross(maps, [1], {3: 0.0}, (4, 6), grids=grids)


# ----------------------------------------------------------------------------------------------------------------------
# TargetSegmenter
# ----------------------------------------------------------------------------------------------------------------------


def test_registered_and_protocol():
    assert METHODS.get("target") is TargetSegmenter
    seg = create_method("target", target="hair", tau=0.8)
    assert isinstance(seg, Segmenter)
    opts = seg.run_options()
    assert (opts.timestep, opts.add_noise, opts.sample_posterior, opts.prompt) == (0, False, False, PROMPT)


@pytest.mark.parametrize("variant", ["guided", "cross-only", "diffsegmenter"])
@pytest.mark.parametrize("binarize", ["otsu-then-resize", "resize-then-otsu"])
def test_segment_recovers_the_region(clip_tokenizer, variant, binarize):
    prompt = encode(clip_tokenizer, PROMPT)
    mask = target_region()
    store = synthetic_store(mask, hair_index=8)
    result = TargetSegmenter(variant=variant, binarize=binarize).segment(store, prompt=prompt)
    assert result.labels.shape == (2 * R, 2 * R) and result.labels.dtype == torch.int64
    assert result.scores is not None and result.scores.shape == (1, 2 * R, 2 * R)
    assert result.label_names == ("background", "hair")
    assert result.meta["token_indices"] == [8]
    expected = mask.repeat_interleave(2, 0).repeat_interleave(2, 1).long()
    assert torch.equal(result.labels, expected)
    if variant == "guided":
        assert result.meta["num_selected"] == int(mask.sum()) and result.meta["fallback"] is False
    assert 0 <= result.meta["otsu_threshold"] <= 1


def test_segment_needs_the_prompt_and_the_word(clip_tokenizer):
    store = synthetic_store(target_region(), hair_index=8)
    seg = TargetSegmenter()
    with pytest.raises(ConfigError, match="prompt"):
        seg.segment(store)
    with pytest.raises(TokenNotFoundError):
        seg.segment(store, prompt=encode(clip_tokenizer, "a photo of a man"))


def test_hyper_parameter_validation():
    with pytest.raises(ConfigError, match="prompt"):
        TargetSegmenter(target="hair", prompt="a photo of a man")
    with pytest.raises(ConfigError, match="prompt"):
        TargetSegmenter(target="hair", prompt="a photo of a haircut")  # whole words only
    for kwargs, name in [
        ({"target": ""}, "target"),
        ({"tau": 0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"variant": "sam"}, "variant"),
        ({"binarize": "otsu"}, "binarize"),
        ({"layers": "down"}, "layers"),
        ({"cross_weights": (0.5, -1.0)}, "cross_weights"),
        ({"cross_weights": (0.0, 0.0)}, "cross_weights"),
        ({"cross_weights": {0: 1.0}}, "cross_weights"),
        ({"fallback_fraction": 0}, "fallback_fraction"),
        ({"eps": 0}, "eps"),
        ({"timestep": -1}, "timestep"),
    ]:
        with pytest.raises(ConfigError, match=name):
            TargetSegmenter(**kwargs)
    with pytest.raises(ConfigError, match="no parameter"):
        create_method("target", threshold=0.5)
    assert TargetSegmenter(target="Hair", prompt="A photo of long HAIR").target == "Hair"


def test_layer_selection(tiny_adapter):
    layers = tiny_adapter.attention_layers()
    guided = [layers[n] for n in TargetSegmenter().select_layers(layers)]
    assert {i.position for i in guided} == {"up", "mid"} and {i.kind for i in guided} == {"self", "cross"}
    cross_only = [layers[n] for n in TargetSegmenter(variant="cross-only").select_layers(layers)]
    assert {i.kind for i in cross_only} == {"cross"}
    base = [layers[n] for n in TargetSegmenter(variant="diffsegmenter").select_layers(layers)]
    assert {i.position for i in base if i.kind == "cross"} == {"down", "mid", "up"}
    finest = max(i.num_tokens for i in layers.values())
    assert all(i.num_tokens == finest for i in base if i.kind == "self")
    assert [i.index for i in guided] == sorted(i.index for i in guided)


@pytest.mark.parametrize("variant", ["guided", "cross-only", "diffsegmenter"])
def test_end_to_end_on_a_tiny_model(tiny_adapter, rgb_image, variant):
    from attnseg.pipeline import AttentionSegmentationPipeline

    pipe = AttentionSegmentationPipeline(tiny_adapter, "target", variant=variant)
    out = pipe.run(rgb_image, seed=0)
    result = out.model_result
    h, w = out.image.size[1], out.image.size[0]
    assert result.labels.shape == (h, w) and result.labels.dtype == torch.int64
    assert set(result.labels.unique().tolist()) <= {0, 1}
    assert result.scores is not None and result.scores.shape == (1, h, w)
    assert result.label_names == ("background", "hair") and result.method == "target"
    assert result.meta["token_indices"] == [8]  # "hair" in the paper's prompt
    assert "otsu_threshold" in result.meta and result.params["variant"] == variant
    if variant == "guided":
        assert result.meta["num_selected"] >= 1 and isinstance(result.meta["fallback"], bool)
    assert out.store.meta["timestep"] == 0 and out.store.meta["add_noise"] is False


def test_non_square_input(tiny_adapter, rgb_image):
    from attnseg.pipeline import AttentionSegmentationPipeline

    out = AttentionSegmentationPipeline(tiny_adapter, "target", variant="cross-only").run(rgb_image, size=(32, 48))
    assert out.model_result.labels.shape == (32, 48) and out.result.size == (48, 40)
    with pytest.raises(ConfigError, match="square"):
        AttentionSegmentationPipeline(tiny_adapter, "target").run(rgb_image, size=(32, 48))


# ----------------------------------------------------------------------------------------------------------------------
# Thresholds that mean the same at every grid
# ----------------------------------------------------------------------------------------------------------------------

_LAYOUT = torch.zeros(8, 8, dtype=torch.long)
_LAYOUT[1:4, 1:5] = 1
_LAYOUT[5:8, 3:7] = 2


def _selection_iou(size: int, **kwargs) -> tuple[float, float]:
    from attnseg.synthetic import resize_layout, synthetic_cross_attention, synthetic_self_attention

    attn = synthetic_self_attention(_LAYOUT, size)
    cross = synthetic_cross_attention(_LAYOUT, 1, size)
    sel = guided_selection(cross, attn, **kwargs)
    region = resize_layout(_LAYOUT, size) == 1
    inter = float((sel.selected & region).sum())
    union = float((sel.selected | region).sum())
    return inter / union, float(sel.selected.float().mean())


@pytest.mark.parametrize("size", [16, 32, 64])
def test_relative_default_selects_the_target_region_at_every_grid(size):
    iou, _ = _selection_iou(size, tau=0.5, tau_mode="relative")
    assert iou > 0.9


def test_paper_threshold_selects_nothing_at_a_fine_grid():
    # D < 0.9 keeps the region at 16 and 32 but no map at 64 (then the 1 % fallback), on the same layout.
    iou16, _ = _selection_iou(16, tau=0.9, tau_mode="absolute")
    _, frac64 = _selection_iou(64, tau=0.9, tau_mode="absolute", fallback_fraction=0.01)
    assert iou16 > 0.8 and frac64 <= 0.011


def test_relative_threshold_is_tau_times_the_median():
    from attnseg.synthetic import synthetic_cross_attention, synthetic_self_attention

    attn = synthetic_self_attention(_LAYOUT, 16)
    cross = synthetic_cross_attention(_LAYOUT, 2, 16)
    sel = guided_selection(cross, attn, tau=0.7, tau_mode="relative")
    assert sel.threshold == pytest.approx(0.7 * float(sel.divergence.median()))
    assert torch.equal(sel.selected, sel.divergence < sel.threshold)
    assert TargetSegmenter().tau_mode == "relative" and TargetSegmenter().tau == 0.5
    assert TargetSegmenter(tau_mode="absolute").tau == 0.9
    with pytest.raises(ConfigError, match="tau_mode"):
        TargetSegmenter(tau_mode="quantile")


def test_target_cross_map_skips_resolutions_without_a_weight_and_validates_shapes():
    fine = torch.zeros(16, 3)
    fine[:, 1] = torch.arange(16.0)
    coarse = torch.zeros(4, 3)
    coarse[:, 1] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    # resolution 2 has no weight at all (not even 0): skipped, so the result is the fine map alone, minmaxed
    out = aggregate_target_cross({2: coarse, 4: fine}, [1], {4: 0.5}, (4, 4))
    torch.testing.assert_close(out, 0.5 * torch.arange(16.0).reshape(4, 4) / 15)
    with pytest.raises(ConfigError, match=r"\(N, T\) with T > 3"):
        aggregate_target_cross({4: fine}, [3], {4: 1.0}, (4, 4))  # token 3 of 3 columns
    with pytest.raises(ConfigError, match=r"\(N, T\)"):
        aggregate_target_cross({4: fine[None]}, [1], {4: 1.0}, (4, 4))  # 3-D


def test_target_cross_map_is_float32_with_a_float64_default(float64_default):
    fine = torch.zeros(16, 3, dtype=torch.float32)
    fine[:, 1] = torch.arange(16.0)
    out = aggregate_target_cross({4: fine}, [1], {4: 1.0}, (4, 4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (torch.arange(16.0) / 15).reshape(4, 4).float())


def test_fallback_keeps_at_least_one_map():
    """``round(fraction * R^2)`` of 0 still keeps the lowest-D map, and only it."""
    attn = smooth_self_attention(4)
    blob = torch.zeros(4, 4)
    blob[1, 2] = 1.0
    sel = guided_selection(blob, attn, tau=1e-9, fallback_fraction=0.02)  # round(0.32) = 0
    assert sel.fallback and sel.num_selected == 1
    best = int(sel.divergence.reshape(-1).argmin())
    assert sel.selected.reshape(-1).nonzero().reshape(-1).tolist() == [best]
    torch.testing.assert_close(sel.mean_map.reshape(-1), attn.reshape(16, 16)[best])


def test_selection_normalises_maps_that_do_not_sum_to_one():
    """Both inputs are L1-normalised (each self map by its own sum), so scaling maps changes nothing."""
    from attnseg.methods.target import _l1_normalise

    rows = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 5.0]])
    expected = torch.tensor([[1.5 / 5, 3.5 / 5], [0.5, 0.5], [0.5 / 6, 5.5 / 6]])  # (x + 0.5) / its row's sum
    torch.testing.assert_close(_l1_normalise(rows, 0.5), expected)
    attn = smooth_self_attention(8)
    blob = torch.zeros(8, 8)
    blob[2:5, 3:6] = 1.0
    scale = torch.linspace(0.5, 4.0, 64).reshape(8, 8, 1, 1)  # a different sum for every map
    plain = guided_selection(blob, attn, tau=1.0, eps=1e-12)
    scaled = guided_selection(3.0 * blob, attn * scale, tau=1.0, eps=1e-12)
    torch.testing.assert_close(scaled.divergence, plain.divergence, rtol=1e-5, atol=1e-6)
    assert torch.equal(scaled.selected, plain.selected)


def test_fallback_fraction_above_one_is_refused():
    attn = smooth_self_attention(4)
    with pytest.raises(ConfigError, match="fallback_fraction"):
        guided_selection(torch.ones(4, 4), attn, fallback_fraction=1.5)
    assert guided_selection(torch.ones(4, 4), attn, tau=1e-9, fallback_fraction=1.0).num_selected == 16
