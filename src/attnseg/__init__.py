"""attnseg: training-free image segmentation from the attention maps of text-to-image diffusion models.

The public API is re-exported here and imported lazily, so ``import attnseg`` stays light
(no torch, diffusers or transformers until a name that needs them is used).

Example:
    >>> import attnseg
    >>> pipe = attnseg.AttentionSegmentationPipeline.from_pretrained("toyworld", "diffseg")  # doctest: +SKIP
    >>> result = pipe("scene.png")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AttnSegError": "attnseg.errors",
    "ConfigError": "attnseg.errors",
    "ImageError": "attnseg.errors",
    "ModelNotFoundError": "attnseg.errors",
    "TokenNotFoundError": "attnseg.errors",
    "UnsupportedModelError": "attnseg.errors",
    "LayerInfo": "attnseg.types",
    "Prompt": "attnseg.types",
    "SegmentationResult": "attnseg.types",
    "TokenSpan": "attnseg.types",
    "AttentionStore": "attnseg.capture.store",
    "AttentionTracer": "attnseg.capture.tracer",
    "DiffusionAdapter": "attnseg.models.base",
    "UNetAdapter": "attnseg.models.unet",
    "load_model": "attnseg.models.loading",
    "AttentionSegmentationPipeline": "attnseg.pipeline",
    "PipelineOutput": "attnseg.pipeline",
    "Segmenter": "attnseg.methods.base",
    "create_method": "attnseg.methods.base",
    "list_methods": "attnseg.methods.base",
    "DiffSeg": "attnseg.methods.diffseg",
    "GoCA": "attnseg.methods.goca",
    "TargetSegmenter": "attnseg.methods.target",
    "PCAClustering": "attnseg.methods.clustering",
    "generate": "attnseg.generation",
    "img2img_capture": "attnseg.generation",
    "find_word": "attnseg.prompts",
    "load_image": "attnseg.io.images",
    "read_image": "attnseg.io.images",
    "Placement": "attnseg.io.geometry",
}

__all__ = [
    "AttentionSegmentationPipeline",
    "AttentionStore",
    "AttentionTracer",
    "AttnSegError",
    "ConfigError",
    "DiffSeg",
    "DiffusionAdapter",
    "GoCA",
    "ImageError",
    "LayerInfo",
    "ModelNotFoundError",
    "PCAClustering",
    "PipelineOutput",
    "Placement",
    "Prompt",
    "SegmentationResult",
    "Segmenter",
    "TargetSegmenter",
    "TokenNotFoundError",
    "TokenSpan",
    "UNetAdapter",
    "UnsupportedModelError",
    "__version__",
    "create_method",
    "find_word",
    "generate",
    "img2img_capture",
    "list_methods",
    "load_image",
    "load_model",
    "read_image",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from attnseg.capture.store import AttentionStore
    from attnseg.capture.tracer import AttentionTracer
    from attnseg.errors import (
        AttnSegError,
        ConfigError,
        ImageError,
        ModelNotFoundError,
        TokenNotFoundError,
        UnsupportedModelError,
    )
    from attnseg.generation import generate, img2img_capture
    from attnseg.io.geometry import Placement
    from attnseg.io.images import load_image, read_image
    from attnseg.methods.base import Segmenter, create_method, list_methods
    from attnseg.methods.clustering import PCAClustering
    from attnseg.methods.diffseg import DiffSeg
    from attnseg.methods.goca import GoCA
    from attnseg.methods.target import TargetSegmenter
    from attnseg.models.base import DiffusionAdapter
    from attnseg.models.loading import load_model
    from attnseg.models.unet import UNetAdapter
    from attnseg.pipeline import AttentionSegmentationPipeline, PipelineOutput
    from attnseg.prompts import find_word
    from attnseg.types import LayerInfo, Prompt, SegmentationResult, TokenSpan
