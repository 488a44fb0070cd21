"""attnseg on whatever device is present: capture cost, end-to-end speed, throughput, memory, agreement.

One run, on one device (CUDA, else MPS, else the CPU; or ``--device``), with random-weight models of the real
architectures built on the device (nothing is downloaded):

1. **capture**: for each model shape (SD1.5-size UNet at 512 px, SDXL-size UNet at 1024 px; more can be
   registered, see below) and dtype (fp16 and bf16 on accelerators, bf16 on the CPU), the plain fused forward and
   each method's captured forward, interleaved over the repeats; the ratio of medians, and the peak device memory
   of each over the plain forward's.
2. **end to end**: seconds per image per method at the shape's size: preprocess, encode (image and prompt), noise,
   capture, method, outputs written (label PNG, overlay, JSON); peak device memory.
3. **throughput**: images per second with :meth:`~attnseg.pipeline.AttentionSegmentationPipeline.run_batch` at
   batch 1, 4 and 8 (outputs written for every image).
4. **agreement**: each method on the tiny test model, on the device and on the CPU (float32; against a float64 CPU
   reference when the device is the CPU): labels identical, mean best IoU, largest map difference.

The targets of one H200-class GPU in fp16 are printed beside the figures (they are not expected elsewhere).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (exact), sampled elsewhere (:class:`attnseg.devices.
PeakMemory`). Results go to ``benchmarks/results/device_<device name>.json`` (``-smoke`` added in smoke mode).

    python benchmarks/device_check.py                        # the device found; planned for < 8 min on one GPU
    python benchmarks/device_check.py --device cpu --smoke   # tiny shapes, seconds (the test suite runs this)

More model shapes (e.g. the transformer stacks) are added with a few lines::

    from device_check import ModelShape, register_shape
    register_shape(ModelShape("pixart-sigma", size=1024, build=build_pixart, methods=("goca", "target")))

where ``build(device, dtype)`` returns a :class:`~attnseg.models.base.DiffusionAdapter` with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnseg.capture.tracer import AttentionTracer
from attnseg.devices import PeakMemory, describe_device, device_name, resolve_device, synchronize
from attnseg.methods.base import create_method
from attnseg.pipeline import AttentionSegmentationPipeline

RESULTS = Path(__file__).parent / "results"

#: Targets on one H200-class GPU in fp16 (printed beside the figures).
TARGETS = {
    "capture_ratio_max": 1.5,  # every method's captured forward vs the plain fused forward
    "diffseg_seconds_per_image_max": 0.15,  # end to end, 512 px
    "diffseg_images_per_second_batch8_min": 20.0,
}

#: The methods and the settings they run with (GoCA needs classes; the target method segments "hair").
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "diffseg": {},
    "goca": {"classes": ["cat", "grass", "wall"]},
    "target": {},
    "clustering": {},
}


# -- model shapes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A model architecture the check runs, with random weights.

    Attributes:
        name: short name in tables and the results file.
        size: pixel input size (square).
        build: ``build(device, dtype) -> DiffusionAdapter`` with random weights, built on ``device``.
        sections: the sections it runs in (``"capture"``, ``"end_to_end"``, ``"throughput"``).
        smoke: a tiny shape for ``--smoke`` (the others are skipped there).
        methods: the methods this shape supports (None: all of :data:`METHOD_SETTINGS`).
    """

    name: str
    size: int
    build: Callable[[torch.device, torch.dtype], Any]
    sections: tuple[str, ...] = ("capture", "end_to_end", "throughput")
    smoke: bool = False
    methods: tuple[str, ...] | None = None


MODEL_SHAPES: dict[str, ModelShape] = {}


def register_shape(shape: ModelShape) -> ModelShape:
    """Add a model shape to the check (replacing one of the same name)."""
    MODEL_SHAPES[shape.name] = shape
    return shape


# Public configurations of the reference checkpoints' other components (from their config.json files).
SD_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.18215,
}
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
    "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280,
}


