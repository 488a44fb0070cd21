"""What can be known about a model before loading it: family, schedule length, sizes and tokenizer.

Everything here reads small JSON files (a local diffusers folder, the bundled toy model, the Hugging Face
cache, or the Hub when it is reachable) and never imports torch or diffusers, so that the command line can
check every option against the model before the heavy work starts.

Example:
    >>> spec = describe_model("toyworld")
    >>> spec.family, spec.latent_scale
    ('toyworld', 1)
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from attnseg.errors import ConfigError, InvalidModelError, ModelNotFoundError, UnsupportedModelError

__all__ = [
    "DIT_COMPONENTS",
    "DTYPES",
    "PIPELINE_FAMILIES",
    "SUPPORTED",
    "TRANSFORMER_FAMILIES",
    "Component",
    "ModelSpec",
    "check_device",
    "check_dtype",
    "component_class",
    "describe_model",
    "detect_family",
    "download_hint",
    "hub_offline",
    "hub_reachable",
    "read_json_file",
]

# diffusers pipeline class -> attnseg family
PIPELINE_FAMILIES: dict[str, str] = {
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
TRANSFORMER_FAMILIES: dict[str, str] = {
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
SUPPORTED = "SD 1.x/2.x/XL (UNet), PixArt-Sigma, SD3/3.5, Flux.1"


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

    @property
    def config_file(self) -> str | None:
        """The file that must be in its sub-folder (None: any file, e.g. a tokenizer's)."""
        return {"model": "config.json", "scheduler": "scheduler_config.json"}.get(self.kind)


#: The components each diffusion-transformer family's adapter takes (its ``components``), in load order.
DIT_COMPONENTS: dict[str, tuple[Component, ...]] = {
    "pixart": (
        Component("transformer", "PixArt transformer"),
        Component("vae", "VAE"),
        Component("text_encoder", "T5 text encoder"),
        Component("tokenizer", "T5 tokenizer", "tokenizer"),
        Component("scheduler", "scheduler", "scheduler"),
    ),
    "sd3": (
        Component("transformer", "SD3 transformer"),
        Component("vae", "VAE"),
        Component("text_encoder", "CLIP-L text encoder"),
        Component("tokenizer", "CLIP-L tokenizer", "tokenizer"),
        Component("text_encoder_2", "CLIP-G text encoder"),
        Component("tokenizer_2", "CLIP-G tokenizer", "tokenizer"),
        Component("scheduler", "scheduler", "scheduler"),
        Component("text_encoder_3", "T5 text encoder", required=False),
        Component("tokenizer_3", "T5 tokenizer", "tokenizer", required=False),
    ),
    "flux": (
        Component("transformer", "Flux transformer"),
        Component("vae", "VAE"),
        Component("text_encoder", "CLIP text encoder"),
        Component("tokenizer", "CLIP tokenizer", "tokenizer"),
        Component("text_encoder_2", "T5 text encoder"),
        Component("tokenizer_2", "T5 tokenizer", "tokenizer"),
        Component("scheduler", "scheduler", "scheduler"),
    ),
}
#: T5 tokens per family when the adapter is not told otherwise (the diffusers pipelines' defaults; Flux: at most
#: its tokenizer's limit). The adapters' ``max_sequence_length`` defaults are these.
T5_TOKENS: dict[str, int] = {"pixart": 300, "sd3": 256, "flux": 512}
#: latent cells per image token along a side where the transformer config does not say it (Flux packs 2x2)
_PACKING: dict[str, int] = {"flux": 2}
#: latent cells of the default input when the transformer config has no sample_size (the pipelines' 128)
DIT_SAMPLE_SIZE = 128

OFFLINE_HINT = (
    "If you are offline, download the model elsewhere (e.g. `hf download {id} --local-dir DIR`) and pass the "
    "local folder with --model DIR, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache."
)
_DEFAULT_ENDPOINT = "https://huggingface.co"
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|auto|mps|xpu|cuda|cuda:\d+|xpu:\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """A model described from its configuration files.

    Attributes:
        name: the model as given (``"toyworld"``, a folder, or a Hub id).
        family: ``"toyworld"`` / ``"toyworld-flux"`` (the toy models) or a family of :data:`PIPELINE_FAMILIES`
            (``"unet"`` for SD 1.x/2.x/XL).
        source: ``"bundled"``, ``"folder"`` or ``"hub"``.
        folder: the local folder holding the configuration files (for the Hub: the cache snapshot), or None.
        num_train_timesteps: length of the training schedule (valid timesteps are ``0 .. n - 1``).
        latent_scale: pixels per latent cell along each side (1 in pixel space).
        resolution: the default ``(H, W)`` input size.
        text_max_length: the token limit of the tokenizer words are looked up with (start and end tokens
            included), when known.
        patch_size: latent cells per image token along a side (diffusion transformers; 1 for UNets): input sides
            are multiples of ``latent_scale * patch_size``.
        word_tokenizer: the sub-folder of the tokenizer words are looked up with (Flux: ``"tokenizer_2"``, T5).
        prompt_limits: ``(tokenizer sub-folder, token limit, encoder)`` of each text encoder that refuses a longer
            prompt instead of cutting it (the diffusion transformers' T5, SD3's CLIP); empty when prompts are cut.
    """

    name: str
    family: str
    source: str
    folder: Path | None
    num_train_timesteps: int
    latent_scale: int
    resolution: tuple[int, int]
    text_max_length: int | None = None
    patch_size: int = 1
    word_tokenizer: str = "tokenizer"
    prompt_limits: tuple[tuple[str, int, str], ...] = ()

    def check_timestep(self, timestep: int, *, flag: str = "--timestep") -> None:
        """Raise :class:`ConfigError` unless ``0 <= timestep < num_train_timesteps``."""
        n = self.num_train_timesteps
        if not 0 <= int(timestep) < n:
            raise ConfigError(f"{flag} {timestep} is outside this model's training schedule: use 0 .. {n - 1}")

    def check_size(self, size: int, *, flag: str = "--size") -> None:
        """Raise :class:`ConfigError` unless ``size`` is a multiple of ``latent_scale * patch_size`` (one image
        token) and at least twice that."""
        step = self.latent_scale * self.patch_size
        if size < 2 * step or size % step:
            scale = "one image token" if self.patch_size > 1 else "the model's latent scale"
            what = f"a multiple of {step} ({scale}) and " if step > 1 else ""
            raise ConfigError(
                f"{flag} {size} does not fit this model: use {what}at least {2 * step} px, "
                f"e.g. {flag} {self.resolution[0]}"
            )

    def tokenizer(self, subfolder: str | None = None) -> Any:
        """The tokenizer words are looked up with (or the one in ``subfolder``), loaded alone: a
        :class:`~attnseg.toyworld.tokenizer.WordTokenizer` for the toy model, else the ``transformers`` tokenizer of
        the folder's :attr:`word_tokenizer` (``tokenizer/``; Flux: ``tokenizer_2/``, its T5)."""
        if self.family in ("toyworld", "toyworld-flux"):
            from attnseg.toyworld.tokenizer import WordTokenizer

            config = _toy_config(self.folder)
            return WordTokenizer.from_dict(config["tokenizer"])
        from transformers import AutoTokenizer

        sub = subfolder or self.word_tokenizer
        if self.source == "hub":
            where, kwargs = self.name, {"subfolder": sub, "local_files_only": hub_offline()}
        elif self.folder is not None and (self.folder / sub).is_dir():
            where, kwargs = str(self.folder / sub), {}
        else:
            raise ModelNotFoundError(f"{self.name} has no {sub}/ folder: the model folder is incomplete")
        try:
            return AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InvalidModelError(f"cannot read the tokenizer of {self.name}: {first}") from None

    def check_prompt(self, text: str) -> None:
        """Refuse (one line) a prompt longer than a text encoder of :attr:`prompt_limits` takes; only the
        tokenizers are read (prompts of models that cut long prompts pass)."""
        from attnseg.prompts import check_prompt_length

        for sub, limit, what in self.prompt_limits:
            check_prompt_length(self.tokenizer(sub), text, limit, what)


def check_dtype(dtype: str) -> None:
    """Refuse a dtype other than float32, bfloat16 and float16."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def check_device(device: str, *, flag: str = "--device") -> str:
    """Check ``--device`` and resolve ``auto``; torch is imported only for a device other than the CPU.

    Returns the device to load the model on (``"auto"`` becomes ``"cuda"`` or ``"cpu"``).
    """
    device = str(device).strip().lower()
    if not _DEVICE.match(device):
        raise ConfigError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f" (torch {torch.__version__})" if "+cpu" in torch.__version__ else ""
            raise ConfigError(f"{flag} {device}: CUDA is not available on this machine{build}; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{flag} mps: Apple's MPS backend is not available here; use --device cpu")
    elif device.startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"{flag} {device}: no Intel XPU is available here; use --device cpu")
    return device


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, with one-line errors that name the file (missing, invalid, not an object)."""
    if not path.is_file():
        raise ModelNotFoundError(f"{what}: {path} is missing (the model folder is incomplete)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InvalidModelError(f"{what}: {path} is not a text file; re-download or re-save the model") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelError(
            f"{what}: {path} is not valid JSON ({exc.msg}, line {exc.lineno}); re-download or re-save the model"
        ) from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{what}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hub endpoint (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    One quick, quiet probe instead of the client's retries, so that an offline machine gets one line at once.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def component_class(entry: Any) -> str | None:
    """The class name of a ``model_index.json`` component entry ``[library, class]`` (None when absent or null)."""
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] not in (None, "null"):
        return str(entry[1])
    return None


def detect_family(index: dict[str, Any]) -> str:
    """The attnseg family of a pipeline described by ``model_index.json``: by its denoiser class (a
    ``transformer`` entry) when it has one, else by its pipeline class.

    Raises:
        UnsupportedModelError: a transformer or pipeline class attnseg does not support, or a pipeline class that
            does not go with its transformer.
    """
    cls = index.get("_class_name", "")
    denoiser = component_class(index.get("transformer"))
    if denoiser is not None:
        family = TRANSFORMER_FAMILIES.get(denoiser)
        if family is None:
            known = ", ".join(TRANSFORMER_FAMILIES)
            raise UnsupportedModelError(
                f"transformer class {denoiser} ({cls or 'unknown pipeline'}) is not supported; supported transformer "
                f"classes: {known}"
            )
        if cls in PIPELINE_FAMILIES and PIPELINE_FAMILIES[cls] != family:
            raise UnsupportedModelError(f"pipeline class {cls} does not go with transformer class {denoiser}")
        return family
    if cls in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[cls]
    raise UnsupportedModelError(f"pipeline class {cls or '(none)'} is not supported; supported: {SUPPORTED}")


def download_hint(id_or_path: str, component: str) -> str:
    """How to complete a model missing ``component``."""
    return (
        f"download the complete model (e.g. `hf download REPO --local-dir {id_or_path}`, or at least "
        f"`--include '{component}/*'`)"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(("/", ".json"))


def describe_model(name: str, *, revision: str | None = None) -> ModelSpec:
    """Describe ``name`` (``"toyworld"``, a toy-model folder, a diffusers folder or a Hub id) without loading it.

    Raises:
        ModelNotFoundError: the folder does not exist, is incomplete, or the Hub id cannot be found (offline,
            unreachable Hub, typo).
        InvalidModelError: a configuration file is not valid JSON, or the components do not fit together.
        UnsupportedModelError: a pipeline family attnseg does not support (yet).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("--model is empty: give 'toyworld', a local diffusers folder or a Hub id")
    from attnseg.toyworld.model import BUNDLED, is_toy_model_dir

    bundled = {"toyworld": "unet", "toyworld-flux": "flux"}
    if name in bundled:
        return _toy_spec(name, BUNDLED[bundled[name]], "bundled")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"--model {name} is a file; give the model's folder (the one holding "
                                     "model_index.json), a Hub id or 'toyworld'")
        if is_toy_model_dir(path) or (
            not (path / "model_index.json").exists() and (path / "config.json").is_file()
            and (path / "model.safetensors").is_file()
        ):  # a toy model folder (a damaged config.json is reported as such)
            return _toy_spec(name, path, "folder")
        return _diffusers_spec(name, path, "folder")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder not found: {name} (check the path, or give a Hub id or 'toyworld')")
    return _diffusers_spec(name, _hub_snapshot(name, revision), "hub")


# --------------------------------------------------------------------------------------------
# toy model


def _toy_config(folder: Path | None) -> dict[str, Any]:
    from attnseg.toyworld.model import CONFIG_FILE, WEIGHTS_DIR

    folder = folder or WEIGHTS_DIR
    return read_json_file(folder / CONFIG_FILE, "toy model")


def _toy_spec(name: str, folder: Path, source: str) -> ModelSpec:
    from attnseg.toyworld.model import CONFIG_FILE, WEIGHTS_FILE

    what = f"the bundled toy-world model {name}" if source == "bundled" else f"toy model {name}"
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"{what}: {folder} lacks {WEIGHTS_FILE} or {CONFIG_FILE}; re-install attnseg or "
                                 "train one with `attnseg toyworld train --out DIR`")
    config = _toy_config(folder)
    try:
        size = int(config["world"]["image_size"])
        max_length = int(config["tokenizer"]["max_length"])
        steps = int((config.get("scheduler") or {}).get("num_train_timesteps", 1000))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelError(f"{what}: {folder / CONFIG_FILE} lacks a valid field ({exc})") from None
    flux = config.get("arch") == "flux"
    return ModelSpec(name=name, family="toyworld-flux" if flux else "toyworld", source=source, folder=folder,
                     num_train_timesteps=steps, latent_scale=1, resolution=(size, size), text_max_length=max_length,
                     patch_size=2 if flux else 1)


# --------------------------------------------------------------------------------------------
# diffusers folders and Hub ids


def _hub_snapshot(repo: str, revision: str | None, *, local_only: bool = False) -> Path:
    """The cache folder of ``repo`` holding at least its ``model_index.json`` (downloaded when the Hub is reachable).

    The configuration files of the components are fetched the same way by :func:`_component_config`.
    """
    index = _hub_file(repo, "model_index.json", revision, required=True, local_only=local_only)
    assert index is not None
    return index.parent


def _hub_file(
    repo: str, filename: str, revision: str | None, *, required: bool, local_only: bool = False
) -> Path | None:
    import logging

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception:  # a malformed id (HFValidationError) and the like
        raise ModelNotFoundError(
            f"{repo!r} is neither a local folder nor a valid Hub id (owner/name); check --model"
        ) from None
    if hub_offline() or local_only:
        if not required:
            return None
        raise ModelNotFoundError(
            f"--model {repo}: no such local folder, and it is not in the Hugging Face cache (HF_HUB_OFFLINE is "
            "set). " + OFFLINE_HINT.format(id=repo)
        )
    if not hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).hostname
        raise ModelNotFoundError(
            f"--model {repo}: no such local folder, it is not in the Hugging Face cache, and the Hub ({host}) "
            "cannot be reached. "
            + OFFLINE_HINT.format(id=repo)
        )
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except EntryNotFoundError:
        if not required:
            return None
        raise ModelNotFoundError(f"model {repo!r} on the Hub has no {filename}: it is not a diffusers pipeline "
                                 "(attnseg loads diffusers repositories)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo!r} was not found on the Hugging Face Hub: check the id (gated or private models need "
            "`hf auth login`)"
        ) from None
    except Exception as exc:  # network errors, gated repositories...
        raise ModelNotFoundError(
            f"cannot get model {repo!r} from the Hugging Face Hub ({type(exc).__name__}). "
            + OFFLINE_HINT.format(id=repo)
        ) from None


def _component_config(spec_name: str, folder: Path, source: str, component: str, filename: str,
                      *, required: bool = True) -> dict[str, Any] | None:
    path = folder / component / filename
    if source == "hub" and not path.is_file():
        fetched = _hub_file(spec_name, f"{component}/{filename}", None, required=required)
        if fetched is None:
            return None
        path = fetched
    if not required and not path.is_file():
        return None
    return read_json_file(path, f"model {spec_name}")


def _diffusers_spec(name: str, folder: Path, source: str) -> ModelSpec:
    index_path = folder / "model_index.json"
    if source == "folder" and not index_path.is_file():
        raise ModelNotFoundError(
            f"{folder} is not a diffusers model folder: {index_path} is missing "
            "(save one with `pipe.save_pretrained(DIR)`, or download a Hub repository with its model_index.json)"
        )
    index = read_json_file(index_path, f"model {name}")
    cls = index.get("_class_name")
    if not isinstance(cls, str) or not cls:
        raise InvalidModelError(f"{index_path} has no _class_name: it does not describe a diffusers pipeline")
    family = detect_family(index)
    if family in DIT_COMPONENTS:
        return _dit_spec(name, folder, source, index, family)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in index]
    if missing:
        raise InvalidModelError(f"{index_path} lists no {', '.join(missing)}: the pipeline is incomplete")

    get = lambda component, filename, required=True: _component_config(  # noqa: E731
        name, folder, source, component, filename, required=required)
    unet = get("unet", "config.json")
    vae = get("vae", "config.json")
    text = get("text_encoder", "config.json")
    scheduler = get("scheduler", "scheduler_config.json")
    assert unet is not None and vae is not None and text is not None and scheduler is not None
    text_2 = get("text_encoder_2", "config.json") if "text_encoder_2" in index else None
    tokenizer = get("tokenizer", "tokenizer_config.json", required=False) or {}

    xl_unet = unet.get("addition_embed_type") == "text_time"
    if xl_unet and text_2 is None:
        raise InvalidModelError(
            f"{name}: unet/ holds an SDXL UNet (addition_embed_type 'text_time') but model_index.json describes a "
            f"{cls} with one text encoder; use the complete SDXL folder (with text_encoder_2/), not a mix"
        )
    if text_2 is not None and not xl_unet:
        raise InvalidModelError(
            f"{name}: model_index.json has a second text encoder (SDXL) but unet/ holds a UNet without SDXL's "
            "size conditioning; use a folder whose components belong together"
        )
    widths = [text.get("hidden_size")] + ([text_2.get("hidden_size")] if text_2 is not None else [])
    cross = unet.get("cross_attention_dim")
    if all(isinstance(w, int) for w in widths) and isinstance(cross, int) and sum(widths) != cross:
        raise InvalidModelError(
            f"{name}: the UNet expects text features of width {cross} but the text encoder(s) give "
            f"{' + '.join(str(w) for w in widths)}; the components come from different models"
        )
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise InvalidModelError(f"{name}: vae/config.json has no block_out_channels")
    latent_scale = 2 ** (len(blocks) - 1)
    sample = unet.get("sample_size", 64)
    sample = sample if isinstance(sample, list) else [sample, sample]
    try:
        resolution = (int(sample[0]) * latent_scale, int(sample[1]) * latent_scale)
        steps = int(scheduler.get("num_train_timesteps", 1000))
    except (TypeError, ValueError, IndexError):
        raise InvalidModelError(
            f"{name}: unet/config.json sample_size or the scheduler's schedule is invalid"
        ) from None
    limit = tokenizer.get("model_max_length")
    if not isinstance(limit, int) or limit > 100_000:  # transformers writes a huge number for "no limit"
        limit = text.get("max_position_embeddings")
    return ModelSpec(name=name, family=family, source=source, folder=folder, num_train_timesteps=steps,
                     latent_scale=latent_scale, resolution=resolution,
                     text_max_length=int(limit) if isinstance(limit, int) else None)


def _dit_spec(name: str, folder: Path, source: str, index: dict[str, Any], family: str) -> ModelSpec:
    """A diffusion transformer (PixArt, SD3, Flux) from its configuration files: every component its adapter takes
    listed and present, the components fitting together, sizes, schedule and token limits."""
    present: set[str] = set()
    for comp in DIT_COMPONENTS[family]:
        if component_class(index.get(comp.name)) is None:
            if comp.required:
                raise ModelNotFoundError(
                    f"{name} has no {comp.role}: its model_index.json lists no {comp.name!r}; "
                    + download_hint(name, comp.name)
                )
            continue
        if source == "folder":
            sub = folder / comp.name
            marker = comp.config_file
            if not sub.is_dir() or (marker is not None and not (sub / marker).is_file()) or not any(sub.iterdir()):
                raise ModelNotFoundError(f"{folder} is missing its {comp.role} ({comp.name}/); "
                                         + download_hint(name, comp.name))
        present.add(comp.name)

    def get(component: str, filename: str = "config.json", required: bool = True) -> dict[str, Any]:
        return _component_config(name, folder, source, component, filename, required=required) or {}

    transformer = get("transformer")
    vae = get("vae")
    scheduler = get("scheduler", "scheduler_config.json")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise InvalidModelError(f"{name}: vae/config.json has no block_out_channels")
    latent_scale = 2 ** (len(blocks) - 1)
    patch = _PACKING.get(family) or transformer.get("patch_size") or 1
    latent = vae.get("latent_channels")
    channels = transformer.get("in_channels")
    if isinstance(latent, int) and isinstance(channels, int) and channels != latent * (_PACKING.get(family, 1) ** 2):
        raise InvalidModelError(
            f"{name}: the transformer takes {channels} input channels but the VAE gives {latent} latent channels"
            + (" (packed 2x2)" if family in _PACKING else "") + "; the components come from different models"
        )
    # the width of the text states the transformer reads, against the T5 encoder that makes them
    t5 = {"pixart": "text_encoder", "sd3": "text_encoder_3", "flux": "text_encoder_2"}[family]
    width_key = "caption_channels" if family == "pixart" else "joint_attention_dim"
    if t5 in present:
        t5_width = get(t5).get("d_model")
        width = transformer.get(width_key)
        if isinstance(t5_width, int) and isinstance(width, int) and t5_width != width:
            raise InvalidModelError(
                f"{name}: the transformer expects text states of width {width} ({width_key}) but the T5 encoder "
                f"({t5}/) gives {t5_width}; the components come from different models"
            )
    sample = transformer.get("sample_size") or DIT_SAMPLE_SIZE
    sample = sample if isinstance(sample, list) else [sample, sample]
    try:
        resolution = (int(sample[0]) * latent_scale, int(sample[1]) * latent_scale)
        steps = int(scheduler.get("num_train_timesteps", 1000))
        patch = int(patch)
    except (TypeError, ValueError, IndexError):
        raise InvalidModelError(f"{name}: transformer/config.json sample_size or the scheduler's schedule is invalid"
                                ) from None

    def limit(sub: str) -> int | None:
        value = get(sub, "tokenizer_config.json", required=False).get("model_max_length")
        return value if isinstance(value, int) and value < 100_000 else None  # a huge number means "no limit"

    t5_tokens = T5_TOKENS[family]
    if family == "pixart":
        words, limits = "tokenizer", (("tokenizer", t5_tokens, "the T5 text encoder"),)
        text_max = t5_tokens
    elif family == "flux":
        t5_limit = min(limit("tokenizer_2") or t5_tokens, t5_tokens)
        words, limits = "tokenizer_2", (("tokenizer_2", t5_limit, "the T5 text encoder"),)
        text_max = t5_limit
    else:  # SD3 reads words from CLIP; both CLIP encoders take the CLIP-L tokenizer's limit, T5 its own
        clip_limit = limit("tokenizer") or get("text_encoder").get("max_position_embeddings")
        clip = (("tokenizer", int(clip_limit), "the CLIP text encoders"),) if isinstance(clip_limit, int) else ()
        t5_part = (("tokenizer_3", t5_tokens, "the T5 text encoder"),) if "tokenizer_3" in present else ()
        words, limits = "tokenizer", clip + t5_part
        text_max = clip_limit if isinstance(clip_limit, int) else None
    return ModelSpec(name=name, family=family, source=source, folder=folder, num_train_timesteps=steps,
                     latent_scale=latent_scale, resolution=resolution, text_max_length=text_max, patch_size=patch,
                     word_tokenizer=words, prompt_limits=limits)
