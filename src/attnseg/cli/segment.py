"""``attnseg segment``: segment images with any method and write labels, overlays, JSON (and heatmaps)."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from attnseg.cli.common import describe_model, fail, handle_errors, parse_params, quiet_libraries, require_model
from attnseg.errors import ConfigError, ImageError
from attnseg.io.images import MAX_PIXELS

if TYPE_CHECKING:
    from attnseg.io.geometry import Fit, Placement

__all__ = [
    "EXIT_SOME_FAILED",
    "SegmentJob",
    "StreamSummary",
    "method_kwargs",
    "plan_outputs",
    "segment_cmd",
    "stream_segment",
    "write_clustering",
    "write_extras",
    "write_output",
]


def method_kwargs(method: str, params: list[str] | None, **named: Any) -> dict[str, Any]:
    """Merge ``-P NAME=VALUE`` parameters with the named shortcuts (``--target``, ``--classes``...);
    a shortcut the method does not take is an error that names it."""
    from attnseg.errors import ConfigError
    from attnseg.methods.base import METHODS, list_methods

    list_methods()  # registers the built-in methods
    accepted = set(inspect.signature(METHODS.get(method)).parameters)
    kwargs = parse_params(params)
    for key, value in named.items():
        if value is None:
            continue
        if key not in accepted:
            flag = "--" + {"ks": "k"}.get(key, key).replace("_", "-")
            raise ConfigError(f"{flag} does not apply to method {method!r}")
        kwargs[key] = value
    return kwargs


FIT_HELP = (
    "How images are placed in the model input: pad (default: the whole image, letterboxed; padding is cut from "
    "every output), resize (squash), crop (centre crop: the edges are not seen), native (the image's aspect ratio "
    "at about the model's area; models that accept any aspect ratio, methods that accept non-square grids)."
)
EXIT_CODES_HELP = "Exit status: 0 all written, 2 bad input (nothing done), 3 some images failed (the rest written)."
#: exit status when some images of a run failed and were skipped (the others were written)
EXIT_SOME_FAILED = 3


def segment_cmd(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (label PNG, overlay PNG, JSON per image)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Required: a Hub model id, a local diffusers folder, or 'toyworld' (the bundled "
        "toy model, which only knows coloured shapes)."
    ),
    method: str = typer.Option("diffseg", "--method", help="Segmentation method (see `attnseg list`)."),
    param: list[str] = typer.Option(
        None, "--param", "-P", help="Method hyper-parameter NAME=VALUE (repeatable), e.g. -P refine=true."
    ),
    target: str | None = typer.Option(None, "--target", help="target: the word to segment, e.g. hair."),
    classes: str | None = typer.Option(None, "--classes", help="goca: class names, e.g. 'cat, grass, wall'."),
    k: str | None = typer.Option(None, "--k", help="clustering: cluster counts, e.g. 2,5,10."),
    variant: str | None = typer.Option(None, "--variant", help="Method variant (target, goca)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt for the denoiser pass (method default if unset)."),
    timestep: int | None = typer.Option(None, "--timestep", help="Denoiser timestep (method default if unset)."),
    noise: bool | None = typer.Option(None, "--noise/--no-noise", help="Noise the latent to the timestep."),
    size: int | None = typer.Option(
        None, "--size", help="Square model input size in pixels (model default if unset; with --fit native the area)."
    ),
    fit: str = typer.Option("pad", "--fit", help=FIT_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for every random draw."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    img2img: bool = typer.Option(
        False, "--img2img", help="Light img2img noising (a few steps, capture at the last) instead of one pass."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Images run through the model together (one at a time with --img2img)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo images whose results exist (default: keep them, so a re-run continues)."
    ),
    max_megapixels: float = typer.Option(
        MAX_PIXELS / 1e6, "--max-megapixels", help="Refuse larger images (decompression-bomb guard)."
    ),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Also write each continuous score map as a PNG."),
    pca_rgb: bool = typer.Option(False, "--pca-rgb", help="clustering: write the per-head PCA RGB grid."),
    save_store: bool = typer.Option(False, "--save-store", help="Also save the captured attention (safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary of all images on stdout."),
) -> None:
    """Segment images and write label PNGs, colour overlays and per-segment JSON at each image's own size.

    Folders stream: one image (or --batch-size images) in memory at a time; an unreadable image is reported
    and skipped; finished images are kept unless --overwrite. Exit status: 0 all written, 2 bad input
    (nothing done), 3 some images failed (the rest written).
    """
    quiet_libraries()
    with handle_errors():
        from attnseg.io.geometry import check_fit
        from attnseg.methods.base import create_method
        from attnseg.models.loading import load_model
        from attnseg.pipeline import AttentionSegmentationPipeline

        model = require_model(model)
        fit_choice = check_fit(fit)
        if batch_size < 1:
            fail(f"--batch-size must be at least 1, got {batch_size}")
        if max_megapixels <= 0:
            fail(f"--max-megapixels must be positive, got {max_megapixels}")
        items = plan_outputs(images, out)
        ks = tuple(int(v) for v in k.split(",") if v.strip()) if k else None
        # a prompt given to a method that owns its prompt (target, goca) goes to the method
        owns_prompt = method in ("target", "goca")
        kwargs = method_kwargs(
            method, param, target=target, classes=classes, ks=ks, variant=variant,
            prompt=prompt if owns_prompt else None,
        )
        seg = create_method(method, **kwargs)
        if fit_choice == "native" and getattr(seg, "square_grids", False):
            fail(f"--fit native gives inputs of the image's shape, but {method} needs square attention grids: "
                 "use --fit pad (or resize, crop)")
        job = SegmentJob(
            out=out, fit=fit_choice, size=(size, size) if size else None, seed=seed,
            prompt=None if owns_prompt else prompt, timestep=timestep, noise=noise, img2img=img2img,
            batch_size=batch_size, overwrite=overwrite, max_pixels=int(max_megapixels * 1e6), heatmaps=heatmaps,
            pca_rgb=pca_rgb, save_store=save_store,
        )
        if len(items) == 1:  # one image: its problems are bad input (exit 2), found before the model loads
            from attnseg.io.images import probe_image

            probe_image(items[0][0], max_pixels=job.max_pixels)
        adapter = load_model(model, dtype=dtype, device=device)
        if not as_json:
            typer.echo(describe_model(adapter, model), err=True)
        pipe = AttentionSegmentationPipeline(adapter, seg, fit=fit_choice)
        out.mkdir(parents=True, exist_ok=True)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), transient=True, disable=as_json,
        ) as progress:
            task = progress.add_task("segmenting", total=len(items))
            summary = stream_segment(pipe, items, job, strict=len(items) == 1,
                                     on_image=lambda _entry: progress.advance(task))
        report = {"model": model, "method": method, "fit": fit_choice, **summary.to_dict()}
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            typer.echo(summary.describe(method=method, model=model, out=out))
        if summary.failed:
            raise typer.Exit(EXIT_SOME_FAILED)


def plan_outputs(images: list[Path], out: Path) -> list[tuple[Path, str]]:
    """``(image path, output stem)`` for every image of the arguments (folders expanded, sorted); stems that
    repeat (same name in two folders) get ``-1``, ``-2``... in argument order, so re-runs find their outputs."""
    from attnseg.io.images import expand_image_paths

    paths = expand_image_paths(images)
    stems: dict[str, int] = {}
    items = []
    for path in paths:
        stem = path.stem if path.stem not in stems else f"{path.stem}-{stems[path.stem]}"
        stems[path.stem] = stems.get(path.stem, 0) + 1
        items.append((path, stem))
    return items


@dataclass(frozen=True)
class SegmentJob:
    """The settings of one ``attnseg segment`` run over a stream of images (see ``segment_cmd`` for each)."""

    out: Path
    fit: Fit = "pad"
    size: tuple[int, int] | None = None
    seed: int = 0
    prompt: str | None = None
    timestep: int | None = None
    noise: bool | None = None
    img2img: bool = False
    batch_size: int = 1
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    heatmaps: bool = False
    pca_rgb: bool = False
    save_store: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class StreamSummary:
    """What a stream of images gave: written, kept from an earlier run, failed (with the reason)."""

    written: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.written, "kept": self.kept,
                "failed": [{"image": p, "error": e} for p, e in self.failed],
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 3)}

    def describe(self, *, method: str, model: str, out: Path) -> str:
        lines = [f"segmented {len(self.written)} image(s) with {method} on {model} in {self.seconds:.1f} s "
                 f"({self.images_per_second:.2f} images/s); results in {out}"]
        if self.kept:
            lines.append(f"kept {len(self.kept)} image(s) already done in {out} (--overwrite to redo them)")
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) failed and were skipped:")
            lines += [f"  {path}: {error}" for path, error in self.failed]
        return "\n".join(lines)


def stream_segment(
    pipe: Any, items: list[tuple[Path, str]], job: SegmentJob, *, strict: bool = False,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> StreamSummary:
    """Segment images one at a time (or ``job.batch_size`` at a time), writing each as it finishes.

    Only the images of the current batch are in memory, so peak memory does not grow with the number of
    images. An image whose ``<stem>.json`` exists is kept unless ``job.overwrite`` (the JSON is written last, so
    it marks a finished image). An image that cannot be read or segmented is recorded in ``failed`` and
    skipped; with ``strict`` its error is raised instead (a run of one image).
    """
    from attnseg.errors import AttnSegError

    summary = StreamSummary()
    todo = []
    for path, stem in items:
        if not job.overwrite and (job.out / f"{stem}.json").is_file():
            summary.kept.append(str(path))
        else:
            todo.append((path, stem))
    smallest = pipe.adapter.latent_scale * 2
    start = time.perf_counter()
    step = 1 if job.img2img else job.batch_size
    for first in range(0, len(todo), step):
        ready = []
        for path, stem in todo[first : first + step]:
            try:
                prepared = pipe.prepare(path, size=job.size, fit=job.fit, max_pixels=job.max_pixels)
                h, w = prepared.decoded.size
                if min(h, w) < smallest:
                    raise ImageError(f"{path} is {w}x{h} px; this model needs at least {smallest} px a side")
                ready.append((path, stem, prepared))
            except AttnSegError as exc:
                if strict:
                    raise
                summary.failed.append((str(path), str(exc)))
        for (path, stem), output in _run(pipe, ready, job, summary, strict):
            written = write_output(output, job.out, stem, heatmaps=job.heatmaps, pca_rgb=job.pca_rgb,
                                   method=pipe.method, save_store=job.save_store)
            entry = {"image": str(path), **{key: str(v) for key, v in written.items()},
                     "num_segments": output.model_result.num_segments, "size": list(output.size)}
            summary.written.append(entry)
            if on_image is not None:
                on_image(entry)
    summary.seconds = time.perf_counter() - start
    return summary


def _run(pipe: Any, ready: list[tuple[Path, str, Any]], job: SegmentJob, summary: StreamSummary,
         strict: bool) -> Iterator[tuple[tuple[Path, str], Any]]:
    """Run a batch of prepared images; on an error in a batch, each image again alone, so only the one that
    fails is skipped."""
    from attnseg.errors import AttnSegError

    options = {"seed": job.seed, "prompt": job.prompt}
    if len(ready) > 1:
        try:
            outputs = pipe.run_batch([p for _, _, p in ready], timestep=job.timestep, add_noise=job.noise, **options)
        except AttnSegError:
            outputs = None
        if outputs is not None:
            yield from zip([(path, stem) for path, stem, _ in ready], outputs, strict=True)
            return
    for path, stem, prepared in ready:
        try:
            if job.img2img:
                output = _img2img(pipe, prepared, fit=job.fit, size=job.size, **options)
            else:
                output = pipe.run(prepared, timestep=job.timestep, add_noise=job.noise, **options)
        except AttnSegError as exc:
            if strict:
                raise
            summary.failed.append((str(path), str(exc)))
            continue
        yield (path, stem), output


def _img2img(pipe: Any, prepared: Any, *, prompt: str | None, seed: int, fit: Fit, size: Any) -> Any:
    """The paper-style real-image reading: light img2img (the method's strength and steps), then segment."""
    from attnseg.generation import img2img_capture
    from attnseg.pipeline import PipelineOutput

    cap = img2img_capture(pipe.adapter, prepared.decoded, pipe.method, seed=seed, size=size, prompt=prompt, fit=fit)
    encoded = pipe.adapter.encode_prompt(cap.store.meta.get("prompt", "") or "")
    result = pipe.method.segment(cap.store, prompt=encoded, out_size=cap.placement.model)
    return PipelineOutput(model_result=result, image=cap.image, store=cap.store, placement=cap.placement,
                          source=cap.source)


def write_clustering(
    clustering: Any, image: Any, out: Path, stem: str, *, pca_rgb: bool, placement: Placement | None = None
) -> dict[str, Path]:
    """One label PNG and overlay per k, the merged masks (one PNG each + JSON with their k), the PCA picture;
    with ``placement`` (and maps at the model size) all at the original image's size."""
    import numpy as np
    import torch
    from PIL import Image

    from attnseg.io.export import label_png_array, overlay

    def back(labels: Any) -> Any:
        if placement is not None and tuple(labels.shape[-2:]) == placement.model:
            return placement.labels_to_original(labels)
        return labels.cpu().numpy()

    written: dict[str, Path] = {}
    for kk, labels in clustering.label_maps.items():
        arr = back(labels)
        Image.fromarray(label_png_array(arr)).save(out / f"{stem}.k{kk}.labels.png")
        written[f"overlay:k{kk}"] = out / f"{stem}.k{kk}.overlay.png"
        overlay(image, arr).save(written[f"overlay:k{kk}"])
        del arr
    mask_dir = out / f"{stem}.masks"
    mask_dir.mkdir(exist_ok=True)
    records = []
    for i, (mask, kk, label) in enumerate(zip(clustering.masks, clustering.mask_k, clustering.mask_label, strict=True)):
        path = mask_dir / f"mask{i:03d}-k{kk}.png"
        arr = back(mask.to(torch.uint8)).astype(np.uint8)
        Image.fromarray(arr * 255).save(path)
        records.append({"file": path.name, "k": int(kk), "label": int(label), "area": int(arr.sum(dtype=np.int64))})
    (mask_dir / "masks.json").write_text(json.dumps({"masks": records, **clustering.summary()}, indent=2,
                                                    default=str))
    written["masks"] = mask_dir
    if pca_rgb:
        written["pca_rgb"] = out / f"{stem}.pca-rgb.png"
        clustering.pca_rgb_image().save(written["pca_rgb"])
    return written


def write_output(
    output: Any, out: Path, stem: str, *, heatmaps: bool, pca_rgb: bool, method: Any = None, save_store: bool = False
) -> dict[str, Path]:
    """Write one image's results at its own size: heatmaps, clustering outputs and the attention store first,
    then labels, overlay and the JSON (last: its presence marks a finished image). Returns the paths."""
    from attnseg.io.export import heatmap_image, save_result

    result = output.model_result
    placement = output.placement
    image = output.source if output.source is not None else output.image
    written: dict[str, Path] = {}
    if heatmaps and result.scores is not None and result.scores.is_floating_point():
        k = result.scores.shape[0]
        names = result.label_names or ()
        if len(names) != k:  # e.g. the target method: one continuous map for the last (target) label
            names = (names[-1],) if k == 1 and names else tuple(str(i) for i in range(k))
        for i, name in enumerate(names):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))
            channel = result.scores[i : i + 1]
            if placement is not None and result.size == placement.model:
                channel = placement.scores_to_original(channel)
            path = out / f"{stem}.heatmap.{i}-{safe}.png"
            heatmap_image(channel[0].numpy()).save(path)
            written[f"heatmap:{name}"] = path
            del channel
    cluster = getattr(method, "cluster", None)
    if cluster is not None:  # principal-component clustering: every k, the merged masks, the PCA picture
        written.update(write_clustering(cluster(output.store, out_size=result.size), image, out, stem,
                                        pca_rgb=pca_rgb, placement=placement))
    if save_store:
        written["store"] = output.store.save(out / f"{stem}.attention.safetensors")
    return {**save_result(result, out, image=image, stem=stem, placement=placement), **written}


def write_extras(
    output: Any, out: Path, stem: str, *, heatmaps: bool, pca_rgb: bool, method: Any = None
) -> dict[str, Path]:
    """Kept for callers of the earlier name: :func:`write_output`."""
    return write_output(output, out, stem, heatmaps=heatmaps, pca_rgb=pca_rgb, method=method)