def _random_unet_adapter(unet_config: dict[str, Any], *, xl: bool, vae_float32: bool) -> Callable[..., Any]:
    def build(device: torch.device, dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from attnseg.models.unet import UNetAdapter
        from attnseg.testing import clip_tokenizer

        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**{**SD_VAE_CONFIG, "scaling_factor": 0.13025 if xl else 0.18215})
            text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT_CONFIG)) if xl else None
        for module in (unet, text, text_2):
            if module is not None:
                module.to(dtype).eval().requires_grad_(False)
        # SDXL's VAE overflows in fp16; diffusers runs it in float32 (force_upcast), and so does this check
        vae.to(torch.float32 if vae_float32 else dtype).eval().requires_grad_(False)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        tok = clip_tokenizer()
        return UNetAdapter(unet, vae, text, tok, scheduler, text_encoder_2=text_2, tokenizer_2=clip_tokenizer() if xl
                           else None, name=f"random {'SDXL' if xl else 'SD1.5'}-size")

    return build


def _tiny_adapter(xl: bool) -> Callable[..., Any]:
    def build(device: torch.device, dtype: torch.dtype) -> Any:
        from attnseg.testing import tiny_sd_adapter

        adapter = tiny_sd_adapter(seed=0, xl=xl)
        for module in (adapter.unet, adapter.text_encoder, getattr(adapter, "text_encoder_2", None)):
            if module is not None:
                module.to(device, dtype)
        adapter.vae.to(device)
        return adapter

    return build


def _register_builtin_shapes() -> None:
    from attnseg.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    register_shape(ModelShape("sd15", 512, _random_unet_adapter(SD15_UNET_CONFIG, xl=False, vae_float32=False)))
    register_shape(ModelShape("sdxl", 1024, _random_unet_adapter(SDXL_UNET_CONFIG, xl=True, vae_float32=True),
                              sections=("capture", "end_to_end")))
    register_shape(ModelShape("tiny-sd", 64, _tiny_adapter(False), smoke=True))
    register_shape(ModelShape("tiny-sdxl", 64, _tiny_adapter(True), smoke=True, sections=("capture",)))


_register_builtin_shapes()


# -- helpers -----------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    repeats: int
    warmup: int
    deadline: float
    out_dir: Path
    errors: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() > self.deadline:
            if what not in self.truncated:
                self.truncated.append(what)
            return True
        return False


def _images(n: int, size: int) -> list[Image.Image]:
    """``n`` synthetic scenes: coloured rectangles on a gradient, different per index (deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size]
        arr = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], -1).astype(np.uint8)
        for _ in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            arr[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(arr))
    return out


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Seconds (device work included) and peak memory over the entry level of one call."""
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        value = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, peak.delta, value


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _method(name: str) -> Any:
    return create_method(name, **METHOD_SETTINGS[name])


def _methods_for(shape: ModelShape, methods: Sequence[str]) -> list[str]:
    return [m for m in methods if shape.methods is None or m in shape.methods]


# -- sections ----------------------------------------------------------------------------------------------------------


