"""Literal, loop-based references for attention capture, in float64: the oracle of the store and processor tests.

Deliberately plain: one head, one query row at a time, no chunking, no in-place tricks. Written from the definitions
(``softmax(q k^T * scale)`` per head; the store's running mean over calls of the head mean), not from the code under
test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["attention_literal", "head_mean_literal", "running_mean_literal", "store_mean_literal"]


def head_mean_literal(probs: torch.Tensor) -> torch.Tensor:
    """``(B, H, Q, K) -> (B, Q, K)`` float64 mean over heads, summed head by head."""
    p = probs.detach().to(torch.float64)
    total = torch.zeros(p.shape[0], p.shape[2], p.shape[3], dtype=torch.float64)
    for h in range(p.shape[1]):
        total = total + p[:, h]
    return total / p.shape[1]


def running_mean_literal(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain mean of a list of same-shaped tensors, in float64 (``sum / n``)."""
    total = torch.zeros(values[0].shape, dtype=torch.float64)
    for v in values:
        total = total + v.detach().to(torch.float64)
    return total / len(values)


def store_mean_literal(calls: Sequence[torch.Tensor], heads: str = "mean") -> torch.Tensor:
    """What one store entry must hold after ``calls`` (each ``(B, H, Q, K)``, one call of one layer each):
    the mean over calls of the head mean (``heads="mean"``) or of the per-head maps (``heads="all"``)."""
    reduced = [head_mean_literal(c) if heads == "mean" else c.detach().to(torch.float64) for c in calls]
    return running_mean_literal(reduced)


def attention_literal(
    hidden: torch.Tensor,
    context: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    heads: int,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities ``(B, H, N, M)`` float64 of ``hidden (B, N, C)`` over ``context (B, M, C')``.

    ``q = hidden w_q^T``, ``k = context w_k^T`` (no bias), split into ``heads`` heads of ``d`` channels; each row is
    ``softmax(q_i . k_j * scale + mask_j)`` with ``scale = 1 / sqrt(d)`` unless given, computed one row at a time.
    ``mask`` is an additive ``(B, M)`` bias, or ``(B, N, M)`` with one row per query.
    """
    x = hidden.detach().to(torch.float64)
    c = context.detach().to(torch.float64)
    q_all = x @ w_q.detach().to(torch.float64).T
    k_all = c @ w_k.detach().to(torch.float64).T
    b, n, inner = q_all.shape
    m = k_all.shape[1]
    d = inner // heads
    s = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, heads, n, m, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            q = q_all[bi, :, h * d : (h + 1) * d]
            k = k_all[bi, :, h * d : (h + 1) * d]
            for i in range(n):
                logits = [float((q[i] * k[j]).sum()) * s for j in range(m)]
                if mask is not None:
                    row = mask[bi] if mask.ndim == 2 else mask[bi, i]
                    logits = [v + float(row[j]) for j, v in enumerate(logits)]
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                total = math.fsum(exps)
                out[bi, h, i] = torch.tensor([e / total for e in exps], dtype=torch.float64)
    return out
