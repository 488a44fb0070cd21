"""Segmentation quality on the toy world, with the bundled (trained) model, against trivial baselines.

Protocol (stated in the results file too):
- scenes: the toy world's val split chooses hyper-parameters, the test split reports them;
- DiffSeg: one denoiser pass (the 32x32 scene at the model input size s, bilinear; noise at timestep t,
  seeded per scene; the scene's caption as prompt),
  DiffSeg on the self-attention, segments matched to the 4 classes (background + 3 shapes) by
  per-image Hungarian matching; mIoU = nanmean over classes of TP/(TP+FP+FN) summed over the split;
- cross-attention per-token segmentation: the same kind of pass; each object's map is the mean over the
  resolutions of its shape token's cross-attention (bilinear to the image, min-max per object);
  a pixel goes to the object with the highest map, or to background when that map is below a
  threshold; the object's shape is the pixel's class; mIoU over the 4 classes (no matching);
- baselines, same scenes: everything one segment; k-means (k = 4) on RGB colours with per-image
  Hungarian matching; the same methods with the same hyper-parameters on the same architecture with
  random weights.

    python benchmarks/toyworld.py [--n-val 100] [--n-test 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.eval.metrics import ConfusionMatrix, PerImageHungarian
from attnseg.methods.diffseg import DiffSeg
from attnseg.models.toy import ToyAdapter
from attnseg.toyworld import build_toy_model, generate_scene, load_toy_model, scene_seed

RESULTS = Path(__file__).parent / "results"
NUM_CLASSES = 4


@dataclass
class Captured:
    scene: object
    store: AttentionStore
    token_index: list[int]  # per object: its shape token


def capture(adapter: ToyAdapter, split: str, n: int, timestep: int, size: int) -> list[Captured]:
    out = []
    layers = adapter.attention_layers((size, size))
    for i in range(n):
        scene = generate_scene(scene_seed(split, i))
        pixels = adapter.preprocess(_pil(scene.image), (size, size))
        g = torch.Generator().manual_seed(scene.seed)
        latents = adapter.add_noise(adapter.encode_image(pixels), timestep, generator=g) if timestep else pixels
        prompt = adapter.encode_prompt(scene.caption)
        store = AttentionStore(group="resolution")
        with AttentionTracer(adapter, store, layers=layers):
            adapter.denoise(latents, timestep, prompt)
        tokens = []
        for obj in scene.objects:
            start, end = obj.word_spans[obj.shape]
            idx = [k for k, (a, b) in enumerate(prompt.offsets) if not prompt.special[k] and a < end and b > start]
            tokens.append(idx[0])
        out.append(Captured(scene, store, tokens))
    return out


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr)


def diffseg_miou(items: list[Captured], thresholds: float) -> tuple[float, float]:
    method = DiffSeg(kl_thresholds=(thresholds,) * 3, num_anchors=16)
    acc = PerImageHungarian(NUM_CLASSES, ignore_index=255)
    for it in items:
        size = it.scene.semantic.shape
        res = method.segment(it.store, out_size=size)
        acc.update(res.labels.numpy(), it.scene.semantic)
    r = acc.result()
    return r.miou, r.accuracy


def cross_predict(it: Captured, threshold: float) -> np.ndarray:
    size = it.scene.semantic.shape
    maps = []
    for r, m in it.store.cross_attention().items():
        grid = it.store.grid(r)
        t = m.T.reshape(-1, *grid)[it.token_index]  # (objects, h, w)
        maps.append(F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0])
    score = torch.stack(maps).mean(0)
    lo = score.amin(dim=(1, 2), keepdim=True)
    hi = score.amax(dim=(1, 2), keepdim=True)
    score = (score - lo) / (hi - lo).clamp_min(1e-8)
    best, arg = score.max(0)
    classes = torch.tensor([o.class_id for o in it.scene.objects])
    pred = classes[arg]
    pred[best < threshold] = 0
    return pred.numpy()


def cross_miou(items: list[Captured], threshold: float) -> tuple[float, float]:
    cm = ConfusionMatrix(NUM_CLASSES, ignore_index=255)
    for it in items:
        cm.update(cross_predict(it, threshold), it.scene.semantic)
    return cm.miou(), cm.pixel_accuracy()


def baselines(items: list[Captured], seed: int) -> dict[str, dict[str, float]]:
    from sklearn.cluster import KMeans

    one, km = PerImageHungarian(NUM_CLASSES, ignore_index=255), PerImageHungarian(NUM_CLASSES, ignore_index=255)
    for it in items:
        sem = it.scene.semantic
        one.update(np.zeros_like(sem), sem)
        rgb = it.scene.image.reshape(-1, 3).astype(np.float32)
        labels = KMeans(NUM_CLASSES, n_init=1, random_state=seed).fit_predict(rgb).reshape(sem.shape)
        km.update(labels, sem)
    return {
        "one-segment": {"miou": one.result().miou, "pixel_accuracy": one.result().accuracy},
        "kmeans-rgb-k4": {"miou": km.result().miou, "pixel_accuracy": km.result().accuracy},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--timesteps", default="50,100,200,300,400")
    parser.add_argument("--sizes", default="32,64", help="model input sizes (scenes are upsampled bilinearly)")
    parser.add_argument("--kl", default="0.3,0.5,0.7,0.9,1.1,1.3")
    parser.add_argument("--bg", default="0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "toyworld.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    kls = [float(v) for v in args.kl.split(",")]
    bgs = [float(v) for v in args.bg.split(",")]
    start = time.perf_counter()

    trained = ToyAdapter(load_toy_model())
    random_model = ToyAdapter(build_toy_model(trained.model.config, seed=1))

    # choose on val
    val_ds, val_cross = {}, {}
    for size in sizes:
        for t in timesteps:
            items = capture(trained, "val", args.n_val, t, size)
            for kl in kls:
                val_ds[(size, t, kl)] = diffseg_miou(items, kl)[0]
            for bg in bgs:
                val_cross[(size, t, bg)] = cross_miou(items, bg)[0]
    best_ds = max(val_ds, key=val_ds.get)
    best_cross = max(val_cross, key=val_cross.get)

    # report on test
    results: dict[str, dict[str, float]] = {}
    for name, adapter in (("trained", trained), ("random-weights", random_model)):
        items = capture(adapter, "test", args.n_test, best_ds[1], best_ds[0])
        m, a = diffseg_miou(items, best_ds[2])
        results[f"diffseg/{name}"] = {"miou": m, "pixel_accuracy": a}
        if best_cross[:2] != best_ds[:2]:
            items = capture(adapter, "test", args.n_test, best_cross[1], best_cross[0])
        m, a = cross_miou(items, best_cross[2])
        results[f"cross-attention/{name}"] = {"miou": m, "pixel_accuracy": a}
        if name == "trained":
            results.update(baselines(items, seed=0))
    base = max(results[k]["miou"] for k in results if not k.endswith("/trained"))
    margins = {
        k: round(v["miou"] - max(results[b]["miou"] for b in results if b != k and not b.endswith("/trained")), 4)
        for k, v in results.items() if k.endswith("/trained")
    }
    record = {
        "benchmark": "toyworld",
        "protocol": __doc__.split("Protocol (stated in the results file too):")[1].split("    python")[0].strip(),
        "model": {k: trained.model.meta.get(k) for k in ("steps", "batch_size", "final_loss", "sha256")},
        "splits": {"val": args.n_val, "test": args.n_test},
        "chosen_on_val": {
            "diffseg": {"input_size": best_ds[0], "timestep": best_ds[1], "kl_threshold": best_ds[2],
                        "val_miou": round(val_ds[best_ds], 4)},
            "cross_attention": {"input_size": best_cross[0], "timestep": best_cross[1],
                                "background_threshold": best_cross[2], "val_miou": round(val_cross[best_cross], 4)},
        },
        "val_grid": {
            "diffseg": {f"size={z},t={t},kl={kl}": round(v, 4) for (z, t, kl), v in val_ds.items()},
            "cross_attention": {f"size={z},t={t},bg={bg}": round(v, 4) for (z, t, bg), v in val_cross.items()},
        },
        "test": {k: {m: round(x, 4) for m, x in v.items()} for k, v in results.items()},
        "margin_over_best_baseline_miou": margins,
        "best_baseline_miou": round(base, 4),
        "targets": {"diffseg_miou": 0.75, "cross_attention_miou": 0.60},
        "threads": args.threads,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'method':32s} {'mIoU':>6s} {'acc':>6s}")
    for k, v in record["test"].items():
        print(f"{k:32s} {v['miou']:6.3f} {v['pixel_accuracy']:6.3f}")
    print("chosen on val:", json.dumps(record["chosen_on_val"]))
    print("margins over the best baseline (mIoU):", margins)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
