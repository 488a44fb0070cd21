"""``attnseg generate``: text-to-image with attention captured at the last step, and the image's masks."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attnseg.cli.common import handle_errors, model_banner, quiet_libraries, require_model
from attnseg.errors import ConfigError

__all__ = ["generate_cmd"]


def generate_cmd(
    prompt: str = typer.Argument(..., help="The text prompt."),
    out: Path = typer.Option(Path("out/generate"), "--out", "-o", help="Output folder."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Required: a Hub id, a local diffusers folder, or 'toyworld' (the bundled toy "
        "model, which only knows coloured shapes)."
    ),
    method: str = typer.Option("clustering", "--method", help="Method applied to the generated image."),
    param: list[str] = typer.Option(None, "--param", "-P", help="Method hyper-parameter NAME=VALUE (repeatable)."),
    k: str | None = typer.Option(None, "--k", help="clustering: cluster counts, e.g. 2,5,10."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (model default, else 50)."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Classifier-free guidance scale, 1 = none (model default, else 7.5)."
    ),
    size: int | None = typer.Option(None, "--size", help="Square image size in pixels (model default if unset)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device."),
    pca_rgb: bool = typer.Option(False, "--pca-rgb", help="clustering: write the per-head PCA RGB grid."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Generate an image from a prompt and segment it from the attention captured while generating it.

    Every option is checked before the model loads and before --out is created.
    """
    with handle_errors():
        from attnseg.cli.segment import method_kwargs
        from attnseg.cli.validate import (
            check_device,
            check_dtype,
            check_finite,
            check_int,
            check_out_dir,
            make_method,
            parse_int_list,
        )
        from attnseg.models.spec import describe_model

        model = require_model(model)
        ks = parse_int_list(k, "--k", minimum=1)
        check_int(steps, "--steps", minimum=1, hint="e.g. --steps 50")
        check_finite(guidance, "--guidance", minimum=0.0, hint="1 = no guidance, e.g. --guidance 7.5")
        check_int(size, "--size", minimum=1, hint="e.g. --size 512 (the model's default when unset)")
        check_dtype(dtype)
        check_out_dir(out)
        spec = describe_model(model)
        if size is not None:
            spec.check_size(size)
        if steps is not None and steps > spec.num_train_timesteps:
            raise ConfigError(f"--steps {steps} exceeds the model's training schedule of {spec.num_train_timesteps} "
                              f"steps; use --steps {spec.num_train_timesteps} or fewer")
        spec.check_prompt(prompt)
        seg = make_method(method, method_kwargs(method, param, ks=ks), flags={"ks": "--k"})
        device = check_device(device)

        quiet_libraries()
        from attnseg.cli.segment import write_clustering
        from attnseg.generation import generate
        from attnseg.models.loading import load_model

        adapter = load_model(model, dtype=dtype, device=device)
        if not as_json:
            typer.echo(model_banner(adapter, model), err=True)
        defaults = getattr(adapter, "recommended", {}).get("generate", {})
        steps = steps if steps is not None else defaults.get("num_inference_steps", 50)
        guidance = guidance if guidance is not None else defaults.get("guidance_scale", 7.5)
        result = generate(
            adapter, prompt, seg, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
            size=(size, size) if size else None,
        )
        out.mkdir(parents=True, exist_ok=True)
        result.image.save(out / "image.png")
        written = {"image": out / "image.png", **result.result.save(out, image=result.image, stem="image")}
        if result.clustering is not None:
            written.update(write_clustering(result.clustering, result.image, out, "image", pca_rgb=pca_rgb))
        summary = {"prompt": prompt, "model": model, "method": method, "timesteps": list(result.timesteps),
                   "files": {key: str(v) for key, v in written.items()}}
        (out / "generate.json").write_text(json.dumps(summary, indent=2))
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            typer.echo(f"generated {out / 'image.png'} ({steps} steps) and its {method} masks in {out}")
