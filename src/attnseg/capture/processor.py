"""Capture processors: attention processors that also hand the attention probabilities to a sink.

A :class:`CaptureProcessor` replaces the processor of one selected ``Attention`` module while a
tracer is active. Two modes:

- ``"reuse"`` (default): the probabilities are computed explicitly, in chunks of heads, handed to
  the sink, and reused for the output (``probs @ v``): one attention computation, like the fused
  path. The output equals the fused processor's up to floating-point rounding.
- ``"beside"``: the original processor computes the output (bit-identical to the plain model) and the
  probabilities are computed beside it: attention is computed twice.

Modules whose original processor is not one of diffusers' plain processors always use ``"beside"``,
so adapters such as IP-Adapter or LoRA processors keep their own output.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from attnseg.errors import AttnSegError

if TYPE_CHECKING:
    from attnseg.types import LayerInfo

__all__ = ["AttentionSink", "CaptureProcessor", "block_plan"]

_PLAIN_PROCESSORS = {"AttnProcessor", "AttnProcessor2_0"}
_CPU_BLOCK = 4 * 2**20
_DEVICE_BLOCK = 256 * 2**20
_HALF = (torch.float16, torch.bfloat16)


def block_plan(
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    *,
    chunk_bytes: int | None = None,
    device_type: str = "cpu",
    split_queries: bool = True,
) -> tuple[int, int]:
    """``(heads, query rows)`` of one block of float32 probabilities, as :class:`CaptureProcessor` cuts them.

    A block holds ``batch * heads * rows * keys`` floats, at most ``chunk_bytes`` (default 4 MiB on the CPU,
    256 MiB elsewhere) but never less than one head and 16 query rows (all query rows when the sink takes
    whole heads, ``split_queries=False``). The memory estimate (:mod:`attnseg.capture.memory`) uses the same plan.
    """
    row_bytes = batch * keys * 4  # one query row of one head, float32
    budget = chunk_bytes or (_CPU_BLOCK if device_type == "cpu" else _DEVICE_BLOCK)
    min_rows = min(queries, 16) if split_queries else queries
    head_step = max(1, min(heads, budget // max(row_bytes * min_rows, 1)))
    q_step = max(min_rows, budget // max(row_bytes * head_step, 1)) if split_queries else queries
    return head_step, min(q_step, queries)


class AttentionSink(Protocol):
    """Receives probabilities from capture processors (an :class:`~attnseg.capture.store.AttentionStore`)."""

    def add_chunk(self, layer: LayerInfo, probs: torch.Tensor, heads: slice, out: torch.Tensor | None = None) -> None:
        """``probs (B, h, q, K)``; sinks whose signature has ``queries`` also get ``queries=slice``."""
        ...

    def end_call(self, layer: LayerInfo) -> None:
        ...


class CaptureProcessor:
    """Wraps the original processor of one ``Attention`` module and captures its probabilities.

    Args:
        original: the module's processor before capture (restored by the tracer).
        layer: the layer's description (its grid is checked against the tokens it sees).
        sink: where probability chunks ``(B, h, Q, K)`` float32 go.
        mode: ``"reuse"`` or ``"beside"`` (see the module docstring).
        chunk_bytes: upper bound on one block of float32 probabilities (at least one head and 16
            query rows at a time). None: 4 MiB on the CPU, where blocks that stay in cache are several times
            faster than large ones (measured on a 1 MiB-L2 x86 core), and 256 MiB on accelerators, where
            fewer, larger kernels are faster.
        want_outputs: also pass each chunk's per-head outputs ``probs @ v`` ``(B, h, Q, d)`` to the sink.
    """

    def __init__(
        self,
        original: Any,
        layer: LayerInfo,
        sink: AttentionSink,
        *,
        mode: Literal["reuse", "beside"] = "reuse",
        chunk_bytes: int | None = None,
        want_outputs: bool = False,
    ) -> None:
        self.original = original
        self.layer = layer
        self.sink = sink
        plain = type(original).__name__ in _PLAIN_PROCESSORS
        self.mode = mode if plain else "beside"
        self.chunk_bytes = chunk_bytes
        self.want_outputs = want_outputs
        # Sinks that take a `queries` slice get blocks of query rows; others (e.g. reducers that need
        # every query of a head at once) get whole heads.
        self._split_queries = "queries" in inspect.signature(sink.add_chunk).parameters
        # AttnProcessor2_0 leaves the scale to SDPA's default (1/sqrt(head_dim)); AttnProcessor uses attn.scale.
        self._use_module_scale = type(original).__name__ == "AttnProcessor"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.mode == "beside":
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            q, k, v, mask, _ = self._project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self._attend(attn, q, k, v, mask, compute_output=self.want_outputs)
            return output

        residual = hidden_states
        q, k, v, mask, shape4d = self._project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = self._attend(attn, q, k, v, mask, compute_output=True)
        assert out is not None
        b, h, n, d = out.shape
        hidden = out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)
        hidden = attn.to_out[0](hidden)
        hidden = attn.to_out[1](hidden)
        if shape4d is not None:
            hidden = hidden.transpose(-1, -2).reshape(shape4d)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor

    # The same projections as diffusers' plain processors, through the module's own sub-modules.
    def _project(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size | None]:
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4d = None
        if hidden_states.ndim == 4:
            shape4d = hidden_states.shape
            b, c, hh, ww = shape4d
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if query.shape[2] != self.layer.num_tokens:
            raise AttnSegError(
                f"attention layer {self.layer.name} saw {query.shape[2]} query tokens but was prepared for a "
                f"{self.layer.grid[0]}x{self.layer.grid[1]} grid; prepare the tracer for this input size"
            )
        return query, key, value, attention_mask, shape4d

    def _attend(
        self,
        attn: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        compute_output: bool,
    ) -> torch.Tensor | None:
        """Probabilities in blocks of (heads, query rows) -> sink; returns ``(B, H, Q, d)`` outputs if asked.

        Blocks of query rows keep each block's scores in cache (a flash-attention-like tiling without the
        online softmax: every block sees all keys), which is what makes explicit probabilities affordable.
        Sinks whose ``add_chunk`` takes no ``queries`` argument get whole heads.

        Precision: the scores ``q k^T`` and their softmax are computed in float32 whatever the model's dtype (as a
        fused fp16/bf16 kernel keeps its scores in float32), so the probabilities the sink sees carry no half-
        precision rounding; the output ``probs @ v`` is computed in the model's dtype, as the fused path does.
        """
        b, h, nq, d = q.shape
        nk = k.shape[2]
        scale = attn.scale if self._use_module_scale else 1.0 / math.sqrt(d)
        upcast = bool(getattr(attn, "upcast_attention", False)) or q.dtype in _HALF
        head_step, q_step = block_plan(
            b, h, nq, nk, chunk_bytes=self.chunk_bytes, device_type=q.device.type, split_queries=self._split_queries
        )
        split_queries = self._split_queries
        q = ((q.float() if upcast else q) * scale).contiguous()  # scaling q (N x d) is cheaper than scaling N x N
        # heads arrive as transposed views; contiguous blocks multiply several times faster (CPU, bfloat16)
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty_like(v[..., :1, :].expand(b, h, nq, d)) if compute_output else None
        for h0 in range(0, h, head_step):
            hs = slice(h0, min(h, h0 + head_step))
            kc, vc = k[:, hs], v[:, hs]
            kt = (kc.float() if upcast else kc).transpose(-1, -2)
            mask_h = None if mask is None else (mask[:, hs] if mask.shape[1] == h else mask)
            for q0 in range(0, nq, q_step):
                qs = slice(q0, min(nq, q0 + q_step))
                qc = q[:, hs, qs]
                scores = torch.matmul(qc, kt).float()
                if mask_h is not None:
                    scores += mask_h[..., qs, :] if mask_h.shape[-2] == nq else mask_h
                probs = scores.softmax(dim=-1)
                del scores
                chunk_out = None
                if compute_output:
                    assert out is not None
                    chunk_out = torch.matmul(probs.to(vc.dtype), vc)
                    out[:, hs, qs] = chunk_out
                if split_queries:
                    self.sink.add_chunk(self.layer, probs, hs, chunk_out if self.want_outputs else None, queries=qs)
                else:
                    self.sink.add_chunk(self.layer, probs, hs, chunk_out if self.want_outputs else None)
                del probs
        self.sink.end_call(self.layer)
        return out
