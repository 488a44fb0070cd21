"""Tests of DiffSeg (``attnseg.methods.diffseg``) and the shared ops it uses."""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from attnseg.errors import ConfigError
from attnseg.methods.base import METHODS, Segmenter, create_method
from attnseg.methods.diffseg import (
    PAPER_THRESHOLD,
    RELATIVE_THRESHOLD,
    DiffSeg,
    SemanticLabels,
    aggregate_self_attention,
    anchor_divergence_unit,
    anchor_grid,
    assign_labels,
    label_segments,
    merge_proposals,
    refine_kmeans,
)
from attnseg.methods.ops import add_query_tiled, key_upsample, minmax, query_tile, symmetric_kl_matrix
from attnseg.types import LayerInfo, SegmentationResult

torch.set_num_threads(1)


def _load_literal() -> ModuleType:
    # Loaded by path so the test does not depend on how pytest puts the repository on sys.path.
    path = Path(__file__).resolve().parents[1] / "reference" / "diffseg_literal.py"
    spec = importlib.util.spec_from_file_location("_diffseg_literal", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


literal = _load_literal()


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic attention
# ----------------------------------------------------------------------------------------------------------------------


def structured_maps(
    resolutions: tuple[int, ...], seed: int, *, num_regions: int = 5, noise: float = 0.5
) -> dict[int, torch.Tensor]:
    """Softmax self-attention with Voronoi regions, a locality term and noise: ``r -> (r*r, r*r) float32``."""
    gen = torch.Generator().manual_seed(seed)
    big = max(resolutions)
    seeds = torch.rand(num_regions, 2, generator=gen) * big
    out = {}
    for r in resolutions:
        ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float() * (big / r) + (big / r - 1) / 2
        region = torch.cdist(pos, seeds).argmin(1)
        same = (region[:, None] == region[None, :]).float()
        dist2 = torch.cdist(pos, pos) ** 2 / (big / 4) ** 2
        logits = 4.0 * same - 0.5 * dist2 + noise * torch.randn(r * r, r * r, generator=gen)
        out[r] = torch.softmax(logits, dim=1)
    return out


def pick_thresholds(attn: torch.Tensor, grid: torch.Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """Thresholds near the given quantiles of the distances each iteration actually compares, each placed in
    the middle of a wide gap between distances, so float32 (ours) vs float64 (literal) rounding cannot flip a
    comparison. Uses the literal port to follow the iterations."""

    def in_gap(dist: np.ndarray, q: float) -> float:
        d = np.unique(dist[np.isfinite(dist)])
        rank = int(q * (len(d) - 1))
        lo, hi = max(0, rank - max(5, len(d) // 20)), min(len(d) - 1, rank + max(5, len(d) // 20))
        window = d[lo : hi + 1]
        j = int(np.argmax(np.diff(window)))
        assert window[j + 1] - window[j] > 2e-4, "no safe gap near this quantile"
        return float((window[j] + window[j + 1]) / 2)

    attns = attn.double().numpy()
    qh, qw = attns.shape[:2]
    maps = attns.reshape(qh * qw, *attns.shape[2:])
    anchors = attns[grid[:, 0].numpy(), grid[:, 1].numpy()]
    thresholds = [in_gap(literal.kl(anchors[:, None], maps[None]).reshape(-1), quantiles[0])]
    merged = literal.mask_merge_first(attns, thresholds[0], grid.numpy())
    for q in quantiles[1:]:
        dist = literal.kl(merged[:, None], merged[None])
        thresholds.append(in_gap(dist[~np.eye(len(merged), dtype=bool)], q))
        merged = literal.mask_merge_later(merged, thresholds[-1])
    return thresholds


# Four rectangles on a 16 x 16 grid, boundaries on even indices so they are exact at 8 x 8 too.
REGIONS_16 = torch.zeros(16, 16, dtype=torch.int64)
REGIONS_16[:8, 8:] = 1
REGIONS_16[8:, :12] = 2
REGIONS_16[8:, 12:] = 3


def region_maps(regions: torch.Tensor, resolutions: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Each query attends uniformly to its own region: ``r -> (r*r, r*r)`` (exact zeros elsewhere)."""
    big = regions.shape[0]
    out = {}
    for r in resolutions:
        f = big // r
        coarse = regions[::f, ::f].reshape(-1)
        same = (coarse[:, None] == coarse[None, :]).float()
        out[r] = same / same.sum(dim=1, keepdim=True)
    return out


class FakeStore:
    """The two methods of ``AttentionStore`` DiffSeg reads, plus ``meta``."""

    def __init__(
        self,
        self_maps: dict[int, torch.Tensor],
        cross_maps: dict[int, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._self = self_maps
        self._cross = cross_maps or {}
        self.meta = meta or {}

    def self_attention(self, batch_index: int = 0) -> dict[int, torch.Tensor]:
        assert batch_index == 0
        return self._self

    def cross_attention(self, batch_index: int = 0) -> dict[int, torch.Tensor]:
        assert batch_index == 0
        return self._cross


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if two label maps are equal up to a permutation of ids."""
    pairs = set(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist(), strict=True))
    return len(pairs) == len(set(a.reshape(-1).tolist())) == len(set(b.reshape(-1).tolist()))


# ----------------------------------------------------------------------------------------------------------------------
# Step 4: anchors
# ----------------------------------------------------------------------------------------------------------------------


def test_anchor_grid_reference_16_64() -> None:
    coords = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61]
    expected = torch.tensor([[r, c] for r in coords for c in coords], dtype=torch.int64)
    grid = anchor_grid(16, 64)
    assert grid.dtype == torch.int64
    assert grid.shape == (256, 2)
    assert torch.equal(grid, expected)


@pytest.mark.parametrize(
    ("num", "size", "coords"),
    [(3, 8, [0, 3, 6]), (4, 10, [0, 3, 6, 9]), (5, 16, [1, 4, 7, 10, 13]), (2, 2, [0, 1]), (4, 16, [0, 5, 10, 15])],
)
def test_anchor_grid_small(num: int, size: int, coords: list[int]) -> None:
    expected = torch.tensor(list(itertools.product(coords, coords)), dtype=torch.int64)
    assert torch.equal(anchor_grid(num, size), expected)


@pytest.mark.parametrize(("num", "size"), [(16, 64), (8, 32), (7, 20), (16, 16), (3, 5)])
def test_anchor_grid_matches_literal(num: int, size: int) -> None:
    expected = literal.generate_sampling_grid(num, size)
    assert np.array_equal(anchor_grid(num, size).numpy(), expected)


@pytest.mark.parametrize(("num", "size"), [(1, 64), (0, 64), (65, 64), (2.0, 8)])
def test_anchor_grid_rejects(num: Any, size: int) -> None:
    with pytest.raises(ConfigError, match="num_anchors"):
        anchor_grid(num, size)


# ----------------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------------


def test_symmetric_kl_matrix_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, 30, generator=gen, dtype=torch.float64) * 2, dim=1)
    q = torch.softmax(torch.randn(7, 30, generator=gen, dtype=torch.float64) * 2, dim=1)
    q[2, :5] = 0.0  # exact zeros: floored inside the logs only
    q[2] /= q[2].sum()
    eps = 1e-10
    expected = torch.empty(5, 7, dtype=torch.float64)
    for a in range(5):
        for b in range(7):
            lp, lq = p[a].clamp_min(eps).log(), q[b].clamp_min(eps).log()
            expected[a, b] = 0.5 * ((p[a] - q[b]) * (lp - lq)).sum()
    for chunk in (None, 1, 3):
        got = symmetric_kl_matrix(p, q, eps=eps, chunk_size=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    d32 = symmetric_kl_matrix(p.float(), q.float())
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(d32).all()


def test_symmetric_kl_matrix_self_distance_zero_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, 40, generator=gen), dim=1)
    d = symmetric_kl_matrix(p, p)
    assert (d >= 0).all()
    torch.testing.assert_close(torch.diagonal(d), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(d, d.T, atol=1e-5, rtol=1e-5)


def test_symmetric_kl_matrix_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError):
        symmetric_kl_matrix(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ConfigError):
        symmetric_kl_matrix(torch.rand(2, 3), torch.rand(2, 3), eps=0.0)


