"""``attnseg serve``: a web page to segment an image with any method (Gradio, in the ``attnseg[app]`` extra).

Importing this package is light; :mod:`attnseg.web.app` imports Gradio.
"""

from __future__ import annotations

__all__ = ["EXAMPLES_DIR", "example_images"]

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent / "examples"


def example_images() -> list[Path]:
    """The bundled example images (non-square toy-world pictures), sorted by name."""
    return sorted(EXAMPLES_DIR.glob("*.png"))
