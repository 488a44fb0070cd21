"""The toy world: synthetic scenes with exact masks and captions, and a small text-to-image diffusion model
trained on them (bundled), so attnseg can be developed and tested end to end without downloading weights.

Importing this package is light (numpy only); torch, diffusers and transformers load when a model is built.
"""

from __future__ import annotations

from attnseg.toyworld.model import ToyConfig, ToyModel, build_toy_model, default_toy_config, load_toy_model
from attnseg.toyworld.tokenizer import Encoding, WordTokenizer
from attnseg.toyworld.train import TrainResult, train
from attnseg.toyworld.world import SPLITS, Scene, SceneObject, WorldConfig, generate_scene, scene_seed, write_dataset

__all__ = [
    "SPLITS",
    "Encoding",
    "Scene",
    "SceneObject",
    "ToyConfig",
    "ToyModel",
    "TrainResult",
    "WordTokenizer",
    "WorldConfig",
    "build_toy_model",
    "default_toy_config",
    "generate_scene",
    "load_toy_model",
    "scene_seed",
    "train",
    "write_dataset",
]
