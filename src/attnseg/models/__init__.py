"""Model adapters, one per family, and loading from the Hub or a local folder."""

from __future__ import annotations

__all__ = ["list_model_families"]


def list_model_families() -> dict[str, str]:
    """Supported families and bundled models with a one-line description."""
    return {
        "unet": "Stable Diffusion 1.x / 2.x / XL (Hub id or local diffusers folder)",
        "toyworld": "attnseg's bundled toy text-to-image model (--model toyworld, offline)",
        "pixart": "PixArt-Sigma (not supported yet)",
        "flux": "Flux (not supported yet)",
    }