def capture_section(ctx: Context, adapters: dict[tuple[str, str], Any], shapes: dict[str, ModelShape],
                    methods: Sequence[str]) -> list[dict[str, Any]]:
    """Plain fused forward and each method's captured forward, interleaved over repeats."""
    runners: list[tuple[str, str, str, Callable[[], Any]]] = []
    for (shape_name, dtype_name), adapter in adapters.items():
        shape = shapes[shape_name]
        if "capture" not in shape.sections:
            continue
        size = (shape.size, shape.size)
        layers = adapter.attention_layers(size)
        latent = adapter.latent_size(size) if hasattr(adapter, "latent_size") else size
        channels = int(adapter.denoiser.config.in_channels)
        noise = torch.randn(1, channels, *latent, generator=torch.Generator().manual_seed(0))
        latents = noise.to(adapter.device, adapter.dtype)
        plain_prompt = adapter.encode_prompt("")

        def plain(adapter: Any = adapter, latents: torch.Tensor = latents, prompt: Any = plain_prompt) -> Any:
            with torch.no_grad():
                return adapter.denoise(latents, 300, prompt)

        runners.append((shape_name, dtype_name, "plain", plain))
        for name in _methods_for(shape, methods):
            method = _method(name)
            pipe = AttentionSegmentationPipeline(adapter, method)
            opts = method.run_options()
            prompt = adapter.encode_prompt(opts.prompt)
            selected = method.select_layers(layers)
            features = getattr(method, "features", None)
            feats = features(adapter) if features is not None else ()

            def captured(pipe: Any = pipe, selected: list[str] = selected, layers: dict = layers,
                         feats: Any = feats, prompt: Any = prompt, t: int = opts.timestep, adapter: Any = adapter,
                         latents: torch.Tensor = latents, size: tuple[int, int] = size) -> Any:
                store = pipe.new_store({n: layers[n] for n in selected}, {"image_size": list(size)})
                with torch.no_grad(), AttentionTracer(adapter, store, select=selected, layers=layers, features=feats):
                    adapter.denoise(latents, t, prompt)
                return store

            runners.append((shape_name, dtype_name, name, captured))

    times: dict[tuple[str, str, str], list[float]] = {}
    peaks: dict[tuple[str, str, str], list[int]] = {}
    for rep in range(ctx.warmup + ctx.repeats):  # warm-up rounds (kernels, allocator) are not counted
        if rep > ctx.warmup and ctx.over_budget("capture repeats"):
            break
        for shape_name, dtype_name, variant, fn in runners:
            key = (shape_name, dtype_name, variant)
            try:
                seconds, peak, _ = _timed(ctx.device, fn)
            except Exception as exc:
                ctx.errors.append(f"capture {key}: {type(exc).__name__}: {exc}")
                continue
            if rep >= ctx.warmup:
                times.setdefault(key, []).append(seconds)
                peaks.setdefault(key, []).append(peak)
    rows = []
    for (shape_name, dtype_name, variant), ts in times.items():
        base_t = _median(times.get((shape_name, dtype_name, "plain"), []))
        base_m = _median(peaks.get((shape_name, dtype_name, "plain"), []))
        med_t, med_m = _median(ts), _median(peaks[(shape_name, dtype_name, variant)])
        rows.append({
            "shape": shape_name, "size": shapes[shape_name].size, "dtype": dtype_name, "variant": variant,
            "seconds_median": round(med_t, 5), "seconds_all": [round(v, 5) for v in ts],
            "ratio_vs_plain": round(med_t / base_t, 3) if base_t > 0 else None,
            "peak_mb": round(med_m / 2**20, 1), "extra_peak_vs_plain_mb": round((med_m - base_m) / 2**20, 1),
        })
    return rows


def end_to_end_section(ctx: Context, adapters: dict[str, Any], shapes: dict[str, ModelShape],
                       methods: Sequence[str], work: Path) -> list[dict[str, Any]]:
    """Seconds per image, from a PIL image to the written outputs, per method."""
    runners = []
    for shape_name, adapter in adapters.items():
        shape = shapes[shape_name]
        if "end_to_end" not in shape.sections:
            continue
        image = _images(1, shape.size)[0]
        for name in _methods_for(shape, methods):
            pipe = AttentionSegmentationPipeline(adapter, _method(name))

            def run(pipe: Any = pipe, image: Image.Image = image, size: int = shape.size, tag: str = name) -> Any:
                out = pipe.run(image, size=(size, size), seed=0)
                out.result.save(work, image=out.image, stem=tag)
                return out

            runners.append((shape_name, name, run))
    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[tuple[str, str], list[int]] = {}
    for rep in range(ctx.warmup + ctx.repeats):
        if rep > ctx.warmup and ctx.over_budget("end-to-end repeats"):
            break
        for shape_name, name, fn in runners:
            try:
                seconds, peak, _ = _timed(ctx.device, fn)
            except Exception as exc:
                ctx.errors.append(f"end to end {shape_name}/{name}: {type(exc).__name__}: {exc}")
                continue
            if rep >= ctx.warmup:
                times.setdefault((shape_name, name), []).append(seconds)
                peaks.setdefault((shape_name, name), []).append(peak)
    return [
        {"shape": s, "size": shapes[s].size, "dtype": str(adapters[s].dtype).removeprefix("torch."), "method": m,
         "seconds_per_image_median": round(_median(ts), 4), "seconds_all": [round(v, 4) for v in ts],
         "peak_mb": round(_median(peaks[(s, m)]) / 2**20, 1)}
        for (s, m), ts in times.items()
    ]


