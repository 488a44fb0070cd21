"""Cost of the two cross-attention methods on an SD1.5-size UNet (random weights) on the CPU.

Compares, in one process and interleaved, against the plain fused forward pass:

- ``goca``: GoCA's capture with its :class:`~attnseg.capture.goca.HeadWeightedStore` (per-pixel head weights
  computed on the fly from the heads' outputs and ``to_out``, self maps reduced for the layer weights and the
  refinement, the reference feature hooked): all 16 cross and 16 self layers of SD1.5; then ``GoCA.segment``.
- ``target``: the hair method's capture (up + mid blocks, cross and self, head/layer means per resolution); then
  ``TargetSegmenter.segment`` (aggregation, guided selection over all R^2 self maps, Otsu).

Each row gives the capture forward, the post-processing (segment) and their sum, as medians over interleaved
repeats, and ratios to the plain forward's median. Peak memory is the largest resident-set size sampled during a
run minus the size just before it.

    python benchmarks/cross_methods_overhead.py [--size 512] [--repeats 3] [--threads 1]

Writes benchmarks/results/cross_methods_overhead.json and prints a table.
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
from attnseg.methods.goca import GoCA
from attnseg.methods.target import TargetSegmenter
from attnseg.models.unet import unet_attention_layers
from attnseg.prompts import tokenize
from attnseg.testing import SD15_UNET_CONFIG, clip_tokenizer
from attnseg.types import LayerInfo, Prompt

RESULTS = Path(__file__).parent / "results"
LATENT_SCALE = 8  # SD's VAE: the benchmark feeds latents directly


class UNetOnly:
    """The part of a :class:`~attnseg.models.base.DiffusionAdapter` that GoCA's ``make_store``/``features`` read."""

    family = "unet"
    is_sdxl = False
    latent_scale = LATENT_SCALE

    def __init__(self, unet: torch.nn.Module, size: int) -> None:
        self.denoiser = unet
        self.resolution = (size, size)

    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        h, w = size or self.resolution
        return unet_attention_layers(self.denoiser, (h // LATENT_SCALE, w // LATENT_SCALE))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device


def make_prompt(text: str, embeddings: torch.Tensor) -> Prompt:
    tok = tokenize(clip_tokenizer(embeddings.shape[1]), text)
    return Prompt(text=text, embeddings=embeddings, **tok.fields())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    latent = args.size // LATENT_SCALE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, SD15_UNET_CONFIG["cross_attention_dim"], generator=g)
    adapter = UNetOnly(unet, args.size)
    layers = adapter.attention_layers()
    meta = {"image_size": [args.size, args.size]}

    goca = GoCA(classes=["cat", "grass", "wall"])
    goca_prompt = make_prompt(goca.prompt, ctx)
    goca_layers = goca.select_layers(layers)
    goca_features = goca.features(adapter)  # type: ignore[arg-type]
    target = TargetSegmenter()
    target_prompt = make_prompt(target.prompt, ctx)
    target_layers = target.select_layers(layers)

    def forward(t: int) -> torch.Tensor:
        return unet(x, torch.tensor([t]), encoder_hidden_states=ctx).sample

    def plain() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        out = forward(300)
        return out, time.perf_counter() - start, 0.0, {}

    def run_goca() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        store = goca.make_store(adapter, {n: layers[n] for n in goca_layers}, dict(meta))  # type: ignore[arg-type]
        with AttentionTracer(unet, store, layers={n: layers[n] for n in goca_layers}, features=goca_features):
            out = forward(goca.timestep)
        mid = time.perf_counter()
        result = goca.segment(store, prompt=goca_prompt, out_size=(args.size, args.size))
        end = time.perf_counter()
        info = {"store_bytes": store.nbytes(), "captured_layers": len(goca_layers),
                "labels": sorted(result.labels.unique().tolist())}
        return out, mid - start, end - mid, info

    def run_target() -> tuple[torch.Tensor, float, float, dict[str, Any]]:
        start = time.perf_counter()
        store = AttentionStore(heads="mean", group="resolution", meta=dict(meta))
        with AttentionTracer(unet, store, layers={n: layers[n] for n in target_layers}):
            out = forward(target.timestep)
        mid = time.perf_counter()
        result = target.segment(store, prompt=target_prompt, out_size=(args.size, args.size))
        end = time.perf_counter()
        info = {"store_bytes": store.nbytes(), "captured_layers": len(target_layers),
                "num_selected": result.meta["num_selected"], "fallback": result.meta["fallback"]}
        return out, mid - start, end - mid, info

    runs = {"plain": plain, "goca": run_goca, "target": run_target}
    references: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in (("plain", 300), ("goca", goca.timestep), ("target", target.timestep)):
            references[name] = forward(t)  # warm-up, and the plain output at each method's timestep
        forward_s: dict[str, list[float]] = {k: [] for k in runs}
        post_s: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[int]] = {k: [] for k in runs}
        max_diff: dict[str, float] = {}
        infos: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved so drift hits every variant alike
                gc.collect()
                with PeakSampler() as sampler:
                    out, fwd, post, info = fn()
                forward_s[name].append(fwd)
                post_s[name].append(post)
                peaks[name].append(sampler.delta)
                max_diff[name] = float((out - references[name]).abs().max())
                infos[name] = info
                del out
    base_t = statistics.median(forward_s["plain"])
    base_m = statistics.median(peaks["plain"])
    rows = {}
    for name in runs:
        totals = [a + b for a, b in zip(forward_s[name], post_s[name], strict=True)]
        fwd, post, total = (statistics.median(v) for v in (forward_s[name], post_s[name], totals))
        rows[name] = {
            "forward_seconds_median": round(fwd, 3),
            "segment_seconds_median": round(post, 3),
            "total_seconds_median": round(total, 3),
            "total_seconds_all": [round(v, 3) for v in totals],
            "forward_ratio_vs_plain": round(fwd / base_t, 3),
            "total_ratio_vs_plain": round(total / base_t, 3),
            "peak_rss_delta_mb": round(statistics.median(peaks[name]) / 2**20, 1),
            "extra_peak_vs_plain_mb": round((statistics.median(peaks[name]) - base_m) / 2**20, 1),
            "max_abs_output_diff_vs_plain": max_diff[name],
            **{k: v for k, v in infos[name].items() if k != "store_bytes"},
            **({"store_mb": round(infos[name]["store_bytes"] / 2**20, 1)} if "store_bytes" in infos[name] else {}),
        }
    result = {
        "benchmark": "cross_methods_overhead",
        "model": "UNet2DConditionModel, SD1.5 config, random weights; random encoder_hidden_states (1, 77, 768)",
        "input": f"{args.size}x{args.size} px (latent {latent}x{latent}), batch 1, float32",
        "methods": {
            "goca": f"{goca!r}; capture mode reuse; reference feature {goca_features}",
            "target": f"{target!r}; capture mode reuse",
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "build_seconds": round(build_s, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "note": "ratios divide by the plain forward's median; timesteps differ (plain 300, GoCA 100, target 0), "
                "which does not change the cost of a forward",
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / "cross_methods_overhead.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':8s} {'fwd s':>7s} {'seg s':>7s} {'fwd x':>6s} {'total x':>8s} {'peak MB':>8s} {'extra MB':>9s}")
    for name, r in rows.items():
        print(
            f"{name:8s} {r['forward_seconds_median']:7.2f} {r['segment_seconds_median']:7.2f} "
            f"{r['forward_ratio_vs_plain']:6.3f} {r['total_ratio_vs_plain']:8.3f} {r['peak_rss_delta_mb']:8.1f} "
            f"{r['extra_peak_vs_plain_mb']:9.1f}"
        )
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
