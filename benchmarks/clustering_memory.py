"""Memory and time of per-head PCA capture (principal-component clustering) on an SD1.5-size UNet.

Random weights (``attnseg.testing.SD15_UNET_CONFIG``), random latents and random ``encoder_hidden_states``
``(1, 77, 768)``, on the CPU. In one process, interleaved: the plain fused forward, and the same forward
with every up-block self-attention head (9 layers x 8 heads) captured into a :class:`PCAHeadStore`, reading
the heads' outputs ``A_h V_h`` (the default) and the ``N x N`` probabilities (option). Peak memory is the
largest resident-set size sampled during a forward minus the size just before it (as in
``capture_overhead.py``). Also reported: the bytes the store keeps against the bytes the per-head ``N x N``
maps would take, and the time of the clustering step (k-means at k = 2, 5, 6, 10, 20) on the capture.

    python benchmarks/clustering_memory.py [--size 512] [--repeats 1] [--threads 1] [--readings outputs,probs]

Writes benchmarks/results/clustering_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import PeakSampler

from attnseg.capture.pca import PCAHeadStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.methods.clustering import PCAClustering
from attnseg.models.unet import unet_attention_layers
from attnseg.testing import SD15_UNET_CONFIG

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--readings", default="outputs,probs", help="comma-separated: outputs, probs")
    parser.add_argument("--n-components", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, default=None, help="capture block bound (default: the processor's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "clustering_memory.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    readings = [r.strip() for r in args.readings.split(",") if r.strip()]

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    latent = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, SD15_UNET_CONFIG["cross_attention_dim"], generator=g)
    t = torch.tensor([1])
    layers = unet_attention_layers(unet, (latent, latent))
    method = PCAClustering(n_components=args.n_components)
    selected = {n: layers[n] for n in method.select_layers(layers)}
    stores: dict[str, PCAHeadStore] = {}
    chunk_bytes = None if args.chunk_mb is None else args.chunk_mb * 2**20

    def plain() -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=ctx).sample

    def captured(reading: str) -> torch.Tensor:
        store = PCAHeadStore(n_components=args.n_components, reading=reading)  # type: ignore[arg-type]
        with AttentionTracer(unet, store, layers=selected, chunk_bytes=chunk_bytes):
            out = unet(x, t, encoder_hidden_states=ctx).sample
        stores[reading] = store
        return out

    runs = {"plain": plain}
    for reading in readings:
        runs[f"pca-{reading}"] = lambda reading=reading: captured(reading)
    with torch.no_grad():
        reference = plain()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[int]] = {k: [] for k in runs}
        max_diff: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved so drift hits every variant alike
                gc.collect()
                with PeakSampler() as sampler:
                    start = time.perf_counter()
                    out = fn()
                    times[name].append(time.perf_counter() - start)
                peaks[name].append(sampler.delta)
                max_diff[name] = float((out - reference).abs().max())
                del out

    base_t = statistics.median(times["plain"])
    base_m = statistics.median(peaks["plain"])
    rows = {}
    for name in runs:
        med_t, med_m = statistics.median(times[name]), statistics.median(peaks[name])
        rows[name] = {
            "seconds_median": round(med_t, 3),
            "seconds_all": [round(v, 3) for v in times[name]],
            "time_ratio_vs_plain": round(med_t / base_t, 3),
            "peak_rss_delta_mb": round(med_m / 2**20, 1),
            "extra_peak_vs_plain_mb": round((med_m - base_m) / 2**20, 1),
            "max_abs_output_diff_vs_plain": max_diff[name],
        }
    store_rows = {}
    for reading, store in stores.items():
        start = time.perf_counter()
        result = method.cluster(store, out_size=(args.size, args.size))
        cluster_s = time.perf_counter() - start
        kept, full = store.nbytes(), store.full_map_nbytes()
        store_rows[f"pca-{reading}"] = {
            "store_bytes": kept,
            "full_per_head_maps_bytes": full,
            "full_over_kept": round(full / kept, 1),
            "cluster_seconds": round(cluster_s, 3),
            "num_masks": int(result.masks.shape[0]),
            "feature_size": list(result.feature_size),
            "feature_dim": int(result.explained_variance_ratio.numel()),
        }
    heads = sum(i.heads for i in selected.values())
    result_json = {
        "benchmark": "clustering_memory",
        "model": "UNet2DConditionModel, SD1.5 config, random weights",
        "input": f"{args.size}x{args.size} px (latent {latent}x{latent}), batch 1, timestep 1, "
        "random encoder_hidden_states (1, 77, 768)",
        "captured": f"{len(selected)} up-block self-attention layers, {heads} heads, grids "
        f"{sorted({i.grid[0] for i in selected.values()})}",
        "n_components": args.n_components,
        "chunk_mb": args.chunk_mb if args.chunk_mb is not None else "processor default",
        "note": "outputs reading: the processor sends cache-sized blocks of query rows, gathered per head block; "
        "probs reading: whole heads (a head's N x N map is reduced at once)",
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
        "build_seconds": round(build_s, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "results": rows,
        "stores": store_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result_json, indent=2) + "\n")
    print(f"{'variant':14s} {'median s':>9s} {'ratio':>6s} {'peak MB':>8s} {'extra MB':>9s} {'max |diff|':>11s}")
    for name, r in rows.items():
        print(
            f"{name:14s} {r['seconds_median']:9.2f} {r['time_ratio_vs_plain']:6.3f} {r['peak_rss_delta_mb']:8.1f} "
            f"{r['extra_peak_vs_plain_mb']:9.1f} {r['max_abs_output_diff_vs_plain']:11.2e}"
        )
    for name, s in store_rows.items():
        print(
            f"{name}: store {s['store_bytes'] / 2**20:.2f} MiB vs full per-head maps "
            f"{s['full_per_head_maps_bytes'] / 2**20:.0f} MiB ({s['full_over_kept']}x); "
            f"clustering {s['cluster_seconds']:.2f} s"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
