"""Principal-component clustering: per-head PCA, its store, k-means, merging, diagnostics, the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnseg.capture.pca import PCAHeadStore, head_pca
from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import AttnSegError, ConfigError
from attnseg.methods.base import create_method, list_methods
from attnseg.methods.clustering import (
    ClusteringResult,
    PCAClustering,
    kmeans_multi,
    merge_masks,
    pca_rgb,
    stack_features,
    upsample_components,
    upsampling_error,
)
from attnseg.types import LayerInfo, SegmentationResult

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _three_regions(side: int = 12) -> torch.Tensor:
    """``(side, side)`` int64 regions: left third 0, top of the rest 1, bottom of the rest 2."""
    lab = torch.zeros(side, side, dtype=torch.int64)
    lab[: side // 2, side // 3 :] = 1
    lab[side // 2 :, side // 3 :] = 2
    return lab


def _piecewise_data(labels: torch.Tensor, features: int = 16, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``(N, F)`` rows constant per region (random region means) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(int(labels.max()) + 1, features, generator=g, dtype=torch.float64) * 3
    x = means[labels.flatten()]
    return x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a permutation of ids."""
    a, b = a.flatten().tolist(), b.flatten().tolist()
    fwd: dict[int, int] = {}
    bwd: dict[int, int] = {}
    return all(fwd.setdefault(x, y) == y and bwd.setdefault(y, x) == x for x, y in zip(a, b, strict=True))


def _layer(name: str = "up_blocks.1.attentions.0.transformer_blocks.0.attn1", grid=(4, 4), heads=2, head_dim=6,
           position="up", index=0) -> LayerInfo:
    return LayerInfo(name, "self", grid, heads=heads, head_dim=head_dim, position=position, index=index,
                     block=".".join(name.split(".")[:2]))


class _OutputRecorder(AttentionStore):
    """Keeps every per-head output it sees (B, H, N, d): the full data the PCA store reduces."""

    wants_outputs = True

    def __init__(self) -> None:
        super().__init__(heads="all", group="layer")
        self.outputs: dict[str, torch.Tensor] = {}

    def add_chunk(self, layer, probs, heads, out=None):  # type: ignore[override]
        assert out is not None
        full = self.outputs.setdefault(layer.name, torch.zeros(out.shape[0], layer.heads, *out.shape[2:]))
        full[:, heads] = out.float()

    def end_call(self, layer):  # type: ignore[override]
        pass


# ----------------------------------------------------------------------------------------------------------------------
# head_pca


def test_head_pca_separates_piecewise_constant_regions():
    labels = _three_regions()
    x = _piecewise_data(labels)
    pca = head_pca(x, 2)
    assert pca.components.shape == (2, labels.numel())
    assert pca.axes.shape == (2, 16)
    # nearly all variance is between the 3 region means, which span 2 dimensions
    assert float(pca.explained_variance_ratio.sum()) > 0.99
    found = kmeans_multi(pca.components.T, [3], seed=0)[3]
    assert _same_partition(found, labels)


def test_head_pca_matches_sklearn_up_to_sign_and_fixes_signs():
    from sklearn.decomposition import PCA

    x = _piecewise_data(_three_regions(), noise=0.5)
    ours = head_pca(x, 3)
    ref = PCA(n_components=3).fit(x.numpy())
    scores = ref.transform(x.numpy()).T
    for j in range(3):
        sign = np.sign(scores[j] @ ours.components[j].double().numpy())
        np.testing.assert_allclose(sign * scores[j], ours.components[j].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sign * ref.components_[j], ours.axes[j].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref.explained_variance_, ours.explained_variance.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ref.explained_variance_ratio_, ours.explained_variance_ratio.numpy(), rtol=1e-5)
    # the sign convention: the largest-magnitude score of every component is positive, so -x gives the same
    idx = ours.components.abs().argmax(dim=1)
    assert bool((ours.components.gather(1, idx[:, None]) > 0).all())
    torch.testing.assert_close(head_pca(-x, 3).components, ours.components)


