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
  image->image part; PixArt weights heads per pixel (per-head outputs), refines with both blocks, order 5. G2's
  layer scores are computed during the pass (the maps of the layers before the reference feature held in float16
  until it arrives); only the prompt's text columns are kept where head weights are non-negative (Flux).
- ``goca_keep_every_map``: the same store keeping every G2 map at the reference grid (float32) and every text
  column, scored after the pass, as GoCA's store did before: the baseline of the reduction, in the same run.

Times are the forward pass alone (the method's post-processing is reported separately, and with it in
``forward_and_segment_ratio_vs_plain``: GoCA now computes G2's pseudo self-attention during the pass, where it
used to be post-processing); peak memory is the
largest resident-set size sampled during a run (forward pass and segmentation) minus the size before it. The results
file also holds the memory estimate from shapes for the full Flux.1-dev model at 1024 px (:func:`full_flux_estimate`).

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/transformer_capture.py [--threads 1] [--repeats 2] \
        [--repeats-1024 1]

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
    meta = {"image_size": [size, size], "tokens": list(enc.tokens[: enc.length])}  # as the pipeline gives it
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

    def run_goca(keep_every_map: bool = False) -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        store = goca.make_store(stack, {n: layers[n] for n in goca_layers}, dict(meta))  # type: ignore[arg-type]
        if keep_every_map:  # every G2 map at the reference grid and every text column, scored after the pass
            store.reference_feature, store.text_columns = None, None
        with AttentionTracer(model, store, layers={n: layers[n] for n in goca_layers}, features=goca_features):
            out = forward()
        mid = time.perf_counter()
        result = goca.segment(store, prompt=prompt)
        return out, mid - start, time.perf_counter() - mid, {
            "store_mb": round(store.nbytes() / MiB, 1), "captured_layers": len(goca_layers),
            "labels": sorted(result.labels.unique().tolist()),
        }

    runs = {"plain": plain, "diffseg": run_diffseg, "goca": run_goca,
            "goca_keep_every_map": lambda: run_goca(keep_every_map=True)}
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
            "forward_and_segment_ratio_vs_plain": round((f + statistics.median(post[name])) / base_t, 3),
            "peak_rss_delta_mb": round(statistics.median(peaks[name]) / MiB, 1),
            "extra_peak_vs_plain_mb": round((statistics.median(peaks[name]) - base_m) / MiB, 1),
            "max_abs_output_diff_vs_plain": diffs[name], **infos[name],
        }
    n_img = layers[next(iter(layers))].num_tokens
    return {"family": family, "size": size, "image_tokens": n_img, "text_tokens": text, "repeats": repeats,
            "goca": repr(goca), "results": rows}


def full_flux_estimate(size: int = 1024) -> dict[str, Any]:
    """Memory of a capture on the full Flux.1-dev (19 + 38 blocks, the real config on the meta device) at ``size`` px,
    from shapes (:func:`attnseg.capture.memory.estimate_capture`, the estimate the pipeline checks before a run).

    GoCA with the Flux settings and the prompt "cat, grass, wall", as made by ``GoCA.make_store``; beside it the same
    store keeping every G2 map and every text column (``reference_feature=None, text_columns=None``: what GoCA's
    store kept before layer scores were computed during capture), and DiffSeg. Per device type: the capture
    processor's probability blocks are 4 MiB on the CPU and 256 MiB on accelerators.
    """
    from diffusers import FluxTransformer2DModel

    from attnseg.capture.memory import estimate_capture

    config_path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs" / "flux1_dev_transformer.json"
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    text = 512
    stack = StackOnly("flux", model, size, flux_attention_layers, 16, text, FluxAdapter)
    layers = stack.attention_layers()
    tok = t5_tokenizer(text)
    goca = GoCA(**resolve_settings("goca", stack, params={"classes": "cat, grass, wall"}).params)
    enc = tokenize(tok, goca.prompt, text)
    selected = {n: layers[n] for n in goca.select_layers(layers)}
    meta = {"image_size": [size, size], "tokens": list(enc.tokens[: enc.length])}

    def summary(store: Any, chosen: dict[str, LayerInfo], method: Any, device: str) -> dict[str, Any]:
        store.device = torch.device(device)  # the meta model's store, placed where the estimate runs
        est = estimate_capture(store, chosen, text_tokens=text, model_dtype=DTYPE, device=device, method=method)
        mib = {k: round(v / MiB, 1) for k, v in est.to_dict()["per_device"][str(est.device)].items()}
        big = sorted(est.items, key=lambda it: -it.nbytes)
        return {**mib, "peak_gib": round(est.peak_bytes() / 2**30, 3), "peak_gb": round(est.peak_bytes() / 1e9, 3),
                "largest_items_mb": [f"{it.phase}: {it.nbytes / MiB:.1f} {it.what}" for it in big[:6]],
                "items": len(big)}

    out: dict[str, Any] = {
        "model": "FluxTransformer2DModel, tests/fixtures/configs/flux1_dev_transformer.json (19 + 38 blocks, "
                 f"24 heads x 128), {size} px: {layers[next(iter(layers))].num_tokens} image + {text} text tokens",
        "goca": repr(goca), "prompt_tokens": enc.length,
        "one_full_attention_tensor_mb": round(24 * (layers[next(iter(layers))].num_tokens + text) ** 2 * 4 / MiB),
    }
    for device, label in (("cpu", "cpu"), ("cuda", "accelerator")):
        store = goca.make_store(stack, selected, dict(meta))  # type: ignore[arg-type]
        out[f"goca_{label}"] = summary(store, selected, goca, device)
        every = goca.make_store(stack, selected, dict(meta))  # type: ignore[arg-type]
        every.reference_feature, every.text_columns = None, None
        out[f"goca_keep_every_map_{label}"] = summary(every, selected, goca, device)
        ds = DiffSeg(num_anchors=16)
        ds_layers = {n: layers[n] for n in ds.select_layers(layers)}
        out[f"diffseg_{label}"] = summary(AttentionStore(heads="mean", group="resolution"), ds_layers, ds, device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats below 1024 px")
    parser.add_argument("--repeats-1024", type=int, default=1, help="interleaved repeats at 1024 px (slow on a CPU)")
    parser.add_argument("--stacks", nargs="+", default=["flux", "pixart"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
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
                print(f"{family:6s} {size:5d} {name:19s} fwd {r['forward_seconds_median']:7.2f} s  "
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
                 "forward's median in the same run. Single runs on a shared machine: read ratios to about +-5%. "
                 "With MALLOC_MMAP_THRESHOLD_ set (see malloc_mmap_threshold), glibc maps every large tensor on its "
                 "own and returns it when freed, so the resident set follows the live tensors instead of what earlier "
                 "runs left in the heap."),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "load_average_1_5_15_min": {"start": load_before, "end": [round(v, 2) for v in os.getloadavg()]},
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
