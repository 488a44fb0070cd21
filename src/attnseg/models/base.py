"""The adapter interface: one per model family.

An adapter hides a family's specifics (VAE or pixel space, tokenizer, conditioning, timestep grid)
behind one set of operations, so capture and methods never look at the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from attnseg.registry import Registry

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from attnseg.types import LayerInfo, Prompt

__all__ = ["ADAPTERS", "DiffusionAdapter"]


class DiffusionAdapter(ABC):
    """Operations a method pipeline needs from a text-to-image diffusion model.

    Subclasses set :attr:`family` and register with ``@ADAPTERS.register(family)``.

    Attributes:
        denoiser: the ``torch.nn.Module`` whose attention layers are captured (UNet or transformer).
        resolution: default ``(H, W)`` pixel size images are resized to.
    """

    family: ClassVar[str]
    denoiser: torch.nn.Module
    resolution: tuple[int, int]

    # -- description -------------------------------------------------------------------------
    @abstractmethod
    def attention_layers(self, size: tuple[int, int] | None = None) -> dict[str, LayerInfo]:
        """Every attention layer of the denoiser for pixel input ``size`` (default :attr:`resolution`),
        keyed by module name, in forward order."""

    @property
    @abstractmethod
    def latent_scale(self) -> int:
        """Pixels per latent cell along each side (8 for SD's VAE, 1 in pixel space)."""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (family, resolution, layer counts) for reports and ``attnseg list``.

        ``layers`` counts attention modules by kind; ``parts`` counts the self/cross/reverse parts of joint layers.
        """
        layers = self.attention_layers()
        kinds: dict[str, int] = {}
        parts: dict[str, int] = {}
        for info in layers.values():
            target = parts if info.part else kinds
            target[info.kind] = target.get(info.kind, 0) + 1
        out: dict[str, Any] = {"family": self.family, "resolution": list(self.resolution), "layers": kinds}
        if parts:
            out["parts"] = parts
        return out

    def method_defaults(self, method: str, *, variant: str | None = None) -> dict[str, Any]:
        """The family's recommended hyper-parameters for ``method`` on this model (``recommended[method]``).

        A ``"run"`` entry holds run options (``timestep``, ``add_noise``, ``size``...) rather than
        hyper-parameters; a ``"variants"`` entry holds per-variant overrides, merged in for ``variant``.
        Explicit user settings override all of them.
        """
        import copy

        rec = getattr(self, "recommended", None)
        params = copy.deepcopy(rec.get(method, {})) if isinstance(rec, dict) else {}
        variants = params.pop("variants", {})
        if variant is not None and variant in variants:
            params.update(copy.deepcopy(variants[variant]))
        return params

    def method_settings(self, method: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(hyper-parameters, run options)`` for ``method``: :meth:`method_defaults` (for the variant in
        ``overrides``, else the default one) with the explicit ``overrides`` on top."""
        base = self.method_defaults(method)
        variant = overrides.get("variant", base.get("variant"))
        params = self.method_defaults(method, variant=variant) if variant is not None else base
        run = params.pop("run", {})
        return {**params, **overrides}, dict(run)

    # -- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """RGB PIL image -> ``(1, 3, H, W)`` tensor in [-1, 1] on the adapter's device, resized
        as the adapter is configured (centre crop and/or resize)."""

    @abstractmethod
    def encode_image(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, C, h, w)`` (posterior mean, or a sample)."""

    @abstractmethod
    def encode_prompt(self, text: str) -> Prompt:
        """Tokenise and encode a prompt ("" allowed) into a :class:`~attnseg.types.Prompt`."""

    @abstractmethod
    def add_noise(
        self, latents: torch.Tensor, timestep: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise clean latents to ``timestep`` with the model's training schedule (seeded)."""

    @abstractmethod
    def denoise(self, latents: torch.Tensor, timestep: int, prompt: Prompt) -> torch.Tensor:
        """One denoiser pass without classifier-free guidance; returns the model output."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] (for generation)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode latents")


ADAPTERS: Registry[type] = Registry("model family")
