"""``attnseg segment``: segment images with any method and write labels, overlays, JSON (and heatmaps)."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from attnseg.cli.common import handle_errors, model_banner, parse_params, quiet_libraries, require_model, warn
from attnseg.errors import ConfigError, ImageError
from attnseg.io import MAX_PIXELS

if TYPE_CHECKING:
    from attnseg.io.geometry import Fit, Placement

__all__ = [
    "EXIT_SOME_FAILED",
    "CheckedRun",
    "SegmentJob",
    "StreamSummary",
    "method_kwargs",
    "output_stems",
    "plan_outputs",
    "prepare_run",
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


@dataclass(frozen=True)
class CheckedRun:
    """What :func:`prepare_run` checked: the images with their output stems (:func:`output_stems`), the method (built
    from the user's settings alone), the user's method keywords (``params``: what the pipeline puts over the model
    family's settings; classes the model cannot represent already dropped with ``--allow-unknown``), the model's
    description, the fit and, for a run of one image, that image as decoded (keyed by its path) and the longer side
    it was reduced to while decoding (see :func:`attnseg.pipeline.decode_side`)."""

    items: list[tuple[Path, str]]
    method: Any
    spec: Any
    params: dict[str, Any] = field(default_factory=dict)
    fit: str = "pad"
    decoded: dict[Path, Any] = field(default_factory=dict)
    decoded_side: int | None = None

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.items]


def prepare_run(
    images: list[Path], out: Path, model: str, method: str, params: list[str] | None, *, size: int | None,
    timestep: int | None, allow_unknown: bool, named: dict[str, Any], fit: str = "pad",
    max_pixels: int = MAX_PIXELS, overwrite: bool = False, prompt: str | None = None,
) -> CheckedRun:
    """Every check of ``segment`` that needs no model: files, the fit, the output folder, the model's description,
    the method's hyper-parameters, timestep and size against the model, words against its tokenizer, ``prompt``
    against the token limits of text encoders that refuse longer prompts (diffusion transformers), and a single
    image (decoded here, so that its problems are bad input, exit 2). The images of a longer run are read one at a
    time later: one that cannot be read is skipped then (exit 3)."""
    from attnseg.cli.validate import check_images, check_method_words, check_out_dir, make_method, precheck_words
    from attnseg.models.spec import describe_model

    paths = check_images(images)  # first: a missing file answers before numpy, PIL or torch is imported
    from attnseg.io.geometry import check_fit

    try:
        fit = check_fit(fit)
    except ConfigError:
        raise ConfigError(f"--fit {fit!r} is not a fit; use pad, resize, crop or native") from None
    check_out_dir(out)
    spec = describe_model(model)
    if size is not None:
        spec.check_size(size)
    if not allow_unknown:  # explicit words first: no torch import for a typo in --classes
        precheck_words({**parse_params(params), **{k: v for k, v in named.items() if v is not None}}, spec.tokenizer)
    kwargs = method_kwargs(method, params, **named)
    seg = make_method(method, kwargs)
    if timestep is not None:
        spec.check_timestep(timestep)
    else:
        spec.check_timestep(seg.run_options().timestep, flag=f"{method}'s timestep (-P timestep=...)")
    checked = check_method_words(seg, method, kwargs, spec.tokenizer, allow_unknown=allow_unknown, warn=warn)
    for attr in ("classes", "background_objects"):  # words dropped by --allow-unknown stay dropped
        kept = getattr(checked, attr, None)
        if kept is not None and tuple(kept) != tuple(getattr(seg, attr, None) or ()):
            kwargs[attr] = list(kept)
    seg = checked
    if prompt:
        spec.check_prompt(prompt)
    if fit == "native" and getattr(seg, "square_grids", False):
        raise ConfigError(f"--fit native gives inputs of the image's shape, but {method} needs square attention "
                          "grids: use --fit pad (or resize, crop)")
    items = output_stems(paths)
    decoded: dict[Path, Any] = {}
    side = None
    if len(items) == 1 and (overwrite or not (Path(out) / f"{items[0][1]}.json").is_file()):
        from attnseg.io.images import read_image
        from attnseg.pipeline import decode_side

        path = items[0][0]
        side = decode_side((size, size) if size is not None else spec.resolution)
        image = read_image(path, max_side=side, max_pixels=max_pixels)  # before the model loads
        smallest = spec.latent_scale * 2
        h, w = image.size
        if min(h, w) < smallest:
            raise ImageError(f"{path} is {w}x{h} px; this model needs at least {smallest} px a side")
        decoded[path] = image
    return CheckedRun(items=items, method=seg, spec=spec, params=kwargs, fit=fit, decoded=decoded, decoded_side=side)


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
    allow_unknown: bool = typer.Option(
        False, "--allow-unknown", help="Skip class names the model's vocabulary cannot represent (with a warning)."
    ),
    paper_defaults: bool = typer.Option(
        False, "--paper-defaults", help="The method's paper settings (e.g. DiffSeg's absolute KL threshold 1.1) "
        "instead of the model family's defaults (`attnseg list` shows both)."
    ),
) -> None:
    """Segment images and write label PNGs, colour overlays and per-segment JSON at each image's own size.

    Every option, file and word is checked before the model loads and before --out is created. Folders stream:
    one image (or --batch-size images) in memory at a time; an unreadable image is reported and skipped;
    finished images are kept unless --overwrite. Exit status: 0 all written, 2 bad input (nothing done), 3 some
    images failed (the rest written).
    """
    with handle_errors():
        import math

        from attnseg.cli.validate import check_device, check_dtype, check_int, parse_int_list

        model = require_model(model)
        ks = parse_int_list(k, "--k", minimum=1)
        check_int(size, "--size", minimum=1, hint="e.g. --size 512 (the model's default when unset)")
        check_int(timestep, "--timestep", minimum=0)
        check_int(batch_size, "--batch-size", minimum=1, hint="e.g. --batch-size 4")
        if not (math.isfinite(max_megapixels) and max_megapixels > 0):
            raise ConfigError(f"--max-megapixels must be a positive number, got {max_megapixels}")
        check_dtype(dtype)
        # a prompt given to a method that owns its prompt (target, goca) goes to the method
        owns_prompt = method in ("target", "goca")
        max_pixels = int(max_megapixels * 1e6)
        checked = prepare_run(
            images, out, model, method, param, size=size, timestep=timestep, allow_unknown=allow_unknown,
            named={"target": target, "classes": classes, "ks": ks, "variant": variant,
                   "prompt": prompt if owns_prompt else None},
            fit=fit, max_pixels=max_pixels, overwrite=overwrite, prompt=prompt,
        )
        items, seg, fit_choice = checked.items, checked.method, checked.fit
        job = SegmentJob(
            out=out, fit=fit_choice, size=(size, size) if size else None, seed=seed,  # type: ignore[arg-type]
            prompt=None if owns_prompt else prompt, timestep=timestep, noise=noise, img2img=img2img,
            batch_size=batch_size, overwrite=overwrite, max_pixels=max_pixels, heatmaps=heatmaps,
            pca_rgb=pca_rgb, save_store=save_store,
        )
        device = check_device(device)

        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        quiet_libraries()
        from attnseg.models.loading import load_model
        from attnseg.pipeline import AttentionSegmentationPipeline

        adapter = load_model(model, dtype=dtype, device=device)
        if not as_json:
            typer.echo(model_banner(adapter, model), err=True)
        # the method by name with the user's keywords: the pipeline puts the family's settings under them
        pipe = AttentionSegmentationPipeline(adapter, method, fit=fit_choice,
                                             preset="paper" if paper_defaults else "family", **checked.params)
        timestep_used = pipe.options(timestep=timestep).timestep
        if timestep is None and timestep_used != seg.run_options().timestep:
            checked.spec.check_timestep(timestep_used, flag=f"the {adapter.family} timestep of {method}")
        from attnseg.pipeline import decode_side

        # the image checked before loading is reused when the model's input size (a preset's may differ from the
        # configuration's) asks for the same decoding; else the stream reads it again
        decoded = checked.decoded if checked.decoded_side == decode_side(pipe.input_size(job.size)) else {}
        out.mkdir(parents=True, exist_ok=True)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), transient=True, disable=as_json,
        ) as progress:
            task = progress.add_task("segmenting", total=len(items))
            summary = stream_segment(pipe, items, job, strict=len(items) == 1, decoded=decoded,
                                     on_image=lambda _entry: progress.advance(task))
        report = {"model": model, "method": method, "fit": fit_choice, "settings": pipe.settings.to_dict(),
                  **summary.to_dict()}
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            typer.echo(summary.describe(method=method, model=model, out=out))
        if summary.failed:
            raise typer.Exit(EXIT_SOME_FAILED)


def plan_outputs(images: list[Path], out: Path) -> list[tuple[Path, str]]:
    """``(image path, output stem)`` for every image of the arguments (folders expanded, sorted; see
    :func:`output_stems`)."""
    from attnseg.io.images import expand_image_paths

    return output_stems(expand_image_paths(images))


def output_stems(paths: list[Path]) -> list[tuple[Path, str]]:
    """``(image path, output stem)`` for image paths; stems that repeat (same name in two folders) get ``-1``,
    ``-2``... in argument order, so re-runs find their outputs."""
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
    on_image: Callable[[dict[str, Any]], None] | None = None, decoded: Mapping[Path, Any] | None = None,
) -> StreamSummary:
    """Segment images one at a time (or ``job.batch_size`` at a time), writing each as it finishes.

    Only the images of the current batch are in memory, so peak memory does not grow with the number of
    images. An image whose ``<stem>.json`` exists is kept unless ``job.overwrite`` (the JSON is written last, so
    it marks a finished image). An image that cannot be read or segmented is recorded in ``failed`` and
    skipped; with ``strict`` its error is raised instead (a run of one image). ``decoded`` holds images already
    read (:class:`~attnseg.io.images.DecodedImage` by path, e.g. the one image :func:`prepare_run` checked).
    """
    from attnseg.errors import AttnSegError

    decoded = decoded or {}
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
                prepared = pipe.prepare(decoded.get(path, path), size=job.size, fit=job.fit, max_pixels=job.max_pixels)
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

    cap = img2img_capture(pipe.adapter, prepared.decoded, pipe.method, seed=seed, size=pipe.input_size(size),
                          prompt=prompt, fit=fit)
    encoded = pipe.adapter.encode_prompt(cap.store.meta.get("prompt", "") or "")
    result = pipe.method.segment(cap.store, prompt=encoded, out_size=cap.placement.model)
    return PipelineOutput(model_result=result, image=cap.image, store=cap.store, placement=cap.placement,
                          source=cap.source, stores=(cap.store,))


def write_clustering(
    clustering: Any, image: Any, out: Path, stem: str, *, pca_rgb: bool, placement: Placement | None = None
) -> dict[str, Path]:
    """One label PNG and overlay per k, the merged masks (one PNG each + JSON with their k), the PCA picture;
    with ``placement`` (and maps at the model size) all at the original image's size."""
    import numpy as np
    import torch
    from PIL import Image

    from attnseg.io.export import label_image, overlay

    def back(labels: Any) -> Any:
        if placement is not None and tuple(labels.shape[-2:]) == placement.model:
            return placement.labels_to_original(labels)
        return labels.cpu().numpy()

    written: dict[str, Path] = {}
    for kk, labels in clustering.label_maps.items():
        arr = back(labels)
        label_image(arr).save(out / f"{stem}.k{kk}.labels.png")  # 16-bit when ids exceed 255
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
    if save_store:  # classes spread over several prompts: NAME.attention-p2.safetensors... for the others
        from attnseg.pipeline import part_store_path

        stores = getattr(output, "stores", ()) or (output.store,)
        for i, store in enumerate(stores):
            written["store" if i == 0 else f"store:p{i + 1}"] = store.save(
                part_store_path(out / f"{stem}.attention.safetensors", i)
            )
    return {**save_result(result, out, image=image, stem=stem, placement=placement), **written}


def write_extras(
    output: Any, out: Path, stem: str, *, heatmaps: bool, pca_rgb: bool, method: Any = None
) -> dict[str, Path]:
    """Kept for callers of the earlier name: :func:`write_output`."""
    return write_output(output, out, stem, heatmaps=heatmaps, pca_rgb=pca_rgb, method=method)
