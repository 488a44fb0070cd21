"""Bad input that is not an error: unknown words skipped on request, classes spread over several prompts, datasets
replaced on request. These run the models (tiny random SD, the bundled toy model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli.app import app
from attnseg.errors import ConfigError

RUNNER = CliRunner()
CLASSES = ["cat", "dog", "bird", "fish", "horse", "sheep", "cow"]


@pytest.fixture(scope="module")
def short_adapter():
    """A tiny random SD whose tokenizer keeps 10 tokens (start and end included): 4 classes per prompt."""
    from attnseg.models.unet import UNetAdapter
    from attnseg.testing import clip_tokenizer, tiny_sd_components

    comps = tiny_sd_components(seed=0)
    comps["tokenizer"] = clip_tokenizer(model_max_length=10)
    return UNetAdapter(**comps, name="tiny-short-text")


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def test_classes_beyond_the_token_limit_are_spread_over_prompts(short_adapter, image):
    from attnseg.methods.goca import GoCA
    from attnseg.pipeline import AttentionSegmentationPipeline

    method = GoCA(classes=CLASSES, background_objects="tree", refine_order=1)
    pipe = AttentionSegmentationPipeline(short_adapter, method)
    parts = pipe.prompt_parts()
    groups = [list(p.classes) for p in parts]
    assert [c for g in groups for c in g] == CLASSES and len(groups) > 1  # every class, in order, none dropped
    for part in parts:  # every prompt holds all of its words
        words = [*part.background_objects, *part.classes]
        assert all(pipe.prompt_fitting(part.prompt, words))
        assert part.prompt.startswith("tree, ")

    out = pipe.run(image, seed=0)
    result = out.result
    assert result.meta["prompts"] == len(groups) and len(out.stores) == len(groups)
    assert result.label_names == ("background", *CLASSES) and result.meta["dropped"] == []
    # each class channel is that class's channel in its own prompt's run (same seed, same image)
    backgrounds = []
    for part in parts:
        alone = AttentionSegmentationPipeline(short_adapter, part).run(image, seed=0).result
        backgrounds.append(alone.scores[0])
        for i, name in enumerate(part.classes, start=1):
            torch.testing.assert_close(result.scores[CLASSES.index(name) + 1], alone.scores[i], rtol=0, atol=0)
    torch.testing.assert_close(result.scores[0], torch.stack(backgrounds).mean(0))
    assert torch.equal(result.labels, result.scores.argmax(0))


def test_a_batch_spreads_classes_over_prompts_as_single_runs_do(short_adapter, image):
    """run_batch with classes beyond the token limit: one pass per prompt for the whole batch, and each image gets
    what run() gives it alone (every prompt's store, the combined classes)."""
    from attnseg.methods.goca import GoCA
    from attnseg.pipeline import AttentionSegmentationPipeline

    # no refinement: its powers of the self-attention would amplify the batch's rounding (as with one prompt)
    pipe = AttentionSegmentationPipeline(short_adapter, GoCA(classes=CLASSES, background_objects="tree",
                                                             refine_order=0))
    other = image[::-1, ::-1].copy()
    batch = pipe.run_batch([image, other], seed=0)
    parts = len(pipe.prompt_parts())
    assert parts > 1
    for picture, got in zip([image, other], batch, strict=True):
        alone = pipe.run(picture, seed=0)
        assert got.result.meta["prompts"] == parts and len(got.stores) == parts
        assert all(store.meta["batch_size"] == 2 for store in got.stores)
        assert got.result.label_names == alone.result.label_names == ("background", *CLASSES)
        torch.testing.assert_close(got.result.scores, alone.result.scores, rtol=1e-4, atol=5e-5)
    assert not torch.equal(batch[0].result.scores, batch[1].result.scores)
    with pytest.raises(ConfigError, match="a prompt cannot be given"):
        pipe.run_batch([image], prompt="tree, cat")


def test_classes_that_fit_use_one_prompt(tiny_adapter, image):
    from attnseg.methods.goca import GoCA
    from attnseg.pipeline import AttentionSegmentationPipeline

    pipe = AttentionSegmentationPipeline(tiny_adapter, GoCA(classes=CLASSES, refine_order=0))
    assert pipe.prompt_parts() == [pipe.method]
    assert pipe.run(image, seed=0).result.meta["prompts"] == 1


def test_a_user_prompt_that_is_cut_off_is_refused(short_adapter):
    from attnseg.errors import ConfigError
    from attnseg.methods.goca import GoCA
    from attnseg.pipeline import AttentionSegmentationPipeline

    prompt = "a photo of a cat and a dog with a bird"
    pipe = AttentionSegmentationPipeline(short_adapter, GoCA(classes="cat, dog, bird", prompt=prompt))
    with pytest.raises(ConfigError, match=r"cuts off \['bird'\]"):
        pipe.prompt_parts()


def test_segment_json_says_how_many_prompts(tiny_sd_dir, tmp_path, rgb_image):
    """The command line on a model folder whose tokenizer keeps 10 tokens: the JSON records the prompts used."""
    import shutil

    model = tmp_path / "short"
    shutil.copytree(tiny_sd_dir, model)
    config = model / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 10}))
    out = tmp_path / "out"
    res = RUNNER.invoke(app, ["segment", str(rgb_image), "--model", str(model), "--method", "goca", "--classes",
                              ", ".join(CLASSES), "--out", str(out), "--save-store"])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "two-halves.json").read_text())
    assert info["meta"]["prompts"] == 2 and len(info["meta"]["prompt_texts"]) == 2
    assert {s.get("name") for s in info["segments"]} <= {"background", *CLASSES}
    assert (out / "two-halves.attention.safetensors").is_file()
    assert (out / "two-halves.attention-p2.safetensors").is_file()


