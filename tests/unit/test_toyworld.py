"""The toy world: scene generator, splits, dataset layout, tokenizer and model config (no model weights)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from attnseg.toyworld.model import ToyConfig, default_toy_config
from attnseg.toyworld.tokenizer import SPECIAL_TOKENS, WordTokenizer
from attnseg.toyworld.world import (
    SPLITS,
    WorldConfig,
    format_objects,
    generate_scene,
    scene_seed,
    world_words,
    write_dataset,
)

WORLD = WorldConfig()


def test_same_seed_gives_identical_scene() -> None:
    for seed in (0, 7, scene_seed("test", 3)):
        a, b = generate_scene(seed, WORLD), generate_scene(seed, WORLD)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.semantic, b.semantic)
        np.testing.assert_array_equal(a.instances, b.instances)
        assert a.caption == b.caption
    assert not np.array_equal(generate_scene(1, WORLD).image, generate_scene(2, WORLD).image)


def test_scene_arrays_have_documented_shapes_and_dtypes() -> None:
    for size in (32, 48):
        scene = generate_scene(5, WorldConfig(image_size=size))
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.semantic.shape == (size, size) and scene.semantic.dtype == np.int64
        assert scene.instances.shape == (size, size) and scene.instances.dtype == np.int64


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_masks_agree_with_captions(split: str) -> None:
    shapes = set(WORLD.shape_classes)
    for i in range(150):
        scene = generate_scene(scene_seed(split, i), WORLD)
        words = scene.caption.replace(",", " ").split()
        named = {WORLD.classes.index(w) for w in words if w in shapes}
        present = set(np.unique(scene.semantic).tolist()) - {0}
        assert named == present, scene.caption  # every named shape has pixels, and every shape is named
        assert 1 <= len(scene.objects) <= WORLD.max_objects
        assert sorted(np.unique(scene.instances).tolist()) == list(range(len(scene.objects) + 1))
        for obj in scene.objects:
            pixels = scene.instances == obj.instance
            assert pixels.sum() == obj.area > 0
            assert (scene.semantic[pixels] == obj.class_id).all()
            assert WORLD.classes[obj.class_id] == obj.shape
            assert scene.caption[obj.span[0] : obj.span[1]] == obj.phrase
            assert obj.phrase.endswith(f"{obj.colour} {obj.shape}")
            assert (obj.texture == "plain") == (obj.phrase == f"{obj.colour} {obj.shape}")
            for word, (s, e) in obj.word_spans.items():
                assert scene.caption[s:e] == word
        assert ((scene.instances == 0) == (scene.semantic == 0)).all()


def test_objects_are_named_left_to_right() -> None:
    for i in range(50):
        scene = generate_scene(scene_seed("val", i), WORLD)
        xs = [np.nonzero(scene.instances == o.instance)[1].mean() for o in scene.objects]
        assert xs == sorted(xs)
        assert [o.span[0] for o in scene.objects] == sorted(o.span[0] for o in scene.objects)


def test_splits_are_disjoint_ranges() -> None:
    ranges = sorted(SPLITS.values())
    for (_, stop), (start, _) in itertools.pairwise(ranges):
        assert stop <= start
    assert scene_seed("val", 0) == SPLITS["val"][0]
    seeds = {split: {scene_seed(split, i) for i in range(100)} for split in SPLITS}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    with pytest.raises(ValueError, match="index"):
        scene_seed("val", SPLITS["val"][1] - SPLITS["val"][0])
    with pytest.raises(ValueError, match="split"):
        scene_seed("holdout", 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 4}, {"classes": ("circle", "square")}, {"classes": ("background", "hexagon")},
     {"min_objects": 0}, {"size_range": (0.3, 0.2)}, {"background_textures": ("wavy",)},
     {"object_textures": ("plain", "wavy"), "object_texture_weights": (1.0, 1.0)},
     {"object_texture_weights": (1.0,)}, {"template_weights": (1.0,)}, {"touch_prob": 1.5},
     {"lighting": 1.0}, {"noise": -1.0}, {"version": 1}],
)
def test_world_config_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WorldConfig(**kwargs)


def test_world_config_round_trips() -> None:
    assert WorldConfig.from_dict(json.loads(json.dumps(WORLD.to_dict()))) == WORLD


def test_write_dataset_layout(tmp_path) -> None:
    root = write_dataset(tmp_path / "ds", "test", 4, seed=2)
    assert (root / "classes.txt").read_text().splitlines() == list(WORLD.classes)
    captions = json.loads((root / "captions.json").read_text())
    assert sorted(captions) == [f"test_{i:06d}" for i in range(2, 6)]
    for sid, record in captions.items():
        scene = generate_scene(scene_seed("test", int(sid.split("_")[1])), WORLD)
        assert record["caption"] == scene.caption
        assert [o["class"] for o in record["objects"]] == [o.shape for o in scene.objects]
        np.testing.assert_array_equal(np.asarray(Image.open(root / "images" / f"{sid}.png")), scene.image)
        label = np.asarray(Image.open(root / "labels" / f"{sid}.png"))
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, scene.semantic)
        np.testing.assert_array_equal(np.asarray(Image.open(root / "instances" / f"{sid}.png")), scene.instances)
    # Same arguments, same files.
    again = write_dataset(tmp_path / "ds2", "test", 4, seed=2)
    assert (again / "captions.json").read_text() == (root / "captions.json").read_text()


def test_format_objects() -> None:
    assert format_objects(["red circle"]) == "a red circle"
    assert format_objects(["red circle", "blue square"]) == "a red circle and a blue square"
    assert format_objects(["a b", "c d", "e f"]) == "a a b, a c d and a e f"


# -- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_offsets_map_back_to_words() -> None:
    tok = WordTokenizer(world_words(WORLD), max_length=24)
    text = "A red circle, and a blue   square on a striped green background"
    enc = tok(text)
    assert len(enc.ids) == len(enc.tokens) == len(enc.offsets) == len(enc.special) == 24
    assert enc.tokens[0] == "<sos>" and enc.special[0] and enc.offsets[0] == (0, 0)
    assert enc.tokens[enc.length - 1] == "<eos>" and enc.special[enc.length - 1]
    assert all(t == "<pad>" and sp for t, sp in zip(enc.tokens[enc.length :], enc.special[enc.length :], strict=True))
    words = [enc.tokens[i] for i in range(1, enc.length - 1)]
    assert words == ["a", "red", "circle", ",", "and", "a", "blue", "square", "on", "a", "striped", "green",
                     "background"]
    for i in range(1, enc.length - 1):
        s, e = enc.offsets[i]
        assert text[s:e].lower() == enc.tokens[i]
        assert not enc.special[i]
    square = enc.tokens.index("square")
    assert enc.offsets[square] == (text.index("square"), text.index("square") + len("square"))


def test_tokenizer_unknown_words_truncation_and_empty() -> None:
    tok = WordTokenizer(["a", "red", "circle"], max_length=5)
    enc = tok("a purple circle")
    assert enc.tokens[:5] == ("<sos>", "a", "<unk>", "circle", "<eos>")
    assert enc.offsets[2] == (2, 8)
    long = tok("a red circle a red")
    assert long.truncated and long.length == 5 and long.tokens[-1] == "<eos>"
    empty = tok("")
    assert empty.tokens == ("<sos>", "<eos>", "<pad>", "<pad>", "<pad>") and empty.length == 2
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(["a"], max_length=1)


def test_tokenizer_specials_and_round_trip() -> None:
    tok = WordTokenizer(world_words(WORLD), max_length=20)
    assert tok.vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert tok.eos_id != 2  # transformers' CLIP treats eos_token_id == 2 as a legacy config
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab == tok.vocab and again.max_length == tok.max_length
    assert tok.decode(tok("a red circle").ids) == "a red circle"


def test_every_caption_fits_the_model_tokenizer() -> None:
    config = default_toy_config()
    tok = WordTokenizer.from_dict(config.tokenizer)
    for i in range(300):
        enc = tok(generate_scene(scene_seed("train", i), config.world).caption)
        assert "<unk>" not in enc.tokens and not enc.truncated


def test_toy_config_round_trips_and_validates() -> None:
    config = default_toy_config(image_size=16, block_out_channels=(8, 16), attention_levels=1, heads=2, text_width=16)
    assert ToyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.unet["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert config.unet["up_block_types"] == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert config.text_encoder["max_position_embeddings"] == config.tokenizer["max_length"]
    with pytest.raises(ValueError, match="divisible"):
        default_toy_config(image_size=18, block_out_channels=(8, 16, 16))
    with pytest.raises(ValueError, match="attention_levels"):
        default_toy_config(attention_levels=0)
    with pytest.raises(ValueError, match="image_size"):
        default_toy_config(image_size=32, world=replace(WORLD, image_size=16))


def test_written_dataset_reads_as_toyworld(tmp_path) -> None:
    from attnseg.errors import DatasetError
    from attnseg.eval.datasets import create_dataset

    write_dataset(tmp_path / "toy", "test", 3)
    ds = create_dataset("toyworld", tmp_path / "toy", split="test")
    assert len(ds) == 3 and tuple(ds.class_names) == ("background", "circle", "square", "triangle", "cross")
    sample = ds[0]
    scene = generate_scene(scene_seed("test", 0))
    assert np.array_equal(sample.label, scene.semantic)
    with pytest.raises(DatasetError, match="attnseg toyworld generate"):
        create_dataset("toyworld", tmp_path / "missing")


# -- world 2: colour carries no class information --------------------------------------------------


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


def test_colour_and_texture_are_independent_of_shape() -> None:
    from scipy.stats import chi2_contingency

    shapes, colours, textures = list(WORLD.shape_classes), list(WORLD.colours), list(WORLD.object_textures)
    by_colour = np.zeros((len(shapes), len(colours)))
    by_texture = np.zeros((len(shapes), len(textures)))
    for i in range(1500):
        for o in generate_scene(scene_seed("train", i), WORLD).objects:
            by_colour[shapes.index(o.shape), colours.index(o.colour)] += 1
            by_texture[shapes.index(o.shape), textures.index(o.texture)] += 1
    # Independence cannot be rejected; a world where a shape prefers a colour gives p far below 0.01.
    assert chi2_contingency(by_colour).pvalue > 0.01
    assert chi2_contingency(by_texture).pvalue > 0.01
    assert (by_colour.sum(0) > 0).all() and (by_texture.sum(0) > 0).all()


def test_same_colour_objects_often_touch_and_never_take_the_background_colour() -> None:
    multi = touching_same = bg_in_objects = 0
    for i in range(400):
        scene = generate_scene(scene_seed("train", i), WORLD)
        if any(o.colour == scene.background_colour for o in scene.objects):
            bg_in_objects += 1
        if len(scene.objects) < 2:
            continue
        multi += 1
        pairs = itertools.combinations(scene.objects, 2)
        if any(a.colour == b.colour and _touching(scene.instances == a.instance, scene.instances == b.instance)
               for a, b in pairs):
            touching_same += 1
    assert touching_same / multi > 0.3
    assert bg_in_objects == 0  # no object takes the background's main colour: every outline stays visible


def test_first_world_configs_are_refused() -> None:
    old = {k: v for k, v in WORLD.to_dict().items() if k != "version"}
    with pytest.raises(ValueError, match="re-train"):
        WorldConfig.from_dict(old)


def test_t5_layout_tokenizer_has_no_start_token() -> None:
    tok = WordTokenizer(world_words(WORLD), max_length=8, start_token=False)
    enc = tok("a red circle")
    assert enc.tokens == ("a", "red", "circle", "<eos>", "<pad>", "<pad>", "<pad>", "<pad>")
    assert enc.length == 4 and enc.special == (False, False, False, True, True, True, True, True)
    assert enc.offsets[1] == (2, 5)
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again("a red circle") == enc
    full = tok("a red circle a red circle a red")
    assert full.truncated and full.tokens[-1] == "<eos>" and full.length == 8