def test_key_upsample_and_query_tile() -> None:
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    up = key_upsample(maps, 4)
    assert up.shape == (2, 3, 4, 4)
    expected = torch.nn.functional.interpolate(maps.reshape(6, 1, 2, 2), size=(4, 4), mode="bilinear")
    torch.testing.assert_close(up, expected.reshape(2, 3, 4, 4))
    assert key_upsample(maps, (2, 2)) is maps

    q = torch.arange(4, dtype=torch.float32).reshape(2, 2, 1)
    tiled = query_tile(q, 4)
    assert tiled.shape == (4, 4, 1)
    assert tiled[:, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    odd = query_tile(q, 3)  # non-integer factor: PyTorch's "nearest" rule
    ref = torch.nn.functional.interpolate(q.permute(2, 0, 1)[None], size=(3, 3), mode="nearest")[0].permute(1, 2, 0)
    assert torch.equal(odd, ref)

    out = torch.ones(4, 4, 1)
    add_query_tiled(out, q, alpha=2.0)
    torch.testing.assert_close(out, 1 + 2 * tiled)


def test_minmax_constant_map_is_zero() -> None:
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    out = minmax(x, (-2, -1))
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------------------------------
# Steps 1-3: aggregation
# ----------------------------------------------------------------------------------------------------------------------


def test_aggregate_hand_made_weights() -> None:
    # r = 2: query i attends only to key i. r = 1: one token attending to itself.
    fine = torch.eye(4)
    coarse = torch.ones(1, 1)
    attn = aggregate_self_attention({2: fine, 1: coarse})
    assert attn.shape == (2, 2, 2, 2)
    assert attn.dtype == torch.float32
    # Default weights: 2/3 and 1/3. KeyUp of the 1x1 map is constant, renormalised to 1/4 per key.
    expected = (2 / 3) * torch.eye(4).reshape(2, 2, 2, 2) + (1 / 3) * 0.25
    torch.testing.assert_close(attn, expected)
    # Explicit weights are normalised to sum 1: {2: 1, 1: 3} -> 0.25, 0.75. Sequence form too.
    expected = 0.25 * torch.eye(4).reshape(2, 2, 2, 2) + 0.75 * 0.25
    torch.testing.assert_close(aggregate_self_attention({2: fine, 1: coarse}, {2: 1.0, 1: 3.0, 8: 5.0}), expected)
    torch.testing.assert_close(aggregate_self_attention([fine, coarse], [0.5, 1.5]), expected)


def test_aggregate_key_upsample_bilinear() -> None:
    # One 2x2 resolution next to a 4x4 one with weight 0: the 4x4 result is the renormalised KeyUp, tiled.
    coarse = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    attn = aggregate_self_attention({4: torch.full((16, 16), 1 / 16), 2: coarse}, {4: 0.0, 2: 1.0})
    up = torch.nn.functional.interpolate(coarse.reshape(4, 1, 2, 2), size=(4, 4), mode="bilinear")[:, 0]
    up = up / up.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(attn[0, 1], up[0])
    torch.testing.assert_close(attn[3, 2], up[3])  # fine query (3, 2) tiles coarse query (1, 1)


def test_aggregate_maps_sum_to_one_and_match_literal() -> None:
    maps = structured_maps((16, 8, 4), seed=3)
    attn = aggregate_self_attention(maps)
    assert attn.shape == (16, 16, 16, 16)
    torch.testing.assert_close(attn.sum(dim=(2, 3)), torch.ones(16, 16))
    expected = literal.aggregate_weights([maps[r].double().numpy() for r in (16, 8, 4)])
    np.testing.assert_allclose(attn.numpy(), expected, rtol=1e-5, atol=1e-7)
    # List input in another order gives the same result.
    torch.testing.assert_close(aggregate_self_attention([maps[4], maps[16], maps[8]]), attn)


@pytest.mark.parametrize(
    ("maps", "weights", "match"),
    [
        ({4: torch.rand(12, 12)}, None, "square grid"),
        ({4: torch.rand(16, 8)}, None, r"\(N, N\)"),
        ({3: torch.full((16, 16), 1 / 16)}, None, "resolution 3"),
        ([torch.full((16, 16), 1 / 16)], [1.0, 2.0], "entries"),
        ({4: torch.full((16, 16), 1 / 16)}, {2: 1.0}, "no entry"),
        ({4: torch.full((16, 16), 1 / 16)}, {4: -1.0}, ">= 0"),
        ({4: torch.full((16, 16), 1 / 16)}, {4: 0.0}, "all be 0"),
        ({4: torch.zeros(16, 16)}, None, "positive"),
        ({}, None, "no self-attention"),
    ],
)
def test_aggregate_rejects(maps: Any, weights: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        aggregate_self_attention(maps, weights)


# ----------------------------------------------------------------------------------------------------------------------
# Steps 5-7: merging
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolutions", "num_anchors", "seed", "quantiles"),
    [
        ((8, 4), 3, 0, (0.1, 0.3)),
        ((8, 4, 2), 4, 1, (0.05, 0.2, 0.4)),
        ((16, 8, 4), 4, 2, (0.1, 0.1, 0.1)),
        ((16, 8, 4), 5, 3, (0.02, 0.1, 0.3)),
        ((16, 8), 4, 4, (0.3, 0.05, 0.5, 0.2)),
    ],
)
def test_merge_proposals_matches_literal(
    resolutions: tuple[int, ...], num_anchors: int, seed: int, quantiles: tuple[float, ...]
) -> None:
    maps = structured_maps(resolutions, seed=seed)
    attn = aggregate_self_attention(maps)
    big = attn.shape[0]
    grid = anchor_grid(num_anchors, big)
    # Thresholds near quantiles of the distances, so merging really happens.
    thresholds = pick_thresholds(attn, grid, quantiles)

    got = merge_proposals(attn, thresholds, grid)
    expected = literal.generate_masks(attn.double().numpy(), thresholds, grid.numpy())
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert 1 <= got.shape[0] < grid.shape[0]  # merging happened
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.ones(got.shape[0]))


