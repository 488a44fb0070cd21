"""Capture cost on diffusion-transformer stacks: DiffSeg and GoCA against the plain forward, interleaved.

Stacks (random weights, bfloat16, real widths and token counts):

- ``flux``: ``FluxTransformer2DModel`` with Flux.1's widths (24 heads x 128, T5 width 4096, 512 text tokens) but
  2 double-stream + 2 single-stream blocks (Flux.1 has 19 + 38); image tokens of a 512 px (32x32 = 1024) and a
  1024 px (64x64 = 4096) input.
- ``pixart``: ``PixArtTransformer2DModel`` with PixArt-Sigma's widths (16 heads x 72, 300 masked T5 tokens) and
  2 of its 28 blocks, at 1024 px (4096 image tokens).

Variants per stack and size, run interleaved (plain, diffseg, goca, plain, ...) so drift hits all alike:

- ``plain``: the fused forward (diffusers' default processors).
- ``diffseg``: every image->image part (Flux) / self layer (PixArt) captured into one head- and layer-mean map.
- ``goca``: GoCA's store with the family defaults mapped to the stack (:meth:`method_defaults`): Flux averages
  heads, takes its reference feature from the first single-stream block and refines with double block 1's
  image->image part; PixArt weights heads per pixel (per-head outputs), refines with both blocks, order 5.

Times are the forward pass alone (the method's post-processing is reported separately); peak memory is the
largest resident-set size sampled during a run minus the size before it. The results file also holds the memory
estimate from shapes for the full Flux.1 model at 1024 px.

    python benchmarks/transformer_capture.py [--threads 1] [--repeats 2] [--repeats-1024 1]

Writes benchmarks/results/transformer_capture.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from capture_overhead import PeakSampler  # same folder: run as python benchmarks/<script>.py

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.methods.diffseg import DiffSeg
from attnseg.methods.goca import GoCA
from attnseg.models.dit import scale_block_names
from attnseg.models.flux import FluxAdapter, flux_attention_layers, image_ids
from attnseg.models.pixart import PixArtAdapter, pixart_attention_layers
from attnseg.presets import resolve_settings, table_defaults
from attnseg.prompts import tokenize
from attnseg.testing import t5_tokenizer
from attnseg.types import LayerInfo, Prompt

RESULTS = Path(__file__).parent / "results"
DTYPE = torch.bfloat16
MiB = 2**20


def random_init(model: torch.nn.Module) -> torch.nn.Module:
    """Materialise a meta-device model on the CPU with N(0, 0.02) weights (far faster than the default init)."""
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    return model.eval().requires_grad_(False)


class StackOnly:
    """The part of an adapter that the methods' stores and layer choices read (no VAE, no text encoder)."""

    def __init__(self, family: str, denoiser: torch.nn.Module, size: int, layers_fn: Any, token_px: int,
                 text: int, adapter_cls: Any) -> None:
        self.family = family
        self.denoiser = denoiser
        self.resolution = (size, size)
        self.latent_scale = 8
        self._layers_fn, self._token_px, self._text = layers_fn, token_px, text
        self._cls = adapter_cls

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        h, w = size or self.resolution
        return self._layers_fn(self.denoiser, (h // self._token_px, w // self._token_px), self._text)

    def method_defaults(self, method: str, *, variant: str | None = None) -> dict[str, Any]:
        """The family's settings mapped to the stack's depth, as ``TransformerAdapter.method_defaults``."""
        rec = table_defaults(self._cls.recommended, method, variant=variant)
        depth = {c: len(getattr(self.denoiser, c)) for c in self._cls.reference_depth if hasattr(self.denoiser, c)}
        return scale_block_names(rec, depth, self._cls.reference_depth)


def build(family: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    with torch.device("meta"):
        if family == "flux":  # Flux.1 widths (the class defaults), 2 + 2 blocks
            model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
        else:  # PixArt-Sigma widths, 2 blocks
            model = PixArtTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
                cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                use_additional_conditions=False, interpolation_scale=2,
            )
    return random_init(model.to(DTYPE))


def run_case(
    family: str, model: torch.nn.Module, size: int, repeats: int, tok: Any, *, warmup: bool = True
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        text = 512
        stack = StackOnly("flux", model, size, flux_attention_layers, 16, text, FluxAdapter)
        grid = (size // 16, size // 16)
        x = torch.randn(1, grid[0] * grid[1], 64, generator=g).to(DTYPE)
        emb = torch.randn(1, text, 4096, generator=g).to(DTYPE)
        pooled = torch.randn(1, 768, generator=g).to(DTYPE)
        ids, txt = image_ids(grid, torch.device("cpu"), DTYPE), torch.zeros(text, 3, dtype=DTYPE)

        def forward() -> torch.Tensor:
            return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                         timestep=torch.tensor([0.4], dtype=DTYPE), img_ids=ids, txt_ids=txt,
                         guidance=torch.tensor([1.0])).sample
    else:
        text = 300
        stack = StackOnly("pixart", model, size, pixart_attention_layers, 16, text, PixArtAdapter)
        x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(DTYPE)
        emb = torch.randn(1, text, 4096, generator=g).to(DTYPE)
        mask = torch.zeros(1, text, dtype=torch.long)
        mask[:, :8] = 1

        def forward() -> torch.Tensor:
            return model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([100]),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    layers = stack.attention_layers()
    enc = tokenize(tok, "cat, grass, wall", text)
    prompt = Prompt(text="cat, grass, wall", embeddings=emb, **enc.fields())
    meta = {"image_size": [size, size]}
    diffseg = DiffSeg(num_anchors=16)
    ds_layers = diffseg.select_layers(layers)
    goca = GoCA(**resolve_settings("goca", stack, params={"classes": "cat, grass, wall"}).params)
    goca_layers = goca.select_layers(layers)
    goca_features = goca.features(stack)  # type: ignore[arg-type]

    def plain() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        out = forward()
        return out, time.perf_counter() - start, 0.0, {}

    def run_diffseg() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        store = AttentionStore(heads="mean", group="resolution", meta=dict(meta))
        with AttentionTracer(model, store, layers={n: layers[n] for n in ds_layers}):
            out = forward()
        mid = time.perf_counter()
        result = diffseg.segment(store)
        return out, mid - start, time.perf_counter() - mid, {
            "store_mb": round(store.nbytes() / MiB, 1), "captured_layers": len(ds_layers),
            "segments": result.num_segments,
        }

    def run_goca() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        store = goca.make_store(stack, {n: layers[n] for n in goca_layers}, dict(meta))  # type: ignore[arg-type]
        with AttentionTracer(model, store, layers={n: layers[n] for n in goca_layers}, features=goca_features):
            out = forward()
        mid = time.perf_counter()
        result = goca.segment(store, prompt=prompt)
        return out, mid - start, time.perf_counter() - mid, {
            "store_mb": round(store.nbytes() / MiB, 1), "captured_layers": len(goca_layers),
            "labels": sorted(result.labels.unique().tolist()),
        }

    runs = {"plain": plain, "diffseg": run_diffseg, "goca": run_goca}
    with torch.no_grad():
        reference = forward() if warmup else None  # warm-up (skipped where one forward takes minutes)
        fwd: dict[str, list[float]] = {k: [] for k in runs}
        post: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[int]] = {k: [] for k in runs}
        diffs: dict[str, float] = {}
        infos: dict[str, dict[str, Any]] = {}
        for _ in range(repeats):
            for name, fn in runs.items():
                gc.collect()
                with PeakSampler() as sampler:
                    out, f, p, info = fn()
                fwd[name].append(f)
                post[name].append(p)
                peaks[name].append(sampler.delta)
                if reference is None:
                    reference = out
                diffs[name] = float((out.float() - reference.float()).abs().max())
                infos[name] = info
                del out
    base_t, base_m = statistics.median(fwd["plain"]), statistics.median(peaks["plain"])
    rows = {}
    for name in runs:
        f = statistics.median(fwd[name])
        rows[name] = {
            "forward_seconds_median": round(f, 2), "forward_seconds_all": [round(v, 2) for v in fwd[name]],
            "segment_seconds_median": round(statistics.median(post[name]), 2),
            "forward_ratio_vs_plain": round(f / base_t, 3),
            "peak_rss_delta_mb": round(statistics.median(peaks[name]) / MiB, 1),
            "extra_peak_vs_plain_mb": round((statistics.median(peaks[name]) - base_m) / MiB, 1),
            "max_abs_output_diff_vs_plain": diffs[name], **infos[name],
        }
    n_img = layers[next(iter(layers))].num_tokens
    return {"family": family, "size": size, "image_tokens": n_img, "text_tokens": text, "repeats": repeats,
            "goca": repr(goca), "results": rows}


def full_flux_estimate(size: int = 1024) -> dict[str, Any]:
    """Memory kept or held by capture for the full Flux.1 (19 + 38 blocks) at ``size`` px, from shapes (float32)."""
    n, t, heads, d, layers = (size // 16) ** 2, 512, 24, 128, 57
    f4 = 4
    probs_block_cpu, probs_block_gpu = 4 * MiB, 256 * MiB  # CaptureProcessor/JointCaptureProcessor defaults
    full_layer = heads * (n + t) ** 2 * f4
    est = {
        "one_full_attention_tensor_mb": round(full_layer / MiB),  # what is never materialised
        "probability_block_mb": {"cpu": probs_block_cpu // MiB, "accelerator": probs_block_gpu // MiB},
        "diffseg_store_mb": round(n * n * f4 / MiB),  # one (N, N) mean over all 57 image->image parts
        "goca_cross_maps_mb": round(layers * n * t * f4 / MiB),  # one (N, T) head-averaged map per layer
        "goca_refine_affinity_mb": round(n * n * f4 / MiB),  # mean of blocks 12 and 18, at the map grid
        "goca_pending_self_map_mb": round(n * n * f4 / MiB),  # the head mean of the layer being captured
        "goca_reference_feature_mb": round(n * heads * d * f4 / MiB),
        "goca_layer_weight_self_maps_mb": round(layers * n * n * f4 / MiB),  # G2: one (N_r, N_r) map per layer
    }
    goca_total = (est["goca_cross_maps_mb"] + est["goca_refine_affinity_mb"] + est["goca_pending_self_map_mb"]
                  + est["goca_reference_feature_mb"] + est["goca_layer_weight_self_maps_mb"])
    vanilla = 3 * n * t * f4 / MiB + est["goca_refine_affinity_mb"] + est["goca_pending_self_map_mb"]
    est["goca_defaults_total_mb"] = round(goca_total)
    est["goca_vanilla_total_mb"] = round(vanilla)  # uniform layer weights, blocks 8/28/47: no G2 maps
    return est


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats below 1024 px")
    parser.add_argument("--repeats-1024", type=int, default=1, help="interleaved repeats at 1024 px (slow on a CPU)")
    parser.add_argument("--stacks", nargs="+", default=["flux", "pixart"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = t5_tokenizer(512)
    cases = []
    for family in args.stacks:
        t0 = time.perf_counter()
        model = build(family)
        print(f"{family}: built in {time.perf_counter() - t0:.0f} s", flush=True)
        for size in ((512, 1024) if family == "flux" else (1024,)):
            reps = args.repeats_1024 if size >= 1024 else args.repeats
            case = run_case(family, model, size, reps, tok, warmup=size < 1024 or family != "flux")
            cases.append(case)
            for name, r in case["results"].items():
                print(f"{family:6s} {size:5d} {name:8s} fwd {r['forward_seconds_median']:7.2f} s  "
                      f"x{r['forward_ratio_vs_plain']:.3f}  peak {r['peak_rss_delta_mb']:8.1f} MB  "
                      f"extra {r['extra_peak_vs_plain_mb']:8.1f} MB  segment {r['segment_seconds_median']:.2f} s",
                      flush=True)
        del model
        gc.collect()
    result = {
        "benchmark": "transformer_capture",
        "dtype": "bfloat16 (model and capture inputs; probabilities float32)",
        "stacks": {
            "flux": "FluxTransformer2DModel, Flux.1 widths (24 heads x 128, 3072, T5 4096, 512 text tokens), "
                    "2 double-stream + 2 single-stream blocks, random N(0, 0.02) weights, guidance embedding",
            "pixart": "PixArtTransformer2DModel, PixArt-Sigma widths (16 heads x 72, 1152, 300 masked T5 tokens), "
                      "2 blocks, random N(0, 0.02) weights",
        },
        "capture_mode": "reuse",
        "threads": args.threads,
        "note": (f"{args.repeats} interleaved repeat(s) below 1024 px and {args.repeats_1024} at 1024 px on this "
                 "2-core CPU, one thread (a 1024 px Flux-shaped forward takes minutes here); medians over the "
                 "repeats; a warm-up forward before each case except Flux at 1024 px. Ratios divide by the plain "
                 "forward's median in the same run. Single runs on a shared machine: read ratios to about +-5%."),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "full_flux1_estimate_1024px": full_flux_estimate(),
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "transformer_capture.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
