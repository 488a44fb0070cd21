"""Shared fixtures: tiny random models, built once per session, all offline on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # CI machines have 2 cores; one thread keeps timings stable


@pytest.fixture(scope="session")
def tiny_adapter():
    from attnseg.testing import tiny_sd_adapter

    return tiny_sd_adapter(seed=0)


@pytest.fixture(scope="session")
def tiny_xl_adapter():
    from attnseg.testing import tiny_sd_adapter

    return tiny_sd_adapter(seed=0, xl=True)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    from attnseg.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def clip_tokenizer():
    from attnseg.testing import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture()
def rgb_image(tmp_path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = np.zeros((48, 40, 3), dtype=np.uint8)
    arr[:, :20] = (200, 30, 30)
    arr[:, 20:] = (30, 30, 200)
    arr = np.clip(arr + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "two-halves.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_dits():
    """One tiny random adapter per diffusion-transformer family (32 px input: an 8x8 token grid)."""
    from attnseg.testing import tiny_transformer_adapter

    return {family: tiny_transformer_adapter(family) for family in ("pixart", "sd3", "flux")}


@pytest.fixture(scope="session")
def tiny_dit_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random diffusion-transformer models saved as diffusers folders, one per family."""
    from attnseg.testing import save_tiny_transformer

    root = tmp_path_factory.mktemp("dit-models")
    return {family: save_tiny_transformer(root / family, family) for family in ("pixart", "sd3", "flux")}