def test_merge_proposals_zeros_do_not_make_nan() -> None:
    # Exact zeros: the reference formula gives NaN distances; the floor keeps everything finite.
    attn = aggregate_self_attention(region_maps(REGIONS_16, (16,)))
    proposals = merge_proposals(attn, (0.5, 0.5), anchor_grid(4, 16))
    assert torch.isfinite(proposals).all()
    assert proposals.shape[0] == 4  # one per region


def test_merge_proposals_rejects() -> None:
    attn = aggregate_self_attention(structured_maps((4,), seed=0))
    grid = anchor_grid(2, 4)
    with pytest.raises(ConfigError, match="kl_thresholds"):
        merge_proposals(attn, [1.0], grid)
    with pytest.raises(ConfigError, match="kl_thresholds"):
        merge_proposals(attn, [1.0, -1.0], grid)
    with pytest.raises(ConfigError, match="anchors"):
        merge_proposals(attn, [1.0, 1.0], torch.tensor([[0, 9]]))
    with pytest.raises(ConfigError, match="attn"):
        merge_proposals(attn.reshape(16, 16), [1.0, 1.0], grid)


# ----------------------------------------------------------------------------------------------------------------------
# Step 8: K-means
# ----------------------------------------------------------------------------------------------------------------------


def test_refine_kmeans_deterministic_and_normalised() -> None:
    attn = aggregate_self_attention(structured_maps((8, 4), seed=5))
    proposals = merge_proposals(attn, (0.3, 0.3), anchor_grid(3, 8))
    a = refine_kmeans(attn, proposals, random_state=0)
    b = refine_kmeans(attn, proposals, random_state=0)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32
    assert 1 <= a.shape[0] <= proposals.shape[0]
    assert a.shape[1:] == (8, 8)
    torch.testing.assert_close(a.sum(dim=(1, 2)), torch.ones(a.shape[0]))
    for bad in (0, 2.5, True, "300"):  # refused before K-means runs, whatever scikit-learn would do with them
        with pytest.raises(ConfigError, match="max_iter must be a positive int"):
            refine_kmeans(attn, proposals, max_iter=bad)  # type: ignore[arg-type]


def test_refine_kmeans_handles_missing_labels() -> None:
    # Duplicated initial centres: one of each pair ends up empty, labels are non-contiguous.
    attn = aggregate_self_attention(region_maps(REGIONS_16, (16,)))
    proposals = merge_proposals(attn, (0.5, 0.5), anchor_grid(4, 16))
    doubled = torch.cat([proposals, proposals])
    with warnings.catch_warnings():  # scikit-learn may warn about duplicate centres / empty clusters
        warnings.simplefilter("ignore")
        refined = refine_kmeans(attn, doubled, random_state=0)
    assert 4 <= refined.shape[0] <= 8
    assert torch.isfinite(refined).all()
    labels = assign_labels(refined, (16, 16))
    assert same_partition(labels, REGIONS_16)


