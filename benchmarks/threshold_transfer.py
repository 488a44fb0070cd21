"""Do the thresholds mean the same at every grid? The relative defaults against the papers' absolute values.

One synthetic layout (four regions; :mod:`attnseg.synthetic`: attention that prefers the query's own region and
grows sharper with the grid, as finer layers do) at 16, 32, 64 and 128 tokens a side:

- DiffSeg: segments found and mIoU (per-image Hungarian over the regions) with the default relative threshold
  (in units of the image's median neighbour-anchor divergence) and with the paper's absolute 1.1;
- the target method's selection (step 6): IoU of the selected query positions with the target region, and the
  fraction of maps selected, with the default relative tau (0.5 x the median divergence) and the paper's 0.9.

    python benchmarks/threshold_transfer.py [--sizes 16,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attnseg.eval.metrics import hungarian_counts
from attnseg.methods.diffseg import PAPER_THRESHOLD, RELATIVE_THRESHOLD, DiffSeg
from attnseg.methods.target import PAPER_TAU, RELATIVE_TAU, guided_selection
from attnseg.synthetic import resize_layout, synthetic_cross_attention, synthetic_self_attention

RESULTS = Path(__file__).parent / "results"


class _Store:
    def __init__(self, attn: torch.Tensor) -> None:
        r = int(attn.shape[0])
        self._maps = {r: attn.reshape(r * r, r * r)}
        self.meta: dict = {}

    def self_attention(self, batch_index: int = 0) -> dict[int, torch.Tensor]:
        return self._maps


def layout() -> torch.Tensor:
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[1:4, 1:5] = 1
    lab[5:8, 3:7] = 2
    lab[0:3, 6:8] = 3
    return lab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "threshold_transfer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lab = layout()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        attn = synthetic_self_attention(lab, size)
        truth = resize_layout(lab, size)
        row: dict = {"grid": size}
        for name, method in (("relative (default)", DiffSeg()), ("absolute 1.1 (paper)",
                                                                  DiffSeg(threshold_mode="absolute"))):
            res = method.segment(_Store(attn))
            tp, fp, fn = hungarian_counts(res.labels.numpy(), truth.numpy(), 4, present_only=True, ignore_index=None)
            row[f"diffseg {name}"] = {"segments": res.meta["num_segments"],
                                      "miou": round(float(np.mean(tp / (tp + fp + fn))), 4),
                                      "effective_threshold": round(res.meta["effective_kl_thresholds"][0], 4)}
        cross = synthetic_cross_attention(lab, 1, size)
        region = truth == 1
        for name, kw in (("relative (default)", {"tau": RELATIVE_TAU, "tau_mode": "relative"}),
                         ("absolute 0.9 (paper)", {"tau": PAPER_TAU, "tau_mode": "absolute"})):
            sel = guided_selection(cross, attn, **kw)
            inter = float((sel.selected & region).sum())
            union = float((sel.selected | region).sum())
            row[f"target {name}"] = {"selection_iou": round(inter / union, 4),
                                     "fraction_selected": round(float(sel.selected.float().mean()), 4),
                                     "fallback": sel.fallback, "threshold": round(sel.threshold, 4)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        del attn
        print(json.dumps(row), flush=True)
    record = {
        "benchmark": "threshold_transfer",
        "protocol": __doc__.split("    python")[0].strip(),
        "defaults": {"diffseg_relative": RELATIVE_THRESHOLD, "diffseg_paper": PAPER_THRESHOLD,
                     "target_relative": RELATIVE_TAU, "target_paper": PAPER_TAU},
        "target_region_fraction": round(float((layout() == 1).float().mean()), 4),
        "rows": rows,
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
