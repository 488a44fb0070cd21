"""Model adapters, one per family, and loading from the Hub or a local folder."""

from __future__ import annotations

from typing import Any

__all__ = ["family_defaults", "import_builtin_adapters", "list_model_families"]

_BUILTIN = ("unet", "pixart", "sd3", "flux", "toy")


def import_builtin_adapters() -> None:
    """Import attnseg's adapter modules once, so that each registers its family in ``ADAPTERS``."""
    import importlib

    for name in _BUILTIN:
        importlib.import_module(f"attnseg.models.{name}")


def list_model_families() -> dict[str, str]:
    """Supported families and bundled models with a one-line description."""
    return {
        "unet": "Stable Diffusion 1.x / 2.x / XL (Hub id or local diffusers folder)",
        "pixart": "PixArt-Sigma / PixArt-alpha (PixArtTransformer2DModel, T5 with attention mask, DDPM)",
        "sd3": "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, joint attention, image tokens first, flow matching)",
        "flux": "Flux.1 dev / schnell (FluxTransformer2DModel, joint attention, text tokens first, flow matching)",
        "toyworld": "attnseg's bundled toy text-to-image model (--model toyworld, offline)",
    }


def family_defaults() -> dict[str, dict[str, Any]]:
    """Per family the recommended method settings (``recommended`` of its adapter class), for ``attnseg list``.

    Layer names are those of the family's reference checkpoint; on a model of another depth the adapter maps
    them to the same relative depth (:meth:`~attnseg.models.base.DiffusionAdapter.method_defaults`).
    """
    from attnseg.models.base import ADAPTERS

    import_builtin_adapters()
    out: dict[str, dict[str, Any]] = {}
    for family in ADAPTERS:
        rec = getattr(ADAPTERS.get(family), "recommended", None)
        if isinstance(rec, dict) and rec:
            out[family] = rec
    return out