# ----------------------------------------------------------------------------------------------------------------------
# Step 9: labels
# ----------------------------------------------------------------------------------------------------------------------


def test_assign_labels_contiguous_by_first_appearance() -> None:
    proposals = torch.zeros(4, 2, 2)
    proposals[3, 0, 0] = 1.0  # proposal 3 wins the first pixel -> id 0
    proposals[1, 0, 1] = 1.0
    proposals[1, 1, 0] = 1.0
    proposals[3, 1, 1] = 1.0  # proposals 0 and 2 never win
    labels = assign_labels(proposals, (2, 2))
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[0, 1], [1, 0]]
    up = assign_labels(proposals, (5, 7))
    assert up.shape == (5, 7)
    assert set(up.unique().tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="out_size"):
        assign_labels(proposals, (0, 4))


def test_assign_labels_matches_literal_up_to_renumbering() -> None:
    attn = aggregate_self_attention(structured_maps((16, 8), seed=6))
    proposals = merge_proposals(attn, (0.5, 0.5), anchor_grid(4, 16))
    labels = assign_labels(proposals, (40, 40))
    expected = literal.upsample_argmax(proposals.double().numpy(), 40, 40)
    assert same_partition(labels, torch.from_numpy(expected))


# ----------------------------------------------------------------------------------------------------------------------
# Step 10: semantic labels
# ----------------------------------------------------------------------------------------------------------------------


def test_label_segments_normalise_each_word_on_its_own() -> None:
    """A word with a large map everywhere must not win a segment where a small word dominates relatively:
    A/|A| = (0.70, 0.70, 0.07, 0.07) and B/|B| = (0, 0, 0.71, 0.71), so the right segment is B's (a norm over
    both words together would give it to A, 1 > 0.5), in both modes."""
    labels = torch.tensor([[0, 0, 1, 1]])
    maps = {"a": torch.tensor([[10.0, 10.0, 1.0, 1.0]]), "b": torch.tensor([[0.0, 0.0, 0.5, 0.5]])}
    for mode in ("mean", "majority"):
        assert label_segments(labels, maps, mode=mode).words == {0: "a", 1: "b"}, mode


def test_label_segments_mean_vs_majority() -> None:
    # Segment 0 = pixels 0-2, segment 5 = pixel 3 (ids need not be contiguous).
    labels = torch.tensor([[0, 0, 0, 5]])
    maps = {
        "cat": torch.tensor([[1.0, 1.0, 1.0, 0.0]]),  # normalised: 0.577 on pixels 0-2
        "dog": torch.tensor([[1.1, 1.1, 0.0, 0.0]]),  # normalised: 0.707 on pixels 0-1
        "sky": torch.tensor([[0.0, 0.0, 0.0, 2.0]]),
    }
    mean = label_segments(labels, maps, mode="mean")
    assert isinstance(mean, SemanticLabels)
    assert mean.words == {0: "cat", 5: "sky"}  # mean: cat 0.577 > dog 0.471
    assert mean.segments == {"cat": [0], "sky": [5]}
    majority = label_segments(labels, maps, mode="majority")
    assert majority.words == {0: "dog", 5: "sky"}  # dog wins 2 of 3 pixels
    assert majority.segments == {"dog": [0], "sky": [5]}
    with pytest.raises(ConfigError, match="mode"):
        label_segments(labels, maps, mode="median")
    with pytest.raises(ConfigError, match="shape"):
        label_segments(labels, {"cat": torch.ones(2, 2)})


# ----------------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------------


def test_diffseg_registered_and_protocol() -> None:
    assert METHODS.get("diffseg") is DiffSeg
    method = create_method("diffseg", kl_thresholds=(0.9, 0.9, 0.9))
    assert isinstance(method, DiffSeg)
    assert isinstance(method, Segmenter)
    assert DiffSeg.name == "diffseg"
    assert DiffSeg.requires == frozenset({"self"})
    opts = method.run_options()
    assert (opts.timestep, opts.add_noise, opts.sample_posterior, opts.prompt) == (300, False, False, "")
    assert (opts.heads, opts.group) == ("mean", "resolution")


def test_diffseg_defaults() -> None:
    params = DiffSeg().params()
    assert params["threshold_mode"] == "relative"
    assert params["kl_thresholds"] == [RELATIVE_THRESHOLD] * 3
    # The paper's values are one argument away.
    paper = DiffSeg(threshold_mode="absolute").params()
    assert paper["kl_thresholds"] == [1.1, 1.1, 1.1] == [PAPER_THRESHOLD] * 3
    assert params["num_anchors"] == 16
    assert params["resolution_weights"] is None
    assert params["refine"] is False
    assert params["timestep"] == 300
    assert params["label_mode"] == "mean"


