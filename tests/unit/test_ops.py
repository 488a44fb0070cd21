"""Shared tensor operations (``attnseg.methods.ops``) against literal loops and hand-computed values."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from attnseg.errors import ConfigError
from attnseg.methods.ops import (
    add_query_tiled,
    group_mean,
    key_upsample,
    minmax,
    normalize_sum,
    query_tile,
    symmetric_kl_matrix,
)

torch.set_num_threads(1)


def _load(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_o", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dl = _load("diffseg_literal")


def nearest_literal(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Query-axis nearest resize, one output position at a time (``src = floor(dst * in / out)``)."""
    h, w = maps.shape[:2]
    out = np.zeros((*size, *maps.shape[2:]), dtype=maps.dtype)
    for y in range(size[0]):
        for x in range(size[1]):
            out[y, x] = maps[(y * h) // size[0], (x * w) // size[1]]
    return out


@pytest.mark.parametrize(("src", "dst"), [((3, 4), (6, 8)), ((4, 4), (2, 2)), ((5, 3), (7, 4)), ((2, 2), (2, 5))])
def test_key_upsample_is_the_literal_half_pixel_bilinear(src, dst):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, *src, generator=g, dtype=torch.float64)
    got = key_upsample(maps, dst)
    for i in range(2):
        for j in range(3):
            expected = dl.bilinear_resize(maps[i, j].numpy(), *dst)
            np.testing.assert_allclose(got[i, j].numpy(), expected, rtol=1e-12, atol=1e-12)
    # a single 2-D map, and one int for a square target
    np.testing.assert_allclose(key_upsample(maps[0, 0], dst).numpy(), dl.bilinear_resize(maps[0, 0].numpy(), *dst))
    square = key_upsample(maps[0, 0], 6)
    np.testing.assert_allclose(square.numpy(), dl.bilinear_resize(maps[0, 0].numpy(), 6, 6))
    assert got.dtype == torch.float64
    with pytest.raises(ConfigError, match="at least 2 dims"):
        key_upsample(torch.ones(4), 2)


@pytest.mark.parametrize(("src", "dst"), [((2, 3), (4, 6)), ((2, 3), (4, 7)), ((3, 3), (7, 6)), ((4, 2), (2, 2))])
def test_query_tile_and_its_in_place_sum_are_the_literal_nearest_resize(src, dst):
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(*src, 5, generator=g, dtype=torch.float64)
    expected = nearest_literal(maps.numpy(), dst)
    np.testing.assert_array_equal(query_tile(maps, dst).numpy(), expected)
    out = torch.rand(*dst, 5, generator=g, dtype=torch.float64)
    before = out.clone()
    assert add_query_tiled(out, maps, alpha=-0.5) is out
    np.testing.assert_allclose(out.numpy(), before.numpy() - 0.5 * expected, rtol=1e-12, atol=1e-12)
    # a non-contiguous accumulator takes the general path with the same result
    wide = torch.rand(dst[1], dst[0], 5, generator=g, dtype=torch.float64)
    view = wide.transpose(0, 1)
    assert not view.is_contiguous()
    start = view.clone()
    add_query_tiled(view, maps, alpha=2.0)
    np.testing.assert_allclose(view.numpy(), start.numpy() + 2.0 * expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(query_tile(maps[..., 0], dst[0]).numpy()[:, :1],
                                  nearest_literal(maps[..., 0].numpy(), (dst[0], dst[0]))[:, :1])
    with pytest.raises(ConfigError, match="trailing axes"):
        add_query_tiled(torch.zeros(*dst, 4), maps)
    with pytest.raises(ConfigError, match="at least 2 dims"):
        query_tile(torch.ones(3), 2)


def test_symmetric_kl_matrix_of_distributions_in_any_blocks():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(4, 9, generator=g, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), 1)
    expected = torch.tensor([[0.5 * float(((p[a] - q[b]) * (p[a].log() - q[b].log())).sum()) for b in range(6)]
                             for a in range(4)], dtype=torch.float64)
    for chunk in (None, 1, 2, 4, 6, 100):
        torch.testing.assert_close(symmetric_kl_matrix(p, q, chunk_size=chunk), expected, rtol=1e-12, atol=1e-12)
    # eps floors zeros inside the logs only: a zero entry against 0.5 costs 0.5 * (log 0.5 - log eps) / 2
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    want = 0.5 * (0.5 * np.log(2.0) + 0.5 * (np.log(0.5) - np.log(1e-3)))
    assert float(symmetric_kl_matrix(a, b, eps=1e-3)[0, 0]) == pytest.approx(want, rel=1e-12)
    shapes = (((3,), (2, 3)), ((2, 3), (3,)), ((2, 3), (2, 4)))
    for bad in ((torch.rand(*a), torch.rand(*b)) for a, b in shapes):
        with pytest.raises(ConfigError, match="must be"):
            symmetric_kl_matrix(*bad)
    with pytest.raises(ConfigError, match="dtype"):
        symmetric_kl_matrix(torch.rand(2, 3), torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="dtype"):
        symmetric_kl_matrix(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ConfigError, match="chunk_size"):
        symmetric_kl_matrix(p, q, chunk_size=0)


def test_group_mean_normalize_sum_and_minmax_by_hand():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    member = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(group_mean(member, values), torch.tensor([[3.0, 5.5], [3.0, 4.0]]))
    with pytest.raises(ConfigError, match="at least one member"):
        group_mean(torch.tensor([[True, False, False], [False, False, False]]), values)
    x = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    torch.testing.assert_close(normalize_sum(x, 1), torch.tensor([[0.25, 0.75], [0.0, 1.0]]))
    torch.testing.assert_close(normalize_sum(x, (0, 1)), x / 8)
    torch.testing.assert_close(normalize_sum(x, 0), torch.tensor([[1.0, 3 / 7], [0.0, 4 / 7]]))
    # minmax per map over the given axes, with eps in the denominator; an int axis works too
    torch.testing.assert_close(minmax(x, 1), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(minmax(x, (0, 1), eps=1.0), torch.tensor([[0.2, 0.6], [0.0, 0.8]]))
    assert torch.equal(minmax(torch.full((2, 2), 3.0), (0, 1), eps=1.0), torch.zeros(2, 2))


def test_query_tile_indices_are_made_on_the_maps_device(foreign_default_device):
    """The nearest-resize indices are created on the maps' device (on a GPU: no host index copied per call);
    with another default device, indices made without ``device=`` would not index these maps."""
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 3, 2, generator=g, dtype=torch.float64)
    expected = nearest_literal(maps.numpy(), (5, 4))
    out = torch.zeros(5, 4, 2, dtype=torch.float64)
    with foreign_default_device:
        got = query_tile(maps, (5, 4))
        add_query_tiled(out, maps)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_symmetric_kl_matrix_on_the_inputs_device(foreign_default_device):
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(3, 5, generator=g), -1)
    q = torch.softmax(torch.randn(4, 5, generator=g), -1)
    expected = symmetric_kl_matrix(p, q)
    with foreign_default_device:
        got = symmetric_kl_matrix(p, q, chunk_size=3)
    assert got.device == p.device
    torch.testing.assert_close(got, expected)
