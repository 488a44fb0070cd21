"""Shared fixtures: tiny random models, built once per session, all offline; and the ``device`` fixture.

``device`` runs a test on the CPU always and on CUDA and MPS when this process can use them, so that the same
``make test`` checks a GPU machine. Where a device is absent its variant is collected and skipped with the
reason (``pytest -rs`` lists them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # CI machines have 2 cores; one thread keeps timings stable

# Property tests: the same few examples on every run (derandomised, no example database), no per-example deadline
# (a loaded machine must not fail a test). HYPOTHESIS_PROFILE=thorough tries many more.
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


#: The devices the ``device`` fixture runs over: the CPU always, CUDA and MPS where present.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="no CUDA device (torch.cuda.is_available() is False): the cuda variant runs on a GPU machine",
        ),
    ),
    pytest.param(
        "mps", id="mps", marks=pytest.mark.skipif(
            not _mps_available(), reason="no MPS device (torch.backends.mps.is_available() is False)",
        ),
    ),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> torch.device:
    """Each device present: ``cpu``, ``cuda:<current>``, ``mps``."""
    from attnseg.devices import as_device

    return as_device(request.param)


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


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test: code that promises float32 results must ask for float32
    wherever it creates a tensor, instead of relying on the default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


@pytest.fixture
def foreign_default_device():
    """A default device other than the inputs' for one test (``with foreign_default_device: f(cpu_tensors)``).

    On a GPU machine the data lives on ``cuda`` while tensors created without ``device=`` land on the CPU; here the
    inputs stay on the CPU and the default becomes ``meta`` (no data), so a tensor created without following its
    inputs' device makes the computation fail or return no values on any machine.
    """
    return torch.device("meta")
