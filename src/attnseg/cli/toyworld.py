"""``attnseg toyworld``: train the toy text-to-image model and write toy-world datasets.

Mounted by the main app as ``attnseg toyworld ...``; runnable alone with ``python -m attnseg.cli.toyworld``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app"]

app = typer.Typer(help="The toy world: synthetic scenes with known masks and a small model trained on them.",
                  no_args_is_help=True)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="output folder (weights, config.json, meta.json, checkpoint)")],
    steps: Annotated[int, typer.Option(help="optimisation steps")] = 2800,
    batch_size: Annotated[int, typer.Option(help="scenes per step")] = 32,
    seed: Annotated[int, typer.Option(help="seeds the initial weights, timesteps and noise")] = 0,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate (warm-up, cosine decay)")] = 1e-3,
    image_size: Annotated[int, typer.Option(help="scene side in pixels")] = 32,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast")] = True,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue from OUT/checkpoint.pt")] = True,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 100,
    caption_dropout: Annotated[float, typer.Option(help="fraction of captions replaced by the empty prompt")] = 0.1,
    arch: Annotated[str, typer.Option(help="unet (the `toyworld` model) or flux (`toyworld-flux`)")] = "unet",
    json_out: Annotated[bool, typer.Option("--json", help="print the training record as JSON")] = False,
) -> None:
    """Train the toy model (resumable: re-run the same command to continue)."""
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from attnseg.errors import AttnSegError
    from attnseg.toyworld.flux import default_toy_flux_config
    from attnseg.toyworld.model import default_toy_config
    from attnseg.toyworld.train import train as run_training

    builders = {"unet": default_toy_config, "flux": default_toy_flux_config}
    if arch not in builders:
        raise typer.BadParameter(f"must be one of {', '.join(builders)}", param_hint="--arch")

    if threads is not None and threads < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--threads")
    limits = (("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--image-size", image_size, 8),
              ("--checkpoint-every", checkpoint_every, 1))
    for flag, value, minimum in limits:
        if value < minimum:
            raise typer.BadParameter(f"must be >= {minimum}, got {value}", param_hint=flag)
    if not (lr > 0 and lr < float("inf")):
        raise typer.BadParameter(f"must be a finite number > 0, got {lr}", param_hint="--lr")
    if threads is not None:
        torch.set_num_threads(threads)
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=json_out) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))

        def progress(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, loss=loss)

        try:
            result = run_training(
                out,
                steps=steps,
                batch_size=batch_size,
                seed=seed,
                lr=lr,
                image_size=image_size,
                resume=resume,
                progress=progress,
                bf16=bf16,
                checkpoint_every=checkpoint_every,
                caption_dropout=caption_dropout,
                config=builders[arch](image_size=image_size),
            )
        except AttnSegError as e:
            from attnseg.cli.common import fail

            fail(str(e))
    if json_out:
        typer.echo(json.dumps(result.meta, indent=1))
    else:
        typer.echo(
            f"wrote {result.out_dir}: {result.steps} steps, final loss {result.final_loss:.4f}, "
            f"{result.seconds / 60:.1f} min, {result.meta['bytes'] / 1e6:.1f} MB"
        )


# what `toyworld generate` writes (and what --overwrite removes first, nothing else)
_DATASET_ENTRIES = ("images", "labels", "instances", "captions.json", "classes.txt", "world.json")


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="dataset folder to write")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    n: Annotated[int, typer.Option(help="number of scenes")] = 200,
    seed: Annotated[int, typer.Option(help="index of the first scene within the split")] = 0,
    image_size: Annotated[int, typer.Option(help="scene side in pixels")] = 32,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace the dataset already in --out (its images/, labels/, instances/ and index files)"
    )] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Write a toy-world dataset: images/, labels/, instances/, captions.json, classes.txt.

    A folder that is not empty is refused unless --overwrite is given: scenes of an earlier, larger dataset would
    otherwise stay behind, undescribed by the new captions.
    """
    from attnseg.cli.common import handle_errors

    with handle_errors():
        import shutil

        from attnseg.cli.validate import check_int, check_out_dir
        from attnseg.errors import ConfigError
        from attnseg.toyworld.world import SPLITS, WorldConfig, write_dataset

        if split not in SPLITS:
            raise ConfigError(f"--split {split!r} is not a split; use one of {', '.join(SPLITS)}")
        check_int(n, "--n", minimum=1, hint="the number of scenes, e.g. --n 200")
        check_int(seed, "--seed", minimum=0)
        check_int(image_size, "--image-size", minimum=8, hint="e.g. --image-size 32")
        check_out_dir(out)
        try:
            world = WorldConfig(image_size=image_size)
        except ValueError as e:
            raise ConfigError(f"--image-size {image_size}: {e}") from None
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace the dataset there, or give "
                                  "a new folder")
            for name in _DATASET_ENTRIES:
                entry = out / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        try:
            root = write_dataset(out, split, n, seed, config=world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if json_out:
        typer.echo(json.dumps({"root": str(root), "split": split, "n": n, "seed": seed, "image_size": image_size}))
    else:
        typer.echo(f"wrote {n} {split} scenes ({image_size}x{image_size}) to {root}")


if __name__ == "__main__":
    app()