def test_head_pca_randomized_matches_full_on_low_rank_data():
    g = torch.Generator().manual_seed(1)
    n = 300
    basis = torch.randn(n, 3, generator=g) * torch.tensor([10.0, 5.0, 2.0])
    x = basis @ torch.randn(3, n, generator=g) + 0.01 * torch.randn(n, n, generator=g)
    full = head_pca(x, 3, solver="full")
    rnd = head_pca(x, 3, solver="randomized")
    torch.testing.assert_close(rnd.components, full.components, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rnd.explained_variance, full.explained_variance, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rnd.total_variance, full.total_variance, rtol=1e-4, atol=1e-4)
    # seeded: the same input gives exactly the same output
    assert torch.equal(head_pca(x, 3, solver="randomized").components, rnd.components)


@pytest.mark.parametrize(
    ("x", "k", "match"),
    [
        (torch.zeros(5), 1, "floating"),
        (torch.zeros(1, 4), 1, "2 samples"),
        (torch.zeros(6, 4), 5, "n_components"),
        (torch.zeros(6, 4), 0, "n_components"),
    ],
)
def test_head_pca_rejects_bad_input(x, k, match):
    with pytest.raises(ConfigError, match=match):
        head_pca(x, k)


# ----------------------------------------------------------------------------------------------------------------------
# PCAHeadStore


def test_store_keeps_only_components_and_equals_direct_pca():
    layer = _layer()
    g = torch.Generator().manual_seed(0)
    n = layer.num_tokens
    probs = torch.rand(1, 2, n, n, generator=g).softmax(-1)
    out = torch.randn(1, 2, n, layer.head_dim, generator=g)
    store = PCAHeadStore(n_components=3)
    # chunks of one head, as the processor sends them
    store.add_chunk(layer, probs[:, :1], slice(0, 1), out[:, :1])
    store.add_chunk(layer, probs[:, 1:], slice(1, 2), out[:, 1:])
    store.end_call(layer)
    held = [store._entries[layer.name].sum, *store._variance.values(), *store._total.values()]
    assert tuple(held[0].shape) == (1, 2, 3, n)
    assert max(t.numel() for t in held) == 2 * 3 * n  # never an (N, N) map
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in held)
    assert store.full_map_nbytes() == 2 * n * n * 4
    comps = store.components(layer.name)
    assert comps.shape == (2, 3, *layer.grid)
    for h in range(2):
        direct = head_pca(out[0, h], 3)
        torch.testing.assert_close(comps[h].reshape(3, n), direct.components)
        torch.testing.assert_close(store.explained_variance(layer.name)[h], direct.explained_variance)
    with pytest.raises(AttnSegError, match="principal components"):
        store.self_attention()


def test_store_probs_reading_and_missing_outputs():
    layer = _layer()
    n = layer.num_tokens
    probs = torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(0)).softmax(-1)
    store = PCAHeadStore(n_components=2, reading="probs")
    assert store.wants_outputs is False
    store.add(layer, probs)
    torch.testing.assert_close(store.components(layer.name)[1].reshape(2, n), head_pca(probs[0, 1], 2).components)
    with pytest.raises(AttnSegError, match="per-head outputs"):
        PCAHeadStore().add(layer, probs)
    with pytest.raises(AttnSegError, match="n_components"):
        PCAHeadStore(n_components=7, reading="outputs").add(layer, probs, out=torch.randn(1, 2, n, layer.head_dim))


def test_store_gathers_query_blocks_for_outputs_and_takes_whole_heads_for_probs():
    import inspect

    layer = _layer()
    n = layer.num_tokens
    g = torch.Generator().manual_seed(0)
    out = torch.randn(1, 2, n, layer.head_dim, generator=g)
    probs = torch.full((1, 2, n, n), 1.0 / n)
    store = PCAHeadStore(n_components=3)
    assert "queries" in inspect.signature(store.add_chunk).parameters  # the processor may split query rows
    for rows in (slice(8, 16), slice(0, 8)):  # any order
        store.add_chunk(layer, probs[:, :, rows], slice(0, 2), out[:, :, rows], queries=rows)
    store.end_call(layer)
    assert not store._rows
    for h in range(2):
        torch.testing.assert_close(store.components(layer.name)[h].reshape(3, n), head_pca(out[0, h], 3).components)
    store.add_chunk(layer, probs[:, :, :8], slice(0, 2), out[:, :, :8], queries=slice(0, 8))
    with pytest.raises(AttnSegError, match="query rows missing"):
        store.end_call(layer)
    # the probabilities of a head are reduced at once: this store asks for whole heads
    assert "queries" not in inspect.signature(PCAHeadStore(reading="probs").add_chunk).parameters


