"""The toy text-to-image diffusion model: configs, construction, saving and loading of the bundled weights.

The model is a pixel-space ``diffusers.UNet2DConditionModel`` (3 channels in and out, no VAE) conditioned by a
small ``transformers.CLIPTextModel`` over a :class:`~attnseg.toyworld.tokenizer.WordTokenizer`, trained with
a ``DDPMScheduler`` (epsilon prediction) on toy-world scenes.

On-disk layout (what :func:`save_toy_model` writes and :func:`load_toy_model` reads)::

    <dir>/model.safetensors   UNet weights as "unet.*", text encoder weights as "text_encoder.*"
    <dir>/config.json         {"format", "world", "tokenizer", "unet", "text_encoder", "scheduler"}
    <dir>/meta.json           seed, steps, batch size, final loss, training time, sha256 of model.safetensors...
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnseg.errors import AttnSegError, ModelNotFoundError
from attnseg.toyworld.tokenizer import WordTokenizer
from attnseg.toyworld.world import WorldConfig, format_objects, world_words

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from attnseg.toyworld.flux import ToyFluxConfig, ToyFluxModel

__all__ = [
    "BUNDLED",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "ToyConfig",
    "ToyModel",
    "build_toy_model",
    "default_toy_config",
    "is_toy_model_dir",
    "load_toy_model",
    "save_toy_model",
    "sha256_file",
    "toy_model_arch",
]

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
BUNDLED: dict[str, Path] = {"unet": WEIGHTS_ROOT / "unet", "flux": WEIGHTS_ROOT / "flux"}
"""The bundled weights (package data) per architecture."""
WEIGHTS_DIR = BUNDLED["unet"]
"""The bundled UNet toy model (``--model toyworld``)."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ToyConfig:
    """The exact configuration of a toy model (what ``config.json`` holds).

    Attributes:
        world: the toy world the model is trained on.
        tokenizer: ``{"vocab": [...], "max_length": T}`` (see :meth:`WordTokenizer.to_dict`).
        unet: keyword arguments of ``UNet2DConditionModel``.
        text_encoder: keyword arguments of ``CLIPTextConfig``.
        scheduler: keyword arguments of ``DDPMScheduler``.
    """

    world: WorldConfig
    tokenizer: dict[str, Any]
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)

    arch = "unet"

    @property
    def image_size(self) -> int:
        return self.world.image_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "arch": self.arch,
            "world": self.world.to_dict(),
            "tokenizer": dict(self.tokenizer),
            "unet": _jsonable(self.unet),
            "text_encoder": _jsonable(self.text_encoder),
            "scheduler": _jsonable(self.scheduler),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        if d.get("format") != FORMAT_VERSION or d.get("arch", "unet") != cls.arch:
            raise AttnSegError(
                f"toy model config format {d.get('format')!r} / arch {d.get('arch')!r} is not supported "
                f"(expected format {FORMAT_VERSION}, arch {cls.arch!r})"
            )
        unet = dict(d["unet"])
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in unet:
                unet[key] = tuple(unet[key])
        return cls(
            world=WorldConfig.from_dict(d["world"]),
            tokenizer=dict(d["tokenizer"]),
            unet=unet,
            text_encoder=dict(d["text_encoder"]),
            scheduler=dict(d["scheduler"]),
        )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def default_toy_config(
    *,
    image_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 96),
    attention_levels: int = 2,
    layers_per_block: int = 1,
    heads: int = 4,
    text_width: int = 64,
    text_layers: int = 2,
    max_length: int | None = None,
    world: WorldConfig | None = None,
) -> ToyConfig:
    """The shipped architecture, with the knobs that matter exposed.

    Args:
        image_size: image side in pixels (the UNet's ``sample_size``).
        block_out_channels: UNet channels per level; level ``i`` runs at ``image_size / 2**i``.
        attention_levels: how many of the coarsest levels carry (self + cross) attention; the mid block always does.
        layers_per_block: ResNet (+ attention) layers per down block (up blocks have one more).
        heads: attention heads of every UNet attention layer.
        text_width, text_layers: the text encoder's hidden size and depth (4 heads, MLP 2x wide).
        max_length: token sequence length ``T``; default = the longest caption the world can produce + 2.
        world: the toy world; default ``WorldConfig(image_size=image_size)``.
    """
    world = world or WorldConfig(image_size=image_size)
    if world.image_size != image_size:
        raise ValueError(f"image_size {image_size} differs from world.image_size {world.image_size}")
    levels = len(block_out_channels)
    if not 1 <= attention_levels <= levels:
        raise ValueError(f"attention_levels must be in [1, {levels}], got {attention_levels}")
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1} (levels of block_out_channels)")
    for c in block_out_channels:
        if c % heads or c % 8:
            raise ValueError(f"block_out_channels {block_out_channels} must be multiples of 8 and of heads={heads}")
    if text_width % 4:
        raise ValueError(f"text_width must be a multiple of 4 (heads), got {text_width}")
    if max_length is None:
        max_length = _longest_caption(world) + 2
    tokenizer = WordTokenizer(world_words(world), max_length=max_length)
    down = tuple(
        "CrossAttnDownBlock2D" if i >= levels - attention_levels else "DownBlock2D" for i in range(levels)
    )
    up = tuple("CrossAttnUpBlock2D" if i < attention_levels else "UpBlock2D" for i in range(levels))
    unet = {
        "sample_size": image_size,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "norm_num_groups": 8,
        "cross_attention_dim": text_width,
        # diffusers reads ``attention_head_dim`` as the number of heads (a known naming quirk).
        "attention_head_dim": heads,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_width,
        "intermediate_size": 2 * text_width,
        "projection_dim": text_width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "pad_token_id": tokenizer.pad_id,
        "bos_token_id": tokenizer.sos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "clip_sample": True,
    }
    return ToyConfig(world=world, tokenizer=tokenizer.to_dict(), unet=unet, text_encoder=text, scheduler=scheduler)


