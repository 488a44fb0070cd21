"""Capture processor for joint attention (MMDiT): one softmax over image and text tokens.

Flux's double-stream blocks and SD3's blocks project image and text tokens separately and attend over
their concatenation; Flux's single-stream blocks receive the concatenation itself. The layer description
(:class:`~attnseg.types.LayerInfo`: ``layout``, ``joined``, ``grid``, ``head_dim``) says which tokens are
where, so this processor never looks at the model family.

Probabilities are computed in blocks of (heads, query rows), each block's softmax running over the **whole**
joint key set as the model computes it (RoPE applied with diffusers' own ``apply_rotary_emb``, after the
q/k norms and before ``q k^T``). Each block is cut into the parts the sink asked for and handed over at once:

- ``image->image`` (``kind="self"``): image queries x image keys;
- ``image->text`` (``kind="cross"``): image queries x text keys;
- ``text->image`` (``kind="reverse"``): text queries x image keys.

Rows of a part do not sum to 1 (the other key group holds the rest of the mass). With per-head outputs, a part
receives the rows' full outputs ``probs @ v`` over all keys: what the output projection sees.

Modes, as :class:`~attnseg.capture.processor.CaptureProcessor`:

- ``"reuse"``: the block's probabilities also give the output (``probs @ v``), projected and split as the
  module's default processor does (image and text outputs, text first or image first per ``layout``); equal to
  the fused output up to floating-point rounding. The processor implements the joint contract itself (it
  returns ``(image, text)`` when the module was given text), which diffusers' SD3 blocks need.
- ``"beside"``: the module's original processor computes the output (bit-identical) and the probabilities are
  computed beside it. Used whatever is asked when the original processor is not one of diffusers' defaults.

Supported diffusers: 0.35 (``FluxAttention``, ``[B, S, H, D]`` heads) and later; tested against the installed
version.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnseg.capture.processor import block_plan
from attnseg.errors import AttnSegError

if TYPE_CHECKING:
    from attnseg.capture.processor import AttentionSink
    from attnseg.types import LayerInfo

__all__ = ["JOINT_PROCESSORS", "JointCaptureProcessor"]

#: diffusers' default processors whose contract this processor reproduces in "reuse" mode.
JOINT_PROCESSORS = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "JointAttnProcessor2_0"})
_HALF = (torch.float16, torch.bfloat16)
_IMAGE_PARTS = ("image->image", "image->text")


class JointCaptureProcessor:
    """Replaces the processor of one joint-attention module while a tracer is active.

    Args:
        original: the module's processor before capture (restored by the tracer; called in ``"beside"`` mode).
        layer: the module's description: ``kind="joint"`` (with ``layout``, ``joined``), or ``kind="self"`` for
            an image-only module run by a joint-contract processor (SD3.5's second attention).
        parts: the parts to capture, ``{"image->image" | "image->text" | "text->image": part description}``;
            for an image-only module, ``{"image->image": layer}``.
        sink: receives ``add_chunk(part, probs (B, h, q, K), heads, out, queries=...)`` and ``end_call(part)``.
        mode: ``"reuse"`` or ``"beside"`` (see the module docstring).
        chunk_bytes: bound on one block of float32 probabilities (rows over the whole joint key set); None:
            4 MiB on the CPU, 256 MiB on accelerators (:func:`~attnseg.capture.processor.block_plan`, as
            :class:`~attnseg.capture.processor.CaptureProcessor`).
        want_outputs: also pass each block's per-head outputs ``(B, h, q, d)`` to the sink.
    """

    def __init__(
        self,
        original: Any,
        layer: LayerInfo,
        parts: Mapping[str, LayerInfo],
        sink: AttentionSink,
        *,
        mode: Literal["reuse", "beside"] = "reuse",
        chunk_bytes: int | None = None,
        want_outputs: bool = False,
    ) -> None:
        unknown = set(parts) - {"image->image", "image->text", "text->image"}
        if unknown:
            raise AttnSegError(f"{layer.name}: unknown parts {sorted(unknown)}")
        if layer.kind != "joint" and set(parts) - {"image->image"}:
            raise AttnSegError(f"{layer.name} is a {layer.kind} layer: only its image->image part exists")
        self.original = original
        self.layer = layer
        self.parts = dict(parts)
        self.sink = sink
        self.mode = mode if type(original).__name__ in JOINT_PROCESSORS else "beside"
        self.chunk_bytes = chunk_bytes
        self.want_outputs = want_outputs
        self._split_queries = "queries" in inspect.signature(sink.add_chunk).parameters

    # Keyword names are declared explicitly: attention modules pass on only the keywords a processor's
    # signature names (IP-adapter inputs reach the original processor in "beside" mode).
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: Any = None,
        ip_adapter_masks: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.mode == "beside":
            extra = {k: v for k, v in (("ip_hidden_states", ip_hidden_states), ("ip_adapter_masks", ip_adapter_masks))
                     if v is not None}
            output = self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra, **kwargs
            )
            q, k, v, image, text = self._project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            self._attend(q, k, v, attention_mask, image, text, compute_output=self.want_outputs)
            return output

        q, k, v, image, text = self._project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self._attend(q, k, v, attention_mask, image, text, compute_output=True)
        assert out is not None
        b, h, s, d = out.shape
        hidden = out.transpose(1, 2).reshape(b, s, h * d).to(q.dtype)
        if encoder_hidden_states is None:
            # one stream: an image-only module projects its output, a joined (single-stream) one returns it as is
            to_out = getattr(attn, "to_out", None)
            if to_out is not None and not self.layer.joined:
                hidden = to_out[1](to_out[0](hidden))
            return hidden
        image_out = hidden[:, image[0] : image[1]]
        text_out = hidden[:, text[0] : text[1]]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    # -- projections: the default processors' steps, through the module's own sub-modules ---------------------------
    def _project(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_rotary_emb: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """``q, k, v (B, H, S, d)`` in the joint order, the image span and the text span of the sequence."""
        info = self.layer
        d = info.head_dim
        n = info.num_tokens
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (-1, d)) for x in (query, key, value))  # (B, S, H, d)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        length = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            if length != n:
                self._wrong_grid(length)
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (x.unflatten(-1, (-1, d)) for x in (eq, ek, ev))
            if getattr(attn, "norm_added_q", None) is not None:
                eq = attn.norm_added_q(eq)
            if getattr(attn, "norm_added_k", None) is not None:
                ek = attn.norm_added_k(ek)
            t = encoder_hidden_states.shape[1]
            text_first = info.layout.index("text") < info.layout.index("image")
            pairs = ((eq, query), (ek, key), (ev, value)) if text_first else ((query, eq), (key, ek), (value, ev))
            query, key, value = (torch.cat(p, dim=1) for p in pairs)
            image = (t, t + n) if text_first else (0, n)
            text = (0, t) if text_first else (n, n + t)
        elif info.joined:
            if length <= n:
                self._wrong_grid(length)
            image = info.image_span(length)
            text = (0, image[0]) if image[0] > 0 else (image[1], length)
        else:
            if length != n:
                self._wrong_grid(length)
            image, text = (0, n), (n, n)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), image, text

    def _wrong_grid(self, length: int) -> None:
        g = self.layer.grid
        raise AttnSegError(
            f"attention layer {self.layer.name} saw {length} tokens, which do not fit its {g[0]}x{g[1]} image grid; "
            "prepare the tracer for this input size"
        )

    # -- probabilities -----------------------------------------------------------------------------------------------
    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        image: tuple[int, int],
        text: tuple[int, int],
        *,
        compute_output: bool,
    ) -> torch.Tensor | None:
        """Blocks of joint probabilities ``(B, h, q, S)`` -> parts -> sink; returns ``(B, H, S, d)`` outputs if
        asked."""
        b, h, s, d = q.shape
        scale = 1.0 / math.sqrt(d)
        bias = _additive_mask(mask, s)
        out_dtype = v.dtype
        # Scores and softmax in float32 whatever the model's dtype (as CaptureProcessor and the fused kernels), so
        # the parts carry no half-precision rounding; the output probs @ v is computed in the model's dtype.
        upcast = q.dtype in _HALF
        # Heads arrive as transposed views of (B, S, H, d); blocks of contiguous (B, H, S, d) are several times
        # faster to multiply (measured on the CPU in bfloat16).
        q = ((q.float() if upcast else q) * scale).contiguous()
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty(v.shape, dtype=out_dtype, device=v.device) if compute_output else None
        want_text_rows = compute_output or "text->image" in self.parts
        groups: list[tuple[str, tuple[int, int]]] = [("image", image)]
        if want_text_rows and text[1] > text[0]:
            groups.append(("text", text))
        for group, (r0, r1) in groups:
            head_step, q_step = block_plan(
                b, h, r1 - r0, s, chunk_bytes=self.chunk_bytes, device_type=q.device.type,
                split_queries=self._split_queries,
            )
            targets = self._targets(group, image, text)
            for h0 in range(0, h, head_step):
                hs = slice(h0, min(h, h0 + head_step))
                kc = k[:, hs]
                kt = (kc.float() if upcast else kc).transpose(-1, -2)
                vc = v[:, hs]
                for q0 in range(r0, r1, q_step):
                    qs = slice(q0, min(r1, q0 + q_step))
                    scores = torch.matmul(q[:, hs, qs], kt).float()
                    if bias is not None:
                        scores += _rows(bias, hs, qs, s)
                    probs = scores.softmax(dim=-1)
                    del scores
                    chunk_out = None
                    if compute_output or (self.want_outputs and targets):
                        chunk_out = torch.matmul(probs.to(vc.dtype), vc)
                        if out is not None:
                            out[:, hs, qs] = chunk_out.to(out_dtype)
                    rel = slice(q0 - r0, qs.stop - r0)
                    for part, (c0, c1) in targets:
                        piece = probs[..., c0:c1]
                        given = chunk_out if self.want_outputs else None
                        if self._split_queries:
                            self.sink.add_chunk(part, piece, hs, given, queries=rel)
                        else:
                            self.sink.add_chunk(part, piece, hs, given)
                    del probs
        for part in self.parts.values():
            self.sink.end_call(part)
        return out

    def _targets(
        self, group: str, image: tuple[int, int], text: tuple[int, int]
    ) -> list[tuple[LayerInfo, tuple[int, int]]]:
        """The parts fed by one group of query rows, with their key columns."""
        if group == "image":
            cols = {"image->image": image, "image->text": text}
            return [(self.parts[p], cols[p]) for p in _IMAGE_PARTS if p in self.parts]
        return [(self.parts["text->image"], image)] if "text->image" in self.parts else []


def _additive_mask(mask: torch.Tensor | None, s: int) -> torch.Tensor | None:
    """An attention mask as an additive float bias broadcastable to ``(B, H, S, S)``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -math.inf)
    mask = mask.float()
    if mask.ndim == 2:  # (B, S) over keys
        return mask[:, None, None, :]
    if mask.ndim == 3:  # (B, Q, S)
        return mask[:, None]
    return mask


def _rows(bias: torch.Tensor, hs: slice, qs: slice, s: int) -> torch.Tensor:
    out = bias[:, hs] if bias.shape[1] > 1 else bias
    return out[..., qs, :] if out.shape[-2] == s else out
