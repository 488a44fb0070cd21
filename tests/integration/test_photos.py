"""Photographs end to end: masks at the image's own size, folders that stream, resume and survive bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A plain background with a red disc near the left end and a blue square near the right end."""
    rng = np.random.default_rng(seed)
    arr = np.full((height, width, 3), (235, 235, 225), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    r = height // 3
    arr[(yy - height // 2) ** 2 + (xx - r - 5) ** 2 < r * r] = (220, 40, 40)
    arr[height // 4 : 3 * height // 4, width - 5 - 2 * r : width - 5] = (45, 85, 225)
    return np.clip(arr.astype(int) + rng.integers(-8, 8, arr.shape), 0, 255).astype(np.uint8)


def test_panorama_masks_cover_all_of_it(tmp_path):
    """The panorama keeps its 2000 x 300 pixels in every output; the JSON says how it was placed."""
    path = tmp_path / "panorama.jpg"
    Image.fromarray(_scene(2000, 300)).save(path, quality=90)
    out = tmp_path / "out"
    res = _run("segment", path, "--model", "toyworld", "--out", out, "--heatmaps", "--method", "goca",
               "--classes", "circle, square")
    assert res.exit_code == 0, res.output
    assert "toy model" in res.output and "only knows the toy world" in res.output
    labels = np.asarray(Image.open(out / "panorama.labels.png"))
    assert labels.shape == (300, 2000)
    assert Image.open(out / "panorama.overlay.png").size == (2000, 300)
    for heat in out.glob("panorama.heatmap.*.png"):
        assert Image.open(heat).size == (2000, 300)
    info = json.loads((out / "panorama.json").read_text())
    assert info["size"] == [300, 2000]
    assert sum(s["area"] for s in info["segments"]) == 300 * 2000  # every pixel in exactly one segment
    # the toy family's GoCA input size (its preset, which the command applies; the native 32 x 32 today): pad
    # scale 32/2000 -> 32 x round(4.8) = 5 rows, top (32 - 5) // 2 = 13
    from attnseg.models.loading import load_model
    from attnseg.pipeline import AttentionSegmentationPipeline

    side = AttentionSegmentationPipeline(load_model("toyworld"), "goca", classes="circle, square").input_size()[0]
    rows = round(300 * side / 2000)
    top = (side - rows) // 2
    assert info["geometry"] == {"fit": "pad", "original_size": [300, 2000], "model_size": [side, side],
                                "source_box": [0, 0, 2000, 300], "target_box": [0, top, side, top + rows]}

    crop = tmp_path / "crop"
    res = _run("segment", path, "--model", "toyworld", "--out", crop, "--fit", "crop")
    assert res.exit_code == 0, res.output
    info = json.loads((crop / "panorama.json").read_text())
    assert info["geometry"]["source_box"] == [850, 0, 1150, 300] and info["size"] == [300, 2000]

    native = tmp_path / "native"
    res = _run("segment", path, "--model", "toyworld", "--out", native, "--fit", "native", "--method", "clustering",
               "--k", "2")
    assert res.exit_code == 0, res.output
    info = json.loads((native / "panorama.json").read_text())
    h, w = info["geometry"]["model_size"]
    assert w > 4 * h and h % 4 == 0 and w % 4 == 0  # the toy UNet halves twice: sides are multiples of 4
    assert np.asarray(Image.open(native / "panorama.k2.labels.png")).shape == (300, 2000)
    # DiffSeg aligns square grids only: native is refused before the model runs, with the way out
    res = _run("segment", path, "--model", "toyworld", "--out", tmp_path / "refused", "--fit", "native")
    assert res.exit_code == 2 and "needs square attention grids" in res.output and "--fit pad" in res.output
    assert "model:" not in res.output  # refused before the model was loaded


def test_sideways_phone_photo_is_segmented_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: view it turned 90 degrees counter-clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(_scene(120, 60)).save(path, exif=exif)
    res = _run("segment", path, "--model", "toyworld", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert np.asarray(Image.open(tmp_path / "out" / "phone.labels.png")).shape == (120, 60)


def test_model_is_required_and_the_error_lists_the_choices(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_scene(40, 30)).save(path)
    for command in (["segment", path, "--out", tmp_path / "out"], ["generate", "a red circle"]):
        res = _run(*command)
        assert res.exit_code == 2, res.output
        lines = [line for line in res.output.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "--model is required" in lines[0]
        assert "toyworld" in lines[0] and "local diffusers folder" in lines[0] and "Hub id" in lines[0]


def test_decompression_bomb_refused_in_one_line(tmp_path):
    from tests.imaging import write_png_header

    bomb = write_png_header(tmp_path / "bomb.png", 30000, 30000)
    res = _run("segment", bomb, "--model", "toyworld", "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "900 megapixels" in res.output and "--max-megapixels" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    sizes = [(60, 40), (48, 64), (90, 30), (50, 50)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(_scene(w, h, seed=i)).save(root / f"img{i}.jpg")
    (root / "broken.jpg").write_bytes((root / "img0.jpg").read_bytes()[:150])  # cut off: cannot be decoded
    return root, {f"img{i}": (h, w) for i, (w, h) in enumerate(sizes)}


def _record_events(monkeypatch):
    """Record every image file opened for decoding and every finished image (its JSON written), in order."""
    import attnseg.io.export as export
    import attnseg.io.images as images

    events: list[tuple[str, str]] = []
    real_open, real_write = images._open, export.write_json

    def counting_open(path, max_pixels):
        events.append(("open", path.stem))
        return real_open(path, max_pixels)

    def recording_write(data, path):
        events.append(("done", path.name.removesuffix(".json")))
        return real_write(data, path)

    monkeypatch.setattr(images, "_open", counting_open)
    monkeypatch.setattr(export, "write_json", recording_write)
    return events


def test_folder_streams_survives_a_broken_file_and_resumes(folder, tmp_path, monkeypatch):
    root, sizes = folder
    out = tmp_path / "out"
    events = _record_events(monkeypatch)
    res = _run("segment", root, "--model", "toyworld", "--out", out, "--json")
    assert res.exit_code == 3, res.output  # some images failed, the rest were written
    summary = json.loads(res.stdout)
    assert [f["image"] for f in summary["failed"]] == [str(root / "broken.jpg")]
    assert "cannot read image" in summary["failed"][0]["error"]
    assert summary["images_per_second"] > 0
    for stem, size in sizes.items():
        assert np.asarray(Image.open(out / f"{stem}.labels.png")).shape == size
    # one image at a time: each image is opened only after the previous one was finished
    decoded = [(kind, name) for kind, name in events if name != "broken"]
    assert decoded == [e for stem in sorted(sizes) for e in (("open", stem), ("done", stem))], events

    # a re-run keeps what is finished (nothing decoded again) and still reports the broken file
    (out / "img2.json").unlink()  # as if the first run had stopped during img2
    events.clear()
    res = _run("segment", root, "--model", "toyworld", "--out", out)
    assert res.exit_code == 3
    assert [name for kind, name in events if kind == "open"] == ["broken", "img2"]
    assert "kept 3 image(s) already done" in res.output and "broken.jpg" in res.output
    assert "images/s" in res.output
    events.clear()
    res = _run("segment", root, "--model", "toyworld", "--out", out, "--overwrite")
    assert res.exit_code == 3 and len([e for e in events if e[0] == "done"]) == 4


def test_batches_decode_batch_size_images_at_a_time(folder, tmp_path, monkeypatch):
    root, sizes = folder
    (root / "broken.jpg").unlink()
    events = _record_events(monkeypatch)
    res = _run("segment", root, "--model", "toyworld", "--out", tmp_path / "out", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    assert [kind for kind, _ in events] == ["open", "open", "done", "done"] * 2
    for stem, size in sizes.items():
        assert np.asarray(Image.open(tmp_path / "out" / f"{stem}.labels.png")).shape == size


def test_a_batch_captures_what_single_runs_capture(tiny_adapter, rgb_image):
    """Each image of a batch gets its own seeded noise and its own store: the maps equal single runs'."""
    from attnseg.pipeline import AttentionSegmentationPipeline

    pipe = AttentionSegmentationPipeline(tiny_adapter, "diffseg", kl_thresholds=(0.9, 0.9, 0.9))
    other = np.asarray(Image.open(rgb_image))[:, ::-1].copy()
    batch = pipe.run_batch([rgb_image, other], seed=3)
    for image, got in zip([rgb_image, other], batch, strict=True):
        alone = pipe.run(image, seed=3)
        for r, maps in alone.store.self_attention().items():
            torch.testing.assert_close(got.store.self_attention()[r], maps, rtol=1e-4, atol=1e-6)
        assert got.result.size == (48, 40) and got.store.meta["batch_size"] == 2
    assert not torch.equal(batch[0].store.self_attention()[16], batch[1].store.self_attention()[16])


def test_web_requests_without_a_browser(tmp_path):
    """The page's work function: every method writes outputs at the upload's size; bad input is a clear error."""
    from attnseg.errors import ConfigError
    from attnseg.models.loading import load_model
    from attnseg.web import example_images
    from attnseg.web.app import segment_request

    adapter = load_model("toyworld")
    upload = tmp_path / "wide.png"
    Image.fromarray(_scene(110, 50)).save(upload)
    settings = {"classes": "circle, square", "target": "circle", "ks": "2, 3"}
    for method in ("diffseg", "goca", "target", "clustering"):
        out = segment_request(adapter, str(upload), method, workdir=tmp_path, **settings)
        assert np.asarray(Image.open(out.labels)).shape == (50, 110), method
        assert Image.open(out.overlay).size == (110, 50)
        assert json.loads(out.json.read_text())["geometry"]["original_size"] == [50, 110]
        assert out.heatmaps and len(out.legend) == len(out.ids) >= 1
        assert all(Image.open(p).size == (110, 50) for p, _ in out.heatmaps)
    assert len(example_images()) >= 2 and all(Image.open(p).size[0] != Image.open(p).size[1]
                                              for p in example_images())
    with pytest.raises(ConfigError, match="no image"):
        segment_request(adapter, None, "diffseg", workdir=tmp_path)
    with pytest.raises(ConfigError, match="GoCA needs class names"):
        segment_request(adapter, str(upload), "goca", workdir=tmp_path, classes=" , ")
    with pytest.raises(ConfigError, match="k values must be whole numbers"):
        segment_request(adapter, str(upload), "clustering", workdir=tmp_path, ks="two")
    with pytest.raises(ConfigError, match="needs square attention grids"):
        segment_request(adapter, str(upload), "diffseg", workdir=tmp_path, fit="native")
