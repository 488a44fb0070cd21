"""``attnseg``: training-free segmentation from diffusion attention, on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attnseg.cli.common import fail, handle_errors, method_parameters, parse_params, quiet_libraries

app = typer.Typer(
    name="attnseg",
    help=(
        "Segment images with no training, from the attention maps of a text-to-image diffusion model.\n\n"
        "Examples:\n\n"
        "  attnseg segment photo.jpg --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out out/\n\n"
        "  attnseg segment images/ --model ./my-sd-folder --method diffseg -P kl_thresholds=0.9,0.9,0.9 --out out/\n\n"
        "  attnseg demo --out out/demo        (offline, bundled model)\n\n"
        "  attnseg list                        (models, methods and their parameters)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (label PNG, overlay PNG, JSON per image)."),
    model: str = typer.Option(
        "toyworld", "--model", "-m", help="Hub model id, local diffusers folder, or 'toyworld' (bundled)."
    ),
    method: str = typer.Option("diffseg", "--method", help="Segmentation method (see `attnseg list`)."),
    param: list[str] = typer.Option(
        None, "--param", "-P", help="Method hyper-parameter NAME=VALUE (repeatable), e.g. -P refine=true."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt for the denoiser pass (method default if unset)."),
    timestep: int | None = typer.Option(None, "--timestep", help="Denoiser timestep (method default if unset)."),
    noise: bool | None = typer.Option(None, "--noise/--no-noise", help="Noise the latent to the timestep."),
    size: int | None = typer.Option(None, "--size", help="Square input size in pixels (model default if unset)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random draw."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
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
        seg = create_method(method, **parse_params(param))
        images_in = [load_image(p) for p in paths]  # fail on a bad image before loading the model
        adapter = load_model(model, dtype=dtype, device=device)
        pipe = AttentionSegmentationPipeline(adapter, seg)
        in_size = (size, size) if size else None
        smallest = adapter.latent_scale * 2
        for p, im in zip(paths, images_in, strict=False):
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
            for path, image in zip(paths, images_in, strict=False):
                stem = path.stem if path.stem not in stems else f"{path.stem}-{stems[path.stem]}"
                stems[path.stem] = stems.get(path.stem, 0) + 1
                output = pipe.run(
                    image, prompt=prompt, timestep=timestep, add_noise=noise, seed=seed, size=in_size,
                    store_path=out / f"{stem}.attention.safetensors" if save_store else None,
                )
                written = output.result.save(out, image=output.image, stem=stem)
                entry = {"image": str(path), **{k: str(v) for k, v in written.items()},
                         "num_segments": output.result.num_segments}
                summary.append(entry)
                progress.advance(task)
        if as_json:
            typer.echo(json.dumps({"model": model, "method": method, "images": summary}, indent=2))
        else:
            typer.echo(f"segmented {len(summary)} image(s) with {method} on {model}; results in {out}")


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List model families, bundled models and methods with their hyper-parameters."""
    from attnseg.methods.base import METHODS, list_methods
    from attnseg.models import list_model_families

    methods = {name: dict(method_parameters(METHODS.get(name))) for name in list_methods()}
    families = list_model_families()
    if as_json:
        typer.echo(json.dumps({"model_families": families, "methods": methods}, indent=2))
        return
    typer.echo("Model families (--model takes a Hub id or a local diffusers folder of these):")
    for name, desc in families.items():
        typer.echo(f"  {name:10s} {desc}")
    typer.echo("\nMethods (--method NAME, hyper-parameters with -P NAME=VALUE):")
    for name, params in methods.items():
        typer.echo(f"  {name}")
        for p, default in params.items():
            typer.echo(f"      {p} = {default}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Scene and noise seed."),
) -> None:
    """Offline demo on the bundled model: segment generated scenes and score them against ground truth."""
    from attnseg.cli.demo import run_demo

    with handle_errors():
        run_demo(out, seed=seed)


def _mount_commands() -> None:
    from attnseg.cli.evaluate import evaluate_cmd, report_cmd

    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)


_mount_commands()


def _mount_optional() -> None:
    try:
        from attnseg.cli.toyworld import app as toy_app
    except ImportError:
        return
    app.add_typer(toy_app, name="toyworld", help="Generate toy-world datasets and train the toy model.")


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
