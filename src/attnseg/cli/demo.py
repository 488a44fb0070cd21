"""``attnseg demo``: segment toy-world scenes offline with the bundled model and score them.

With the bundled toy-world model the demo shows real segmentations (the model was trained; see
``attnseg toyworld train``). If the bundled weights are missing (e.g. a source checkout without package
data), it falls back to a tiny randomly initialised Stable Diffusion and says so: then it only shows
that the pipeline runs, not a meaningful segmentation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from PIL import Image

from attnseg.cli.common import quiet_libraries

__all__ = ["run_demo"]


def _row(panels: list[np.ndarray], scale: int) -> np.ndarray:
    gap = np.full((panels[0].shape[0] * scale, 2, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for p in panels:
        parts += [np.kron(p, np.ones((scale, scale, 1), np.uint8)), gap]
    return np.concatenate(parts[:-1], axis=1)


def _goca_semantic(adapter: Any, scene: Any, image: Image.Image, seed: int, classes: tuple[str, ...],
                   confusion: Any) -> np.ndarray:
    """GoCA on one scene with the shapes its caption names; returns ``(H, W)`` class ids and scores them."""
    from attnseg.pipeline import AttentionSegmentationPipeline

    shapes = sorted({o.shape for o in scene.objects})
    params = dict(getattr(adapter, "recommended", {}).get("goca", {}))
    run = params.pop("run", {})
    pipe = AttentionSegmentationPipeline(adapter, "goca", classes=shapes, prompt=scene.caption, **params)
    result = pipe.run(image, seed=seed, **run).result.resize(scene.semantic.shape)
    lut = np.array([classes.index(n) for n in result.label_names])
    pred = lut[result.labels.numpy()]
    confusion.update(pred, scene.semantic)
    return pred


def run_demo(out: Path, *, seed: int = 0, num_scenes: int = 4) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``out/summary.json``)."""
    quiet_libraries()
    from attnseg.errors import ModelNotFoundError
    from attnseg.eval.metrics import ConfusionMatrix, PerImageHungarian
    from attnseg.io.export import colorize
    from attnseg.models.loading import load_model
    from attnseg.pipeline import AttentionSegmentationPipeline
    from attnseg.toyworld import generate_scene, scene_seed
    from attnseg.toyworld.world import WorldConfig

    out.mkdir(parents=True, exist_ok=True)
    try:
        adapter = load_model("toyworld")
        model_name, trained = "toyworld (bundled, trained)", True
    except ModelNotFoundError as exc:
        from attnseg.testing import tiny_sd_adapter

        typer.secho(
            f"bundled toy-world weights not available ({exc}); falling back to a tiny RANDOMLY INITIALISED "
            "Stable Diffusion: this shows the pipeline runs, the segmentation below means nothing.",
            fg=typer.colors.YELLOW, err=True,
        )
        adapter, model_name, trained = tiny_sd_adapter(), "tiny random SD (untrained)", False

    params: dict[str, Any] = dict(getattr(adapter, "recommended", {}).get("diffseg", {}))
    run_kwargs = params.pop("run", {})
    pipe = AttentionSegmentationPipeline(adapter, "diffseg", **params)
    classes = WorldConfig().classes
    scores = PerImageHungarian(len(classes), ignore_index=255)
    goca_scores = ConfusionMatrix(len(classes), ignore_index=255)
    rows, per_scene = [], []
    for i in range(num_scenes):
        scene = generate_scene(scene_seed("test", i))
        image = Image.fromarray(scene.image)
        # the toy world's captions play the role of DiffSeg's demo captions (BLIP in the reference notebook)
        prompt = scene.caption if trained else None
        output = pipe.run(image, seed=seed, prompt=prompt, **run_kwargs)
        pred = output.result.resize(scene.semantic.shape).labels.numpy()
        mapping = scores.update(pred, scene.semantic)
        lut = np.zeros(int(pred.max()) + 1, dtype=np.int64)  # unmatched segments shown as background
        for p, c in mapping.items():
            lut[p] = c
        mapped = lut[pred]
        output.result.save(out, image=output.image, stem=f"scene{i}")
        image.save(out / f"scene{i}.png")
        panels = [scene.image, np.asarray(colorize(scene.semantic)), np.asarray(colorize(mapped))]
        if trained:  # open-vocabulary: GoCA with the shapes the caption names
            panels.append(np.asarray(colorize(_goca_semantic(adapter, scene, image, seed, classes, goca_scores))))
        rows.append(_row(panels, 8))
        single = PerImageHungarian(len(classes), ignore_index=255)
        single.update(pred, scene.semantic)
        res = single.result()
        per_scene.append({"scene": i, "caption": scene.caption, "segments": output.result.num_segments,
                          "miou": round(res.miou, 4), "pixel_accuracy": round(res.accuracy, 4)})
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    figure = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)
    Image.fromarray(figure).save(out / "demo.png")
    total = scores.result()
    goca = {"miou": round(goca_scores.miou(), 4), "pixel_accuracy": round(goca_scores.pixel_accuracy(), 4),
            "protocol": "classes from the caption, one confusion matrix over the scenes"} if trained else None
    summary = {
        "model": model_name, "method": "diffseg", "params": pipe.method.params(), "run": run_kwargs,
        "scenes": per_scene, "miou": round(total.miou, 4), "pixel_accuracy": round(total.accuracy, 4),
        "protocol": "per-image Hungarian matching of segments to shape classes (background included)",
        "goca": goca,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    typer.echo(f"model: {model_name}; method: diffseg")
    typer.echo(f"{'scene':>5s}  {'segments':>8s}  {'mIoU':>6s}  {'acc':>6s}  caption")
    for s in per_scene:
        typer.echo(f"{s['scene']:5d}  {s['segments']:8d}  {s['miou']:6.3f}  {s['pixel_accuracy']:6.3f}  {s['caption']}")
    typer.echo(f"all    mIoU {summary['miou']:.3f}  pixel accuracy {summary['pixel_accuracy']:.3f}")
    typer.echo(f"protocol: {summary['protocol']}")
    if goca is not None:
        typer.echo(f"goca   mIoU {goca['miou']:.3f}  pixel accuracy {goca['pixel_accuracy']:.3f}  ({goca['protocol']})")
    panels = "input | ground truth | diffseg" + (" | goca" if trained else "")
    typer.echo(f"figure ({panels}, one scene a row): {out / 'demo.png'}")
    return summary
