"""Tensor operations shared by the attention-based methods.

Conventions (``METHODS.md`` §0): grids are flattened row-major, a self-attention map in 4-D is
``S[qy, qx, ky, kx]`` (query axes first), and post-processing runs in float32 unless stated.

- :func:`key_upsample` is ``KeyUp_R``: bilinear resize of the *last two* (key) axes.
- :func:`query_tile` is ``QueryTile_R``: nearest resize of the *first two* (query) axes;
  :func:`add_query_tiled` accumulates it into an existing tensor without materialising the tiles.
- :func:`symmetric_kl_matrix` is the pairwise symmetric KL distance of DiffSeg, computed with matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnseg.errors import ConfigError

__all__ = [
    "add_query_tiled",
    "group_mean",
    "key_upsample",
    "minmax",
    "normalize_sum",
    "query_tile",
    "symmetric_kl_matrix",
]

# Budget for the temporary ``log q`` block of :func:`symmetric_kl_matrix` (elements, i.e. 64 MiB in float32).
_KL_BLOCK_ELEMENTS = 16 * 2**20


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def key_upsample(maps: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """``KeyUp``: bilinearly resize the last two axes of ``maps`` to ``size``.

    Uses ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (half-pixel centres,
    the same as Keras ``UpSampling2D(interpolation="bilinear")``). Works for down-sizing too (without
    antialiasing).

    Args:
        maps: ``(..., h, w)`` floating tensor (any number of leading axes, possibly none).
        size: target ``(H, W)``, or one int for a square target.

    Returns:
        ``(..., H, W)`` tensor of the same dtype. When ``(H, W) == (h, w)`` the input itself is returned
        (bilinear resizing to the same size is the identity).
    """
    out_h, out_w = _as_size(size)
    if maps.ndim < 2:
        raise ConfigError(f"maps must have at least 2 dims (..., h, w), got shape {tuple(maps.shape)}")
    *lead, h, w = maps.shape
    if (h, w) == (out_h, out_w):
        return maps
    flat = maps.reshape(-1, 1, h, w)
    up = F.interpolate(flat, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    return up.reshape(*lead, out_h, out_w)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    # PyTorch's ``mode="nearest"``: source index = floor(dst * n_in / n_out).
    return (torch.arange(n_out, device=device) * n_in) // n_out


def query_tile(maps: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """``QueryTile``: nearest resize of the first two (query) axes of ``maps`` to ``size``.

    When the target is an integer multiple of the input, each query map is repeated ``H / h`` times along
    rows and ``W / w`` times along columns (the reference's ``repeat``); otherwise PyTorch's ``"nearest"``
    rule ``src = floor(dst * h / H)`` is used.

    Args:
        maps: ``(h, w, ...)`` tensor (query grid first, anything after).
        size: target ``(H, W)`` of the query grid, or one int.

    Returns:
        ``(H, W, ...)`` tensor, same dtype (a new tensor).
    """
    out_h, out_w = _as_size(size)
    if maps.ndim < 2:
        raise ConfigError(f"maps must have at least 2 dims (h, w, ...), got shape {tuple(maps.shape)}")
    h, w = maps.shape[:2]
    if out_h % h == 0 and out_w % w == 0:
        return maps.repeat_interleave(out_h // h, dim=0).repeat_interleave(out_w // w, dim=1)
    rows = _nearest_index(h, out_h, maps.device)
    cols = _nearest_index(w, out_w, maps.device)
    return maps[rows][:, cols]


def add_query_tiled(out: torch.Tensor, maps: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """In place ``out += alpha * query_tile(maps, out.shape[:2])``, without materialising the tiles.

    Args:
        out: ``(H, W, ...)`` tensor, modified in place.
        maps: ``(h, w, ...)`` tensor whose trailing axes match ``out``'s.
        alpha: scalar weight.

    Returns:
        ``out``.
    """
    out_h, out_w = out.shape[:2]
    h, w = maps.shape[:2]
    if out.shape[2:] != maps.shape[2:]:
        raise ConfigError(f"trailing axes differ: out {tuple(out.shape)} vs maps {tuple(maps.shape)}")
    rest = tuple(out.shape[2:])
    if out_h % h == 0 and out_w % w == 0 and out.is_contiguous():
        fy, fx = out_h // h, out_w // w
        view = out.view(h, fy, w, fx, *rest)
        view.add_(maps.reshape(h, 1, w, 1, *rest), alpha=alpha)
        return out
    out.add_(query_tile(maps, (out_h, out_w)), alpha=alpha)
    return out


def symmetric_kl_matrix(
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    eps: float = 1e-10,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Pairwise symmetric KL distance between the rows of ``p`` and the rows of ``q``.

    ``D[a, b] = 1/2 * sum_d (p[a, d] - q[b, d]) * (log p[a, d] - log q[b, d])``, i.e.
    ``(KL(p_a || q_b) + KL(q_b || p_a)) / 2`` (DiffSeg's distance, ``METHODS.md`` §2 step 5), computed as

    ``D = 1/2 (sum p log p)[:, None] + 1/2 (sum q log q)[None, :] - 1/2 p @ (log q)^T - 1/2 (log p) @ q^T``

    so the work is two matrix products. Entries are floored at ``eps`` *inside the logarithms only*
    ([proposal]; the reference adds no epsilon, and an exact zero then gives ``0 * log 0 = NaN``), so a
    zero entry contributes ``q * (log eps - log q)``-type terms instead of NaN. Rounding can make the
    product form slightly negative; results are clamped at 0.

    Args:
        p: ``(A, D)`` float32 or float64, rows are distributions (non-negative, usually summing to 1).
        q: ``(B, D)``, same dtype and device as ``p``.
        eps: floor applied before taking logarithms; must be > 0.
        chunk_size: rows of ``q`` processed at once (bounds the temporary ``log q`` block); default keeps
            that block under 16 Mi elements (64 MiB in float32).

    Returns:
        ``(A, B)`` tensor of ``p``'s dtype, ``D >= 0``.
    """
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ConfigError(f"p and q must be (A, D) and (B, D), got {tuple(p.shape)} and {tuple(q.shape)}")
    if not p.is_floating_point() or p.dtype != q.dtype:
        raise ConfigError(f"p and q must share a floating dtype, got {p.dtype} and {q.dtype}")
    if eps <= 0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    d = p.shape[1]
    if chunk_size is None:
        chunk_size = max(1, _KL_BLOCK_ELEMENTS // max(d, 1))
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")

    log_p = p.clamp_min(eps).log_()
    h_p = torch.einsum("ad,ad->a", p, log_p)
    out = torch.empty(p.shape[0], q.shape[0], dtype=p.dtype, device=p.device)
    for start in range(0, q.shape[0], chunk_size):
        q_c = q[start : start + chunk_size]
        log_q = q_c.clamp_min(eps).log_()
        h_q = torch.einsum("bd,bd->b", q_c, log_q)
        block = out[:, start : start + q_c.shape[0]]
        torch.add(h_p[:, None], h_q[None, :], out=block)
        block.addmm_(p, log_q.T, alpha=-1.0)
        block.addmm_(log_p, q_c.T, alpha=-1.0)
        del log_q
    return out.mul_(0.5).clamp_min_(0.0)


def group_mean(membership: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``values`` selected by each row of ``membership``, as one matrix product.

    Args:
        membership: ``(K, N)`` bool, ``membership[k, n]`` puts row ``n`` in group ``k``; every group must be
            non-empty.
        values: ``(N, D)`` floating.

    Returns:
        ``(K, D)`` tensor of ``values``' dtype.
    """
    weights = membership.to(values.dtype)
    counts = weights.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ConfigError("every group must contain at least one member")
    return (weights @ values).div_(counts)


def normalize_sum(x: torch.Tensor, dims: int | Sequence[int]) -> torch.Tensor:
    """Divide ``x`` by its sum over ``dims`` (L1 normalisation of non-negative maps).

    Args:
        x: floating tensor, non-negative.
        dims: axis or axes summed over.

    Returns:
        Tensor of ``x``'s shape and dtype whose sums over ``dims`` are 1 (NaN where a sum is 0).
    """
    dims_t = (dims,) if isinstance(dims, int) else tuple(dims)
    return x / x.sum(dim=dims_t, keepdim=True)


def minmax(x: torch.Tensor, dims: int | Sequence[int], *, eps: float = 0.0) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` over ``dims``, map by map.

    A constant map (``max == min``) would give ``0 / 0``; it is returned as zeros instead.

    Args:
        x: floating tensor.
        dims: the axes of one map (e.g. ``(-2, -1)`` for ``(..., H, W)`` maps).
        eps: added to the denominator (e.g. 1e-8 where ``METHODS.md`` proposes it).

    Returns:
        Tensor of ``x``'s shape and dtype with values in ``[0, 1]``.
    """
    dims_t = (dims,) if isinstance(dims, int) else tuple(dims)
    lo = x.amin(dim=dims_t, keepdim=True)
    hi = x.amax(dim=dims_t, keepdim=True)
    span = hi - lo
    out = (x - lo) / (span + eps).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(span > 0, out, torch.zeros_like(out))


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory free now on ``device`` (None: the host), or None where it cannot be read.

    Reads the device that will hold the tensors: the host's ``MemAvailable`` for the CPU,
    ``torch.cuda.mem_get_info`` (plus the caching allocator's unused blocks) for CUDA, Metal's recommended working
    set minus what is allocated for MPS; see :func:`attnseg.devices.available_memory_bytes`.
    """
    from attnseg.devices import available_memory_bytes as read

    return read(device)


def check_memory(
    nbytes: int, what: str, *, device: torch.device | str | None = "cpu", fraction: float | None = None
) -> None:
    """Refuse, with a clear error, work whose tensors would not fit in the memory available now on ``device``.

    Without this, an (R, R, R, R) aggregate at R = 128 (SD 1.5 at 1024 px) gets the process killed by the
    OS with no message (or a CUDA out-of-memory error deep inside a kernel). Where the available memory is
    unknown it passes.

    Args:
        nbytes: the bytes the work will hold at once.
        what: what needs them, for the message (e.g. ``"aggregating self-attention at 64x64"``).
        device: the device that will hold the tensors (a ``torch.device``, ``"cpu"``, ``"cuda:0"``...).
        fraction: the share of the available memory allowed; default 0.5 on the CPU (shared with the OS and other
            processes) and 0.8 on accelerators (see :func:`attnseg.devices.default_check_fraction`).

    Raises:
        AttnSegError: naming the size, the device and the fix.
    """
    from attnseg.devices import default_check_fraction, describe_device
    from attnseg.errors import AttnSegError

    share = default_check_fraction(device) if fraction is None else fraction
    available = available_memory_bytes(device)
    if available is not None and nbytes > share * available:
        raise AttnSegError(
            f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than {share:.0%} of the "
            f"{available / 2**30:.1f} GiB available on {describe_device(device)}; "
            "use a smaller input size (--size) or fewer/lower-resolution layers"
        )
