"""Checks that run before the heavy work: words, parameters, the model's description, stores, locks, writes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.errors import ConfigError, RunLockedError, StoreError

# --------------------------------------------------------------------------------------------
# words


class _FakeSubwordTokenizer:
    """A sentencepiece-like tokenizer: known pieces, everything else one unknown token (id 2)."""

    unk_token_id = 2

    def __init__(self) -> None:
        self._pieces = {"cat": [10], "grass": [11, 12], "wall": [13], "catz": [10, 2]}

    def __call__(self, word: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self._pieces.get(word.lower(), [self.unk_token_id, self.unk_token_id])}


def test_unknown_words_with_the_toy_vocabulary():
    from attnseg.prompts import unknown_words
    from attnseg.toyworld.tokenizer import WordTokenizer

    tok = WordTokenizer(["red", "circle", "square"], max_length=8)
    assert unknown_words(tok, ["circle", "red circle", "giraffe", "red giraffe", "t-shirt", "Circle"]) == {
        "giraffe": ("giraffe",), "red giraffe": ("giraffe",), "t-shirt": ("t", "shirt"),
    }


def test_unknown_words_with_subword_tokenizers(clip_tokenizer):
    from attnseg.prompts import unknown_words

    # a word is unknown only when every piece of it is the unknown token ("catz" is partly known)
    assert unknown_words(_FakeSubwordTokenizer(), ["cat", "grass wall", "zebra", "cat zebra", "catz"]) == {
        "zebra": ("zebra",), "cat zebra": ("zebra",),
    }
    # CLIP's byte-level BPE represents any word, whatever its letters
    assert unknown_words(clip_tokenizer, ["giraffe", "Zürich", "東京", "qwxzv"]) == {}


def test_words_within_tells_what_the_length_limit_cut(clip_tokenizer):
    from attnseg.prompts import tokenize, words_within
    from attnseg.testing import clip_tokenizer as make
    from attnseg.types import Prompt

    short = make(model_max_length=6)  # start + 4 tokens + end
    text = "cat, dog, hippopotamus"
    tok = tokenize(short, text)
    prompt = Prompt(text=text, embeddings=torch.zeros(1, 6, 2), **tok.fields())
    assert words_within(prompt, ["cat", "dog", "hippopotamus", "zebra"]) == [True, True, False, False]
    full = tokenize(clip_tokenizer, text)
    prompt = Prompt(text=text, embeddings=torch.zeros(1, 77, 2), **full.fields())
    assert words_within(prompt, ["cat", "dog", "hippopotamus"]) == [True, True, True]


def test_check_method_words_skips_with_allow_unknown():
    from attnseg.cli.validate import check_method_words, make_method
    from attnseg.toyworld.tokenizer import WordTokenizer

    tok = WordTokenizer(["circle", "square"], max_length=12)
    kwargs = {"classes": "circle, giraffe, square"}
    method = make_method("goca", kwargs)
    with pytest.raises(ConfigError, match="cannot represent 'giraffe'"):
        check_method_words(method, "goca", kwargs, lambda: tok)
    warnings: list[str] = []
    kept = check_method_words(method, "goca", kwargs, lambda: tok, allow_unknown=True, warn=warnings.append)
    assert kept.classes == ("circle", "square") and len(warnings) == 1 and "giraffe" in warnings[0]
    # a method that names no words never loads the tokenizer
    def boom() -> None:
        raise AssertionError("tokenizer loaded")

    diffseg = make_method("diffseg", {})
    assert check_method_words(diffseg, "diffseg", {}, boom) is diffseg


# --------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize(("text", "expected"), [("2,5,10", (2, 5, 10)), (" 3 ", (3,)), ("4,", (4,)), (None, None)])
def test_parse_int_list_accepts(text, expected):
    from attnseg.cli.validate import parse_int_list

    assert parse_int_list(text, "--k") == expected


@pytest.mark.parametrize("text", ["abc", "2.5", ",", "", "2,x", "1e3", "-2", "0"])
def test_parse_int_list_refuses(text):
    from attnseg.cli.validate import parse_int_list

    with pytest.raises(ConfigError, match="--k"):
        parse_int_list(text, "--k")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.5])
def test_check_finite_refuses(value):
    from attnseg.cli.validate import check_finite

    with pytest.raises(ConfigError, match="--guidance"):
        check_finite(value, "--guidance", minimum=0.0)


def test_generate_refuses_a_nan_guidance_in_the_library(tiny_adapter):
    from attnseg.generation import generate

    with pytest.raises(ConfigError, match="finite"):
        generate(tiny_adapter, "a cat", "clustering", guidance_scale=float("nan"), num_inference_steps=1)


def test_check_out_dir(tmp_path):
    from attnseg.cli.validate import check_out_dir

    check_out_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="cannot be created"):
        check_out_dir(tmp_path / "f" / "sub")


# --------------------------------------------------------------------------------------------
# the model's description agrees with the loaded model


def test_describe_model_agrees_with_the_loaded_models(tiny_sd_dir):
    from attnseg.models.loading import load_model
    from attnseg.models.spec import describe_model

    for name in (str(tiny_sd_dir), "toyworld"):
        spec = describe_model(name)
        adapter = load_model(name)
        assert spec.latent_scale == adapter.latent_scale
        assert spec.resolution == tuple(adapter.resolution)
        assert spec.num_train_timesteps == len(adapter.scheduler.alphas_cumprod)
        tokenizer = spec.tokenizer()
        assert len(tokenizer) == len(adapter.tokenizer)
        limit = getattr(adapter.tokenizer, "model_max_length", None) or adapter.tokenizer.max_length
        assert spec.text_max_length == limit


# --------------------------------------------------------------------------------------------
# stores


def _store():
    from attnseg.capture.store import AttentionStore
    from attnseg.types import LayerInfo

    store = AttentionStore(group="resolution", meta={"prompt": "x"})
    info = LayerInfo("a.attn1", "self", (2, 2), heads=2, head_dim=4, position="down", index=0, block="a")
    store.add(info, torch.softmax(torch.randn(1, 2, 4, 4), -1))
    return store


def test_store_keeps_the_file_name_it_was_given(tmp_path):
    from attnseg.capture.store import AttentionStore

    store = _store()
    assert store.save(tmp_path / "x.attn") == tmp_path / "x.attn"
    assert (tmp_path / "x.attn").is_file() and not (tmp_path / "x.safetensors").exists()
    assert store.save(tmp_path / "plain") == tmp_path / "plain.safetensors"  # no suffix at all: one is added
    loaded = AttentionStore.load(tmp_path / "x.attn")
    torch.testing.assert_close(loaded.get("self/2x2"), store.get("self/2x2"))


def test_a_full_disk_leaves_no_store_file(tmp_path, monkeypatch):
    import safetensors.torch

    store = _store()
    store.save(tmp_path / "s.safetensors")
    before = (tmp_path / "s.safetensors").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        _store().save(tmp_path / "s.safetensors")
    with pytest.raises(OSError, match="No space"):
        _store().save(tmp_path / "new.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == before  # the old store is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no half file, no temporary


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"layers": None}, "lacks 'layers'"),
        ({"dtype": "banana"}, "unknown dtype 'banana'"),
        ({"dtype": "Tensor"}, "unknown dtype 'Tensor'"),
        ({"entries": {"k": {"kind": "self"}}}, "lacks 'grid'"),
        ({"meta": "text"}, "meta is not an object"),
        ({"version": "one"}, "is not a number"),
        ({"format": "something.else"}, "unknown format"),
    ],
)
def test_damaged_store_headers_are_one_store_error(tmp_path, header, message):
    from safetensors.torch import save_file

    from attnseg.capture.store import AttentionStore

    good = json.loads(json.dumps(_store()._header()))
    data = {**good, **header}
    if header.get("layers", 0) is None:
        del data["layers"]
    save_file({"self/2x2": torch.zeros(1, 4, 4)}, str(tmp_path / "s.safetensors"),
              metadata={"attnseg": json.dumps(data)})
    with pytest.raises(StoreError, match=message) as info:
        AttentionStore.load(tmp_path / "s.safetensors")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# label PNGs


def test_label_images_are_16_bit_above_255(tmp_path):
    from attnseg.io.export import label_image

    small = np.arange(12).reshape(3, 4)
    large = small * 60  # up to 660
    assert label_image(small).mode == "L"
    img = label_image(large)
    img.save(tmp_path / "l.png")
    back = np.asarray(Image.open(tmp_path / "l.png"))
    assert back.dtype in (np.uint16, np.int32) and np.array_equal(back.astype(np.int64), large)
    with pytest.raises(ValueError, match="65535"):
        label_image(np.array([[70000]]))


def test_per_k_clustering_labels_do_not_wrap(tmp_path):
    from attnseg.cli.segment import write_clustering

    class Clustering:
        def __init__(self) -> None:
            self.label_maps = {300: torch.arange(16 * 16).reshape(16, 16) + 40}  # ids 40..295: wraps in 8 bits
            self.masks = [torch.ones(16, 16, dtype=torch.bool)]
            self.mask_k = [300]
            self.mask_label = [0]

        def summary(self) -> dict:
            return {}

    clustering = Clustering()
    write_clustering(clustering, Image.new("RGB", (16, 16)), tmp_path, "img", pca_rgb=False)
    back = np.asarray(Image.open(tmp_path / "img.k300.labels.png")).astype(np.int64)
    assert np.array_equal(back, clustering.label_maps[300].numpy())


# --------------------------------------------------------------------------------------------
# locks and appends


def test_run_lock_is_exclusive_and_released(tmp_path):
    from attnseg.eval.lock import RunLock

    first = RunLock(tmp_path, 0).acquire()
    with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
        RunLock(tmp_path, 0).acquire()
    other_shard = RunLock(tmp_path, 1).acquire()  # another shard is another lock
    first.release()
    assert not (tmp_path / ".lock-0").exists()
    with RunLock(tmp_path, 0) as again:
        assert again.held
    other_shard.release()


def test_process_alive():
    from attnseg.eval.lock import _start_ticks, process_alive

    assert process_alive(os.getpid())
    ticks = _start_ticks(os.getpid())
    if ticks is not None:  # a reused pid (another start time) counts as gone
        assert not process_alive(os.getpid(), ticks + 1)
    assert not process_alive(0) and not process_alive(2**22 + 12345)


def test_append_jsonl_leaves_no_half_line_on_a_full_disk(tmp_path, monkeypatch):
    from attnseg.eval import report

    path = tmp_path / "results-0.jsonl"
    report.append_jsonl(path, {"id": "a", "index": 0, "metrics": {}, "counts": {}})
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "write", half_then_full)
    with pytest.raises(OSError):
        report.append_jsonl(path, {"id": "b", "index": 1, "metrics": {}, "counts": {"x": list(range(50))}})
    assert path.read_bytes() == before
    monkeypatch.undo()
    records, torn = report.read_jsonl(path)
    assert [r["id"] for r in records] == ["a"] and torn == 0


def test_write_json_atomic_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    from attnseg.eval import report

    path = tmp_path / "report.json"
    report.write_json_atomic(path, {"v": 1})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "fsync", full)
    with pytest.raises(OSError):
        report.write_json_atomic(path, {"v": 2})
    monkeypatch.setattr(report.os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [('{"id": "a", "index": 0, "metrics": {}}', "no 'counts' object"), ('[1, 2]', "not an object"),
     ('{"id": 3, "index": 0, "metrics": {}, "counts": {}}', "no string 'id'"),
     ('{"id": "a", "index": "0", "metrics": {}, "counts": {}}', "no integer 'index'")],
)
def test_result_lines_are_validated_on_read(tmp_path, line, problem):
    from attnseg.errors import AttnSegError
    from attnseg.eval.report import read_jsonl

    path = tmp_path / "results-0.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(AttnSegError, match=problem):
        read_jsonl(path)


# --------------------------------------------------------------------------------------------
# the evaluation configuration


@pytest.fixture()
def generic_data(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\ncircle\nsquare\n")
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(np.eye(20, 24, dtype=np.uint8)).save(root / "labels" / f"s{i}.png")
    return root


def test_evaluation_config_round_trips_through_json_and_is_frozen(generic_data):
    import dataclasses

    from attnseg.eval.runner import EvaluationConfig, resolve_evaluation

    config = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", method="diffseg",
                                params={"kl_thresholds": (0.5, 0.5)}, seed=3, limit=2)
    assert config.ids == ("s0", "s1") and config.num_images == 2 and config.matching == "per-image-hungarian"
    assert config.method_params["kl_thresholds"] == [0.5, 0.5]  # recorded with every default, JSON-normalised
    again = EvaluationConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and again.differences(config) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 4  # type: ignore[misc]
    other = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", method="diffseg",
                               params={"kl_thresholds": (0.5, 0.5)}, seed=4, limit=3)
    diffs = other.differences(config)
    assert [d.split(":")[0] for d in diffs] == ["num_images", "ids_sha256", "limit", "seed"]
    assert "seed: 3 -> 4" in diffs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matching": "semantic"}, "cannot be scored with matching"),
        ({"class_source": "oracle"}, "does not fit a class-agnostic method"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"size": 0}, "size must be an integer >= 1"),
        ({"dtype": "float64"}, "dtype must be"),
        ({"ids": ("s0", "s0")}, "distinct ids"),
        ({"ids_sha256": "0" * 64}, "ids_sha256 does not match"),
        ({"method_kind": "magic"}, "method_kind must be one of"),
        ({"background_offset": float("nan")}, "background_offset must be finite"),
        ({"geometry": {"crop": "letterbox", "score_at": "label", "upsample": "nearest"}}, "crop must be"),
        ({"geometry": {"crop": "pad", "score_at": "input", "upsample": "nearest"}}, "scores at the label size"),
        ({"geometry": {"crop": "native", "score_at": "input", "upsample": "nearest"}}, "scores at the label size"),
    ],
)
def test_evaluation_config_refuses_inconsistent_fields(generic_data, change, message):
    import dataclasses

    from attnseg.eval.runner import resolve_evaluation

    config = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2)
    if "ids" in change:
        change = {**change, "num_images": 2}
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config, **change)


@pytest.mark.parametrize("crop", ["pad", "native"])
def test_evaluation_config_keeps_the_letterbox_and_native_geometry(generic_data, crop):
    from attnseg.eval.runner import EvaluationConfig, resolve_evaluation

    config = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2, crop=crop)
    assert config.geometry.crop == crop and config.identity()["geometry"]["crop"] == crop
    assert EvaluationConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    other = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2)
    assert [d.split(":")[0] for d in other.differences(config)] == ["geometry"]
    with pytest.raises(ConfigError, match="scores at the label size"):
        resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2, crop=crop,
                           score_at="input")


def test_evaluation_run_takes_a_config_and_refuses_a_changed_one(generic_data, tmp_path):
    from attnseg.eval.runner import EvaluationRun, resolve_evaluation

    config = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2)
    run = EvaluationRun(tmp_path / "run", config)
    run.prepare()
    run.close()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["identity"] == config.identity()
    changed = resolve_evaluation(dataset="generic", root=generic_data, model="toyworld", limit=2, seed=9)
    with pytest.raises(ConfigError, match=r"another configuration \(seed: 0 -> 9\)"):
        EvaluationRun(tmp_path / "run", changed).prepare()
    with pytest.raises(ConfigError, match="not both"):
        EvaluationRun(tmp_path / "run", config, seed=1)
