"""The command line on tiny PixArt, SD3 and Flux folders: every method, the family defaults, and one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli.app import app

runner = CliRunner()

METHOD_ARGS = {
    "diffseg": ["-P", "num_anchors=4"],
    "goca": ["--classes", "cat, grass"],
    "target": ["--target", "cat", "--prompt", "a photo of a cat"],
    "clustering": ["--k", "2,3"],
}


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_every_method_through_the_cli(tiny_dit_dirs, rgb_image, tmp_path, family):
    for method, extra in METHOD_ARGS.items():
        out = tmp_path / method
        args = ["segment", str(rgb_image), "--model", str(tiny_dit_dirs[family]), "--out", str(out), "--method",
                method, "--size", "32", "--json", *extra]
        res = runner.invoke(app, args, catch_exceptions=False)
        assert res.exit_code == 0, (method, res.output)
        info = json.loads((out / "two-halves.json").read_text())
        assert info["method"] == method
        labels = np.asarray(Image.open(out / "two-halves.labels.png"))
        assert labels.shape == (48, 40)  # at the image's own size; the model saw it letterboxed into 32x32
        assert info["geometry"]["model_size"] == [32, 32]
        if method == "goca":  # the family's defaults were applied (head method, refinement layers, timestep)
            import attnseg.models as models

            defaults = models.family_defaults()[family]["goca"]
            assert info["params"]["refine_order"] == defaults.get("refine_order", 2)
            assert info["params"]["timestep"] == defaults["timestep"]
            assert info["params"]["refine_layers"] and all(":" in n or "attn1" in n
                                                           for n in info["params"]["refine_layers"])
            assert set(np.unique(labels)) <= {0, 1, 2}
        if method == "target":
            assert set(np.unique(labels)) <= {0, 1}


def test_list_shows_the_family_defaults():
    res = runner.invoke(app, ["list", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert {"pixart", "sd3", "flux"} <= set(data["model_families"])
    flux = data["family_defaults"]["flux"]["goca"]
    assert flux["head_method"] == "average" and flux["reference_layer"] == "single_transformer_blocks.8.attn"
    assert data["family_defaults"]["pixart"]["goca"]["refine_order"] == 5
    assert "goca: " in runner.invoke(app, ["list"]).output


def _error(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.strip().splitlines() if line.startswith("error:")]) == 1
    return res.output


def test_one_line_errors(tiny_dit_dirs, rgb_image, tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("attnseg.models.loading.load_model", refuse)  # every error below comes before loading
    # a Flux folder without its T5 encoder
    broken = tmp_path / "flux-no-t5"
    shutil.copytree(tiny_dit_dirs["flux"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    out = _error(["segment", str(rgb_image), "--model", str(broken), "--out", str(tmp_path / "o"), "--size", "32"])
    assert "T5 text encoder" in out and "text_encoder_2" in out
    # the same when model_index.json lists none
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    assert "has no T5 text encoder" in _error(["segment", str(rgb_image), "--model", str(broken), "--out",
                                               str(tmp_path / "o")])
    # a prompt longer than T5's limit (32 tokens in the tiny model)
    long_prompt = " ".join(["cat"] * 40)
    out = _error(["segment", str(rgb_image), "--model", str(tiny_dit_dirs["flux"]), "--out", str(tmp_path / "o"),
                  "--size", "32", "--prompt", long_prompt])
    assert "at most 32" in out and "T5" in out
    # an unsupported transformer class
    other = tmp_path / "hunyuan"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps(
        {"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]}
    ))
    out = _error(["segment", str(rgb_image), "--model", str(other), "--out", str(tmp_path / "o")])
    assert "transformer class HunyuanDiT2DModel" in out and "FluxTransformer2DModel" in out


def test_the_cli_takes_the_family_settings_from_the_pipeline(tiny_dit_dirs, rgb_image, tmp_path):
    """--variant picks the family's per-variant layers, mapped to the model's depth (2 + 2 blocks here); -P wins."""
    out = tmp_path / "vanilla"
    args = ["segment", str(rgb_image), "--model", str(tiny_dit_dirs["flux"]), "--out", str(out), "--method", "goca",
            "--classes", "cat, grass", "--variant", "vanilla", "--size", "32", "-P", "refine_order=3", "--json"]
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    params = json.loads((out / "two-halves.json").read_text())["params"]
    assert params["cross_layers"] == ["transformer_blocks.0.attn:cross", "single_transformer_blocks.0.attn:cross",
                                      "single_transformer_blocks.1.attn:cross"]
    assert params["timestep"] == 407 and params["refine_order"] == 3 and params["variant"] == "vanilla"