def _longest_caption(world: WorldConfig) -> int:
    """Words of the longest caption the world can produce (every template, ``max_objects`` objects)."""
    tok = WordTokenizer(world_words(world), max_length=2)
    colour = max(world.colours, key=len)
    shape = max(world.shape_classes, key=len)
    texture = max(world.object_textures, key=len)
    objects = format_objects([f"{texture} {colour} {shape}"] * world.max_objects)
    background = f"{max(world.background_textures, key=len)} {colour}"
    longest = 0
    for t in world.templates:
        text = t.format(objects=objects, background=background)
        longest = max(longest, len(tok.words(text)))
    return longest


@dataclass
class ToyModel:
    """A loaded toy model.

    Attributes:
        unet: the pixel-space ``UNet2DConditionModel`` (input ``(B, 3, H, W)`` in [-1, 1]).
        text_encoder: the ``CLIPTextModel``; ``last_hidden_state`` ``(B, T, text_width)`` conditions the UNet.
        tokenizer: the word tokenizer.
        scheduler: the training ``DDPMScheduler``.
        config: the exact configuration.
        meta: the training record (``meta.json``), empty for an untrained model.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: WordTokenizer
    scheduler: DDPMScheduler
    config: ToyConfig
    meta: dict[str, Any] = field(default_factory=dict)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ``(B, T, text_width)`` conditioning on the text encoder's device and dtype.

        The text encoder is causal, so ``<eos>`` and the padding after it would each carry a summary of the whole
        caption, and a pixel could read everything from them without attending to the words. Their states are
        replaced by the ``<sos>`` state, which (causal, position 0) is the same constant for every caption: the
        words are then the only tokens that carry content, which is what makes per-token cross-attention maps
        informative. The UNet is trained and used with exactly this conditioning.
        """
        import torch

        ids = torch.tensor(self.tokenizer.batch(texts), device=self.text_encoder.device)
        return self.condition(ids)

    def condition(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T) int64`` token ids -> ``(B, T, text_width)`` conditioning (see :meth:`encode_text`)."""
        import torch

        hidden = self.text_encoder(input_ids=ids).last_hidden_state
        tok = self.tokenizer
        after = (ids == tok.eos_id) | (ids == tok.pad_id)
        null = hidden[:, :1].expand_as(hidden)
        return torch.where(after[..., None], null, hidden)

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet

    def modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules by their weight-name prefix."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights, each module's under its prefix (``"unet."``, ``"text_encoder."``)."""
        return module_state_dict(self.modules())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict` (strict)."""
        load_module_state_dict(self.modules(), state)

    # -- training (see attnseg.toyworld.train) ---------------------------------------------------
    def draw(self, pixels: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random draws of one training step: a DDPM timestep per scene (uniform) and the noise."""
        import torch

        n_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, n_train, (pixels.shape[0],), generator=gen)
        noise = torch.randn(pixels.shape, generator=gen)
        return {"t": t.to(pixels.device), "noise": noise.to(pixels.device)}

    def loss(
        self, pixels: torch.Tensor, ids: torch.Tensor, draws: dict[str, torch.Tensor], *, bf16: bool = True
    ) -> torch.Tensor:
        """Epsilon-prediction loss at the drawn timesteps (text encoder and UNet under bf16 autocast)."""
        import torch

        alphas = self.scheduler.alphas_cumprod.to(device=pixels.device, dtype=torch.float32)
        a = alphas[draws["t"]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * pixels + (1 - a).sqrt() * draws["noise"]
        with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = self.unet(noisy, draws["t"], encoder_hidden_states=self.condition(ids)).sample
        return torch.nn.functional.mse_loss(pred.float(), draws["noise"])


def module_state_dict(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Weights of several modules in one dict, each under ``"<prefix>."``."""
    return {f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()}


def load_module_state_dict(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`module_state_dict` (strict: every key must belong to one module)."""
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in modules}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise AttnSegError(f"toy model weights contain keys outside {sorted(modules)} ({key!r})")
        parts[prefix][rest] = value
    for prefix, module in modules.items():
        module.load_state_dict(parts[prefix], strict=True)


def build_toy_model(config: ToyConfig | ToyFluxConfig, *, seed: int | None = 0) -> ToyModel | ToyFluxModel:
    """Construct a toy model from ``config`` (UNet or Flux architecture) with fresh weights (``seed`` fixes them)."""
    import torch

    from attnseg.toyworld.flux import ToyFluxConfig, build_toy_flux_model

    if isinstance(config, ToyFluxConfig):
        return build_toy_flux_model(config, seed=seed)
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config.unet)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder))
    scheduler = DDPMScheduler(**config.scheduler)
    tokenizer = WordTokenizer.from_dict(config.tokenizer)
    return ToyModel(unet, text_encoder, tokenizer, scheduler, config)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_toy_model(
    model: ToyModel | ToyFluxModel, path: str | Path, meta: dict[str, Any] | None = None, *, dtype: str = "float16"
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``meta.json`` (with the weights' sha256) to ``path``.

    Args:
        model: the model to save.
        path: output folder (created).
        meta: training record to store in ``meta.json`` (``sha256``, ``bytes``, ``weights_dtype`` are added).
        dtype: storage dtype of the weights, ``"float16"`` (default: half the size; the model trains under
            bfloat16 autocast, whose rounding is coarser) or ``"float32"``. They load as float32.
    """
    import torch
    from safetensors.torch import save_file

    dtypes = {"float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # clone: tied weights (T5 shares its embedding) must not share memory in the file
    state = {k: v.detach().to(dtypes[dtype]).cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    # One metadata key: safetensors writes a map's keys in no fixed order, and the file's sha256 must be stable.
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)  # package data: readable by all (safetensors may create it private)
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1) + "\n")
    record = dict(meta or {})
    record["weights_file"] = WEIGHTS_FILE
    record["sha256"] = sha256_file(path / WEIGHTS_FILE)
    record["bytes"] = (path / WEIGHTS_FILE).stat().st_size
    record["weights_dtype"] = dtype
    (path / META_FILE).write_text(json.dumps(record, indent=1) + "\n")
    model.meta = record
    return path


def is_toy_model_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder laid out as :func:`save_toy_model` writes it (cheap: reads ``config.json``)."""
    folder = Path(path)
    config = folder / CONFIG_FILE
    if not (folder.is_dir() and config.is_file() and (folder / WEIGHTS_FILE).is_file()):
        return False
    try:
        d = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
        return False
    denoiser = "transformer" if d.get("arch") == "flux" else "unet"
    return {"world", denoiser, "text_encoder"} <= set(d)


def toy_model_arch(path: str | Path) -> str:
    """The architecture (``"unet"`` or ``"flux"``) a toy model folder's ``config.json`` declares."""
    try:
        d = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return "unet"
    return str(d.get("arch", "unet")) if isinstance(d, dict) else "unet"


def load_toy_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
    arch: str = "unet",
) -> ToyModel | ToyFluxModel:
    """Load a toy model saved by :func:`save_toy_model` (default: the bundled weights), in eval mode.

    Args:
        path: a folder with ``model.safetensors``, ``config.json`` and ``meta.json``; None = bundled weights.
        arch: which bundled model when ``path`` is None: ``"unet"`` (``--model toyworld``) or ``"flux"``
            (``--model toyworld-flux``). A folder's own ``config.json`` says its architecture.
        device: where to put the model.
        verify: check the weights' sha256 against ``meta.json``.

    Raises:
        ModelNotFoundError: the folder or one of its files is missing.
        AttnSegError: the files are corrupt (checksum mismatch, unreadable config or weights).
    """
    from safetensors.torch import load_file

    from attnseg.toyworld.flux import ToyFluxConfig

    if path is None and arch not in BUNDLED:
        raise AttnSegError(f"arch must be one of {sorted(BUNDLED)}, got {arch!r}")
    folder = Path(path) if path is not None else BUNDLED[arch]
    what = f"the bundled toy-world {arch} weights" if path is None else f"toy model folder {str(folder)!r}"
    if not folder.is_dir():
        raise ModelNotFoundError(f"{what}: folder not found. Train one with `attnseg toyworld train --out DIR`.")
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, META_FILE) if not (folder / n).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{what}: missing {', '.join(missing)}. Re-install attnseg or train one with "
            "`attnseg toyworld train --out DIR`."
        )
    try:
        meta = json.loads((folder / META_FILE).read_text())
        raw = json.loads((folder / CONFIG_FILE).read_text())
        config_cls = ToyFluxConfig if raw.get("arch") == ToyFluxConfig.arch else ToyConfig
        config = config_cls.from_dict(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AttnSegError(f"{what}: unreadable config.json or meta.json ({e})") from e
    if verify:
        expected = meta.get("sha256")
        actual = sha256_file(folder / WEIGHTS_FILE)
        if expected != actual:
            raise AttnSegError(
                f"{what}: {WEIGHTS_FILE} is corrupt (sha256 {actual[:12]}..., meta.json says "
                f"{str(expected)[:12]}...). Re-install attnseg or re-train the model."
            )
    model = build_toy_model(config, seed=None)
    try:
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    except (RuntimeError, OSError, ValueError) as e:
        raise AttnSegError(f"{what}: weights do not match config.json ({e})") from e
    model.meta = meta
    for module in model.modules().values():
        module.to(device).eval()
    return model