def test_diffseg_select_layers() -> None:
    def info(name: str, kind: str, index: int) -> LayerInfo:
        return LayerInfo(name, kind, (8, 8), 8, 40, "down", index, "down_blocks.0")  # type: ignore[arg-type]

    layers = {"b.attn2": info("b.attn2", "cross", 1), "b.attn1": info("b.attn1", "self", 0)}
    layers["a.attn1"] = info("a.attn1", "self", 2)
    assert DiffSeg().select_layers(layers) == ["b.attn1", "a.attn1"]
    assert DiffSeg(label_words=["cat"]).select_layers(layers) == ["b.attn1", "b.attn2", "a.attn1"]
    assert DiffSeg(label_words="cat, dog").label_words == ("cat", "dog")  # the command line's form


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kl_thresholds": (1.1,)}, "kl_thresholds"),
        ({"kl_thresholds": (1.1, 0.0)}, "kl_thresholds"),
        ({"kl_thresholds": "1.1"}, "kl_thresholds"),
        ({"kl_thresholds": (1.1, float("nan"))}, "kl_thresholds"),
        ({"num_anchors": 1}, "num_anchors"),
        ({"num_anchors": 4.0}, "num_anchors"),
        ({"resolution_weights": {64: -1.0}}, "resolution_weights"),
        ({"resolution_weights": {64: 0.0}}, "resolution_weights"),
        ({"resolution_weights": {"64": 1.0}}, "resolution_weights"),
        ({"refine": 1}, "refine"),
        ({"kmeans_max_iter": 0}, "kmeans_max_iter"),
        ({"random_state": -1}, "random_state"),
        ({"timestep": -5}, "timestep"),
        ({"label_words": " , "}, "label_words"),
        ({"label_words": []}, "label_words"),
        ({"label_words": {"cat": []}}, "label_words"),
        ({"label_words": ["cat", "cat"]}, "label_words"),
        ({"label_mode": "median"}, "label_mode"),
        ({"threshold_mode": "quantile"}, "threshold_mode"),
    ],
)
def test_diffseg_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        DiffSeg(**kwargs)


def test_diffseg_keyword_only() -> None:
    with pytest.raises(TypeError):
        DiffSeg((1.1, 1.1))  # type: ignore[misc]


def test_diffseg_recovers_regions() -> None:
    store = FakeStore(region_maps(REGIONS_16, (16, 8)))
    method = DiffSeg(kl_thresholds=(1.1, 1.1, 1.1), threshold_mode="absolute", num_anchors=4)
    result = method.segment(store)
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == (16, 16)  # no image size in the store: the attention grid
    assert result.labels.dtype == torch.int64
    assert same_partition(result.labels, REGIONS_16)
    assert result.labels.unique().tolist() == [0, 1, 2, 3]
    assert result.scores is not None and result.scores.shape == (4, 16, 16)
    assert torch.equal(result.scores.argmax(dim=0), result.labels)
    assert result.method == "diffseg"
    assert result.label_names is None
    assert result.params["num_anchors"] == 4
    assert result.meta["num_proposals"] == 4
    assert result.meta["proposals_per_iteration"] == [16, 4, 4]
    assert result.meta["grid"] == 16
    assert result.meta["resolution_weights"] == pytest.approx({16: 2 / 3, 8: 1 / 3})


def test_diffseg_out_size_from_store_and_argument() -> None:
    maps = region_maps(REGIONS_16, (16, 8))
    result = DiffSeg(num_anchors=4).segment(FakeStore(maps, meta={"image_size": (64, 64)}))
    assert result.labels.shape == (64, 64)
    nearest = torch.nn.functional.interpolate(REGIONS_16[None, None].float(), size=(64, 64), mode="nearest")[0, 0]
    # Map ids to regions by majority, then require near-perfect agreement (only boundary pixels may differ).
    mapping = {int(i): int(torch.mode(nearest[result.labels == i]).values) for i in result.labels.unique()}
    relabelled = result.labels.clone().apply_(lambda v: mapping[v])
    assert (relabelled == nearest.long()).float().mean() > 0.97
    explicit = DiffSeg(num_anchors=4).segment(FakeStore(maps, meta={"image_size": (64, 64)}), out_size=(20, 24))
    assert explicit.labels.shape == (20, 24)


def test_diffseg_refine_on_regions() -> None:
    store = FakeStore(region_maps(REGIONS_16, (16, 8)))
    result = DiffSeg(num_anchors=4, refine=True).segment(store, generator=torch.Generator().manual_seed(0))
    assert same_partition(result.labels, REGIONS_16)
    assert result.params["refine"] is True


def test_diffseg_semantic_labels_from_cross_attention() -> None:
    # Tokens: 0 = start, 1 = "a", 2 = "cat", 3-4 = "dog" (two sub-tokens), 5 = end.
    # Regions 0 and 1 (top) look at "cat"; regions 2 and 3 (bottom) at "dog".
    cross = {}
    for r in (16, 8):
        f = 16 // r
        region = REGIONS_16[::f, ::f].reshape(-1)
        x = torch.full((r * r, 6), 0.05)
        x[region <= 1, 2] = 0.6
        x[region >= 2, 3] = 0.4
        x[region >= 2, 4] = 0.4
        cross[r] = x / x.sum(dim=1, keepdim=True)
    store = FakeStore(region_maps(REGIONS_16, (16, 8)), cross_maps=cross, meta={"image_size": (32, 32)})
    method = DiffSeg(num_anchors=4, label_words={"cat": [2], "dog": [3, 4]})
    result = method.segment(store)
    assert result.label_names is not None and len(result.label_names) == 4
    top = REGIONS_16.repeat_interleave(2, 0).repeat_interleave(2, 1) <= 1
    for seg_id, word in enumerate(result.label_names):
        mask = result.labels == seg_id
        assert word == ("cat" if bool(top[mask].float().mean() > 0.5) else "dog")
    assert sorted(result.meta["semantic"]) == ["cat", "dog"]
    assert result.meta["token_indices"] == {"cat": [2], "dog": [3, 4]}

    with pytest.raises(ConfigError, match="prompt"):
        DiffSeg(num_anchors=4, label_words=["cat"]).segment(store)
    with pytest.raises(ConfigError, match="outside"):
        DiffSeg(num_anchors=4, label_words={"cat": [9]}).segment(store)


