"""The command line, end to end on a tiny random SD folder, including bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli.app import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_explains_itself():
    res = _run("--help")
    assert res.exit_code == 0
    for word in ("segment", "list", "demo", "Examples"):
        assert word in res.output
    res = _run("segment", "--help")
    assert res.exit_code == 0 and "--method" in res.output and "--param" in res.output


def test_list_shows_methods_and_parameters():
    res = _run("list", "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert "diffseg" in data["methods"] and "kl_thresholds" in data["methods"]["diffseg"]
    assert "unet" in data["model_families"]


def test_segment_images_and_folder(tiny_sd_dir, rgb_image, tmp_path):
    out = tmp_path / "out"
    second = rgb_image.parent / "second.jpg"
    Image.open(rgb_image).save(second)
    res = _run("segment", rgb_image.parent, "--model", tiny_sd_dir, "--out", out, "--json", "--save-store",
               "-P", "kl_thresholds=0.9,0.9,0.9", "-P", "threshold_mode=absolute", "-P", "num_anchors=4")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [e["image"] for e in summary["images"]] == [str(second), str(rgb_image)]  # folder order: sorted
    for stem in ("two-halves", "second"):
        labels = np.asarray(Image.open(out / f"{stem}.labels.png"))
        assert labels.shape == (48, 40)  # the image's own size, not the model's 32 x 32
        assert Image.open(out / f"{stem}.overlay.png").size == (40, 48)
        info = json.loads((out / f"{stem}.json").read_text())
        assert info["method"] == "diffseg" and sum(s["area"] for s in info["segments"]) == 48 * 40
        # pad: 48 x 40 in 32 x 32 -> scale 32/48, 27 wide (round(26.67)), left (32 - 27) // 2 = 2
        assert info["geometry"] == {"fit": "pad", "original_size": [48, 40], "model_size": [32, 32],
                                    "source_box": [0, 0, 40, 48], "target_box": [2, 0, 29, 32]}
        assert info["params"]["kl_thresholds"] == [0.9, 0.9, 0.9]
        assert (out / f"{stem}.attention.safetensors").is_file()


def test_segment_paper_defaults_and_the_settings_it_reports(tiny_sd_dir, rgb_image, tmp_path):
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", tmp_path / "paper", "--json",
               "--paper-defaults", "-P", "num_anchors=4")
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout)["settings"]
    assert settings["preset"] == "paper" and settings["params"]["threshold_mode"] == "absolute"
    assert settings["sources"] == {"threshold_mode": "paper", "kl_thresholds": "paper", "num_anchors": "user"}
    info = json.loads((tmp_path / "paper" / "two-halves.json").read_text())
    assert info["params"]["kl_thresholds"] == [1.1, 1.1, 1.1]
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", tmp_path / "family", "--json",
               "-P", "num_anchors=4")
    assert json.loads(res.stdout)["settings"]["params"].get("threshold_mode") is None  # the relative default
    info = json.loads((tmp_path / "family" / "two-halves.json").read_text())
    assert info["params"]["threshold_mode"] == "relative"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png"], "image not found"),
        (["notes.png"], "not an image file"),
        (["tiny.png"], "needs at least"),
        (["ok.png", "--method", "nope"], "unknown method 'nope'"),
        (["ok.png", "-P", "kl_thresholds=-1,1"], "kl_thresholds"),
        (["ok.png", "-P", "nonsense"], "NAME=VALUE"),
        (["ok.png", "-P", "no_such_param=1"], "no_such_param"),
        (["ok.png", "--model", "someone/not-a-cached-model"], "local folder"),
        (["ok.png", "--model", "PIXART"], "has no PixArt transformer"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, tiny_sd_dir, args, message):
    (tmp_path / "notes.png").write_text("hello")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    args = [str(pixart) if a == "PIXART" else (str(tmp_path / a) if a.endswith(".png") else a) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_sd_dir)]
    res = runner.invoke(app, ["segment", *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.strip().splitlines() if line.startswith("error:")]) == 1


def test_segment_target_and_goca(tiny_sd_dir, rgb_image, tmp_path):
    out = tmp_path / "target"
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", out, "--method", "target", "--target", "hair",
               "--prompt", "a photo of a man with detailed hair", "--heatmaps")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "two-halves.json").read_text())
    assert info["method"] == "target"
    assert set(np.unique(np.asarray(Image.open(out / "two-halves.labels.png")))) <= {0, 1}
    assert info["meta"]["token_indices"] == [8]  # "hair" in the paper's prompt
    assert (out / "two-halves.heatmap.0-hair.png").is_file()

    out = tmp_path / "goca"
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", out, "--method", "goca",
               "--classes", "cat, grass, wall", "--heatmaps")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "two-halves.json").read_text())
    assert {s.get("name") for s in info["segments"]} <= {"background", "cat", "grass", "wall"}
    for i, name in enumerate(("background", "cat", "grass", "wall")):
        assert (out / f"two-halves.heatmap.{i}-{name}.png").is_file()


def test_method_shortcut_that_does_not_apply(tiny_sd_dir, rgb_image, tmp_path):
    res = runner.invoke(app, ["segment", str(rgb_image), "--model", str(tiny_sd_dir), "--out", str(tmp_path),
                              "--method", "goca", "--target", "hair"])
    assert res.exit_code == 2 and "--target does not apply to method 'goca'" in res.output


def test_segment_clustering_writes_every_k_and_merged_masks(tiny_sd_dir, rgb_image, tmp_path):
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", tmp_path, "--method", "clustering",
               "--k", "2,3", "--pca-rgb")
    assert res.exit_code == 0, res.output
    for k in (2, 3):
        labels = np.asarray(Image.open(tmp_path / f"two-halves.k{k}.labels.png"))
        assert labels.shape == (48, 40) and len(np.unique(labels)) <= k
        assert (tmp_path / f"two-halves.k{k}.overlay.png").is_file()
    masks = json.loads((tmp_path / "two-halves.masks" / "masks.json").read_text())
    assert {m["k"] for m in masks["masks"]} <= {2, 3} and masks["masks"]
    for m in masks["masks"]:
        mask = np.asarray(Image.open(tmp_path / "two-halves.masks" / m["file"]))
        assert mask.shape == (48, 40) and mask.astype(np.int64).sum() // 255 == m["area"]
    assert (tmp_path / "two-halves.pca-rgb.png").is_file()


def test_generate_with_clustering(tmp_path):
    res = _run("generate", "a red circle on a plain background", "--model", "toyworld", "--out", tmp_path,
               "--k", "2,3", "--steps", "4", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert len(summary["timesteps"]) == 4
    assert Image.open(tmp_path / "image.png").size == (32, 32)
    assert (tmp_path / "image.k3.overlay.png").is_file() and (tmp_path / "image.masks" / "masks.json").is_file()


def test_segment_with_img2img_reading(tiny_sd_dir, rgb_image, tmp_path):
    res = _run("segment", rgb_image, "--model", tiny_sd_dir, "--out", tmp_path, "--method", "clustering",
               "--k", "2", "--img2img")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "two-halves.json").read_text())
    assert info["meta"]["timesteps"] == [26, 1]  # 40 leading DDIM steps, strength 0.05: two steps, offset 1