@pytest.mark.parametrize(("step", "expected_call"), [("last", 2), (0, 0), (1, 1)])
def test_store_keeps_the_chosen_call(step, expected_call):
    layer = _layer()
    n = layer.num_tokens
    g = torch.Generator().manual_seed(0)
    calls = [torch.randn(1, 2, n, layer.head_dim, generator=g) for _ in range(3)]
    probs = torch.full((1, 2, n, n), 1.0 / n)
    store = PCAHeadStore(n_components=2, step=step)
    for out in calls:
        store.add(layer, probs, out=out)
    assert store.captured_call(layer.name) == expected_call
    expected = head_pca(calls[expected_call][0, 0], 2).components
    torch.testing.assert_close(store.components(layer.name)[0].reshape(2, n), expected)


def test_store_batch_slice_keeps_conditional_half():
    layer = _layer()
    n = layer.num_tokens
    out = torch.randn(2, 2, n, layer.head_dim, generator=torch.Generator().manual_seed(0))
    store = PCAHeadStore(n_components=2, batch=slice(1, 2))
    store.add(layer, torch.full((2, 2, n, n), 1.0 / n), out=out)
    assert store.batch_size == 1
    torch.testing.assert_close(store.components(layer.name)[0].reshape(2, n), head_pca(out[1, 0], 2).components)


def test_store_traced_on_tiny_model_equals_direct_pca_of_full_outputs(tiny_adapter):
    """Per-head PCA as it arrives == PCA of the full per-head outputs A_h V_h, and chunking does not matter."""
    layers = tiny_adapter.attention_layers()
    selected = [n for n, i in layers.items() if i.kind == "self" and i.position == "up"]
    latents = tiny_adapter.encode_image(torch.zeros(1, 3, *tiny_adapter.resolution))
    prompt = tiny_adapter.encode_prompt("")
    recorder = _OutputRecorder()
    with AttentionTracer(tiny_adapter, recorder, select=selected):
        tiny_adapter.denoise(latents, 10, prompt)
    store = PCAHeadStore(n_components=3)
    with AttentionTracer(tiny_adapter, store, select=selected, chunk_bytes=1):  # one head per chunk
        tiny_adapter.denoise(latents, 10, prompt)
    assert set(store.keys()) == set(selected)
    for name in selected:
        info = layers[name]
        comps = store.components(name)
        assert comps.shape == (info.heads, 3, *info.grid)
        for h in range(info.heads):
            direct = head_pca(recorder.outputs[name][0, h], 3).components
            torch.testing.assert_close(comps[h].reshape(3, -1), direct, rtol=1e-4, atol=1e-5)