def test_diffseg_errors_on_bad_store() -> None:
    with pytest.raises(ConfigError, match="no self-attention"):
        DiffSeg().segment(FakeStore({}))
    # An 8 x 8 grid is smaller than the 16 x 16 anchor grid: every position becomes an anchor.
    small = DiffSeg(num_anchors=16).segment(FakeStore(region_maps(REGIONS_16, (8,))))
    assert small.meta["num_anchors_per_side"] == 8 and small.meta["num_anchor_points"] == 64
    with pytest.raises(ConfigError, match="square"):
        DiffSeg(num_anchors=2).segment(FakeStore({4: torch.full((12, 12), 1 / 12)}))


# ----------------------------------------------------------------------------------------------------------------------
# Exact pruning of iteration 0 (grids >= 32)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attn_32() -> torch.Tensor:
    return aggregate_self_attention(structured_maps((32, 16, 8), seed=7, num_regions=6))


@pytest.mark.parametrize("quantiles", [(0.02, 0.1, 0.3), (0.1, 0.05), (0.3, 0.3, 0.3), (0.6, 0.2)])
def test_merge_proposals_pruned_matches_literal(attn_32: torch.Tensor, quantiles: tuple[float, ...]) -> None:
    from attnseg.methods.diffseg import _prune_plan

    assert _prune_plan(32, 32, 32, 32) is not None  # the pruned path is the one under test
    grid = anchor_grid(6, 32)
    thresholds = pick_thresholds(attn_32, grid, quantiles)
    got = merge_proposals(attn_32, thresholds, grid)
    expected = literal.generate_masks(attn_32.double().numpy(), thresholds, grid.numpy())
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tau", [1e-4, 0.05, 0.5, 1.1, 3.0, 50.0])
def test_merge_pruned_equals_dense(tau: float) -> None:
    from attnseg.methods.diffseg import _merge

    # Exact zeros (regions) mixed with smooth maps: the floor is active, the bound must still hold.
    regions = REGIONS_16.repeat_interleave(2, 0).repeat_interleave(2, 1)
    maps = region_maps(regions, (32, 16))
    smooth = structured_maps((32, 16), seed=8)
    mixed = {r: 0.5 * maps[r] + 0.5 * smooth[r] if r == 16 else maps[r] for r in (32, 16)}
    attn = aggregate_self_attention(mixed)
    grid = anchor_grid(5, 32)
    pruned, counts_pruned = _merge(attn, (tau, tau), grid, prune=True)
    dense, counts_dense = _merge(attn, (tau, tau), grid, prune=False)
    assert counts_pruned == counts_dense
    torch.testing.assert_close(pruned, dense, rtol=1e-5, atol=1e-7)