def throughput_section(ctx: Context, adapters: dict[str, Any], shapes: dict[str, ModelShape],
                       methods: Sequence[str], batches: Sequence[int], work: Path) -> list[dict[str, Any]]:
    """Images per second with one captured pass per batch, outputs written for every image."""
    runners = []
    for shape_name, adapter in adapters.items():
        shape = shapes[shape_name]
        if "throughput" not in shape.sections:
            continue
        images = _images(max(batches), shape.size)
        for name in _methods_for(shape, methods):
            pipe = AttentionSegmentationPipeline(adapter, _method(name))
            for b in batches:
                def run(pipe: Any = pipe, imgs: list = images[:b], size: int = shape.size, tag: str = name) -> Any:
                    outs = pipe.run_batch(imgs, size=(size, size), seed=0)
                    for i, out in enumerate(outs):
                        out.result.save(work, image=out.image, stem=f"{tag}-{i}")
                    return outs

                runners.append((shape_name, name, b, run))
    times: dict[tuple[str, str, int], list[float]] = {}
    peaks: dict[tuple[str, str, int], list[int]] = {}
    for rep in range(ctx.warmup + ctx.repeats):
        if rep > ctx.warmup and ctx.over_budget("throughput repeats"):
            break
        for shape_name, name, b, fn in runners:
            try:
                seconds, peak, _ = _timed(ctx.device, fn)
            except Exception as exc:
                ctx.errors.append(f"throughput {shape_name}/{name}/batch {b}: {type(exc).__name__}: {exc}")
                continue
            if rep >= ctx.warmup:
                times.setdefault((shape_name, name, b), []).append(seconds)
                peaks.setdefault((shape_name, name, b), []).append(peak)
    return [
        {"shape": s, "size": shapes[s].size, "method": m, "batch": b,
         "images_per_second": round(b / _median(ts), 3), "seconds_all": [round(v, 4) for v in ts],
         "peak_mb": round(_median(peaks[(s, m, b)]) / 2**20, 1)}
        for (s, m, b), ts in times.items()
    ]


def _mean_best_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ious = []
    for i in a.unique():
        m = a == i
        ious.append(max(float((m & (b == j)).sum() / (m | (b == j)).sum()) for j in b.unique()))
    return sum(ious) / len(ious)


