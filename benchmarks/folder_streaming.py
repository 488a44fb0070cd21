"""Peak memory of ``attnseg segment FOLDER`` as the folder grows: streaming vs decoding every image first.

Writes N large JPEG photos (default 12 megapixels, 4000 x 3000) and, for each folder size, runs in a fresh
process:

- ``stream``: ``attnseg segment FOLDER --model toyworld`` as shipped (one image decoded at a time, JPEGs
  reduced while decoding, outputs at the photos' own size);
- ``decode-all`` (the baseline, what the command did before): every image decoded at full resolution into a
  list first, then the same segmentation.

Each child reports its peak resident memory (``ru_maxrss``); the ratios compare the two in the same run.
Results: ``benchmarks/results/folder_streaming.json``.

    python benchmarks/folder_streaming.py [--sizes 2 8] [--width 4000 --height 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "folder_streaming.json"


def write_photos(folder: Path, n: int, width: int, height: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    for i in range(n):
        ramp = (xx + yy) / (width + height) * 150 + 50
        base = np.stack([xx / width * 200 + 20 * i, yy / height * 180 + 30, ramp], -1)
        r = height // (4 + i % 3)
        disc = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < r * r
        base[disc] = (220, 40, 40)
        base[height // 4 : height // 2, 2 * width // 3 : 2 * width // 3 + r] = (45, 85, 225)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"photo{i:02d}.jpg", quality=88)


def child(mode: str, folder: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from attnseg.cli.segment import SegmentJob, plan_outputs, stream_segment
    from attnseg.models.loading import load_model
    from attnseg.pipeline import AttentionSegmentationPipeline

    items = plan_outputs([folder], out)
    held = []
    if mode == "decode-all":  # the earlier behaviour: every image decoded at full size before the model runs
        from PIL import Image

        for path, _ in items:
            with Image.open(path) as im:
                held.append(im.convert("RGB"))
    pipe = AttentionSegmentationPipeline(load_model("toyworld"), "diffseg")
    start = time.perf_counter()
    summary = stream_segment(pipe, items, SegmentJob(out=out, overwrite=True))
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1), "images": len(summary.written),
                      "failed": len(summary.failed), "seconds": round(seconds, 2),
                      "images_per_second": round(summary.images_per_second, 3), "held": len(held)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"photos{n}"
            write_photos(folder, n, args.width, args.height)
            for mode in ("stream", "decode-all"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(folder), str(Path(tmp) / f"out-{mode}-{n}")],
                    capture_output=True, text=True, env=env, check=True,
                )
                row = {"mode": mode, "num_images": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"{mode:10s} {n:3d} images: peak RSS {row['peak_rss_mb']:8.1f} MB, "
                      f"{row['images_per_second']:.2f} images/s", flush=True)
    by = {(r["mode"], r["num_images"]): r["peak_rss_mb"] for r in rows}
    lo, hi = min(args.sizes), max(args.sizes)
    summary = {
        "stream_peak_ratio_largest_vs_smallest_folder": round(by[("stream", hi)] / by[("stream", lo)], 3),
        "decode_all_peak_ratio_largest_vs_smallest_folder": round(by[("decode-all", hi)] / by[("decode-all", lo)], 3),
        "decode_all_vs_stream_peak_ratio_at_largest_folder": round(by[("decode-all", hi)] / by[("stream", hi)], 3),
    }
    result = {
        "benchmark": "folder_streaming",
        "description": __doc__.strip().splitlines()[0],
        "photo_size": [args.height, args.width],
        "model": "toyworld", "method": "diffseg", "fit": "pad",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": 1},
        "rows": rows, "summary": summary,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