def test_store_save_load_round_trip(tmp_path):
    layer = _layer()
    n = layer.num_tokens
    store = PCAHeadStore(n_components=2, step=1, meta={"image_size": [8, 8]})
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        store.add(layer, torch.full((1, 2, n, n), 1.0 / n), out=torch.randn(1, 2, n, layer.head_dim, generator=g))
    store.add_feature("f", torch.ones(1, 3, 2))
    path = store.save(tmp_path / "pca")
    loaded = PCAHeadStore.load(path)
    assert (loaded.n_components, loaded.reading, loaded.step) == (2, "outputs", 1)
    assert loaded.meta == {"image_size": [8, 8]}
    assert loaded.layers == store.layers
    assert loaded.captured_call(layer.name) == 1
    assert torch.equal(loaded.components(layer.name), store.components(layer.name))
    assert torch.equal(loaded.explained_variance_ratio(layer.name), store.explained_variance_ratio(layer.name))
    assert torch.equal(loaded.features["f"], store.features["f"])
    # the evaluation cache reads the header with the base loader, then the method's load_store
    assert AttentionStore.load(path).meta == store.meta
    assert torch.equal(PCAClustering.load_store(path).components(layer.name), store.components(layer.name))
    plain = AttentionStore(group="layer")
    plain.add(layer, torch.full((1, 2, n, n), 1.0 / n))
    with pytest.raises(AttnSegError, match=r"AttentionStore\.load"):
        PCAHeadStore.load(plain.save(tmp_path / "plain"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"n_components": 0}, "n_components"), ({"reading": "maps"}, "reading"), ({"step": -1}, "step"),
     ({"solver": "arpack"}, "solver"), ({"seed": -1}, "seed")],
)
def test_store_validates_options(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        PCAHeadStore(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# upsampling, stacking, diagnostics


def test_upsampling_error_zero_for_constant_maps_positive_at_edges():
    const = torch.full((3, 4, 4), 2.5)
    assert float(upsampling_error(const, 16).abs().max()) == 0.0
    step = torch.zeros(1, 4, 4)
    step[:, :, 2:] = 1.0
    err = upsampling_error(step, 16)
    assert err.shape == (16, 16)
    assert float(err[:, 6:10].min()) > 0  # around the edge between columns 1 and 2 of the 4 x 4 grid
    assert float(err[:, :4].abs().max()) == 0.0 and float(err[:, 12:].abs().max()) == 0.0


def test_upsample_components_modes_and_shapes():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    near = upsample_components(x, 4, "nearest")
    assert near.shape == (1, 1, 4, 4)
    assert torch.equal(near[0, 0], x[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(upsample_components(x, (2, 2)), x)
    with pytest.raises(ConfigError, match="mode"):
        upsample_components(x, 4, "bicubic")  # type: ignore[arg-type]


def test_stack_features_shapes_order_and_reweighting():
    big = torch.ones(3, 4, 4)
    small = torch.full((2, 2, 2), 2.0)
    feats = stack_features([big, small], 4)
    assert feats.shape == (16, 5)
    assert torch.equal(feats[:, :3], torch.ones(16, 3)) and torch.equal(feats[:, 3:], torch.full((16, 2), 2.0))
    weighted = stack_features([big, small], 4, reweight=True)  # eq. 5: x r / max r, r = 4 and 2
    assert torch.equal(weighted[:, :3], feats[:, :3]) and torch.equal(weighted[:, 3:], feats[:, 3:] * 0.5)


def test_pca_rgb_grid_layout_and_range():
    heads = [torch.randn(3, 4, 4), torch.randn(3, 4, 4), torch.randn(2, 2, 2)]
    grid = pca_rgb(heads, columns=2, padding=1)
    assert grid.shape == (3, 4 + 1 + 4, 4 + 1 + 4)
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    # min-max per channel: every channel of the first tile spans [0, 1]
    tile = grid[:, :4, :4]
    assert torch.equal(tile.amin(dim=(1, 2)), torch.zeros(3)) and torch.equal(tile.amax(dim=(1, 2)), torch.ones(3))
    rows = pca_rgb([torch.randn(2, 3, 4, 4), torch.randn(1, 3, 2, 2)], padding=0)  # one row per layer
    assert rows.shape == (3, 8, 8)
    assert torch.equal(rows[:, 4:, 4:], torch.ones(3, 4, 4))  # empty cell: background


# ----------------------------------------------------------------------------------------------------------------------
# k-means and merging


def test_kmeans_multi_reproducible_and_renumbered():
    x = _piecewise_data(_three_regions(), features=4, noise=0.3).float()
    a = kmeans_multi(x, [3, 2, 5], seed=0)
    b = kmeans_multi(x, (2, 3, 5), seed=0)
    assert list(a) == [2, 3, 5]
    for k in a:
        assert torch.equal(a[k], b[k])
        assert a[k].dtype == torch.int64 and a[k].shape == (x.shape[0],)
        first_seen = list(dict.fromkeys(a[k].tolist()))
        assert first_seen == list(range(len(first_seen)))  # ids by first appearance
    assert _same_partition(a[3], _three_regions())
    with pytest.raises(ConfigError, match="ks"):
        kmeans_multi(x, [1])
    with pytest.raises(ConfigError, match="samples"):
        kmeans_multi(x[:4], [5])


def _hand_made_maps() -> dict[int, torch.Tensor]:
    """10 x 10 label maps. k=2: L (cols 0-4), R (cols 5-9). k=3: L, R top, R bottom.
    k=4: 46 of L's 50 pixels; R top; R bottom + L's 4 remaining pixels."""
    k2 = torch.zeros(10, 10, dtype=torch.int64)
    k2[:, 5:] = 1
    k3 = k2.clone()
    k3[5:, 5:] = 2
    k4 = torch.zeros(10, 10, dtype=torch.int64)
    k4[:5, 5:] = 1
    k4[5:, 5:] = 2
    k4[6:10, 4] = 2  # 4 pixels of L move to the R-bottom cluster
    return {2: k2, 3: k3, 4: k4}


@pytest.mark.parametrize(
    ("theta", "survivors"),
    [
        # (4,0) has IoU 46/50 = 0.92 with (2,0); (4,1) equals (3,1); (4,2) has IoU 25/29 = 0.86 with (3,2)
        (0.9, [(2, 0), (2, 1), (3, 1), (3, 2), (4, 2)]),
        (0.85, [(2, 0), (2, 1), (3, 1), (3, 2)]),
        (1.0, [(2, 0), (2, 1), (3, 1), (3, 2), (4, 0), (4, 2)]),
    ],
)
def test_merge_masks_hand_made(theta, survivors):
    maps = _hand_made_maps()
    merged = merge_masks(maps, iou_threshold=theta)
    assert list(zip(merged.mask_k, merged.mask_label, strict=True)) == survivors
    assert merged.num_pooled == 2 + 3 + 3
    assert merged.masks.dtype == torch.bool and merged.masks.shape == (len(survivors), 10, 10)
    for mask, k, label in zip(merged.masks, merged.mask_k, merged.mask_label, strict=True):
        assert torch.equal(mask, maps[k] == label)
    members = dict(zip(zip(merged.mask_k, merged.mask_label, strict=True), merged.members, strict=True))
    assert members[(2, 0)] == (((2, 0), (3, 0), (4, 0)) if theta < 1 else ((2, 0), (3, 0)))


def test_merge_masks_validates():
    with pytest.raises(ConfigError, match="iou_threshold"):
        merge_masks(_hand_made_maps(), iou_threshold=0)
    with pytest.raises(ConfigError, match="size"):
        merge_masks({2: torch.zeros(4, 4, dtype=torch.int64), 3: torch.zeros(5, 5, dtype=torch.int64)})


# ----------------------------------------------------------------------------------------------------------------------
# the method


def _synthetic_store(side: int = 8) -> PCAHeadStore:
    """Up layers at side and side/2 whose head outputs are piecewise constant over 3 regions."""
    store = PCAHeadStore(n_components=3, meta={"image_size": [2 * side, 2 * side]})
    for index, (s, pos) in enumerate([(side // 2, "down"), (side // 2, "mid"), (side // 2, "up"), (side, "up")]):
        layer = _layer(f"{pos}_blocks.{index}.attn1", grid=(s, s), heads=2, head_dim=8, position=pos, index=index)
        labels = _three_regions(s)
        out = torch.stack([_piecewise_data(labels, 8, seed=h).float() for h in range(2)])[None]
        store.add(layer, torch.full((1, 2, s * s, s * s), 1.0 / (s * s)), out=out)
    return store


def test_method_registered_and_validates():
    assert "clustering" in list_methods()
    method = create_method("clustering", ks=(5, 2))
    assert isinstance(method, PCAClustering) and method.ks == (2, 5) and method.primary_k == 5
    for kwargs, name in [
        ({"ks": (1, 2)}, "ks"), ({"ks": (2, 2)}, "ks"), ({"primary_k": 3}, "primary_k"),
        ({"positions": "mid"}, "positions"), ({"n_components": 0}, "n_components"), ({"size": 0}, "size"),
        ({"upsample": "cubic"}, "upsample"), ({"merge_iou": 1.5}, "merge_iou"), ({"reading": "x"}, "reading"),
        ({"cfg_half": "first"}, "cfg_half"), ({"img2img_strength": 0}, "img2img_strength"),
        ({"resolutions": (0,)}, "resolutions"), ({"n_init": 0}, "n_init"), ({"reweight": 1}, "reweight"),
    ]:
        with pytest.raises(ConfigError, match=name):
            PCAClustering(**kwargs)


def test_select_layers_by_position(tiny_adapter):
    layers = tiny_adapter.attention_layers()
    up = PCAClustering().select_layers(layers)
    assert up and all(layers[n].position == "up" and layers[n].kind == "self" for n in up)
    both = PCAClustering(positions="both").select_layers(layers)
    assert {layers[n].position for n in both} == {"down", "up"}
    mid = PCAClustering(positions="down", include_mid=True).select_layers(layers)
    assert {layers[n].position for n in mid} == {"down", "mid"}
    assert [layers[n].index for n in both] == sorted(layers[n].index for n in both)
    res = PCAClustering(resolutions=(8,)).select_layers(layers)
    assert {layers[n].resolution for n in res} == {8}
    with pytest.raises(ConfigError, match="no self-attention layer"):
        PCAClustering(resolutions=(3,)).select_layers(layers)


def test_cluster_recovers_regions_and_returns_everything():
    store = _synthetic_store()
    method = PCAClustering(ks=(2, 3, 4))
    result = method.cluster(store)
    assert isinstance(result, ClusteringResult)
    assert result.ks == (2, 3, 4) and result.feature_size == (8, 8) and result.size == (16, 16)
    assert len(result.heads) == 4  # two up layers x two heads; down and mid ignored
    assert {name for name, _, _ in result.heads} == {"up_blocks.2.attn1", "up_blocks.3.attn1"}
    assert result.explained_variance_ratio.shape == (4, 3)
    truth = _three_regions(8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert _same_partition(result.label_maps[3], truth)
    assert result.masks.shape[1:] == (16, 16) and len(result.mask_k) == result.masks.shape[0]
    assert set(result.upsampling_error) == {4, 8}
    assert float(result.upsampling_error[8].abs().max()) == 0.0  # already at U: nothing to interpolate
    assert result.pca_rgb.shape[0] == 3
    seg = method.segment(store)
    assert isinstance(seg, SegmentationResult) and seg.method == "clustering"
    assert torch.equal(seg.labels, result.label_maps[4]) and seg.meta["k"] == 4
    assert torch.equal(result.to_segmentation(3).labels, result.label_maps[3])
    # same seed, same labels
    again = method.cluster(store)
    assert all(torch.equal(again.label_maps[k], result.label_maps[k]) for k in result.ks)
    # fewer components than kept, another grid and the down layers
    other = PCAClustering(ks=(2,), n_components=2, size=16, positions="down").cluster(store, out_size=(16, 16))
    assert other.feature_size == (16, 16) and other.explained_variance_ratio.shape == (2, 2)


def test_cluster_rejects_wrong_stores():
    with pytest.raises(AttnSegError, match="PCAHeadStore"):
        PCAClustering().cluster(AttentionStore())
    with pytest.raises(AttnSegError, match="components"):
        PCAClustering(n_components=4).cluster(_synthetic_store())


def test_cluster_cfg_halves():
    layer = _layer(grid=(4, 4), heads=1)
    n = layer.num_tokens
    out = torch.randn(2, 1, n, layer.head_dim, generator=torch.Generator().manual_seed(0))
    store = PCAHeadStore(n_components=2)
    store.add(layer, torch.full((2, 1, n, n), 1.0 / n), out=out)
    cond = PCAClustering(ks=(2,), n_components=2).cluster(store)
    assert cond.heads == ((layer.name, 0, "cond"),)
    both = PCAClustering(ks=(2,), n_components=2, cfg_half="both").cluster(store)
    assert [item for *_, item in both.heads] == ["uncond", "cond"]


# ----------------------------------------------------------------------------------------------------------------------
# edges: defaults, boundaries, dtypes, messages


def test_kmeans_multi_is_scikit_learn_with_one_run_by_default():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, generator=g)  # no cluster structure: the k-means++ start decides
    got = kmeans_multi(x, [5], seed=0)[5]
    one = KMeans(n_clusters=5, init="k-means++", n_init=1, random_state=0).fit_predict(x.numpy())
    two = KMeans(n_clusters=5, init="k-means++", n_init=2, random_state=0).fit_predict(x.numpy())
    assert _same_partition(got, torch.from_numpy(one.astype(np.int64)))
    assert not _same_partition(got, torch.from_numpy(two.astype(np.int64)))  # so the number of runs shows


def test_kmeans_multi_accepts_k_equal_to_the_samples_and_names_bad_options():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    labels = kmeans_multi(x, [3])[3]
    assert labels.tolist() == [0, 1, 2]  # one sample per cluster
    with pytest.raises(ConfigError, match=r"^seed must be an int >= 0"):
        kmeans_multi(x, [2], seed=-1)
    with pytest.raises(ConfigError, match=r"^n_init must be an int >= 1"):
        kmeans_multi(x, [2], n_init=0)


def test_merge_masks_counts_one_pixel_masks_exactly():
    # k=2: one pixel labelled 1; k=3: the same pixel labelled 1. Identical one-pixel masks: IoU 1 / 1 = 1.
    k2 = torch.zeros(3, 3, dtype=torch.int64)
    k2[1, 1] = 1
    merged = merge_masks({2: k2, 3: k2.clone()}, iou_threshold=1.0)
    assert list(zip(merged.mask_k, merged.mask_label, strict=True)) == [(2, 0), (2, 1)]
    assert merged.members[1] == ((2, 1), (3, 1))


def test_merge_masks_counts_exactly_beyond_float32_integers():
    """Above 2^24 pixels float32 sums of 0/1 are no longer exact (2^24 + 1 rounds to 2^24): two masks that differ by
    one pixel out of 2^24 + 1 would look identical. One row of 2^24 + 2 pixels (a few seconds)."""
    n = 2**24 + 2
    k2 = torch.zeros(1, n, dtype=torch.uint8)  # one mask: everything
    k3 = k2.clone()
    k3[0, 0] = 1  # everything but the first pixel, and the first pixel
    merged = merge_masks({2: k2, 3: k3}, iou_threshold=1.0)  # merge identical masks only
    assert list(zip(merged.mask_k, merged.mask_label, strict=True)) == [(2, 0), (3, 0), (3, 1)]


def test_stack_features_are_float32_with_a_float64_default(float64_default):
    feats = stack_features([torch.ones(2, 2, 2, dtype=torch.float32)], 4)
    assert feats.dtype == torch.float32
    assert torch.equal(feats, torch.ones(16, 2, dtype=torch.float32))


def test_stack_features_upsample_with_the_mode_asked_for():
    x = torch.arange(4.0).reshape(1, 2, 2)
    near = stack_features([x], 4, mode="nearest")
    assert torch.equal(near[:, 0].reshape(4, 4), x[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    bilinear = stack_features([x], 4)
    assert torch.equal(bilinear[:, 0].reshape(4, 4), upsample_components(x, 4, "bilinear")[0])
    assert not torch.equal(near, bilinear)


def test_upsample_components_names_the_shape_it_refuses():
    with pytest.raises(ConfigError, match=r"got \(3, 4\)"):
        upsample_components(torch.zeros(3, 4), 8)
    with pytest.raises(ConfigError, match="got list"):
        upsample_components([[0.0]], 8)  # type: ignore[arg-type]


def test_option_errors_name_the_option():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    with pytest.raises(ConfigError, match=r"^max_iter must be an int >= 1"):
        kmeans_multi(x, [2], max_iter=0)
    with pytest.raises(ConfigError, match=r"iou_threshold must be in \(0, 1\]"):
        merge_masks({2: torch.zeros(2, 2, dtype=torch.int64)}, iou_threshold=1.5)
    with pytest.raises(ConfigError, match=r"per_head\[1\] must be a \(k, h, w\) tensor, got \(2, 2\)"):
        stack_features([torch.ones(1, 2, 2), torch.ones(2, 2)], 4)
    with pytest.raises(ConfigError, match=r"per_head\[0\] must be a \(k, h, w\) tensor, got list"):
        stack_features([[[[1.0]]]], 4)  # type: ignore[list-item]


def test_bilinear_downsizing_has_no_antialiasing():
    """Half-pixel bilinear without antialiasing (the paper's ``F.interpolate`` default): halving a 4x4 map samples
    between the centre pixels of each 2x2 block, i.e. averages them."""
    x = torch.tensor([[0.0, 4.0, 0.0, 4.0], [8.0, 0.0, 8.0, 0.0], [0.0, 0.0, 16.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    down = upsample_components(x[None, None], 2)[0, 0]
    torch.testing.assert_close(down, torch.tensor([[3.0, 3.0], [0.0, 4.0]]))