def test_aggregation_refuses_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregate that would exhaust memory is refused with a message, not killed by the OS."""
    import attnseg.methods.ops as ops
    from attnseg.errors import AttnSegError

    maps = {8: torch.full((64, 64), 1 / 64)}
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 1000)  # 3 * 8^4 * 4 bytes do not fit in 1 kB
    with pytest.raises(AttnSegError, match=r"8x8 needs about .* GiB"):
        aggregate_self_attention(maps)
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: 2**30)
    assert aggregate_self_attention(maps).shape == (8, 8, 8, 8)


# -- thresholds that mean the same at every grid -----------------------------------------------------------------


class _AggregatedStore:
    """A store whose one resolution already holds the aggregated self-attention."""

    def __init__(self, attn: torch.Tensor) -> None:
        r = int(attn.shape[0])
        self._maps = {r: attn.reshape(r * r, r * r)}
        self.meta: dict[str, Any] = {}

    def self_attention(self, batch_index: int = 0) -> dict[int, torch.Tensor]:
        return self._maps


LAYOUT = torch.zeros(8, 8, dtype=torch.long)
LAYOUT[1:4, 1:5] = 1
LAYOUT[5:8, 3:7] = 2
LAYOUT[0:3, 6:8] = 3


def _miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    from attnseg.eval.metrics import hungarian_counts

    tp, fp, fn = hungarian_counts(pred.numpy(), target.numpy(), int(target.max()) + 1, present_only=True)
    return float((tp / (tp + fp + fn)).mean())


def test_anchor_divergence_unit_is_the_median_kl_over_anchor_pairs() -> None:
    from attnseg.synthetic import synthetic_self_attention

    attn = synthetic_self_attention(LAYOUT, 16)
    grid = anchor_grid(4, 16)
    values = []
    for a in range(len(grid)):  # literal float64 loop over the 16 * 15 / 2 pairs
        for b in range(a + 1, len(grid)):
            p = attn[grid[a, 0], grid[a, 1]].double().clamp_min(1e-10)
            q = attn[grid[b, 0], grid[b, 1]].double().clamp_min(1e-10)
            values.append(float(0.5 * ((p - q) * (p.log() - q.log())).sum()))
    expected = sorted(values)[(len(values) - 1) // 2]  # torch.median takes the lower middle value
    assert anchor_divergence_unit(attn, 4) == pytest.approx(expected, rel=1e-4)
    # A sharper model (larger divergences) gives a proportionally larger unit: thresholds follow it.
    sharper = synthetic_self_attention(LAYOUT, 16, sharpness=2.0)
    assert anchor_divergence_unit(sharper, 4) > 1.5 * anchor_divergence_unit(attn, 4)


# At 16 x 16 this layout's attention is so soft (sharpness 1) that the default merges two of the four regions
# (mIoU 0.55; the paper's absolute 1.1 merges all of them): benchmarks/results/threshold_transfer.json.
@pytest.mark.parametrize("size", [32, 64])
def test_relative_default_finds_the_same_regions_at_every_grid(size: int) -> None:
    from attnseg.synthetic import resize_layout, synthetic_self_attention

    attn = synthetic_self_attention(LAYOUT, size)
    target = resize_layout(LAYOUT, size)
    result = DiffSeg().segment(_AggregatedStore(attn))
    assert result.meta["divergence_unit"] == pytest.approx(anchor_divergence_unit(attn, 16))
    assert _miou(result.labels, target) > 0.8
    assert 4 <= result.meta["num_segments"] <= 10


def test_absolute_paper_threshold_does_not_transfer_across_grids() -> None:
    # The motivating failure: the paper's 1.1 merges everything at 16 x 16 but separates the regions at 64 x 64.
    from attnseg.synthetic import resize_layout, synthetic_self_attention

    paper = DiffSeg(threshold_mode="absolute")
    coarse = paper.segment(_AggregatedStore(synthetic_self_attention(LAYOUT, 16)))
    fine = paper.segment(_AggregatedStore(synthetic_self_attention(LAYOUT, 64)))
    assert coarse.meta["num_segments"] == 1
    assert _miou(fine.labels, resize_layout(LAYOUT, 64)) > 0.8

# ----------------------------------------------------------------------------------------------------------------------
# Step 8 from wrong proposals, against a literal Lloyd's algorithm
# ----------------------------------------------------------------------------------------------------------------------


def lloyd_literal(data: np.ndarray, init: np.ndarray, max_iter: int = 300) -> np.ndarray:
    """Plain Lloyd's K-means in float64 loops: nearest centre (squared distance, first on ties), then means, until
    the assignment stops changing. Returns the labels of the rows of ``data``."""
    centres = init.astype(np.float64).copy()
    labels = np.full(data.shape[0], -1)
    for _ in range(max_iter):
        new = np.array([int(np.argmin([float(((x - c) ** 2).sum()) for c in centres])) for x in data])
        if np.array_equal(new, labels):
            break
        labels = new
        for k in range(centres.shape[0]):
            if (labels == k).any():
                centres[k] = data[labels == k].mean(axis=0)
    return labels


def test_refine_kmeans_corrects_wrong_proposals() -> None:
    """Start from proposals that mix the regions: refinement must move every centre to its region's mean."""
    attn = aggregate_self_attention(region_maps(REGIONS_16, (16, 8)))
    flat = attn.reshape(256, 256).double()
    truth = torch.stack([flat[REGIONS_16.reshape(-1) == k].mean(0) for k in range(4)])  # each region's mean map
    mix = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.6, 0.4, 0.0], [0.0, 0.0, 0.6, 0.4], [0.4, 0.0, 0.0, 0.6]])
    wrong = (mix.double() @ truth).float().reshape(4, 16, 16)
    assert float((wrong.reshape(4, -1).double() - truth).abs().max()) > 1e-3  # the start is wrong
    refined = refine_kmeans(attn, wrong, random_state=0)
    torch.testing.assert_close(refined.reshape(4, -1).double(), truth, rtol=1e-5, atol=1e-7)
    assert same_partition(assign_labels(refined, (16, 16)), REGIONS_16)


def test_refine_kmeans_matches_literal_lloyd_from_merged_proposals() -> None:
    attn = aggregate_self_attention(structured_maps((8, 4), seed=5, noise=1.5))
    proposals = merge_proposals(attn, (0.3, 0.3), anchor_grid(3, 8))
    data = attn.reshape(64, 64).double().numpy()
    labels = lloyd_literal(data, proposals.reshape(proposals.shape[0], -1).double().numpy())
    present = sorted(set(labels.tolist()))
    expected = np.stack([data[labels == k].mean(axis=0) for k in present])
    refined = refine_kmeans(attn, proposals, random_state=0)
    assert refined.shape[0] == len(present)
    np.testing.assert_allclose(refined.reshape(len(present), -1).double().numpy(), expected, rtol=1e-5, atol=1e-7)
    # the refinement moved the proposals (a no-op would return them unchanged)
    assert refined.shape != proposals.shape or float((refined - proposals).abs().max()) > 1e-4


def test_diffseg_segment_uses_the_refined_proposals() -> None:
    # Thresholds so loose that merging leaves one proposal per 2x2 anchor block; refinement with K-means then
    # decides the labels: DiffSeg(refine=True) must equal assign_labels(refine_kmeans(merge_proposals(...))).
    maps = structured_maps((8, 4), seed=5, noise=1.5)
    attn = aggregate_self_attention(maps)
    proposals = merge_proposals(attn, (0.3, 0.3), anchor_grid(3, 8))
    refined = refine_kmeans(attn, proposals, random_state=7)
    method = DiffSeg(kl_thresholds=(0.3, 0.3), threshold_mode="absolute", num_anchors=3, refine=True, random_state=7)
    result = method.segment(FakeStore(maps))
    assert torch.equal(result.labels, assign_labels(refined, (8, 8)))
    assert result.meta["num_proposals"] == refined.shape[0]
    unrefined = DiffSeg(kl_thresholds=(0.3, 0.3), threshold_mode="absolute", num_anchors=3).segment(FakeStore(maps))
    assert torch.equal(unrefined.labels, assign_labels(proposals, (8, 8)))
    assert not torch.equal(result.labels, unrefined.labels)


# ----------------------------------------------------------------------------------------------------------------------
# Edges: memory estimate, block sizes, pruning plan, default dtype and device
# ----------------------------------------------------------------------------------------------------------------------