def agreement_section(ctx: Context, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Each method on the tiny test model: the device (float32) against the CPU (float32; float64 when the device
    is the CPU itself)."""
    from attnseg.testing import tiny_sd_adapter

    device = ctx.device
    reference = tiny_sd_adapter(seed=0)
    ref_dtype = "float32"
    if device.type == "cpu":
        reference.unet.double()
        reference.text_encoder.double()
        ref_dtype = "float64"
    on_device = _tiny_adapter(False)(device, torch.float32)
    image = _images(1, 64)[0]
    rows = []
    for name in methods:
        try:
            got = AttentionSegmentationPipeline(on_device, _method(name)).run(image, size=(64, 64), seed=0)
            want = AttentionSegmentationPipeline(reference, _method(name)).run(image, size=(64, 64), seed=0)
        except Exception as exc:
            ctx.errors.append(f"agreement {name}: {type(exc).__name__}: {exc}")
            continue
        a, b = got.result.labels, want.result.labels
        diff = 0.0
        for key in want.store:
            w = want.store.get(key).double()
            g = got.store.get(key).cpu().double()
            diff = max(diff, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30))
        rows.append({
            "method": name, "reference": f"cpu {ref_dtype}", "labels_identical": bool(torch.equal(a, b)),
            "pixels_equal": round(float((a == b).float().mean()), 5),
            "mean_best_iou": round(min(_mean_best_iou(a, b), _mean_best_iou(b, a)), 4),
            "max_map_diff_relative": diff,
        })
    return rows


# -- report ------------------------------------------------------------------------------------------------------------


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISS")


def print_report(result: dict[str, Any]) -> None:
    dev = result["device"]
    print(f"attnseg device check on {dev['description']}, torch {dev['torch']}"
          f"{' (smoke: tiny shapes)' if result['smoke'] else ''}; {result['repeats']} timed repeats after "
          f"{result['warmup']} warm-up round(s)")
    print("targets are for one H200-class GPU in fp16; elsewhere they are shown for reference")
    print("\ncapture: captured forward vs the plain fused forward (median seconds, interleaved)")
    print(f"{'shape':10s} {'dtype':9s} {'variant':11s} {'seconds':>9s} {'ratio':>6s} {'target':>7s} {'':4s} "
          f"{'peak MB':>9s} {'+MB vs plain':>12s}")
    cap_max = TARGETS["capture_ratio_max"]
    for r in result["capture"]:
        ratio = r["ratio_vs_plain"]
        target = "" if r["variant"] == "plain" else f"<={cap_max}"
        ok = None if r["variant"] == "plain" or ratio is None else ratio <= cap_max
        print(f"{r['shape']:10s} {r['dtype']:9s} {r['variant']:11s} {r['seconds_median']:9.4f} "
              f"{ratio if ratio is not None else float('nan'):6.3f} {target:>7s} {_mark(ok):4s} {r['peak_mb']:9.1f} "
              f"{r['extra_peak_vs_plain_mb']:12.1f}")
    print("\nend to end: preprocess, encode, noise, capture, method, outputs (median seconds per image)")
    print(f"{'shape':10s} {'size':>5s} {'dtype':9s} {'method':11s} {'s/image':>9s} {'target':>7s} {'':4s} "
          f"{'peak MB':>9s}")
    s_max = TARGETS["diffseg_seconds_per_image_max"]
    for r in result["end_to_end"]:
        applies = r["method"] == "diffseg" and r["size"] == 512
        target = f"<={s_max}" if applies else ""
        ok = r["seconds_per_image_median"] <= s_max if applies else None
        print(f"{r['shape']:10s} {r['size']:5d} {r['dtype']:9s} {r['method']:11s} {r['seconds_per_image_median']:9.4f} "
              f"{target:>7s} {_mark(ok):4s} {r['peak_mb']:9.1f}")
    print("\nthroughput: images per second (one captured pass per batch, outputs written)")
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in result["throughput"]:
        by.setdefault((r["shape"], r["method"]), {})[r["batch"]] = r["images_per_second"]
    batches = result["settings"]["batches"]
    ips_min = TARGETS["diffseg_images_per_second_batch8_min"]
    print(f"{'shape':10s} {'method':11s} " + " ".join(f"{'b' + str(b):>8s}" for b in batches) + f" {'target b8':>10s}")
    for (shape, method), vals in by.items():
        applies = method == "diffseg" and 8 in vals and shape == "sd15"
        ok = vals[8] >= ips_min if applies else None
        cells = " ".join(f"{vals[b]:8.2f}" if b in vals else f"{'-':>8s}" for b in batches)
        print(f"{shape:10s} {method:11s} {cells} {('>=' + str(ips_min)) if applies else '':>10s} {_mark(ok)}")
    print("\nagreement: tiny model, device float32 vs the CPU reference")
    print(f"{'method':11s} {'reference':12s} {'identical':>9s} {'pixels eq':>9s} {'best IoU':>9s} "
          f"{'max map diff':>13s}")
    for r in result["agreement"]:
        print(f"{r['method']:11s} {r['reference']:12s} {r['labels_identical']!s:>9s} {r['pixels_equal']:9.4f} "
              f"{r['mean_best_iou']:9.4f} {r['max_map_diff_relative']:13.2e}")
    if result["truncated"]:
        print(f"\nstopped early to stay within the time budget: {', '.join(result['truncated'])}")
    for err in result["errors"]:
        print(f"error: {err}")
    print(f"\n{result['seconds']:.0f} s in all; written to {result['path']}")


# -- main --------------------------------------------------------------------------------------------------------------


def _dtype_names(device: torch.device, given: str | None) -> list[str]:
    if given:
        return [d.strip() for d in given.split(",") if d.strip()]
    return ["bfloat16"] if device.type == "cpu" else ["float16", "bfloat16"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one run each without warm-up, batches 1 and 2: seconds (keeps it alive)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 3; smoke 1)")
    parser.add_argument("--shapes", default=None, help="comma-separated model shapes (default: all, or the tiny ones)")
    parser.add_argument("--methods", default=",".join(METHOD_SETTINGS), help="comma-separated methods")
    parser.add_argument("--dtypes", default=None, help="default float16,bfloat16 on accelerators, bfloat16 on the CPU")
    parser.add_argument("--batches", default=None, help="batch sizes for the throughput (default 1,4,8; smoke 1,2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which repeats stop (default 7 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on every .to(dtype)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    shapes = {n: s for n, s in MODEL_SHAPES.items() if s.smoke == args.smoke}
    if args.shapes:
        wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in MODEL_SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; registered: {', '.join(MODEL_SHAPES)}")
        shapes = {n: MODEL_SHAPES[n] for n in wanted}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown_methods = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown_methods:
        parser.error(f"unknown methods {unknown_methods}; known: {', '.join(METHOD_SETTINGS)}")
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,4,8")).split(",")]
    dtype_names = _dtype_names(device, args.dtypes)
    main_dtype = dtype_names[0]
    warmup = 0 if args.smoke else 1
    ctx = Context(device=device, repeats=repeats, warmup=warmup, deadline=started + args.budget, out_dir=args.out)

    build_seconds: dict[str, float] = {}
    adapters: dict[tuple[str, str], Any] = {}
    for shape_name, shape in shapes.items():
        for dtype_name in dtype_names:
            t0 = time.perf_counter()
            adapters[(shape_name, dtype_name)] = shape.build(device, getattr(torch, dtype_name))
            build_seconds[f"{shape_name}/{dtype_name}"] = round(time.perf_counter() - t0, 2)

    sections: dict[str, float] = {"build": round(time.perf_counter() - started, 2)}

    def timed_section(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        sections[name] = round(time.perf_counter() - t0, 2)
        return value

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        main_adapters = {s: a for (s, d), a in adapters.items() if d == main_dtype}
        capture = timed_section("capture", lambda: capture_section(ctx, adapters, shapes, methods))
        end_to_end = timed_section("end_to_end", lambda: end_to_end_section(ctx, main_adapters, shapes, methods, work))
        throughput = timed_section(
            "throughput", lambda: throughput_section(ctx, main_adapters, shapes, methods, batches, work)
        )
    adapters.clear()
    main_adapters.clear()
    agreement = timed_section("agreement", lambda: agreement_section(ctx, methods))

    name = device_name(device) + ("-smoke" if args.smoke else "")
    path = args.out / f"device_{name}.json"
    info: dict[str, Any] = {
        "type": device.type, "name": device_name(device), "description": describe_device(device),
        "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, total_memory_gb=round(props.total_memory / 2**30, 1))
    result: dict[str, Any] = {
        "benchmark": "device_check", "device": info, "smoke": args.smoke, "repeats": repeats, "warmup": warmup,
        "settings": {"shapes": {n: s.size for n, s in shapes.items()}, "dtypes": dtype_names,
                     "end_to_end_dtype": main_dtype, "methods": {m: METHOD_SETTINGS[m] for m in methods},
                     "batches": batches, "budget_seconds": args.budget},
        "targets": {"hardware": "one H200-class GPU, fp16", **TARGETS},
        "build_seconds": build_seconds, "section_seconds": sections,
        "capture": capture, "end_to_end": end_to_end, "throughput": throughput, "agreement": agreement,
        "truncated": ctx.truncated, "errors": ctx.errors,
        "seconds": round(time.perf_counter() - started, 1), "path": str(path),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
