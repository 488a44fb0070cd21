"""How long the command line takes to reject bad input, from a shell.

Measures, interleaved in one run, the wall time of fresh processes:

- ``python -c pass``: the interpreter alone (the floor);
- ``python -c "import torch, diffusers, transformers"``: what every command paid before its first check when
  the heavy libraries were imported up front (the baseline);
- ``attnseg segment missing.jpg --model toyworld``: a missing image;
- ``attnseg segment ok.png --model toyworld --size -8``: a bad option;
- ``attnseg segment ok.png --model toyworld --method goca --classes "circle, giraffe"``: a word the model cannot
  represent (the method's module imports torch; the tokenizer is read, the model is not loaded);
- ``attnseg segment ok.png --model ./broken``: an invalid ``model_index.json``.

    python benchmarks/cli_startup.py [--repeats 5]

Writes benchmarks/results/cli_startup.json (medians, and ratios to the baseline) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"


def _cases(tmp: Path) -> dict[str, list[str]]:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp / "ok.png")
    (tmp / "broken").mkdir()
    (tmp / "broken" / "model_index.json").write_text("{not json")
    seg = [sys.executable, "-m", "attnseg.cli.app", "segment"]
    out = ["--out", str(tmp / "out")]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import torch, diffusers, transformers (baseline)": [sys.executable, "-c",
                                                              "import torch, diffusers, transformers"],
        "segment missing.jpg": [*seg, str(tmp / "missing.jpg"), "--model", "toyworld", *out],
        "segment --size -8": [*seg, str(tmp / "ok.png"), "--model", "toyworld", "--size", "-8", *out],
        "segment goca unknown word": [*seg, str(tmp / "ok.png"), "--model", "toyworld", "--method", "goca",
                                      "--classes", "circle, giraffe", *out],
        "segment invalid model_index.json": [*seg, str(tmp / "ok.png"), "--model", str(tmp / "broken"), *out],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    times: dict[str, list[float]] = {}
    codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as d:
        cases = _cases(Path(d))
        for _ in range(args.repeats):
            for name, cmd in cases.items():
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                times.setdefault(name, []).append(time.perf_counter() - start)
                codes[name] = proc.returncode
    medians = {k: statistics.median(v) for k, v in times.items()}
    baseline = medians["import torch, diffusers, transformers (baseline)"]
    rows = {k: {"median_s": round(v, 3), "min_s": round(min(times[k]), 3), "ratio_to_baseline": round(v / baseline, 3),
                "exit_code": codes[k]} for k, v in medians.items()}
    result = {
        "benchmark": "cli_startup", "repeats": args.repeats, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "cases": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':50s} {'median s':>9s} {'min s':>7s} {'x baseline':>10s} {'exit':>5s}")
    for name, row in rows.items():
        print(f"{name:50s} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['ratio_to_baseline']:10.3f} "
              f"{row['exit_code']:5d}")


if __name__ == "__main__":
    main()
