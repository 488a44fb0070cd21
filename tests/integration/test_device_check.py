"""benchmarks/device_check.py stays alive: its CPU smoke mode runs here, writes its JSON and prints its table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"
METHODS = ["diffseg", "goca", "target", "clustering"]


def _load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("device_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_run_writes_results_and_prints_the_table(tmp_path, capsys, monkeypatch):
    script = _load_script(monkeypatch)
    # the registry hook other model families use: one extra shape, capture only, one method
    script.register_shape(script.ModelShape(
        "extra-tiny", 32, script.MODEL_SHAPES["tiny-sd"].build, sections=("capture",), smoke=True, methods=("diffseg",)
    ))
    result = script.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])

    path = tmp_path / "device_cpu-smoke.json"
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["errors"] == [] and data["benchmark"] == "device_check" and data["smoke"] is True
    assert data["device"]["type"] == "cpu" and data["settings"]["dtypes"] == ["bfloat16"]
    assert set(data["targets"]) >= {"capture_ratio_max", "diffseg_seconds_per_image_max",
                                    "diffseg_images_per_second_batch8_min"}

    capture = {(r["shape"], r["variant"]): r for r in data["capture"]}
    for shape in ("tiny-sd", "tiny-sdxl"):
        assert capture[(shape, "plain")]["ratio_vs_plain"] == 1.0
        for method in METHODS:
            row = capture[(shape, method)]
            assert row["seconds_median"] > 0 and row["ratio_vs_plain"] > 0 and row["dtype"] == "bfloat16"
    assert {v for s, v in capture if s == "extra-tiny"} == {"plain", "diffseg"}

    assert {(r["shape"], r["method"]) for r in data["end_to_end"]} == {("tiny-sd", m) for m in METHODS}
    assert all(r["seconds_per_image_median"] > 0 for r in data["end_to_end"])
    assert {(r["method"], r["batch"]) for r in data["throughput"]} == {(m, b) for m in METHODS for b in (1, 2)}
    assert all(r["images_per_second"] > 0 for r in data["throughput"])
    assert [r["method"] for r in data["agreement"]] == METHODS
    for row in data["agreement"]:
        assert row["reference"] == "cpu float64"
        assert row["mean_best_iou"] >= 0.9 and row["max_map_diff_relative"] < 1e-4

    out = capsys.readouterr().out
    for heading in ("capture:", "end to end:", "throughput:", "agreement:"):
        assert heading in out
    assert "<=1.5" in out and "H200" in out and str(path) in out


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_full_size_shapes_build_and_capture_on_the_meta_device(shape, monkeypatch):
    """The SD1.5- and SDXL-size models the GPU run builds are wired correctly (text encoders, SDXL's added
    conditioning, every method's layers and store; a GoCA capture, which uses self and cross layers and a hooked
    feature): built and run on the meta device, which allocates nothing."""
    import torch

    from attnseg.capture.tracer import AttentionTracer
    from attnseg.pipeline import AttentionSegmentationPipeline

    script = _load_script(monkeypatch)
    spec = script.MODEL_SHAPES[shape]
    meta = torch.device("meta")
    adapter = spec.build(meta, torch.float16)
    assert adapter.device == meta and adapter.dtype == torch.float16
    size = (spec.size, spec.size)
    layers = adapter.attention_layers(size)
    latents = torch.zeros(1, 4, *adapter.latent_size(size), device=meta, dtype=torch.float16)
    assert adapter.encode_image(torch.zeros(1, 3, *size, device=meta)).shape == latents.shape
    for name in METHODS:  # every method's layers, store and estimate; one captured forward (meta ops are slow)
        method = script._method(name)
        pipe = AttentionSegmentationPipeline(adapter, method)
        selected = method.select_layers(layers)
        store = pipe.new_store({n: layers[n] for n in selected}, {"image_size": list(size)})
        assert store.device == meta and pipe.estimate(size=size).peak_bytes() > 0
        if name != "goca":
            continue
        features = method.features(adapter)
        with torch.no_grad(), AttentionTracer(adapter, store, select=selected, layers=layers, features=features):
            out = adapter.denoise(latents, 10, adapter.encode_prompt(method.run_options().prompt))
        assert out.shape == latents.shape and len(store) > 0
