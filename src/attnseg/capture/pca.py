"""Per-head PCA of attention as it arrives (Stillger et al., "Beyond Labels"; ``METHODS.md`` §5).

The principal-component clustering method keeps every self-attention head separate. Keeping the heads'
``N x N`` maps would cost 0.5 GiB per 64 x 64 layer of SD1.5, so :class:`PCAHeadStore` reduces each head
the moment its chunk arrives and keeps only ``(k_pc, N)`` per head:

- ``reading="outputs"`` (default, the predecessor's data): the head's output ``X_h = A_h V_h``, an
  ``N x head_dim`` matrix (samples = query positions, features = value channels);
- ``reading="probs"`` ([proposal], option): the probabilities ``X_h = A_h`` themselves, ``N x N``
  (samples = queries, features = keys).

PCA is centred, without whitening (scikit-learn's ``PCA``), and a deterministic sign convention makes the
result reproducible: each component's largest-magnitude score is positive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.store import AttentionStore, _Entry
from attnseg.errors import AttnSegError, ConfigError
from attnseg.types import LayerInfo

if TYPE_CHECKING:
    from attnseg.capture.memory import MemoryItem

__all__ = ["HeadPCA", "PCAHeadStore", "head_pca"]

_FORMAT = "attnseg.PCAHeadStore"
_FORMAT_VERSION = 1

#: Largest ``min(N, F)`` solved with a full (exact) SVD under ``solver="auto"``; larger data matrices (the
#: ``"probs"`` reading at 32 x 32 and 64 x 64) use the seeded randomized solver.
FULL_SVD_MAX_DIM = 256

Reading = Literal["outputs", "probs"]
Solver = Literal["auto", "full", "randomized"]


@dataclass(frozen=True)
class HeadPCA:
    """PCA of one head's data matrix ``X (N, F)`` (N samples, F features).

    Attributes:
        components: ``(k, N)`` float32, the projections of the N centred samples on the first k principal
            axes (scikit-learn's ``fit_transform`` output, transposed); row ``j`` is principal component
            ``j`` as a map over the N positions. Not scikit-learn's ``components_`` (those are :attr:`axes`).
        axes: ``(k, F)`` float32 unit principal axes (scikit-learn's ``components_``).
        explained_variance: ``(k,)`` float32 variance along each axis (``S^2 / (N - 1)``).
        total_variance: ``()`` float32, the summed variance of all F features (for ratios).
    """

    components: torch.Tensor
    axes: torch.Tensor
    explained_variance: torch.Tensor
    total_variance: torch.Tensor

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """``(k,)`` share of the total variance explained by each component."""
        return self.explained_variance / self.total_variance.clamp_min(torch.finfo(torch.float32).tiny)


def _flip_signs(scores: torch.Tensor, axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of every score column positive (first index on ties)."""
    idx = scores.abs().argmax(dim=0)
    signs = torch.sign(scores.gather(0, idx[None])[0])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return scores * signs[None], axes * signs[:, None]


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the exact solver, except on MPS, which has no float64 (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _full_pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xd = x.to(_wide_dtype(x.device))
    xc = xd - xd.mean(dim=0, keepdim=True)
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    total = xc.square().sum()
    return u[:, :k] * s[:k], vh[:k], s[:k], total


def _randomized_pca(
    x: torch.Tensor, k: int, *, n_oversamples: int, n_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko et al. 2011, subspace iteration) of ``x - mean`` without forming it."""
    n, f = x.shape
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    rank = min(k + n_oversamples, n, f)
    mean = xf.mean(dim=0)  # (F,)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(f, rank, generator=gen, dtype=torch.float64).to(xf.dtype).to(xf.device)

    def centred_mul(m: torch.Tensor) -> torch.Tensor:  # (X - 1 mean) @ m, m: (F, r)
        return xf @ m - (mean @ m)[None, :]

    def centred_tmul(m: torch.Tensor) -> torch.Tensor:  # (X - 1 mean)^T @ m, m: (N, r)
        return xf.T @ m - mean[:, None] * m.sum(dim=0)[None, :]

    q = torch.linalg.qr(centred_mul(omega)).Q
    for _ in range(n_iter):
        q = torch.linalg.qr(centred_tmul(q)).Q
        q = torch.linalg.qr(centred_mul(q)).Q
    wide = _wide_dtype(xf.device)
    b = centred_tmul(q).T.to(wide)  # (r, F) = Q^T (X - 1 mean)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q.to(wide) @ ub[:, :k]
    # Welford-style per-feature variance: no (N, F) temporary.
    total = xf.var(dim=0, correction=0).to(wide).sum() * n
    return u * s[:k], vh[:k], s[:k], total


def head_pca(
    x: torch.Tensor,
    n_components: int,
    *,
    solver: Solver = "auto",
    n_oversamples: int = 10,
    n_iter: int = 7,
    seed: int = 0,
) -> HeadPCA:
    """Centred PCA (no whitening) of one head's data matrix, with a deterministic sign convention.

    Equals scikit-learn's ``PCA(n_components).fit_transform(x)`` up to the sign of each component: here the
    entry of largest magnitude of every component (over the N samples) is positive, so ``head_pca(-x)``
    equals ``head_pca(x)``.

    Args:
        x: ``(N, F)`` floating, N samples (query positions) by F features (value channels, or keys for the
            ``"probs"`` reading). Any dtype; the full solver works in float64, the randomized one in
            ``x``'s dtype (float32 for half inputs) for the large products.
        n_components: k, ``1 <= k <= min(N, F)``.
        solver: ``"full"`` (exact thin SVD), ``"randomized"`` (seeded subspace iteration; for large F such
            as the ``(N, N)`` probabilities) or ``"auto"`` (full when ``min(N, F) <= FULL_SVD_MAX_DIM``).
        n_oversamples, n_iter: randomized solver's extra dimensions and power iterations (scikit-learn's
            ``randomized_svd`` uses 10 and 7 for few components).
        seed: seeds the randomized solver's test matrix (a private CPU generator): same input, same output.

    Returns:
        :class:`HeadPCA` with ``components (k, N)``, ``axes (k, F)``, ``explained_variance (k,)``.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
        >>> head_pca(x, 1).components
        tensor([[-1.4142,  0.0000,  1.4142]])
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"x must be a floating (N, F) tensor, got {shape}")
    n, f = (int(s) for s in x.shape)
    if n < 2:
        raise ConfigError(f"PCA needs at least 2 samples (rows of x), got {n}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= min(n, f):
        raise ConfigError(f"n_components must be an int in [1, min(N, F) = {min(n, f)}], got {n_components!r}")
    if solver not in ("auto", "full", "randomized"):
        raise ConfigError(f"solver must be 'auto', 'full' or 'randomized', got {solver!r}")
    if solver == "full" or (solver == "auto" and min(n, f) <= FULL_SVD_MAX_DIM):
        scores, axes, s, total = _full_pca(x, n_components)
    else:
        scores, axes, s, total = _randomized_pca(x, n_components, n_oversamples=n_oversamples, n_iter=n_iter, seed=seed)
    scores, axes = _flip_signs(scores, axes)
    return HeadPCA(
        components=scores.T.to(torch.float32).contiguous(),
        axes=axes.to(torch.float32).contiguous(),
        explained_variance=(s.square() / (n - 1)).to(torch.float32),
        total_variance=(total / (n - 1)).to(torch.float32),
    )


@dataclass
class _Pending:
    """One call of one layer while its head chunks arrive."""

    components: torch.Tensor  # (B, H, k, N)
    variance: torch.Tensor  # (B, H, k)
    total: torch.Tensor  # (B, H)
    done: torch.Tensor  # (H,) bool


class PCAHeadStore(AttentionStore):
    """Keeps, per captured layer and head, the first ``k`` principal components of the head's data matrix.

    Each head is reduced by :func:`head_pca` as its chunk arrives; only ``(B, H, k, N)`` component maps (plus
    the explained variance) are kept per layer, never an ``(N, N)`` map. Averaging principal components over
    denoiser calls is not meaningful (signs and axes differ per call), so one call is kept: the last one
    (``step="last"``) or the call with a given index (``step=i``, 0-based, counted per layer from the
    store's creation).

    Args:
        n_components: k principal components kept per head. Default 3 (paper, Table 2). A store captured
            with k components serves any method setting with ``n_components <= k`` (components are nested).
        reading: ``"outputs"`` (``X_h = A_h V_h``, ``N x head_dim``; the predecessor's hook, METHODS.md §5) or
            ``"probs"`` (``X_h = A_h``, ``N x N``; [proposal]).
        step: ``"last"`` or a 0-based call index to keep.
        solver, seed: passed to :func:`head_pca`.
        batch: batch items to keep (e.g. ``slice(1, 2)``, the conditional half of a CFG batch of 2).
        dtype: storage dtype of the component maps.
        device: where the kept tensors live (PCA itself runs where the data arrives).
        meta: JSON-able metadata saved with the store.

    Example:
        >>> store = PCAHeadStore(n_components=2)
        >>> info = LayerInfo("a.attn1", "self", (2, 2), heads=1, head_dim=3, position="up", index=0, block="a")
        >>> probs = torch.full((1, 1, 4, 4), 0.25)
        >>> store.add(info, probs, out=torch.randn(1, 1, 4, 3))
        >>> store.components("a.attn1").shape
        torch.Size([1, 2, 2, 2])
    """

    wants_outputs: bool = True

    def __init__(
        self,
        *,
        n_components: int = 3,
        reading: Reading = "outputs",
        step: Literal["last"] | int = "last",
        solver: Solver = "auto",
        seed: int = 0,
        batch: slice | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(heads="all", group="layer", batch=batch, dtype=dtype, device=device, meta=meta)
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ConfigError(f"n_components must be an int >= 1, got {n_components!r}")
        if reading not in ("outputs", "probs"):
            raise ConfigError(f"reading must be 'outputs' or 'probs', got {reading!r}")
        if step != "last" and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ConfigError(f"step must be 'last' or a call index >= 0, got {step!r}")
        if solver not in ("auto", "full", "randomized"):
            raise ConfigError(f"solver must be 'auto', 'full' or 'randomized', got {solver!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        self.n_components = n_components
        self.reading: Reading = reading
        self.step = step
        self.solver: Solver = solver
        self.seed = seed
        # The processor computes per-head outputs only when asked; the "probs" reading does not need them.
        self.wants_outputs = reading == "outputs"
        self._variance: dict[str, torch.Tensor] = {}  # (B, H, k)
        self._total: dict[str, torch.Tensor] = {}  # (B, H)
        self._captured_call: dict[str, int] = {}
        self._calls: dict[str, int] = {}  # completed calls per layer
        self._pending: dict[str, _Pending] = {}
        self._rows: dict[tuple[str, int, int], tuple[torch.Tensor, list[int]]] = {}  # head blocks being gathered
        if reading == "probs":
            # A head's (N, N) probabilities are reduced at once, and a block of query rows may span all heads of a
            # layer: gathering rows would hold every head's map. The processor sends whole heads to sinks whose
            # add_chunk takes no `queries`, so this instance exposes one without it.
            self.add_chunk = self._add_whole_heads  # type: ignore[method-assign]

    # -- write side --------------------------------------------------------------------------------------------------
    def memory_items(
        self, layers: Mapping[str, LayerInfo], *, batch: int = 1, text_tokens: int = 0
    ) -> list[MemoryItem]:
        """The store's tensors for a capture of ``layers``, from shapes (see ``AttentionStore.memory_items``).

        Kept: ``(B, H, k, N)`` component maps and ``(B, H, k)`` variances per layer. Per call (transient): the
        pending components of the call, the gathered rows of a head block (``reading="outputs"``, at most all heads,
        float32) and the PCA of one head (about three float64 copies of its ``(N, F)`` data with the exact solver,
        one float32 copy with the randomized one).
        """
        from attnseg.capture.memory import MemoryItem, key_tokens, nbytes

        b = self.kept_batch(batch)
        dev = str(self.device)
        k = self.n_components
        items: list[MemoryItem] = []
        for info in layers.values():
            n = info.num_tokens
            comps = nbytes((b, info.heads, k, n), self.dtype) + nbytes((b, info.heads, k)) + nbytes((b, info.heads))
            items.append(MemoryItem(f"the principal components of {info.name}", comps, "kept", dev))
            f = info.head_dim if self.reading == "outputs" else key_tokens(info, text_tokens)
            per_call = comps
            if self.reading == "outputs":
                per_call += nbytes((b, info.heads, n, f))
            full = self.solver == "full" or (self.solver == "auto" and min(n, f) <= FULL_SVD_MAX_DIM)
            per_call += 3 * nbytes((n, f), torch.float64) if full else nbytes((n, f))
            items.append(MemoryItem(f"the PCA working set of one call of {info.name}", per_call, "capture", dev,
                                    info.name))
        return items

    def item(self, index: int) -> PCAHeadStore:
        """Batch item ``index`` only, as views (see ``AttentionStore.item``)."""
        new = super().item(index)
        assert isinstance(new, PCAHeadStore)
        new._variance = {name: v[index : index + 1] for name, v in self._variance.items()}
        new._total = {name: v[index : index + 1] for name, v in self._total.items()}
        new._captured_call = dict(self._captured_call)
        return new

    def key(self, layer: LayerInfo) -> str:
        """One entry per layer: its module name."""
        return layer.name

    def _wanted(self, call: int) -> bool:
        return self.step == "last" or call == self.step

    def add_chunk(
        self,
        layer: LayerInfo,
        probs: torch.Tensor,
        heads: slice,
        out: torch.Tensor | None = None,
        queries: slice | None = None,
    ) -> None:
        """Reduce heads ``heads`` of the current call of ``layer`` by PCA once all their query rows are in.

        With ``reading="outputs"`` the processor sends blocks of query rows (cache-sized blocks are faster on
        the CPU); their ``(q, d)`` output rows are gathered per head block, ``(B, h, N, d)``, and reduced when
        the block is complete. With ``reading="probs"`` the processor sends whole heads (see ``__init__``),
        as a head's ``(N, N)`` probabilities are needed at once.

        Args:
            probs: ``(B, h, q, K)`` float32 probabilities (read with ``reading="probs"``).
            heads: which of the layer's heads these are.
            out: ``(B, h, q, d)`` per-head outputs ``probs @ v`` (read with ``reading="outputs"``).
            queries: which query rows these are (None: all N).
        """
        call = self._calls.get(layer.name, 0)
        if not self._wanted(call):
            return
        data = probs if self.reading == "probs" else out
        if data is None:
            raise AttnSegError(
                f"PCAHeadStore(reading='outputs') got no per-head outputs for {layer.name}: trace with "
                "want_outputs=True (AttentionTracer does so by default for this store), or use reading='probs'"
            )
        if self.batch is not None:
            data = data[self.batch]
        if data.ndim != 4:
            raise AttnSegError(f"attention data of {layer.name} must be (B, h, Q, F), got {tuple(data.shape)}")
        b, h, q, f = (int(s) for s in data.shape)
        n = layer.num_tokens
        if b == 0:
            raise AttnSegError(f"the store's batch slice {self.batch} selects no item of {layer.name}'s batch")
        start = heads.start or 0
        if start + h > layer.heads:
            raise AttnSegError(f"heads {start}..{start + h} exceed the {layer.heads} heads of {layer.name}")
        k = self.n_components
        if k > min(n, f):
            raise AttnSegError(
                f"n_components={k} exceeds min(N, F) = {min(n, f)} for {layer.name} ({self.reading} reading, "
                f"{n} tokens x {f} features); lower n_components"
            )
        rows = slice(*(slice(None) if queries is None else queries).indices(n))
        if rows.stop - rows.start != q or rows.step != 1:
            raise AttnSegError(f"{layer.name}: query rows {queries} do not match the {q} rows received")
        if q == n:
            self._reduce(layer, data, start)
            return
        key = (layer.name, start, start + h)
        block = self._rows.get(key)
        if block is None:
            block = self._rows[key] = (torch.empty(b, h, n, f, dtype=data.dtype, device=data.device), [0])
        block[0][:, :, rows] = data
        block[1][0] += q
        if block[1][0] >= n:
            del self._rows[key]
            self._reduce(layer, block[0], start)

    def _reduce(self, layer: LayerInfo, data: torch.Tensor, start: int) -> None:
        """PCA of complete heads ``data (B, h, N, F)``, heads ``start..start+h`` of ``layer``."""
        b, h, n, _ = (int(s) for s in data.shape)
        k = self.n_components
        pending = self._pending.get(layer.name)
        if pending is None or tuple(pending.components.shape) != (b, layer.heads, k, n):
            pending = self._pending[layer.name] = _Pending(
                components=torch.zeros(b, layer.heads, k, n, dtype=self.dtype, device=self.device),
                variance=torch.zeros(b, layer.heads, k, dtype=torch.float32, device=self.device),
                total=torch.zeros(b, layer.heads, dtype=torch.float32, device=self.device),
                done=torch.zeros(layer.heads, dtype=torch.bool),
            )
        for bi in range(b):
            for j in range(h):
                res = head_pca(data[bi, j].detach(), k, solver=self.solver, seed=self.seed)
                pending.components[bi, start + j] = res.components.to(self.device, self.dtype)
                pending.variance[bi, start + j] = res.explained_variance.to(self.device)
                pending.total[bi, start + j] = res.total_variance.to(self.device)
        pending.done[start : start + h] = True

    def _add_whole_heads(
        self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None = None
    ) -> None:
        """:meth:`add_chunk` without ``queries``: the processor then sends whole heads."""
        PCAHeadStore.add_chunk(self, layer, probs, heads, out)

    def end_call(self, layer: LayerInfo) -> None:
        """Close one call of ``layer``: a complete call that was kept replaces the layer's previous one."""
        call = self._calls.get(layer.name, 0)
        self._calls[layer.name] = call + 1
        pending = self._pending.pop(layer.name, None)
        stale = [key for key in self._rows if key[0] == layer.name]
        for key in stale:
            del self._rows[key]
        if stale:
            raise AttnSegError(f"call {call} of {layer.name} ended with query rows missing for heads {stale[0][1:]}")
        if pending is None:
            return
        if not bool(pending.done.all()):
            missing = (~pending.done).nonzero().flatten().tolist()
            raise AttnSegError(f"call {call} of {layer.name} ended without heads {missing}")
        self._entries[layer.name] = _Entry(
            kind=layer.kind, grid=layer.grid, layers=[layer.name], sum=pending.components, count=1
        )
        self._variance[layer.name] = pending.variance
        self._total[layer.name] = pending.total
        self._captured_call[layer.name] = call
        self.layers[layer.name] = layer

    def add(self, layer: LayerInfo, probs: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Add a whole call at once: ``probs (B, H, Q, K)`` and, for ``reading="outputs"``, ``out (B, H, Q, d)``."""
        if probs.ndim != 4 or probs.shape[1] != layer.heads:
            raise ConfigError(f"probs must be (B, {layer.heads}, Q, K) for {layer.name}, got {tuple(probs.shape)}")
        self.add_chunk(layer, probs.float(), slice(0, layer.heads), out)
        self.end_call(layer)

    # -- read side ---------------------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None or entry.sum is None:
            stored = ", ".join(self._entries) or "none"
            raise AttnSegError(f"no principal components stored for {name!r}; stored: {stored}")
        return entry

    def components(self, name: str, batch_index: int | None = 0) -> torch.Tensor:
        """Principal-component maps of layer ``name``: ``(H, k, h, w)`` float32 for one batch item, or
        ``(B, H, k, h, w)`` when ``batch_index`` is None (``(h, w)`` is the layer's grid)."""
        entry = self._entry(name)
        assert entry.sum is not None
        h, w = entry.grid
        maps = entry.sum.float().reshape(*entry.sum.shape[:-1], h, w)
        return maps if batch_index is None else maps[batch_index]

    def explained_variance(self, name: str, batch_index: int | None = 0) -> torch.Tensor:
        """``(H, k)`` (or ``(B, H, k)``) variance along each kept principal axis."""
        self._entry(name)
        v = self._variance[name]
        return v if batch_index is None else v[batch_index]

    def explained_variance_ratio(self, name: str, batch_index: int | None = 0) -> torch.Tensor:
        """``(H, k)`` (or ``(B, H, k)``) share of each head's total variance per kept component."""
        self._entry(name)
        ratio = self._variance[name] / self._total[name][..., None].clamp_min(torch.finfo(torch.float32).tiny)
        return ratio if batch_index is None else ratio[batch_index]

    def captured_call(self, name: str) -> int:
        """The 0-based index of the call whose components are kept for layer ``name``."""
        self._entry(name)
        return self._captured_call[name]

    @property
    def batch_size(self) -> int:
        """Batch items kept per layer (0 when empty)."""
        for e in self._entries.values():
            if e.sum is not None:
                return int(e.sum.shape[0])
        return 0

    def by_resolution(self, kind: str, batch_index: int | None = 0) -> dict[int, torch.Tensor]:
        raise AttnSegError(
            "PCAHeadStore keeps per-head principal components, not attention maps; read them with "
            "components(layer) (methods that need maps must use an AttentionStore)"
        )

    def nbytes(self) -> int:
        """Bytes held by the kept tensors (component maps, variances)."""
        extra = sum(t.numel() * t.element_size() for t in (*self._variance.values(), *self._total.values()))
        return super().nbytes() + extra

    def full_map_nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes that the kept layers' per-head ``(N, N)`` maps (all kept batch items) would take in ``dtype``."""
        size = torch.finfo(dtype).bits // 8
        total = 0
        for e in self._entries.values():
            if e.sum is not None:
                b, heads, _, n = e.sum.shape
                total += b * heads * n * n * size
        return total

    def clear(self) -> None:
        super().clear()
        self._variance.clear()
        self._total.clear()
        self._captured_call.clear()
        self._calls.clear()
        self._pending.clear()
        self._rows.clear()

    # -- persistence -------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self._entries.items():
            if e.sum is None:
                continue
            tensors[name] = e.sum.contiguous()
            tensors[f"variance:{name}"] = self._variance[name].contiguous()
            tensors[f"total_variance:{name}"] = self._total[name].contiguous()
        tensors.update({f"feature:{name}": v.contiguous() for name, v in self.features.items()})
        return tensors

    def _header(self) -> dict[str, Any]:
        # the base store's keys stay, so that its readers see a per-layer, all-heads store
        header = super()._header()
        header.update(
            format=_FORMAT,
            version=_FORMAT_VERSION,
            n_components=self.n_components,
            reading=self.reading,
            step=self.step,
            solver=self.solver,
            seed=self.seed,
            entries={
                name: {
                    "kind": e.kind, "grid": list(e.grid), "layers": e.layers, "count": e.count,
                    "call": self._captured_call.get(name, 0),
                }
                for name, e in self._entries.items()
                if e.sum is not None
            },
        )
        return header

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> PCAHeadStore:
        """Read a store written by :meth:`save`."""
        from attnseg.capture.store import header_fields, read_store_file, store_dtype

        path = Path(path)
        header, tensors = read_store_file(path, device=device)
        if header.get("format") != _FORMAT:
            raise AttnSegError(
                f"{path} holds a {header.get('format', 'attnseg.AttentionStore')}, not per-head principal "
                "components; read it with AttentionStore.load"
            )
        with header_fields(path):
            store = cls(
                n_components=int(header["n_components"]),
                reading=header["reading"],
                step=header["step"],
                solver=header.get("solver", "auto"),
                seed=int(header.get("seed", 0)),
                dtype=store_dtype(path, header["dtype"]),
                device=device,
                meta=header.get("meta", {}),
            )
            store.layers = {n: LayerInfo.from_dict(d) for n, d in header["layers"].items()}
            for name, count in header.get("features", {}).items():
                store.features[name] = tensors[f"feature:{name}"]
                store._feature_counts[name] = int(count)
            for name, d in header["entries"].items():
                store._entries[name] = _Entry(
                    kind=d["kind"], grid=(int(d["grid"][0]), int(d["grid"][1])), layers=list(d["layers"]),
                    sum=tensors[name], count=int(d["count"]),
                )
                store._variance[name] = tensors[f"variance:{name}"]
                store._total[name] = tensors[f"total_variance:{name}"]
                store._captured_call[name] = int(d.get("call", 0))
        return store

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}:{tuple(e.sum.shape) if e.sum is not None else None}" for k, e in self._entries.items()
        )
        opts = f"n_components={self.n_components}, reading={self.reading!r}, step={self.step!r}"
        return f"PCAHeadStore({opts}, [{parts}])"
