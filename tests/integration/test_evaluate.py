"""`attnseg evaluate` / `attnseg report` end to end on a tiny random SD and a tiny generic-layout dataset.

Covers: the report, resuming after a kill (identical numbers), the attention-store cache (no model pass),
two processes merged == one process, refusing a changed config, semantic and binary method paths, and the
one-line errors.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from attnseg.capture.store import AttentionStore
from attnseg.cli.evaluate import evaluate_cmd, report_cmd
from attnseg.eval.report import build_report, compare_reports, read_jsonl
from attnseg.eval.runner import EvaluationRun, detect_distributed, image_seed, method_kind
from attnseg.methods.base import METHODS, RunOptions
from attnseg.types import SegmentationResult

pytestmark = pytest.mark.slow


def _load(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_e", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ml = _load("metrics_literal")
dl = _load("diffseg_literal")
INPUT = 32  # the tiny model's input side (16 x 16 latents, VAE factor 2)

CLASSES = ("background", "red", "blue")
NUM_IMAGES = 5
DIFFSEG = ["--method", "diffseg", "-P", "num_anchors=4", "-P", "kl_thresholds=0.001,0.001",
           "-P", "threshold_mode=absolute"]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
    return app


APP = _app()
RUNNER = CliRunner()


def _cli(*args: Any) -> Any:
    return RUNNER.invoke(APP, [str(a) for a in args], catch_exceptions=False)


def write_generic_dataset(root: Path, n: int = NUM_IMAGES) -> Path:
    """``n`` small images (40 px high, 40..56 px wide, so centre crops matter) with labels and classes.txt."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i in range(n):
        h, w = 40, 40 + 4 * i
        label = np.zeros((h, w), np.uint8)
        label[:, : w // 2 - i] = 1
        if i != 1:  # one image without "blue"
            label[h // 2 :, w // 2 :] = 2
        label[:3, :3] = 255  # ignored corner
        img = np.full((h, w, 3), 20, np.uint8)
        img[label == 1] = (200, 40, 40)
        img[label == 2] = (40, 40, 200)
        img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"img{i}.png")
        Image.fromarray(label).save(root / "labels" / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_generic_dataset(tmp_path_factory.mktemp("data") / "toy")


def _base(data: Path, model: Path, out: Path, *extra: Any) -> list[Any]:
    return ["evaluate", "--dataset", "generic", "--root", data, "--model", model, *DIFFSEG, "--out", out, *extra]


@pytest.fixture(scope="module")
def baseline(toy_data, tiny_sd_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted single-process run, with its attention stores cached."""
    out = tmp_path_factory.mktemp("runs") / "base"
    res = _cli(*_base(toy_data, tiny_sd_dir, out, "--cache-stores"))
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "report.json").read_text())


def read_label(data: Path, i: int) -> np.ndarray:
    return np.array(Image.open(data / "labels" / f"img{i}.png"), dtype=np.int64)


def centre_square(label: np.ndarray) -> np.ndarray:
    """The label cropped like the image for a square input: the centred ``h x h`` columns (``w >= h`` here)."""
    h, w = label.shape
    left = (w - h) // 2
    return label[:, left : left + h]


def numbers(report: dict) -> dict:
    """The parts of a report that must not depend on processes, restarts or timing."""
    return {k: report[k] for k in ("metrics", "per_class", "per_image", "num_images", "complete", "missing")}


# --------------------------------------------------------------------------------------------
# end to end


def test_evaluate_writes_config_results_and_report(baseline, toy_data):
    out, report = baseline
    assert (out / "config.json").is_file() and (out / "report.md").is_file()
    lines = (out / "results-0.jsonl").read_text().splitlines()
    assert len(lines) == NUM_IMAGES
    first = json.loads(lines[0])
    assert first["id"] == "img0" and first["seed"] == image_seed(0, "img0")
    assert set(first["counts"]) == {"hungarian", "hist"} and first["store"] == "saved"
    assert set(first["timings"]) >= {"load", "capture", "segment", "score", "total"}
    assert report["complete"] and report["num_images"] == NUM_IMAGES and report["missing"]["count"] == 0
    assert report["matching"] == "per-image-hungarian" and report["method"]["kind"] == "class-agnostic"
    assert report["method"]["params"]["kl_thresholds"] == [0.001, 0.001]
    assert [row["name"] for row in report["per_class"]] == list(CLASSES)
    assert report["metrics"]["mean_segments_per_image"] > 1
    # labels are cropped like the images: 40 x 40 per image (image i loses 2i columns on the left), minus
    # what is left of the 3 x 3 ignored corner
    ignored = sum(3 * max(0, 3 - 2 * i) for i in range(NUM_IMAGES))
    assert report["metrics"]["num_pixels"] == NUM_IMAGES * 40 * 40 - ignored
    assert "centre-cropped" in report["geometry"]["description"]
    assert set(report["versions"]) >= {"attnseg", "torch", "diffusers", "transformers"}
    assert report["timings"]["per_image_mean"] > 0
    md = (out / "report.md").read_text()
    assert "## Per class" in md and "| miou **(primary)** |" in md and "blue" in md

    res = _cli("report", out)
    assert res.exit_code == 0, res.output
    assert "| | base |" in res.stdout and "**miou**" in res.stdout
    res = _cli("report", out, "--json")
    assert numbers(json.loads(res.stdout)[0]) == numbers(report)
    # a class-agnostic run can be re-scored with another matching, from the stored counts
    other = build_report(out, write=False, matching="dataset-hungarian")
    assert other["matching"] == "dataset-hungarian" and other["metrics"]["mapping"]
    assert build_report(out, write=False, matching="best-match")["metrics"]["best_match_iou"] > 0


def test_diffseg_run_scores_equal_a_literal_scoring_of_its_predictions(baseline, toy_data):
    """Every image: DiffSeg's labels (recomputed from the cached store), resized to the centre-cropped label by a
    literal nearest rule, scored by an exhaustive Hungarian search; the report must hold exactly those numbers."""
    from attnseg.capture.store import AttentionStore
    from attnseg.methods.diffseg import DiffSeg

    out, report = baseline
    records = [json.loads(x) for x in (out / "results-0.jsonl").read_text().splitlines()]
    method = DiffSeg(num_anchors=4, kl_thresholds=(0.001, 0.001), threshold_mode="absolute")
    tp, fp, fn = np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64)
    # stores are filed by capture settings: this run's folder is the one captured at the run's timestep
    timestep = json.loads((out / "config.json").read_text())["identity"]["method"]["params"]["timestep"]
    (folder,) = [p for p in (out / "stores").iterdir()
                 if p.is_dir() and json.loads((p / "capture.json").read_text())["timestep"] == timestep]
    for i, rec in enumerate(records):
        store = AttentionStore.load(folder / f"img{i}.safetensors")
        assert list(store.meta["image_size"]) == [INPUT, INPUT]
        labels = method.segment(store).labels.numpy()
        target = centre_square(read_label(toy_data, i))
        pred = ml.nearest_resize_literal(labels, target.shape)
        ref = ml.hungarian_literal(pred, target, 3, 255)
        hist = np.zeros((3, len(ref["hist"][0])), np.int64)
        for r, c, n in rec["counts"]["hist"]:
            hist[r, c] += n
        np.testing.assert_array_equal(hist, np.array(ref["hist"]))  # the same pixels, the same ids
        got = rec["counts"]["hungarian"]
        assert sum(got["tp"]) == sum(ref["tp"])  # an optimal assignment
        assert got["num_pixels"] == ref["num_pixels"]
        if ref["unique"]:
            assert (got["tp"], got["fp"], got["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
            assert rec["metrics"]["miou"] == pytest.approx(ref["miou"], abs=1e-12)
        # where several assignments are optimal (a class absent from the image), the solver's choice decides the
        # split of FP between classes: the rest uses the stored counts
        tp += got["tp"]
        fp += got["fp"]
        fn += got["fn"]
        assert rec["metrics"]["pixel_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    iou = [t / (t + p + n) if t + p + n else float("nan") for t, p, n in zip(tp, fp, fn, strict=True)]
    assert report["metrics"]["miou"] == pytest.approx(ml.nanmean(iou), abs=1e-12)
    assert report["metrics"]["pixel_accuracy"] == pytest.approx(tp.sum() / report["metrics"]["num_pixels"], abs=1e-12)
    assert [row["tp"] for row in report["per_class"]] == tp.tolist()


def test_resume_after_kill_gives_identical_report(baseline, toy_data, tiny_sd_dir, tmp_path):
    base_out, base_report = baseline

    # 1. killed by an exception after two images, then resumed with the same command
    out = tmp_path / "killed"
    run = EvaluationRun(
        out, dataset="generic", root=toy_data, model=str(tiny_sd_dir), method="diffseg",
        params={"num_anchors": 4, "kl_thresholds": (0.001, 0.001), "threshold_mode": "absolute"},
    )
    seen: list[str] = []

    def kill_after_two(record: dict) -> None:
        seen.append(record["id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run(on_image=kill_after_two)
    assert len((out / "results-0.jsonl").read_text().splitlines()) == 2
    assert not build_report(out, write=False)["complete"]
    res = _cli(*_base(toy_data, tiny_sd_dir, out))
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(base_report)

    # 2. killed mid-write: k complete lines plus a torn half line
    out = tmp_path / "torn"
    out.mkdir()
    shutil.copy(base_out / "config.json", out / "config.json")
    lines = (base_out / "results-0.jsonl").read_text().splitlines(keepends=True)
    (out / "results-0.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    partial = build_report(out, write=False)
    assert partial["missing"] == {"count": 2, "ids": ["img3", "img4"]} and partial["files"]["torn_lines"] == 1
    res = _cli(*_base(toy_data, tiny_sd_dir, out))
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in (out / "results-0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"img{i}" for i in range(NUM_IMAGES)]
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(base_report)


_KILLER = """
import os, signal, sys

point, at = sys.argv[1], int(sys.argv[2])
calls = [0]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "results":  # half of a result line is on disk when the process dies
    from attnseg.eval import runner

    real = runner.append_jsonl

    def append(path, record):
        calls[0] += 1
        if calls[0] == at:
            import json

            line = json.dumps(record).encode()
            with open(path, "ab") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        real(path, record)

    runner.append_jsonl = append
elif point == "store":  # half of an attention store is on disk when the process dies
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        calls[0] += 1
        if calls[0] == at:
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            die()

    safetensors.torch.save_file = save_file
elif point == "report":  # half of report.json is on disk when the process dies
    from attnseg.eval import report

    real = report._write_text_atomic

    def write(path, text):
        if path.name != "report.json":
            return real(path, text)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text[: len(text) // 2])
        die()

    report._write_text_atomic = write
from attnseg.cli.evaluate import _standalone_app

_standalone_app()(args=sys.argv[3:], prog_name="attnseg")
"""


@pytest.mark.parametrize(("point", "at"), [("results", 3), ("store", 2), ("report", 1)])
def test_sigkill_at_several_points_resumes_to_the_same_report(point, at, baseline, toy_data, tiny_sd_dir, tmp_path):
    """SIGKILL (no clean-up at all) while a result line, an attention store or the report is being written; the
    same command then finishes the run, and its report equals the uninterrupted run's."""
    _, base_report = baseline
    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    args = [str(a) for a in _base(toy_data, tiny_sd_dir, out, "--cache-stores")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), point, str(at), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed, not finished
    assert not (out / "report.json").exists()
    if point == "results":
        assert read_jsonl(out / "results-0.jsonl")[1] == 1  # a torn line, which a resume must not trust
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    final = json.loads((out / "report.json").read_text())
    assert numbers(final) == numbers(base_report)
    ids = [json.loads(x)["id"] for x in (out / "results-0.jsonl").read_text().splitlines()]
    assert ids == [f"img{i}" for i in range(NUM_IMAGES)]  # every image once, in order
    for store in (out / "stores").rglob("*.safetensors"):  # every cached store is whole
        AttentionStore.load(store)


def test_full_disk_while_appending_resumes_to_the_same_report(baseline, toy_data, tiny_sd_dir, tmp_path,
                                                              monkeypatch):
    """The disk fills up while the third result line is written: one line, exit code 2, no half line left; once
    there is room again the same command finishes with the uninterrupted run's report."""
    from attnseg.eval import report as report_module

    _, base_report = baseline
    out = tmp_path / "full"
    real_write = os.write
    calls = [0]

    def write(fd, data):
        if data.startswith(b'{"id"'):
            calls[0] += 1
            if calls[0] == 3:
                real_write(fd, data[:10])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(report_module.os, "write", write)
    res = RUNNER.invoke(APP, [str(a) for a in _base(toy_data, tiny_sd_dir, out)])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: the disk is full"), res.output
    assert len(res.stderr.strip().splitlines()) == 1
    text = (out / "results-0.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2  # two whole lines, no half line
    monkeypatch.undo()
    res = _cli(*_base(toy_data, tiny_sd_dir, out))
    assert res.exit_code == 0, res.output
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(base_report)


def test_cached_stores_are_reused_without_the_model(baseline, toy_data, tiny_sd_dir, tmp_path, monkeypatch):
    from attnseg.models.unet import UNetAdapter

    base_out, _ = baseline
    calls = []
    original = UNetAdapter.denoise

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNetAdapter, "denoise", counting)
    out = tmp_path / "other-threshold"
    args = ["evaluate", "--dataset", "generic", "--root", toy_data, "--model", tiny_sd_dir, "--method", "diffseg",
            "-P", "num_anchors=4", "-P", "kl_thresholds=0.004,0.004",
            "-P", "threshold_mode=absolute", "--store-dir", base_out / "stores", "--out", out]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    assert calls == []  # every store came from the cache
    report = json.loads((out / "report.json").read_text())
    assert report["timings"]["stores"] == {"loaded": NUM_IMAGES}
    table = compare_reports([base_out, out])
    assert "param `kl_thresholds`" in table and "[0.004, 0.004]" in table

    # another capture setting (the timestep) makes the cached stores stale: the model runs again, and its stores go
    # to their own folder, so the first ones are not replaced
    before = {p: p.read_bytes() for p in (base_out / "stores").rglob("*.safetensors")}
    res = _cli(*args[:-2], "-P", "timestep=200", "--out", tmp_path / "other-timestep")
    assert res.exit_code == 0, res.output
    assert len(calls) == NUM_IMAGES
    assert {p: p.read_bytes() for p in before} == before
    folders = sorted(p for p in (base_out / "stores").iterdir() if p.is_dir())
    assert len(folders) == 2 and all((f / "capture.json").is_file() for f in folders)
    default = METHODS.get("diffseg")().run_options().timestep
    assert {json.loads((f / "capture.json").read_text())["timestep"] for f in folders} == {200, default}
    # and the first settings still find their stores
    res = _cli(*args[:-2], "--out", tmp_path / "again")
    assert res.exit_code == 0 and len(calls) == NUM_IMAGES, res.output


def test_two_processes_merge_to_the_single_process_report(baseline, toy_data, tiny_sd_dir, tmp_path, monkeypatch):
    """Rank 1 runs the CLI in a subprocess while rank 0 runs it in this process (importing diffusers costs ~10 s
    a process on this machine, so one subprocess instead of two keeps the file under a minute)."""
    _, base_report = baseline
    out = tmp_path / "sharded"
    args = [str(a) for a in _base(toy_data, tiny_sd_dir, out)]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "attnseg.cli.evaluate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        res = _cli(*args)
    finally:
        output = proc.communicate(timeout=300)[0]
    assert res.exit_code == 0, res.output
    assert proc.returncode == 0, output
    rank_ids = {r: [json.loads(x)["id"] for x in (out / f"results-{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert rank_ids == {0: ["img0", "img2", "img4"], 1: ["img1", "img3"]}
    assert (out / "report.json").is_file()  # written by whichever process finished last
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(base_report)
    assert numbers(build_report(out)) == numbers(base_report)


def test_changed_config_is_refused_unless_overwrite(toy_data, tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    assert _cli(*_base(toy_data, tiny_sd_dir, out, "--limit", "2")).exit_code == 0
    res = _cli(*_base(toy_data, tiny_sd_dir, out, "--limit", "2", "-P", "kl_thresholds=0.5,0.5"))
    assert res.exit_code == 2
    assert "another configuration" in res.output and "kl_thresholds" in res.output and "--overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = _cli(*_base(toy_data, tiny_sd_dir, out, "--limit", "2", "-P", "kl_thresholds=0.5,0.5", "--overwrite"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 2 and report["method"]["params"]["kl_thresholds"] == [0.5, 0.5]
    # the same command again finds everything done
    res = _cli(*_base(toy_data, tiny_sd_dir, out, "--limit", "2", "-P", "kl_thresholds=0.5,0.5"))
    assert res.exit_code == 0 and "resuming" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "generic", "--root", "MISSING"], "does not exist"),
        (["--dataset", "generic"], "dataset root is required"),
        (["--protocol", "no-such-protocol", "--root", "DATA"], "unknown protocol 'no-such-protocol'"),
        (["--protocol", "hair-figaro1k", "--root", "DATA"], "binary"),
        (["--dataset", "generic", "--root", "DATA", "--matching", "semantic"], "cannot be scored"),
        (["--dataset", "generic", "--root", "DATA", "-P", "nope=1"], "no parameter nope"),
        (["--dataset", "generic", "--root", "DATA", "--class-source", "oracle"], "takes no class names"),
    ],
)
def test_bad_input_gives_one_line_error(args, message, toy_data, tiny_sd_dir, tmp_path):
    args = [str(tmp_path / "missing") if a == "MISSING" else (str(toy_data) if a == "DATA" else a) for a in args]
    res = _cli("evaluate", *args, "--model", tiny_sd_dir, "--method", "diffseg", "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing is written before the configuration is valid


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    res = _cli("report", tmp_path)
    assert res.exit_code == 2 and "not an evaluation run folder" in res.output


# --------------------------------------------------------------------------------------------
# semantic and binary methods (stand-ins for GoCA and the hair method, registered here)


class _Bands:
    """Shared stand-in logic: one vertical band per output channel, from the model's self-attention pass."""

    requires: ClassVar[frozenset] = frozenset({"self"})

    def run_options(self) -> RunOptions:
        return RunOptions(timestep=10, prompt="")

    def select_layers(self, layers):
        return [n for n, info in layers.items() if info.kind == "self"][:1]

    @staticmethod
    def _bands(k: int, size) -> torch.Tensor:
        h, w = size
        scores = torch.zeros(k, h, w)
        for i, cols in enumerate(torch.arange(w).chunk(k)):
            scores[i][:, cols] = 1.0
        return scores


class FakeSemantic(_Bands):
    """A semantic method: ``classes=[...]``; channel 0 is the background (0.5 everywhere)."""

    name: ClassVar[str] = "fake-semantic"

    def __init__(self, *, classes=(), sharpness: float = 1.0) -> None:
        self.classes = tuple(classes)
        self.sharpness = sharpness

    def segment(self, store, *, prompt=None, out_size=None, generator=None) -> SegmentationResult:
        size = out_size or tuple(store.meta["image_size"])
        scores = torch.cat([torch.full((1, *size), 0.5), self._bands(len(self.classes), size)]) * self.sharpness
        return SegmentationResult(labels=scores.argmax(0), scores=scores, label_names=("background", *self.classes),
                                  method=self.name)


class FakeTarget(_Bands):
    """A binary method: ``target="..."``; the left half of the image is the target."""

    name: ClassVar[str] = "fake-target"

    def __init__(self, *, target: str = "hair") -> None:
        self.target = target

    def segment(self, store, *, prompt=None, out_size=None, generator=None) -> SegmentationResult:
        size = out_size or tuple(store.meta["image_size"])
        labels = torch.zeros(size, dtype=torch.int64)
        labels[:, : size[1] // 2] = 1
        return SegmentationResult(labels=labels, label_names=("background", self.target), method=self.name)


@pytest.fixture()
def fake_methods():
    """Register the stand-ins for one test only (other tests iterate over the method registry)."""
    for cls in (FakeSemantic, FakeTarget):
        METHODS.register(cls.name)(cls)
    yield
    for cls in (FakeSemantic, FakeTarget):
        if cls.name in METHODS:
            METHODS.unregister(cls.name)


def test_method_kind_decides_the_scoring_path():
    assert method_kind("diffseg") == "class-agnostic"
    assert method_kind(FakeSemantic) == "semantic"
    assert method_kind(FakeTarget) == "binary"


def _band_scores(k: int, offset: float) -> np.ndarray:
    """The stand-in's scores at the input size: background 0.5 + offset, class i = 1 on the i-th of k bands."""
    scores = np.zeros((k + 1, INPUT, INPUT))
    scores[0] = 0.5 + offset
    for i, cols in enumerate(np.array_split(np.arange(INPUT), k)):
        scores[i + 1][:, cols] = 1.0
    return scores


@pytest.mark.usefixtures("fake_methods")
def test_semantic_method_gets_oracle_classes_and_a_background_offset(toy_data, tiny_sd_dir, tmp_path):
    out = tmp_path / "semantic"
    res = _cli("evaluate", "--dataset", "generic", "--root", toy_data, "--model", tiny_sd_dir,
               "--method", "fake-semantic", "--class-source", "oracle", "--background-offset", "0.45", "--out", out)
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in (out / "results-0.jsonl").read_text().splitlines()]
    assert [r["classes"] for r in records] == [["red", "blue"], ["red"], ["red", "blue"], ["red", "blue"],
                                                ["red", "blue"]]
    report = json.loads((out / "report.json").read_text())
    assert report["matching"] == "semantic" and report["protocol"]["background"] == "threshold:0.45"
    assert report["protocol"]["class_source"] == "oracle" and report["metrics"]["background_offset"] == 0.45
    # literal: the bands' scores resized bilinearly (one output index at a time) to the cropped label, the background
    # lifted to 0.95, argmax (the background wins where two bands blend below it), names -> dataset ids
    preds, targets = [], []
    for i, rec in enumerate(records):
        target = centre_square(read_label(toy_data, i))
        scores = _band_scores(len(rec["classes"]), 0.45)
        up = np.stack([dl.bilinear_resize(c, *target.shape) for c in scores])
        ids = np.array([0] + [CLASSES.index(c) for c in rec["classes"]])[up.argmax(0)]
        ref = ml.confusion_literal(ids, target, 3, 255)
        assert rec["metrics"]["by_offset"]["0.45"]["miou"] == pytest.approx(ref["miou"], abs=1e-12)
        assert rec["metrics"]["by_offset"]["0.45"]["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=1e-12)
        preds.append(ids.ravel())
        targets.append(target.ravel())
    ref = ml.confusion_literal(np.concatenate(preds), np.concatenate(targets), 3, 255)
    for name in ("miou_absent_as_zero", "miou", "pixel_accuracy", "num_pixels"):
        assert report["metrics"][name] == pytest.approx(ref[name], abs=1e-12), name
    for row in report["per_class"]:
        c = row["id"]
        assert (row["gt_pixels"], row["pred_pixels"]) == (ref["gt"][c], ref["predicted"][c])
        assert row["iou"] == pytest.approx(ref["iou"][c], abs=1e-12)
        assert row["recall"] == pytest.approx(ref["recall"][c], abs=1e-12)
    assert 0 < ref["predicted"][0] < ref["num_pixels"]  # the offset decides some pixels, not all
    assert "bilinear on class scores" in report["geometry"]["description"]


@pytest.mark.usefixtures("fake_methods")
def test_semantic_class_sources(toy_data, tiny_sd_dir, tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"img{i}": ["red", "sky"] for i in range(NUM_IMAGES)}))
    common = {"dataset": "generic", "root": toy_data, "method": "fake-semantic", "model": str(tiny_sd_dir)}
    label = np.array([[0, 2], [2, 255]])
    run = EvaluationRun(tmp_path / "a", class_source="vocabulary", **common)
    assert run._classes("img0", label) == ["red", "blue"]
    run = EvaluationRun(tmp_path / "b", class_source="captions", captions=captions, **common)
    assert run._classes("img0", label) == ["red", "sky"]
    with pytest.raises(Exception, match="needs --captions"):
        EvaluationRun(tmp_path / "c", class_source="captions", **common)


def test_background_offsets_follow_the_protocol():
    from attnseg.eval.protocols import get_protocol
    from attnseg.eval.runner import GOCA_OFFSETS, _background_plan

    held_out = get_protocol("goca-voc")
    with pytest.raises(Exception, match="--split val"):
        _background_plan(held_out, "semantic", "train", None)  # the offset must come from the held-out split
    assert _background_plan(held_out, "semantic", "val", None) == ("held-out-threshold", list(GOCA_OFFSETS), "best")
    assert _background_plan(held_out, "semantic", "train", 0.1) == ("held-out-threshold", [0.1], "0.1")
    oracle = get_protocol("goca-voc-oracle")
    assert _background_plan(oracle, "semantic", "train", None)[1:] == (list(GOCA_OFFSETS), "best")
    with pytest.raises(Exception, match="drop --background-offset"):
        _background_plan(oracle, "semantic", "train", 0.1)
    assert _background_plan(None, "semantic", None, None) == ("none", None, "none")


@pytest.mark.usefixtures("fake_methods")
def test_binary_method_scores_its_target_class(toy_data, tiny_sd_dir, tmp_path):
    out = tmp_path / "binary"
    res = _cli("evaluate", "--dataset", "generic", "--root", toy_data, "--model", tiny_sd_dir,
               "--method", "fake-target", "-P", "target=red", "--crop", "resize", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["matching"] == "binary" and report["per_class"][0]["name"] == "red"
    assert set(report["metrics"]) >= {"miou", "accuracy", "precision", "f1", "iou", "recall", "pooled"}
    # literal: the stand-in's left half at the input size, nearest-resized to the (uncropped) label; "red" = class 1
    per_image = []
    for i in range(NUM_IMAGES):
        label = read_label(toy_data, i)
        half = np.zeros((INPUT, INPUT), np.int64)
        half[:, : INPUT // 2] = 1
        per_image.append(ml.binary_literal(ml.nearest_resize_literal(half, label.shape), label == 1, label != 255))
    for name in ("miou", "accuracy", "precision", "recall", "f1", "iou", "iou_background"):
        assert report["metrics"][name] == pytest.approx(ml.nanmean([r[name] for r in per_image]), abs=1e-12), name
    counts = {k: sum(r[k] for r in per_image) for k in ("tp", "fp", "fn", "tn")}
    assert report["metrics"]["pooled"]["iou"] == pytest.approx(
        counts["tp"] / (counts["tp"] + counts["fp"] + counts["fn"]), abs=1e-12)
    assert report["metrics"]["pooled"]["recall"] == pytest.approx(counts["tp"] / (counts["tp"] + counts["fn"]),
                                                                  abs=1e-12)
    assert "squashed" in report["geometry"]["description"]


def _write_cityscapes(root: Path) -> None:
    """Three 40 x 64 images in the Cityscapes layout: road (labelId 7), building (11), sky (23), void (0)."""
    for i in range(3):
        stem = f"aachen_000000_00000{i}"
        (root / "leftImg8bit/val/aachen").mkdir(parents=True, exist_ok=True)
        (root / "gtFine/val/aachen").mkdir(parents=True, exist_ok=True)
        label = np.full((40, 64), 23, np.uint8)
        label[20:] = 7
        label[10:30, 10 + 8 * i : 30 + 8 * i] = 11
        label[:, 30:33] = 0  # inside the centre crop (columns 12..51)
        Image.fromarray(np.dstack([label * 9] * 3).astype(np.uint8)).save(
            root / "leftImg8bit/val/aachen" / f"{stem}_leftImg8bit.png")
        Image.fromarray(label).save(root / "gtFine/val/aachen" / f"{stem}_gtFine_labelIds.png")


def _write_figaro(root: Path) -> None:
    """Three 40 x 48 images in the Figaro-1k layout, hair on the left third."""
    (root / "Original/Testing").mkdir(parents=True)
    (root / "GT/Testing").mkdir(parents=True)
    for i in range(3):
        mask = np.zeros((40, 48), bool)
        mask[:, : 16 + i] = True
        Image.fromarray((np.dstack([mask] * 3) * 200).astype(np.uint8)).save(
            root / "Original/Testing" / f"Frame0000{i}-org.jpg")
        Image.fromarray(mask).save(root / "GT/Testing" / f"Frame0000{i}-gt.pbm")


@pytest.mark.parametrize(
    ("protocol", "writer", "method", "score_at", "label_size"),
    [
        ("diffseg-cityscapes27", _write_cityscapes, ["--method", "diffseg", "-P", "num_anchors=4"], "input", [32, 32]),
        ("hair-figaro1k", _write_figaro, ["--method", "fake-target"], "label", [40, 48]),
    ],
)
@pytest.mark.usefixtures("fake_methods")
def test_registered_protocol_fixes_geometry_and_scoring(protocol, writer, method, score_at, label_size, tiny_sd_dir,
                                                        tmp_path):
    writer(tmp_path / "data")
    out = tmp_path / "run"
    # --size 32: the protocols' 512 px would make the tiny model's attention maps needlessly large
    res = _cli("evaluate", "--protocol", protocol, "--root", tmp_path / "data", "--model", tiny_sd_dir, *method,
               "--size", "32", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["protocol"]["id"] == f"{protocol}@v1" and report["complete"] and report["num_images"] == 3
    assert report["geometry"]["score_at"] == score_at and report["model"]["size"] == 32
    assert report["protocol"]["notes"] in (out / "report.md").read_text()
    records = [json.loads(x) for x in (out / "results-0.jsonl").read_text().splitlines()]
    assert all(r["label_size"] == label_size for r in records)
    if protocol == "hair-figaro1k":
        assert report["matching"] == "binary" and report["per_class"][0]["name"] == "hair"
        # literal: the left half at 32 x 32, nearest-resized to the 40 x 48 label; hair = the first 16 + i columns
        per_image = []
        for i in range(3):
            half = np.zeros((INPUT, INPUT), np.int64)
            half[:, : INPUT // 2] = 1
            hair = np.zeros((40, 48), bool)
            hair[:, : 16 + i] = True
            per_image.append(ml.binary_literal(ml.nearest_resize_literal(half, (40, 48)), hair))
        for name in ("miou", "precision", "recall", "iou"):
            assert report["metrics"][name] == pytest.approx(ml.nanmean([r[name] for r in per_image]), abs=1e-12)
    else:
        assert report["matching"] == "per-image-hungarian" and len(report["per_class"]) == 27
        assert report["metrics"]["num_pixels"] < 3 * 32 * 32  # void pixels ignored


def test_scorers_agree_with_literal_metrics():
    """Counts stored per image rebuild exactly what an exhaustive Hungarian search and a pixel-by-pixel best match
    give (the scorers use attnseg.eval.metrics inside, so that is not the reference)."""
    from attnseg.eval.report import make_scorer

    rng = np.random.default_rng(1)
    targets, preds = [], []
    while len(targets) < 3:  # images whose optimal assignment is unique (no tie-breaking question)
        t = rng.integers(0, 4, (12, 10))
        t[0, :3] = 255
        p = np.where(rng.random((12, 10)) < 0.5, np.where(t == 255, 0, t), rng.integers(0, 6, (12, 10)))
        if ml.hungarian_literal(p, t, 4, 255)["unique"]:
            targets.append(t)
            preds.append(p)
    scoring = {"num_classes": 4, "ignore_index": 255, "class_names": list("abcd")}
    records = []
    hungarian = make_scorer({**scoring, "matching": "per-image-hungarian"})
    tp, fp, fn = np.zeros(4), np.zeros(4), np.zeros(4)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        metrics, counts = hungarian.score(p, t)
        records.append({"id": str(i), "metrics": metrics, "counts": counts})
        ref = ml.hungarian_literal(p, t, 4, 255)
        tp, fp, fn = tp + ref["tp"], fp + ref["fp"], fn + ref["fn"]
    metrics, table = hungarian.combine(records)
    assert metrics["miou"] == pytest.approx(ml.nanmean(list(tp / (tp + fp + fn))), abs=1e-12)
    assert [r["tp"] for r in table] == tp.astype(int).tolist()

    best = make_scorer({**scoring, "matching": "best-match"})
    masks = rng.random((5, 12, 10)) > 0.6  # overlapping masks
    for pred in (preds[0], masks):
        metrics, _ = best.score(pred, targets[0])
        pred_masks = pred if pred.ndim == 3 else np.stack([pred == k for k in range(pred.max() + 1)])
        ref = ml.best_match_literal(pred_masks, targets[0], 4, 255)
        assert metrics["best_match_iou"] == pytest.approx(ml.nanmean(ref), abs=1e-12)
    with pytest.raises(Exception, match="best-match"):
        hungarian.score(masks, targets[0])


def test_rank_and_world_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect_distributed() == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(Exception, match="RANK=2"):
        detect_distributed()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    assert detect_distributed() == (0, 1)


def test_pad_scores_every_label_pixel_and_never_padding(toy_data, tiny_sd_dir, tmp_path):
    """With --crop pad nothing is cropped: every labelled pixel of every image is scored, at the label size."""
    out = tmp_path / "pad"
    res = _cli(*_base(toy_data, tiny_sd_dir, out, "--crop", "pad"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    # all 40 x (40 + 4i) label pixels, minus the 3 x 3 ignored corner of each image
    assert report["metrics"]["num_pixels"] == sum(40 * (40 + 4 * i) - 9 for i in range(NUM_IMAGES))
    assert "letterboxed" in report["geometry"]["description"]
    records = [json.loads(line) for line in (out / "results-0.jsonl").read_text().splitlines()]
    assert [r["label_size"] for r in records] == [[40, 40 + 4 * i] for i in range(NUM_IMAGES)]
    res = _cli(*_base(toy_data, tiny_sd_dir, tmp_path / "bad", "--crop", "pad", "--score-at", "input"))
    assert res.exit_code == 2 and "score_at must be 'label'" in res.output


def test_paper_defaults_put_the_papers_settings_under_the_given_ones(toy_data, tiny_sd_dir, tmp_path):
    out = tmp_path / "paper"
    res = _cli("evaluate", "--dataset", "generic", "--root", toy_data, "--model", tiny_sd_dir, "--method", "diffseg",
               "-P", "num_anchors=4", "--paper-defaults", "--limit", "1", "--out", out)
    assert res.exit_code == 0, res.output
    params = json.loads((out / "report.json").read_text())["method"]["params"]
    assert params["threshold_mode"] == "absolute" and params["kl_thresholds"] == [1.1, 1.1, 1.1]
    assert params["num_anchors"] == 4
