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

__all__ = ["ADAPTERS", "DiffusionAdapter", "vae_latents"]


def vae_latents(
    vae: Any, pixels: Any, *, dtype: Any, device: Any = None, sample: bool = False, generator: Any = None
) -> Any:
    """``(B, 3, H, W)`` pixels in [-1, 1] -> ``(latents - shift_factor) * scaling_factor`` in ``dtype``: the
    encoding every latent-space adapter (UNet or transformer) shares. ``device`` moves the pixels first."""
    from attnseg.errors import ImageError

    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ImageError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode(pixels.to(device, vae_dtype) if device is not None else pixels.to(vae_dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(dtype)


class DiffusionAdapter(ABC):
    """Operations a method pipeline needs from a text-to-image diffusion model.

    Subclasses set :attr:`family` and register with ``@ADAPTERS.register(family)``.

    Attributes:
        denoiser: the ``torch.nn.Module`` whose attention layers are captured (UNet or transformer).
        resolution: default ``(H, W)`` pixel size images are resized to.
    """

    family: ClassVar[str]
    #: the family's settings per method name (see :mod:`attnseg.presets` and :meth:`method_defaults`)
    recommended: ClassVar[dict[str, dict[str, Any]]] = {}
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
    def size_multiple(self) -> int | None:
        """Input sides may be any multiple of this (any aspect ratio), so ``fit="native"`` can keep an image's
        shape; None when the model takes :attr:`resolution` only (the default)."""
        return None

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
        """The family's settings for ``method`` on this model: ``recommended[method]`` with the overrides of
        ``variant`` (its ``"variants"`` entry) merged in; a ``"run"`` entry holds run options (``timestep``,
        ``add_noise``, ``size``...). Subclasses may adapt them to the loaded model (e.g. layer names to its depth).

        :func:`attnseg.presets.resolve_settings` chooses the variant, puts the user's settings on top and is what
        the pipeline applies; this method only says what the family recommends.
        """
        from attnseg.presets import table_defaults

        return table_defaults(getattr(self, "recommended", None), method, variant=variant)

    def prompt_limits(self) -> list[tuple[Any, int, str]]:
        """``(tokenizer, token limit, encoder)`` of each text encoder that refuses a longer prompt (one-line error,
        :func:`attnseg.prompts.check_prompt_length`) instead of cutting it; empty (the default) when prompts are cut
        at the limit."""
        return []

    def check_prompt(self, text: str) -> None:
        """Refuse ``text`` when it is longer than a text encoder of :meth:`prompt_limits` takes."""
        from attnseg.prompts import check_prompt_length

        for tokenizer, limit, what in self.prompt_limits():
            check_prompt_length(tokenizer, text, limit, what)

    def prompt_fitting(self, text: str, words: Any) -> list[bool]:
        """Per word of ``words``: is all of it within what the text encoder(s) take of ``text``? With
        :meth:`prompt_limits`, read from the tokenizers alone (the prompt may be too long to encode); else from the
        encoded prompt (:func:`attnseg.prompts.words_within`). Methods that spread classes over several prompts
        decide with it (e.g. GoCA's ``split_prompts``)."""
        from attnseg.prompts import words_fitting, words_within

        limits = self.prompt_limits()
        if not limits:
            return words_within(self.encode_prompt(text), words)
        words = list(words)
        fits = [True] * len(words)
        for tokenizer, limit, _ in limits:
            fits = [a and b for a, b in zip(fits, words_fitting(tokenizer, text, words, limit), strict=True)]
        return fits

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
        """Noise clean latents to ``timestep`` with the model's training schedule (seeded).

        Implementations draw the noise on the generator's device (the CPU when there is no generator) and move it
        to the latents' device, so that one seed gives the same noise on every device (the pipeline passes a CPU
        generator). Drawing on the accelerator would give different numbers for the same seed.
        """

    @abstractmethod
    def denoise(self, latents: torch.Tensor, timestep: int, prompt: Prompt) -> torch.Tensor:
        """One denoiser pass without classifier-free guidance; returns the model output."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] (for generation)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode latents")


ADAPTERS: Registry[type] = Registry("model family")
