"""Is the toy world hard for what needs no model? Model-free baselines on its val split, and a grid of scenes.

Before any model is trained on a world, the baselines that read only colour, texture and edges must fail on it,
while a person still reads every shape at a glance (look at the grid). Every baseline is scored on the same val
scenes under both per-image Hungarian rules (matching over the classes present, and over all classes), with each
baseline's parameter taken at its best under each rule (the most favourable reading for the baseline):

- one segment; k-means on RGB (k = 2..5, and k = the number of classes present); SLIC and Felzenszwalb superpixels
  (a small grid of parameters); the caption colour threshold (each pixel the class of the caption's object of its
  nearest palette colour; also scored directly); k-means on RGB pooled over k = 2, 5, 6, 10, 20 (best-match IoU).

Targets (issue): no baseline above mIoU 0.45, pooled masks at most 0.6 best-match IoU.

    python benchmarks/toyworld_world.py [--n 200] [--grid docs/toyworld_grid.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.eval.bootstrap import mean_estimate, miou_estimate
from attnseg.eval.metrics import best_match_iou, hungarian_counts, label_masks
from attnseg.toyworld import baselines as B
from attnseg.toyworld.world import WorldConfig, generate_scene, scene_seed

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def grid_figure(world: WorldConfig, path: Path, rows: int = 4, cols: int = 8, scale: int = 5) -> list[str]:
    """Save a grid of val scenes (row-major) and return their captions."""
    tiles, captions = [], []
    for r in range(rows):
        line = []
        for c in range(cols):
            scene = generate_scene(scene_seed("val", r * cols + c), world)
            captions.append(scene.caption)
            line += [np.kron(scene.image, np.ones((scale, scale, 1), np.uint8)),
                     np.full((world.image_size * scale, 3, 3), 255, np.uint8)]
        tiles += [np.concatenate(line[:-1], 1), np.full((3, sum(t.shape[1] for t in line[:-1]), 3), 255, np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles[:-1], 0)).save(path)
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="val scenes")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--grid", type=Path, default=DOCS / "toyworld_grid.png")
    parser.add_argument("--out", type=Path, default=RESULTS / "toyworld_world.json")
    args = parser.parse_args()
    start = time.perf_counter()
    world = WorldConfig()
    c = len(world.classes)
    scenes = [generate_scene(scene_seed("val", i), world) for i in range(args.n)]

    fns = {name: (lambda sc, fn=fn: fn(sc.image, sc.semantic)) for name, fn in B.agnostic_baselines().items()}
    fns["caption colour threshold"] = lambda sc: B.caption_colour_threshold(
        sc.image, [(o.colour, o.class_id) for o in sc.objects], world.colours, background_colour=sc.background_colour)

    table: dict[str, dict[str, dict]] = {}
    for name, fn in fns.items():
        counts: dict[str, list] = {"present": [], "all": [], "direct": []}
        for sc in scenes:
            pred = fn(sc)
            for rule in ("present", "all"):
                counts[rule].append(hungarian_counts(pred, sc.semantic, c, present_only=rule == "present",
                                                     ignore_index=None))
            if name == "caption colour threshold":
                cm = np.bincount(sc.semantic.ravel() * c + pred.ravel(), minlength=c * c).reshape(c, c)
                tp = np.diag(cm)
                counts["direct"].append((tp, cm.sum(0) - tp, cm.sum(1) - tp))
        table[name] = {rule: miou_estimate(*(np.stack(x) for x in zip(*rows, strict=True)),
                                           n_boot=args.boot).to_dict() for rule, rows in counts.items() if rows}
    pooled = [float(np.nanmean(best_match_iou(B.kmeans_rgb_pooled(sc.image), label_masks(sc.semantic,
                                                                                         ignore_index=None)[1])))
              for sc in scenes]
    pooled_est = mean_estimate(pooled, n_boot=args.boot).to_dict()

    families = ("one segment", "k-means RGB", "SLIC", "Felzenszwalb", "caption colour threshold")
    best: dict[str, dict] = {}
    for fam in families:
        for rule in ("present", "all", "direct"):
            cands = [(e[rule]["value"], n) for n, e in table.items() if n.startswith(fam) and rule in e]
            if cands:
                _, n = max(cands)
                best[f"{fam} [{rule}]"] = {"setting": n, **table[n][rule]}
    worst = max(v["value"] for v in best.values())
    captions = grid_figure(world, args.grid)
    record = {
        "benchmark": "toyworld_world",
        "protocol": __doc__.split("    python")[0].strip(),
        "world": world.to_dict(),
        "split": "val", "n": args.n,
        "best_per_baseline_and_rule": best,
        "pooled_kmeans_best_match_iou": pooled_est,
        "highest_baseline_miou": round(worst, 4),
        "targets": {"max_baseline_miou": 0.45, "max_pooled_best_match_iou": 0.6},
        "all_settings": table,
        "grid": {"file": str(args.grid.relative_to(DOCS.parent)) if args.grid.is_relative_to(DOCS.parent)
                 else str(args.grid), "captions": captions},
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, entry in best.items():
        print(f"{name:45s} {entry['value']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]  ({entry['setting']})")
    print(f"{'k-means RGB pooled (best-match IoU)':45s} {pooled_est['value']:.3f} "
          f"[{pooled_est['ci'][0]:.3f}, {pooled_est['ci'][1]:.3f}]")
    print(f"written to {args.out} and {args.grid}")


if __name__ == "__main__":
    main()
