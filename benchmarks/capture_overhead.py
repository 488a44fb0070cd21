"""Cost of attention capture on an SD1.5-size UNet (random weights) at 512 px on the CPU.

Compares, in one process and interleaved: the plain fused forward; the same forward with DiffSeg's
capture (all 16 self-attention layers, head mean, grouped by resolution) in "reuse" mode (the
default: probabilities reused for the output) and in "beside" mode (original processor for the
output, probabilities computed beside it). Peak memory is the largest resident-set size sampled
during a forward minus the size just before it.

    python benchmarks/capture_overhead.py [--dtype float32] [--repeats 3] [--threads 2]

Writes benchmarks/results/capture_overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.models.unet import unet_attention_layers
from attnseg.testing import SD15_UNET_CONFIG

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples the resident set size every millisecond in a background thread."""

    def __enter__(self) -> PeakSampler:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    build_s = time.perf_counter() - t0
    latent = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    ctx = torch.randn(1, 77, SD15_UNET_CONFIG["cross_attention_dim"], generator=g).to(dtype)
    t = torch.tensor([300])
    layers = unet_attention_layers(unet, (latent, latent))
    selected = {n: i for n, i in layers.items() if i.kind == "self"}

    def plain() -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=ctx).sample

    def captured(mode: str) -> torch.Tensor:
        store = AttentionStore(group="resolution")
        with AttentionTracer(unet, store, layers=selected, mode=mode):  # type: ignore[arg-type]
            out = unet(x, t, encoder_hidden_states=ctx).sample
        captured.store_bytes = store.nbytes()  # type: ignore[attr-defined]
        return out

    runs = {"plain": plain, "capture-reuse": lambda: captured("reuse"), "capture-beside": lambda: captured("beside")}
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
                max_diff[name] = float((out.float() - reference.float()).abs().max())
                del out
    base_t = statistics.median(times["plain"])
    base_m = statistics.median(peaks["plain"])
    rows = {}
    for name in runs:
        med_t, med_m = statistics.median(times[name]), statistics.median(peaks[name])
        rows[name] = {
            "seconds_median": round(med_t, 3),
            "seconds_min": round(min(times[name]), 3),
            "time_ratio_vs_plain_min": round(min(times[name]) / min(times["plain"]), 3),
            "seconds_all": [round(v, 3) for v in times[name]],
            "time_ratio_vs_plain": round(med_t / base_t, 3),
            "peak_rss_delta_mb": round(med_m / 2**20, 1),
            "extra_peak_vs_plain_mb": round((med_m - base_m) / 2**20, 1),
            "max_abs_output_diff_vs_plain": max_diff[name],
        }
    result = {
        "benchmark": "capture_overhead",
        "model": "UNet2DConditionModel, SD1.5 config, random weights",
        "input": f"{args.size}x{args.size} px (latent {latent}x{latent}), batch 1, timestep 300",
        "captured_layers": len(selected),
        "store_bytes": captured.store_bytes,  # type: ignore[attr-defined]
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "build_seconds": round(build_s, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "targets": {"time_ratio": "<= 1.15", "extra_peak_mb": "<= 512"},
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"capture_overhead_{args.dtype}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':16s} {'median s':>9s} {'ratio':>6s} {'min s':>6s} {'ratio':>6s} {'peak MB':>8s} "
          f"{'extra MB':>9s} {'max |diff|':>11s}")
    for name, r in rows.items():
        print(
            f"{name:16s} {r['seconds_median']:9.2f} {r['time_ratio_vs_plain']:6.3f} {r['seconds_min']:6.2f} "
            f"{r['time_ratio_vs_plain_min']:6.3f} {r['peak_rss_delta_mb']:8.1f} "
            f"{r['extra_peak_vs_plain_mb']:9.1f} {r['max_abs_output_diff_vs_plain']:11.2e}"
        )
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