def test_aggregation_memory_estimate_is_three_float32_aggregates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate is three ``R^4`` float32 tensors (the aggregate, one resized resolution, the merge's log-maps):
    refused one byte below the memory that holds them at the CPU's allowed share, accepted at it."""
    import attnseg.methods.ops as ops
    from attnseg.devices import default_check_fraction
    from attnseg.errors import AttnSegError

    maps = {8: torch.full((64, 64), 1 / 64)}
    need = 3 * 8**4 * 4
    enough = int(need / default_check_fraction(torch.device("cpu")))
    assert enough * default_check_fraction(torch.device("cpu")) == need  # the boundary is exact (share 1/2)
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: enough)
    assert aggregate_self_attention(maps).shape == (8, 8, 8, 8)
    monkeypatch.setattr(ops, "available_memory_bytes", lambda device=None: enough - 1)
    with pytest.raises(AttnSegError, match="8x8 needs"):
        aggregate_self_attention(maps)


def test_pruned_iteration0_in_row_blocks_that_do_not_divide_the_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key pooling runs over blocks of rows; a last, shorter block uses a matching slice of the reused buffer
    (no resized output) and gives what the dense path gives."""
    import attnseg.methods.diffseg as diffseg

    attn = aggregate_self_attention(structured_maps((32, 16), seed=9))
    grid = anchor_grid(4, 32)
    dense, counts_dense = diffseg._merge(attn, (0.5, 0.5), grid, prune=False)
    monkeypatch.setattr(diffseg, "_POOL_BLOCK_ELEMENTS", 3 * 32 * 32)  # blocks of 3 rows; 1024 = 341 * 3 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when an ``out=`` tensor of the wrong shape is resized
        pruned, counts_pruned = diffseg._merge(attn, (0.5, 0.5), grid, prune=True)
    assert counts_pruned == counts_dense
    torch.testing.assert_close(pruned, dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("grids", "plan"),
    [
        ((32, 32, 32, 32), (8, 4, 4)),
        ((64, 48, 64, 48), (8, 8, 6)),
        ((40, 32, 32, 32), (8, 4, 4)),
        ((16, 32, 32, 32), None),  # each side below 32 turns pruning off
        ((32, 16, 32, 32), None),
        ((32, 32, 16, 32), None),
        ((32, 32, 32, 16), None),
        ((36, 32, 32, 32), None),  # query sides must be multiples of the 8-query tile
        ((32, 36, 32, 32), None),
        ((32, 32, 36, 32), None),  # key sides must be multiples of the 8 bins
        ((32, 32, 32, 36), None),
    ],
)
def test_prune_plan_by_hand(grids: tuple[int, int, int, int], plan: tuple[int, int, int] | None) -> None:
    from attnseg.methods.diffseg import _prune_plan

    assert _prune_plan(*grids) == plan


def test_assign_labels_follows_the_proposals_device(foreign_default_device: torch.device) -> None:
    proposals = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = assign_labels(proposals, (7, 5))
    with foreign_default_device:
        got = assign_labels(proposals, (7, 5))
    assert got.device == proposals.device
    assert torch.equal(got, expected)


def test_label_segments_with_a_float64_default_and_bad_labels(float64_default: torch.dtype) -> None:
    labels = torch.tensor([[0, 0, 0, 5]])
    maps = {"cat": torch.tensor([[1.0, 1.0, 1.0, 0.0]]), "sky": torch.tensor([[0.0, 0.0, 0.0, 2.0]])}
    assert label_segments(labels, maps, mode="mean").words == {0: "cat", 5: "sky"}
    with pytest.raises(ConfigError, match="integer"):
        label_segments(labels.float(), maps)  # (H, W) but not integer
    with pytest.raises(ConfigError, match="integer"):
        label_segments(labels[None], {w: m[None] for w, m in maps.items()})  # integer but not (H, W)


@pytest.mark.parametrize("prune", [False, True])
def test_merge_with_a_float64_default_and_another_default_device(
    prune: bool, float64_default: torch.dtype, foreign_default_device: torch.device
) -> None:
    """Iteration 0 (dense and pruned) creates its tensors in the maps' dtype and on their device."""
    from attnseg.methods.diffseg import _merge

    torch.set_default_dtype(torch.float32)
    attn = aggregate_self_attention(structured_maps((32, 16), seed=9))
    grid = anchor_grid(4, 32)
    expected, counts_expected = _merge(attn, (0.5, 0.5), grid, prune=prune)
    torch.set_default_dtype(float64_default)
    with foreign_default_device:
        got, counts = _merge(attn, (0.5, 0.5), grid, prune=prune)
    assert counts == counts_expected
    assert got.dtype == torch.float32 and got.device == attn.device
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_refine_kmeans_with_a_single_iteration_is_one_lloyd_step() -> None:
    attn = aggregate_self_attention(structured_maps((8, 4), seed=5, noise=1.5))
    proposals = merge_proposals(attn, (0.3, 0.3), anchor_grid(3, 8))
    data = attn.reshape(64, 64).double().numpy()
    # one update of the centres, then the labels of the updated centres (scikit-learn's last assignment)
    labels = lloyd_literal(data, proposals.reshape(proposals.shape[0], -1).double().numpy(), max_iter=2)
    present = sorted(set(labels.tolist()))
    expected = np.stack([data[labels == k].mean(axis=0) for k in present])
    one = refine_kmeans(attn, proposals, max_iter=1, random_state=0)
    np.testing.assert_allclose(one.reshape(len(present), -1).double().numpy(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="max_iter"):
        refine_kmeans(attn, proposals, max_iter=0)
