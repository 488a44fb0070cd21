"""Train the toy text-to-image diffusion model on toy-world scenes (CPU-friendly, seeded, resumable).

Every random draw is a function of ``(seed, step)``: batch ``s`` holds training scenes ``s * B .. s * B + B - 1``
and its timesteps and noise come from a generator seeded with ``(seed, s)``. A run interrupted and re-run with
the same arguments therefore continues from its last checkpoint and ends with the same weights (same machine,
same thread count).

Example:
    >>> from attnseg.toyworld.train import train
    >>> result = train("runs/toy", steps=2, batch_size=2, seed=0, lr=1e-3)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnseg.errors import ConfigError
from attnseg.toyworld.model import (
    META_FILE,
    ToyConfig,
    ToyModel,
    build_toy_model,
    default_toy_config,
    save_toy_model,
)
from attnseg.toyworld.world import SPLITS, generate_scene

if TYPE_CHECKING:
    from attnseg.toyworld.flux import ToyFluxConfig, ToyFluxModel

__all__ = ["CHECKPOINT_FILE", "TrainResult", "scene_batch", "train"]

CHECKPOINT_FILE = "checkpoint.pt"

ProgressFn = Callable[[int, int, float], None]
"""``progress(step_done, total_steps, loss)``, called after every optimisation step."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        out_dir: the folder with ``model.safetensors``, ``config.json``, ``meta.json`` (and the checkpoint).
        steps: optimisation steps done in total.
        final_loss: mean training loss over the last steps (see ``meta["final_loss_window"]``).
        seconds: training wall time summed over all sessions (resumes included).
        meta: the ``meta.json`` record.
    """

    out_dir: Path
    steps: int
    final_loss: float
    seconds: float
    meta: dict[str, Any]


def scene_batch(first: int, batch_size: int, config: ToyConfig | ToyFluxConfig) -> tuple[Any, list[str]]:
    """Training scenes ``first .. first + batch_size - 1`` (wrapping around the train split).

    Returns:
        ``pixels (B, 3, H, W) float32`` in [-1, 1] and the ``B`` captions.
    """
    import numpy as np
    import torch

    start, stop = SPLITS["train"]
    scenes = [generate_scene(start + (first + j) % (stop - start), config.world) for j in range(batch_size)]
    images = np.stack([s.image for s in scenes]).astype(np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, [s.caption for s in scenes]


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    out_dir: str | Path,
    *,
    steps: int = 2800,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 1e-3,
    image_size: int = 32,
    resume: bool = True,
    progress: ProgressFn | None = None,
    config: ToyConfig | ToyFluxConfig | None = None,
    bf16: bool = True,
    checkpoint_every: int = 100,
    warmup: int | None = None,
    min_lr_ratio: float = 0.1,
    grad_clip: float = 1.0,
    loss_window: int = 100,
    caption_dropout: float = 0.1,
) -> TrainResult:
    """Train a toy model and write it in the layout :func:`~attnseg.toyworld.model.load_toy_model` reads.

    Args:
        out_dir: output folder; receives ``checkpoint.pt`` every ``checkpoint_every`` steps and, at the end,
            ``model.safetensors``, ``config.json`` and ``meta.json``.
        steps: total optimisation steps.
        batch_size: scenes per step.
        seed: seeds the initial weights and every timestep/noise draw.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to ``min_lr_ratio * lr``).
        image_size: scene side in pixels (ignored when ``config`` is given; must then match it).
        resume: continue from ``out_dir/checkpoint.pt`` when present (its settings must match);
            False starts afresh and overwrites it.
        progress: optional callback ``progress(step_done, steps, loss)``.
        config: the model (:class:`~attnseg.toyworld.model.ToyConfig` for the UNet, or
            :class:`~attnseg.toyworld.flux.ToyFluxConfig`); default
            :func:`~attnseg.toyworld.model.default_toy_config` at ``image_size``.
        bf16: run forward and backward under CPU/GPU bfloat16 autocast (weights and optimiser stay float32).
        checkpoint_every: steps between checkpoints.
        warmup: warm-up steps; default ``min(100, steps // 10)``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: gradient-norm clip (``0`` disables it).
        loss_window: the number of last steps averaged into ``final_loss``.
        caption_dropout: fraction of training captions replaced by the empty prompt, so the model also learns
            the unconditional distribution (the empty prompt and classifier-free guidance then mean something).

    Returns:
        a :class:`TrainResult`.
    """
    import torch

    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if not 0 <= caption_dropout < 1:
        raise ConfigError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    config = config or default_toy_config(image_size=image_size)
    if config.image_size != image_size:
        raise ConfigError(f"image_size={image_size} but config.world.image_size={config.image_size}")
    warmup = min(100, steps // 10) if warmup is None else warmup
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "image_size": image_size,
        "bf16": bf16,
        "warmup": warmup,
        "min_lr_ratio": min_lr_ratio,
        "grad_clip": grad_clip,
        "caption_dropout": caption_dropout,
    }

    model = build_toy_model(config, seed=seed)
    device = next(model.denoiser.parameters()).device
    params = [p for module in model.modules().values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start_step, elapsed, losses = 0, 0.0, []

    ckpt_path = out / CHECKPOINT_FILE
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["config"] != config.to_dict():
            raise ConfigError(f"{ckpt_path} was written for another model config; use resume=False to restart")
        same = {k: v for k, v in ckpt["settings"].items() if k != "steps"} == {
            k: v for k, v in settings.items() if k != "steps"
        }
        if not same:
            raise ConfigError(
                f"{ckpt_path} was written with other settings {ckpt['settings']}; use resume=False to restart"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, elapsed, losses = int(ckpt["step"]), float(ckpt["elapsed"]), list(ckpt["losses"])
        if start_step > steps:
            raise ConfigError(f"{ckpt_path} is already at step {start_step} > steps={steps}")

    for module in model.modules().values():
        module.train()

    def save_checkpoint(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "losses": losses,
                "config": config.to_dict(),
                "settings": settings,
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    t0 = time.perf_counter()
    for step in range(start_step, steps):
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
        pixels, captions = scene_batch(step * batch_size, batch_size, config)
        pixels = pixels.to(device)
        draws = model.draw(pixels, gen)
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        ids = torch.tensor(model.tokenizer.batch(captions), device=device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup, min_lr_ratio)
        loss = model.loss(pixels, ids, draws, bf16=bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        elapsed += now - t0
        t0 = now
        if progress is not None:
            progress(step + 1, steps, losses[-1])
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(step + 1)

    return _finish(model, out, settings, losses, elapsed, loss_window)


def _finish(
    model: ToyModel | ToyFluxModel,
    out: Path,
    settings: dict[str, Any],
    losses: list[float],
    elapsed: float,
    window: int,
) -> TrainResult:
    import platform

    import diffusers
    import torch
    import transformers

    tail = losses[-window:] if losses else [float("nan")]
    final = float(sum(tail) / len(tail))
    meta = {
        **settings,
        "final_loss": final,
        "final_loss_window": len(tail),
        "first_loss": losses[0] if losses else None,
        "loss_every_100": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5)
                           for i in range(0, len(losses), 100)],
        "training_time_s": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in model.modules().items()},
    }
    for module in model.modules().values():
        module.eval()
    save_toy_model(model, out, meta)
    record = json.loads((out / META_FILE).read_text())
    return TrainResult(out_dir=out, steps=len(losses), final_loss=final, seconds=elapsed, meta=record)
