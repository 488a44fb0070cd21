"""Loading models from a Hugging Face Hub id or a local diffusers folder."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from attnseg.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

__all__ = [
    "Component",
    "detect_family",
    "load_components",
    "load_model",
    "load_pipeline_components",
    "read_model_index",
]

# diffusers pipeline class -> attnseg family
_PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionImg2ImgPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusionXLImg2ImgPipeline": "unet",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}
# diffusers denoiser class -> attnseg family (the denoiser decides when the pipeline class is unknown)
_TRANSFORMER_FAMILIES = {
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
_SUPPORTED = "SD 1.x/2.x/XL (UNet), PixArt-Sigma, SD3/3.5, Flux.1"

_OFFLINE_HINT = (
    "If you are offline, download the model elsewhere (e.g. `hf download {id} --local-dir DIR`) and pass the "
    "local folder with --model DIR, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache."
)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def read_model_index(id_or_path: str, *, local_files_only: bool | None = None, revision: str | None = None) -> dict:
    """Read ``model_index.json`` from a local folder or the Hub (cache first when offline)."""
    path = Path(id_or_path).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers model folder: {index} is missing "
                "(save one with `pipe.save_pretrained(DIR)`, or download a Hub repository with its model_index.json)"
            )
        return json.loads(index.read_text())
    if id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model folder not found: {id_or_path}")
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(
            id_or_path, "model_index.json", revision=revision,
            local_files_only=bool(local_files_only) or _offline(),
        )
    except Exception as exc:  # network errors, missing repos, gated repos all surface here
        reason = type(exc).__name__
        raise ModelNotFoundError(
            f"cannot get model {id_or_path!r} from the Hugging Face Hub ({reason}). "
            + _OFFLINE_HINT.format(id=id_or_path)
        ) from None
    return json.loads(Path(file).read_text())


def _class_of(entry: Any) -> str | None:
    """The class name of a ``model_index.json`` component entry ``[library, class]`` (None when absent)."""
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] not in (None, "null"):
        return str(entry[1])
    return None


def detect_family(index: dict) -> str:
    """The attnseg family of a pipeline described by ``model_index.json``: by its denoiser class (a
    ``transformer`` entry) when it has one, else by its pipeline class."""
    cls = index.get("_class_name", "")
    denoiser = _class_of(index.get("transformer"))
    if denoiser is not None:
        family = _TRANSFORMER_FAMILIES.get(denoiser)
        if family is None:
            known = ", ".join(_TRANSFORMER_FAMILIES)
            raise UnsupportedModelError(
                f"transformer class {denoiser} ({cls or 'unknown pipeline'}) is not supported; supported transformer "
                f"classes: {known}"
            )
        if cls in _PIPELINE_FAMILIES and _PIPELINE_FAMILIES[cls] != family:
            raise UnsupportedModelError(f"pipeline class {cls} does not go with transformer class {denoiser}")
        return family
    if cls in _PIPELINE_FAMILIES:
        return _PIPELINE_FAMILIES[cls]
    raise UnsupportedModelError(f"pipeline class {cls or '(none)'} is not supported; supported: {_SUPPORTED}")


@dataclass(frozen=True)
class Component:
    """One component of a diffusers pipeline folder, as an adapter's constructor takes it.

    Attributes:
        name: the ``model_index.json`` key, sub-folder and constructor argument (``"text_encoder_2"``).
        role: what it is, for messages (``"T5 text encoder"``).
        kind: ``"model"`` (weights: moved to the device, eval mode, dtype), ``"tokenizer"`` or ``"scheduler"``.
        required: whether the adapter needs it (an optional component the index lists as null is passed as None).
    """

    name: str
    role: str
    kind: Literal["model", "tokenizer", "scheduler"] = "model"
    required: bool = True


def _download_hint(id_or_path: str, name: str) -> str:
    return (
        f"download the complete model (e.g. `hf download REPO --local-dir {id_or_path}`, or at least "
        f"`--include '{name}/*'`)"
    )


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
        cls_name = _class_of(entry)
        if cls_name is None:
            if comp.required:
                raise ModelNotFoundError(
                    f"{id_or_path} has no {comp.role}: its model_index.json lists no {comp.name!r}; "
                    + _download_hint(id_or_path, comp.name)
                )
            out[comp.name] = None
            continue
        if local:
            sub = folder / comp.name
            marker = {"model": "config.json", "scheduler": "scheduler_config.json"}.get(comp.kind)
            if not sub.is_dir() or (marker is not None and not (sub / marker).is_file()) or not any(sub.iterdir()):
                raise ModelNotFoundError(
                    f"{folder} is missing its {comp.role} ({comp.name}/); " + _download_hint(id_or_path, comp.name)
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
    from attnseg.toyworld.model import is_toy_model_dir

    if id_or_path == "toyworld" or is_toy_model_dir(id_or_path):
        from attnseg.models.toy import ToyAdapter

        path = None if id_or_path == "toyworld" else id_or_path
        return ToyAdapter.from_pretrained(path, dtype=dtype, device=device, **kwargs)
    index = read_model_index(id_or_path, local_files_only=kwargs.get("local_files_only"))
    family = detect_family(index)
    from attnseg.models import import_builtin_adapters
    from attnseg.models.base import ADAPTERS

    import_builtin_adapters()
    return ADAPTERS.get(family).from_pretrained(id_or_path, dtype=dtype, device=device, **kwargs)