def test_allow_unknown_skips_the_word_with_one_warning(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    res = RUNNER.invoke(app, ["segment", str(tmp_path / "scene.png"), "--model", "toyworld", "--method", "goca",
                              "--classes", "circle, giraffe", "--allow-unknown", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipping 'giraffe'")
    # besides the warning, stderr holds only the line that names the loaded model
    assert [line for line in lines if line not in warnings] == [line for line in lines if line.startswith("model:")]
    info = json.loads((out / "scene.json").read_text())
    assert info["params"]["classes"] == ["circle"]
    assert {s.get("name") for s in info["segments"]} <= {"background", "circle"}


def test_toyworld_generate_replaces_a_dataset_only_with_overwrite(tmp_path):
    out = tmp_path / "toy"
    assert RUNNER.invoke(app, ["toyworld", "generate", "--out", str(out), "--n", "5"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    res = RUNNER.invoke(app, ["toyworld", "generate", "--out", str(out), "--n", "2"])
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert len(list((out / "images").iterdir())) == 5
    res = RUNNER.invoke(app, ["toyworld", "generate", "--out", str(out), "--n", "2", "--overwrite"])
    assert res.exit_code == 0, res.output
    for sub in ("images", "labels", "instances"):  # no stale scene of the earlier, larger dataset is left
        assert sorted(p.name for p in (out / sub).iterdir()) == ["test_000000.png", "test_000001.png"]
    assert sorted(json.loads((out / "captions.json").read_text())) == ["test_000000", "test_000001"]
    assert (out / "notes.txt").read_text() == "mine"  # what generate did not write is kept


def test_inspect_describes_a_saved_store(tmp_path, rgb_image):
    out = tmp_path / "out"
    res = RUNNER.invoke(app, ["segment", str(rgb_image), "--model", "toyworld", "--out", str(out), "--save-store"])
    assert res.exit_code == 0, res.output
    store = out / "two-halves.attention.safetensors"
    res = RUNNER.invoke(app, ["inspect", str(store), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["header"]["format"] == "attnseg.AttentionStore" and data["tensors"]
    for key, entry in data["header"]["entries"].items():
        h, w = entry["grid"]
        assert data["tensors"][key][-2] == h * w  # one row per query token of the grid
