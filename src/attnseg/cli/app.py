"""``attnseg``: training-free segmentation from diffusion attention, on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attnseg.cli.common import handle_errors, method_parameters

app = typer.Typer(
    name="attnseg",
    help=(
        "Segment images with no training, from the attention maps of a text-to-image diffusion model.\n\n"
        "Examples:\n\n"
        "  attnseg segment photo.jpg --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out out/\n\n"
        "  attnseg segment images/ --model ./my-sd-folder --method diffseg -P kl_thresholds=0.9,0.9,0.9 --out out/\n\n"
        "  attnseg segment photo.jpg --model ./sd15 --method goca --classes 'cat, grass' --out out/\n\n"
        "  attnseg generate 'a baby in a yellow toy car' --model ./sd21 --method clustering --k 2,5,10\n\n"
        "  attnseg evaluate --protocol diffseg-cocostuff27 --root /data/coco --model ./sd14 --out runs/ds\n\n"
        "  attnseg demo --out out/demo        (offline, bundled model)\n\n"
        "  attnseg list                        (models, methods and their parameters)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List model families, bundled models and methods with their hyper-parameters."""
    from attnseg.methods.base import METHODS, list_methods
    from attnseg.models import family_defaults, list_model_families

    methods = {name: dict(method_parameters(METHODS.get(name))) for name in list_methods()}
    families = list_model_families()
    defaults = family_defaults()
    if as_json:
        typer.echo(json.dumps({"model_families": families, "methods": methods, "family_defaults": defaults},
                              indent=2, default=list))
        return
    typer.echo("Model families (--model takes a Hub id or a local diffusers folder of these):")
    for name, desc in families.items():
        typer.echo(f"  {name:10s} {desc}")
    typer.echo("\nPer-family method defaults (used unless set; layer names of the reference checkpoint, mapped to\n"
               "the same relative depth on other configurations):")
    for family, per_method in defaults.items():
        for method_name, params in per_method.items():
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            typer.echo(f"  {family:10s} {method_name}: {shown}")
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
    from attnseg.cli.generate import generate_cmd
    from attnseg.cli.segment import segment_cmd

    app.command("segment")(segment_cmd)
    app.command("generate")(generate_cmd)
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
