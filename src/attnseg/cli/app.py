"""``attnseg``: training-free segmentation from diffusion attention, on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attnseg.cli.common import OneLineErrorGroup, add_debug_option, handle_errors, method_parameters

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
        "  attnseg segment panorama.jpg --model toyworld --fit pad --out out/   (masks at the image's own size)\n\n"
        "  attnseg segment photos/ --model ./sd15 --batch-size 4 --out out/   (streams; re-runs continue)\n\n"
        "  attnseg demo --out out/demo        (offline, bundled model)\n\n"
        "  attnseg serve                       (web page on http://127.0.0.1:7860, bundled model)\n\n"
        "  attnseg list                        (models, methods and their parameters)\n\n"
        "Bad input gets one line on stderr and exit code 2; an unexpected error (a bug) exit code 1 and a hint "
        "to re-run with --debug, which shows the traceback; segment exits with 3 when some images of a folder "
        "failed (the rest are written)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrorGroup,
)

add_debug_option(app)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List model families, bundled models and methods with their hyper-parameters."""
    from attnseg.methods.base import METHODS, list_methods
    from attnseg.models import family_defaults, family_variant_defaults, generation_defaults, list_model_families

    methods = {name: dict(method_parameters(METHODS.get(name))) for name in list_methods()}
    families = list_model_families()
    defaults = family_defaults()
    variants = family_variant_defaults()
    generation = generation_defaults()
    if as_json:
        typer.echo(json.dumps({"model_families": families, "methods": methods, "family_defaults": defaults,
                               "family_variant_defaults": variants, "generation_defaults": generation},
                              indent=2, default=list))
        return
    typer.echo("Model families (--model takes a Hub id or a local diffusers folder of these):")
    for name, desc in families.items():
        typer.echo(f"  {name:10s} {desc}")
    typer.echo("\nPer-family method settings (what a method runs with unless set; layer names of the reference\n"
               "checkpoint, mapped to the same relative depth on other configurations):")

    def shown(params: dict) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in params.items())

    for family, per_method in defaults.items():
        for method_name, params in per_method.items():
            typer.echo(f"  {family:10s} {method_name}: {shown(params)}")
            for variant, vparams in variants.get(family, {}).get(method_name, {}).items():
                typer.echo(f"  {family:10s} {method_name} --variant {variant}: {shown(vparams)}")
    for family, params in generation.items():
        typer.echo(f"  {family:10s} generate: {shown(params)}")
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
    from attnseg.cli.common import TOY_NOTE
    from attnseg.cli.demo import run_demo

    typer.echo(f"the demo runs the bundled toy model, {TOY_NOTE}")
    with handle_errors():
        run_demo(out, seed=seed)


def _mount_commands() -> None:
    from attnseg.cli.evaluate import evaluate_cmd, report_cmd
    from attnseg.cli.generate import generate_cmd
    from attnseg.cli.inspect_store import inspect_cmd
    from attnseg.cli.segment import segment_cmd
    from attnseg.cli.serve import serve_cmd

    app.command("segment")(segment_cmd)
    app.command("serve")(serve_cmd)
    app.command("generate")(generate_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
    app.command("inspect")(inspect_cmd)


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
