"""``attnseg inspect``: describe a saved attention store without loading the model or the tensors."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from attnseg.cli.common import handle_errors

__all__ = ["inspect_cmd"]


def inspect_cmd(
    store: Path = typer.Argument(..., help="An attention store saved by `segment --save-store` or `evaluate`."),
    as_json: bool = typer.Option(False, "--json", help="Print the store's header and tensor shapes as JSON."),
) -> None:
    """Show what a saved attention store holds: its format, the capture settings and every map with its shape.

    The store is read in full, so that a damaged file is reported here rather than by a later run.
    """
    with handle_errors():
        from attnseg.capture.pca import _FORMAT as PCA_FORMAT
        from attnseg.capture.pca import PCAHeadStore
        from attnseg.capture.store import AttentionStore, read_store_header

        header, shapes = read_store_header(store)
        reader = PCAHeadStore if header.get("format") == PCA_FORMAT else AttentionStore
        reader.load(store)  # every field and tensor checked
        entries = header.get("entries") if isinstance(header.get("entries"), dict) else {}
        meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
        if as_json:
            typer.echo(json.dumps({"file": str(store), "header": header,
                                   "tensors": {k: list(v) for k, v in shapes.items()}}, indent=2, default=str))
            return
        typer.echo(f"{store}: {header.get('format', 'attnseg.AttentionStore')} v{header.get('version', 0)}, "
                   f"heads={header.get('heads', '?')}, group={header.get('group', '?')}, "
                   f"dtype={header.get('dtype', '?')}")
        for key in ("model", "family", "prompt", "timestep", "image_size", "seed"):
            if key in meta:
                typer.echo(f"  {key}: {meta[key]!r}")
        for key, entry in entries.items():
            shape = shapes.get(key)
            info = entry if isinstance(entry, dict) else {}
            typer.echo(f"  {key}: {info.get('kind', '?')} grid {info.get('grid', '?')} x{info.get('count', '?')} "
                       f"calls, tensor {list(shape) if shape is not None else 'missing'}")
