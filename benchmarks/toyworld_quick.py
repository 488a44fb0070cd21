"""Quick check that a toy model's cross-attention is informative: per-token segmentation mIoU on val scenes.

For each scene: noise the image to ``t`` (seeded), run the UNet once with the caption (canonical template,
every object named), record every ``attn2`` (cross-attention) layer's probabilities with a small processor defined
here, average heads, upsample each layer to the image (bilinear) and average layers. A class's score map is the
mean of its shape-word tokens (``"circle"``...); the background's is the ``"background"`` token. Two read-outs:

- ``renorm``: per pixel, probabilities renormalised over the caption's words (special tokens dropped), argmax;
- ``minmax``: every class map min-max normalised over the image, argmax.

Figures are given for all cross-attention layers averaged (``all``) and per grid side (``r16``, ``r8``...).

mIoU is over the world's classes (background included) from one confusion matrix summed over the scenes.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/toyworld_quick.py --model DIR --n 50
(the capture here is deliberately simple; attnseg.capture replaces it.)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.toyworld.model import ToyModel, build_toy_model, load_toy_model
from attnseg.toyworld.world import generate_scene, scene_seed


class CrossProbe:
    """Attention processor for ``attn2`` layers: stores ``probs (B, heads, N, T)`` and returns the original output."""

    def __init__(self, original: Any, name: str, store: dict[str, torch.Tensor]) -> None:
        self.original = original
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states).float()
        k = attn.to_k(context).float()
        heads = attn.heads
        q = q.view(b, n, heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.view(b, 1, 1, -1).float()
        self.store[self.name] = scores.softmax(-1).detach()
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def cross_maps(
    model: ToyModel, pixels: torch.Tensor, caption: str, t: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Head-averaged cross-attention per token at the image size, ``(T, H, W)`` float32, averaged over all layers
    (key ``"all"``) and over the layers of each grid side ``r`` (key ``"r<r>"``)."""
    unet = model.unet
    store: dict[str, torch.Tensor] = {}
    saved = dict(unet.attn_processors)
    probes = {
        k: (CrossProbe(v, k, store) if ".attn2." in k else v) for k, v in saved.items()
    }
    unet.set_attn_processor(probes)
    try:
        a = model.scheduler.alphas_cumprod[t].float()
        noise = torch.randn(pixels.shape, generator=gen)
        noisy = a.sqrt() * pixels + (1 - a).sqrt() * noise
        with torch.no_grad():
            cond = model.encode_text([caption])
            unet(noisy, torch.tensor([t]), encoder_hidden_states=cond)
    finally:
        unet.set_attn_processor(saved)
    h, w = pixels.shape[-2:]
    groups: dict[str, list[torch.Tensor]] = {"all": []}
    for probs in store.values():
        n = probs.shape[2]
        s = round((h * w / n) ** 0.5)  # downsampling factor of this layer
        m = probs[0].mean(0).T.reshape(-1, h // s, w // s)  # (T, h', w')
        up = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        groups["all"].append(up)
        groups.setdefault(f"r{h // s}", []).append(up)
    return {k: torch.stack(v).mean(0) for k, v in groups.items()}


def segment(maps: torch.Tensor, enc: Any, scene: Any, num_classes: int, mode: str) -> np.ndarray:
    """Per-token read-out -> ``(H, W) int64`` class ids (only classes named in the caption compete)."""
    content = [i for i, sp in enumerate(enc.special) if not sp]
    if mode == "renorm":
        sub = maps[content]
        maps = maps.clone()
        maps[content] = sub / sub.sum(0, keepdim=True).clamp_min(1e-12)
    class_tokens: dict[int, list[int]] = {}
    for obj in scene.objects:
        s, e = obj.word_spans[obj.shape]
        idx = [i for i, off in enumerate(enc.offsets) if off == (s, e) and not enc.special[i]]
        class_tokens.setdefault(obj.class_id, []).extend(idx)
    bg = [i for i, tok in enumerate(enc.tokens) if tok == "background"]
    h, w = maps.shape[-2:]
    scores = torch.full((num_classes, h, w), -1e9)
    for c, idx in class_tokens.items():
        scores[c] = maps[idx].mean(0)
    scores[0] = maps[bg].mean(0) if bg else torch.zeros(h, w)
    if mode == "minmax":
        for c in [0, *class_tokens]:
            m = scores[c]
            scores[c] = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        if not bg:
            scores[0] = 0.5
    return scores.argmax(0).numpy()


def miou(conf: np.ndarray) -> tuple[float, list[float]]:
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return float(np.nanmean(iou)), [round(float(x), 3) for x in iou]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="toy model folder (default: bundled weights)")
    p.add_argument("--random", action="store_true", help="use freshly initialised weights (baseline)")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 200, 300, 500])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_toy_model(args.model)
    if args.random:
        model = build_toy_model(model.config, seed=args.seed)
        model.unet.eval()
        model.text_encoder.eval()
    world = model.config.world
    eval_world = replace(world, templates=world.templates[:1], template_weights=(1.0,))
    k = len(world.classes)
    t0 = time.time()
    results: dict[str, Any] = {"model": args.model or "bundled", "random": args.random, "n": args.n}
    results["split"] = args.split
    for t in args.timesteps:
        confs: dict[tuple[str, str], np.ndarray] = {}
        gen = torch.Generator().manual_seed(args.seed)
        for i in range(args.n):
            scene = generate_scene(scene_seed(args.split, i), eval_world)
            pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
            enc = model.tokenizer(scene.caption)
            for layers, maps in cross_maps(model, pixels, scene.caption, t, gen).items():
                for mode in ("renorm", "minmax"):
                    pred = segment(maps, enc, scene, k, mode)
                    conf = confs.setdefault((layers, mode), np.zeros((k, k), dtype=np.int64))
                    np.add.at(conf, (scene.semantic.ravel(), pred.ravel()), 1)
        for (layers, mode), conf in confs.items():
            m, per = miou(conf)
            results[f"t{t}_{layers}_{mode}"] = {"miou": round(m, 4), "iou": per}
            per_class = dict(zip(world.classes, per, strict=True))
            print(f"t={t:4d} {layers:4s} {mode:7s} mIoU {m:.3f}  per class {per_class}")
    results["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
