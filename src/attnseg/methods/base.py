"""The interface every segmentation method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from attnseg.registry import Registry

if TYPE_CHECKING:
    import torch

    from attnseg.capture.store import AttentionStore
    from attnseg.types import AttentionKind, LayerInfo, Prompt, SegmentationResult

__all__ = ["METHODS", "RunOptions", "Segmenter", "create_method", "list_methods"]


@dataclass(frozen=True)
class RunOptions:
    """How the denoiser must be run for a method (the method's reference settings).

    Attributes:
        timestep: the timestep fed to the denoiser (its embedding), on the scheduler's training grid.
        add_noise: noise the latent to ``timestep`` before the pass (False: clean latent, as DiffSeg).
        sample_posterior: draw from the VAE posterior instead of taking its mean.
        prompt: the default prompt ("" = unconditional).
        heads: ``"mean"`` to average heads as maps arrive, ``"all"`` to keep them.
        group: ``"layer"`` keeps one map per layer; ``"resolution"`` averages layers of one kind and
            resolution as they arrive (much less memory).
    """

    timestep: int = 0
    add_noise: bool = False
    sample_posterior: bool = False
    prompt: str = ""
    heads: str = "mean"
    group: str = "resolution"


@runtime_checkable
class Segmenter(Protocol):
    """A training-free segmentation method that reads an :class:`~attnseg.capture.store.AttentionStore`.

    Hyper-parameters are keyword-only and validated in ``__init__``.
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[AttentionKind]]

    def run_options(self) -> RunOptions:
        """The reference settings for the denoiser pass that feeds this method."""
        ...

    def select_layers(self, layers: dict[str, LayerInfo]) -> list[str]:
        """Names of the layers whose attention must be captured (the rest stay on the fused path)."""
        ...

    # Optional hooks (looked up with getattr by the pipeline):
    #   make_store(adapter, layers, meta) -> AttentionStore   a custom reducing store (e.g. GoCA head weights)
    #   features(adapter) -> list[str]                       module names whose outputs the store needs
    #   square_grids: bool                                   True if only square attention grids are accepted
    #                                                        (non-square inputs are then refused before capture)

    def segment(
        self,
        store: AttentionStore,
        *,
        prompt: Prompt | None = None,
        out_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationResult:
        """Segment from captured attention; ``out_size`` is the ``(H, W)`` of the returned labels."""
        ...


METHODS: Registry[type] = Registry("method")


def create_method(name: str, **kwargs: object) -> Segmenter:
    """Instantiate a registered method by name with keyword hyper-parameters."""
    import inspect

    from attnseg.errors import ConfigError

    _import_builtin_methods()
    cls = METHODS.get(name)
    accepted = {n for n, p in inspect.signature(cls).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(accepted))}"
        )
    return cls(**kwargs)


def list_methods(pattern: str = "*") -> list[str]:
    _import_builtin_methods()
    return METHODS.list(pattern)


def _import_builtin_methods() -> None:
    """Import every method module of this package once, so that each registers itself."""
    import importlib
    import pkgutil

    import attnseg.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base", "ops") and not info.name.startswith("_"):
            importlib.import_module(f"attnseg.methods.{info.name}")
