"""``attnseg segment``: segment images with any method and write labels, overlays, JSON (and heatmaps)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import typer

from attnseg.cli.common import fail, handle_errors, parse_params, quiet_libraries

__all__ = ["method_kwargs", "segment_cmd", "write_clustering", "write_extras"]


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


def segment_cmd(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (label PNG, overlay PNG, JSON per image)."),
    model: str = typer.Option(
        "toyworld", "--model", "-m", help="Hub model id, local diffusers folder, or 'toyworld' (bundled)."
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
    size: int | None = typer.Option(None, "--size", help="Square input size in pixels (model default if unset)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random draw."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    img2img: bool = typer.Option(
        False, "--img2img", help="Light img2img noising (a few steps, capture at the last) instead of one pass."
    ),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Also write each continuous score map as a PNG."),
    pca_rgb: bool = typer.Option(False, "--pca-rgb", help="clustering: write the per-head PCA RGB grid."),
    save_store: bool = typer.Option(False, "--save-store", help="Also save the captured attention (safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary of all images on stdout."),
) -> None:
    """Segment images and write label PNGs, colour overlays and per-segment JSON."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    quiet_libraries()
    with handle_errors():
        from attnseg.io.images import expand_image_paths, load_image
        from attnseg.methods.base import create_method
        from attnseg.models.loading import load_model
        from attnseg.pipeline import AttentionSegmentationPipeline

        paths = expand_image_paths(images)
        ks = tuple(int(v) for v in k.split(",") if v.strip()) if k else None
        # a prompt given to a method that owns its prompt (target, goca) goes to the method
        owns_prompt = method in ("target", "goca")
        kwargs = method_kwargs(
            method, param, target=target, classes=classes, ks=ks, variant=variant,
            prompt=prompt if owns_prompt else None,
        )
        seg = create_method(method, **kwargs)
        images_in = [load_image(p) for p in paths]  # fail on a bad image before loading the model
        adapter = load_model(model, dtype=dtype, device=device)
        # the model family's recommended settings fill in what was not given
        params, run = adapter.method_settings(method, kwargs)
        if params != kwargs:
            seg = create_method(method, **params)
        pipe = AttentionSegmentationPipeline(adapter, seg)
        timestep = timestep if timestep is not None else run.get("timestep")
        noise = noise if noise is not None else run.get("add_noise")
        in_size = (size, size) if size else (tuple(run["size"]) if run.get("size") else None)
        smallest = adapter.latent_scale * 2
        for p, im in zip(paths, images_in, strict=True):
            if min(im.size) < smallest:
                fail(f"{p} is {im.size[0]}x{im.size[1]} px; this model needs at least {smallest} px a side")
        out.mkdir(parents=True, exist_ok=True)
        summary = []
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), transient=True, disable=as_json,
        ) as progress:
            task = progress.add_task("segmenting", total=len(paths))
            stems: dict[str, int] = {}
            for path, image in zip(paths, images_in, strict=True):
                stem = path.stem if path.stem not in stems else f"{path.stem}-{stems[path.stem]}"
                stems[path.stem] = stems.get(path.stem, 0) + 1
                store_path = out / f"{stem}.attention.safetensors" if save_store else None
                if img2img:
                    output = _img2img(pipe, image, prompt=None if owns_prompt else prompt, seed=seed, size=in_size,
                                      store_path=store_path)
                else:
                    output = pipe.run(
                        image, prompt=None if owns_prompt else prompt, timestep=timestep, add_noise=noise,
                        seed=seed, size=in_size, store_path=store_path,
                    )
                written = write_extras(output, out, stem, heatmaps=heatmaps, pca_rgb=pca_rgb, method=seg)
                entry = {"image": str(path), **{key: str(v) for key, v in written.items()},
                         "num_segments": output.result.num_segments}
                summary.append(entry)
                progress.advance(task)
        if as_json:
            typer.echo(json.dumps({"model": model, "method": method, "images": summary}, indent=2))
        else:
            typer.echo(f"segmented {len(summary)} image(s) with {method} on {model}; results in {out}")


def _img2img(pipe: Any, image: Any, *, prompt: str | None, seed: int, size: Any, store_path: Path | None) -> Any:
    """The paper-style real-image reading: light img2img (the method's strength and steps), then segment."""
    from attnseg.generation import img2img_capture
    from attnseg.pipeline import PipelineOutput

    cap = img2img_capture(pipe.adapter, image, pipe.method, seed=seed, size=size, prompt=prompt)
    if store_path is not None:
        cap.store.save(store_path)
    encoded = pipe.adapter.encode_prompt(cap.store.meta.get("prompt", "") or "")
    result = pipe.method.segment(cap.store, prompt=encoded, out_size=(cap.image.size[1], cap.image.size[0]))
    return PipelineOutput(result=result, image=cap.image, store=cap.store)


def write_clustering(clustering: Any, image: Any, out: Path, stem: str, *, pca_rgb: bool) -> dict[str, Path]:
    """One label PNG and overlay per k, the merged masks (one PNG each + JSON with their k), the PCA picture."""
    import numpy as np
    from PIL import Image

    from attnseg.io.export import overlay

    written: dict[str, Path] = {}
    for kk, labels in clustering.label_maps.items():
        arr = labels.cpu().numpy()
        Image.fromarray(arr.astype(np.uint8)).save(out / f"{stem}.k{kk}.labels.png")
        written[f"overlay:k{kk}"] = out / f"{stem}.k{kk}.overlay.png"
        overlay(image, arr).save(written[f"overlay:k{kk}"])
    mask_dir = out / f"{stem}.masks"
    mask_dir.mkdir(exist_ok=True)
    records = []
    for i, (mask, kk, label) in enumerate(zip(clustering.masks, clustering.mask_k, clustering.mask_label, strict=True)):
        path = mask_dir / f"mask{i:03d}-k{kk}.png"
        Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).save(path)
        records.append({"file": path.name, "k": int(kk), "label": int(label), "area": int(mask.sum())})
    (mask_dir / "masks.json").write_text(json.dumps({"masks": records, **clustering.summary()}, indent=2,
                                                    default=str))
    written["masks"] = mask_dir
    if pca_rgb:
        written["pca_rgb"] = out / f"{stem}.pca-rgb.png"
        clustering.pca_rgb_image().save(written["pca_rgb"])
    return written


def write_extras(
    output: Any, out: Path, stem: str, *, heatmaps: bool, pca_rgb: bool, method: Any = None
) -> dict[str, Path]:
    """Write the result (labels, overlay, JSON), its heatmaps and the clustering outputs; return the paths."""
    from attnseg.io.export import save_heatmap

    result = output.result
    written = result.save(out, image=output.image, stem=stem)
    if heatmaps and result.scores is not None and result.scores.is_floating_point():
        k = result.scores.shape[0]
        names = result.label_names or ()
        if len(names) != k:  # e.g. the target method: one continuous map for the last (target) label
            names = (names[-1],) if k == 1 and names else tuple(str(i) for i in range(k))
        for i, name in enumerate(names):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))
            written[f"heatmap:{name}"] = save_heatmap(result.scores[i].numpy(), out / f"{stem}.heatmap.{i}-{safe}.png")
    cluster = getattr(method, "cluster", None)
    if cluster is not None:  # principal-component clustering: every k, the merged masks, the PCA picture
        written.update(write_clustering(cluster(output.store, out_size=result.size), output.image, out, stem,
                                        pca_rgb=pca_rgb))
    return written
