"""Loading models from a Hugging Face Hub id or a local diffusers folder."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnseg.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from attnseg.models.spec import (
    PIPELINE_FAMILIES,
    TRANSFORMER_FAMILIES,
    Component,
    _hub_snapshot,
    component_class,
    describe_model,
    detect_family,
    download_hint,
    hub_offline,
    read_json_file,
)

__all__ = [
    "Component",
    "detect_family",
    "load_components",
    "load_model",
    "load_pipeline_components",
    "read_model_index",
]

# kept here for callers that import them from this module (the tables live in attnseg.models.spec)
_PIPELINE_FAMILIES = PIPELINE_FAMILIES
_TRANSFORMER_FAMILIES = TRANSFORMER_FAMILIES


def _offline() -> bool:
    return hub_offline()


def read_model_index(id_or_path: str, *, local_files_only: bool | None = None, revision: str | None = None) -> dict:
    """Read ``model_index.json`` from a local folder or the Hub (cache first; one quick probe of the Hub when the
    file is not cached, so that an offline machine fails at once with one line)."""
    path = Path(id_or_path).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers model folder: {index} is missing "
                "(save one with `pipe.save_pretrained(DIR)`, or download a Hub repository with its model_index.json)"
            )
        return read_json_file(index, f"model {id_or_path}")
    if id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model folder not found: {id_or_path}")
    snapshot = _hub_snapshot(id_or_path, revision, local_only=bool(local_files_only))
    return read_json_file(snapshot / "model_index.json", f"model {id_or_path}")


def load_pipeline_components(
    id_or_path: str,
    components: Sequence[Component],
    *,
    family: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Load the components an adapter takes from a Hub id or a local diffusers folder.

    Every component is checked first (listed in ``model_index.json``, its sub-folder present in a local folder),
    so a folder missing its T5 encoder fails in one line before any weight is read. Classes come from
    ``model_index.json`` (``[library, class]``).

    Returns:
        ``{name: object or None}`` keyword arguments for the adapter's constructor.
    """
    index = read_model_index(id_or_path, local_files_only=local_files_only, revision=revision)
    found = detect_family(index)
    if found != family:
        raise UnsupportedModelError(f"{id_or_path} is a {found} model, not {family}")
    folder = Path(id_or_path).expanduser()
    local = folder.exists()
    plan: list[tuple[Component, str, str]] = []
    out: dict[str, Any] = {}
    for comp in components:
        entry = index.get(comp.name)
        cls_name = component_class(entry)
        if cls_name is None:
            if comp.required:
                raise ModelNotFoundError(
                    f"{id_or_path} has no {comp.role}: its model_index.json lists no {comp.name!r}; "
                    + download_hint(id_or_path, comp.name)
                )
            out[comp.name] = None
            continue
        if local:
            sub = folder / comp.name
            marker = comp.config_file
            if not sub.is_dir() or (marker is not None and not (sub / marker).is_file()) or not any(sub.iterdir()):
                raise ModelNotFoundError(
                    f"{folder} is missing its {comp.role} ({comp.name}/); " + download_hint(id_or_path, comp.name)
                )
        plan.append((comp, str(entry[0]), cls_name))

    common: dict[str, Any] = {"revision": revision}
    if local_files_only or _offline():
        common["local_files_only"] = True
    for comp, library, cls_name in plan:
        try:
            cls = getattr(importlib.import_module(library), cls_name)
            kwargs = dict(common, subfolder=comp.name)
            if comp.kind == "model":
                kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
            obj = cls.from_pretrained(id_or_path, **kwargs)
        except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise ModelNotFoundError(f"cannot load the {comp.role} ({comp.name}) of {id_or_path}: {first}") from None
        if comp.kind == "model":
            obj = obj.to(device).eval().requires_grad_(False)
        out[comp.name] = obj
    return out


def load_components(
    id_or_path: str,
    *,
    family: str = "unet",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Load the components a family's adapter takes, as keyword arguments for its constructor."""
    index = read_model_index(id_or_path, local_files_only=local_files_only, revision=revision)
    found = detect_family(index)
    if found != family:
        raise UnsupportedModelError(f"{id_or_path} is a {found} model, not {family}")
    if family != "unet":
        raise UnsupportedModelError(f"load_components loads UNet models; load {family} models with load_model")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common: dict[str, Any] = {"revision": revision}
    if local_files_only or _offline():
        common["local_files_only"] = True
    try:
        unet = UNet2DConditionModel.from_pretrained(id_or_path, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(id_or_path, subfolder="vae", torch_dtype=dtype, **common)
        scheduler = DDPMScheduler.from_pretrained(id_or_path, subfolder="scheduler", **common)
        tokenizer = CLIPTokenizer.from_pretrained(id_or_path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(id_or_path, subfolder="text_encoder", dtype=dtype, **common)
        extra: dict[str, Any] = {}
        if "text_encoder_2" in index:
            extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(id_or_path, subfolder="tokenizer_2", **common)
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                id_or_path, subfolder="text_encoder_2", dtype=dtype, **common
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"cannot load the components of {id_or_path}: {first}") from None
    for module in (unet, vae, text_encoder, *[m for k, m in extra.items() if k == "text_encoder_2"]):
        module.to(device).eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler, **extra}


TOY_MODELS = {"toyworld": "unet", "toyworld-flux": "flux"}
"""The bundled toy models by name, and their architecture."""


def load_model(
    id_or_path: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Any:
    """Load an adapter for any supported model: a Hub id, a local folder, or ``"toyworld"`` (bundled).

    Example:
        >>> adapter = load_model("toyworld")  # doctest: +SKIP
    """
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    from attnseg.toyworld.model import is_toy_model_dir, toy_model_arch

    if id_or_path in TOY_MODELS or is_toy_model_dir(id_or_path):
        arch = TOY_MODELS.get(id_or_path) or toy_model_arch(id_or_path)
        path = None if id_or_path in TOY_MODELS else id_or_path
        if arch == "flux":
            from attnseg.models.toy_flux import ToyFluxAdapter

            return ToyFluxAdapter.from_pretrained(path, dtype=dtype, device=device, **kwargs)
        from attnseg.models.toy import ToyAdapter

        return ToyAdapter.from_pretrained(path, dtype=dtype, device=device, **kwargs)
    local_only = kwargs.pop("local_files_only", None)
    if not local_only:
        describe_model(id_or_path)  # every configuration file checked (one-line errors) before the weights load
    index = read_model_index(id_or_path, local_files_only=local_only)
    family = detect_family(index)
    from attnseg.models import import_builtin_adapters
    from attnseg.models.base import ADAPTERS

    import_builtin_adapters()
    return ADAPTERS.get(family).from_pretrained(
        id_or_path, dtype=dtype, device=device, local_files_only=local_only, **kwargs
    )
