"""``attnseg serve``: the web page, on the bundled toy model or any model given with ``--model``."""

from __future__ import annotations

import typer

from attnseg.cli.common import fail, handle_errors, model_banner, quiet_libraries

__all__ = ["serve_cmd"]


def serve_cmd(
    model: str = typer.Option(
        "toyworld", "--model", "-m", help="Hub id, local diffusers folder, or 'toyworld' (default: the bundled toy "
        "model, which only knows coloured shapes)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
) -> None:
    """Serve a web page to segment images: upload or pick an example, choose a method, download the masks.

    Runs offline: no analytics, no share link. Needs the app extra: pip install 'attnseg[app]'.
    """
    import importlib.util

    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    if importlib.util.find_spec("gradio") is None:
        fail("the web app needs Gradio: pip install 'attnseg[app]'")
    quiet_libraries()
    with handle_errors():
        from attnseg.models.loading import load_model
        from attnseg.web.app import launch

        adapter = load_model(model, dtype=dtype, device=device)
        typer.echo(model_banner(adapter, model))
        typer.echo(f"serving on http://{host}:{port} (Ctrl+C to stop)")
        launch(adapter, model, host=host, port=port)
