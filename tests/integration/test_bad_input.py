"""A corpus of bad input, run through the command line in-process.

Every case must give exit code 2 (1 for the one internal error), exactly one line on stderr that names the problem
(``error: ...``), no traceback, nothing on stdout, and leave every file as it was (no ``--out`` created, nothing
changed). An autouse guard makes loading a model an error, so every case also shows that it fails before the model
loads. A few subprocess cases at the end measure the real start-up time and check ``--debug``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli.app import app

RUNNER = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"


# --------------------------------------------------------------------------------------------
# the files the cases use


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (the pixel data is not there): enough for PIL to refuse it as a
    decompression bomb without anyone allocating it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
                     + chunk(b"IEND", b""))


def _write_sd_configs(root: Path, changes: dict[str, Any] | None = None) -> Path:
    """The configuration files of a tiny Stable Diffusion folder (no weights: every case fails before loading)."""
    configs: dict[str, Any] = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        },
        "unet/config.json": {"sample_size": 16, "cross_attention_dim": 32, "block_out_channels": [32, 64]},
        "vae/config.json": {"block_out_channels": [8, 16]},
        "text_encoder/config.json": {"hidden_size": 32, "max_position_embeddings": 77},
        "scheduler/scheduler_config.json": {"num_train_timesteps": 1000},
    }
    configs.update(changes or {})
    for name, value in configs.items():
        if value is None:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    return root


_FLUX_INDEX = {
    "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def _write_flux_configs(root: Path, changes: dict[str, Any] | None = None) -> Path:
    """The configuration files of a tiny Flux folder (no weights, no tokenizer files but their configs)."""
    configs: dict[str, Any] = {
        "model_index.json": _FLUX_INDEX,
        "transformer/config.json": {"in_channels": 16, "patch_size": 1, "joint_attention_dim": 32},
        "vae/config.json": {"block_out_channels": [8, 16], "latent_channels": 4},
        "text_encoder/config.json": {"hidden_size": 16, "max_position_embeddings": 77},
        "tokenizer/tokenizer_config.json": {"model_max_length": 77},
        "text_encoder_2/config.json": {"d_model": 32},
        "tokenizer_2/tokenizer_config.json": {"model_max_length": 32},
        "scheduler/scheduler_config.json": {"num_train_timesteps": 1000},
    }
    return _write_sd_configs(root, {k: None for k in (
        "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
    )} | configs | (changes or {}))


def _write_dataset(root: Path, classes: tuple[str, ...] = ("background", "circle", "square"), *,
                   label_size: tuple[int, int] | None = None, n: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(root / "images" / f"img{i}.png")
        h, w = label_size or (40, 40)
        label = np.zeros((h, w), np.uint8)
        label[: h // 2] = 1
        Image.fromarray(label).save(root / "labels" / f"img{i}.png")
    return root


def _write_store(path: Path, header: Any, *, raw_header: str | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    text = raw_header if raw_header is not None else json.dumps(header)
    save_file({"self/2x2": torch.full((1, 4, 4), 0.25)}, str(path), metadata={"attnseg": text})
    return path


_GOOD_HEADER = {
    "format": "attnseg.AttentionStore", "version": 1, "heads": "mean", "group": "resolution", "dtype": "float32",
    "entries": {"self/2x2": {"kind": "self", "grid": [2, 2], "layers": ["a.attn1"], "count": 1}},
    "layers": {}, "features": {}, "meta": {},
}


@dataclass
class Env:
    """Paths of one case (everything under the case's own temporary folder)."""

    root: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.root
        self.ok = r / "ok.png"
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(self.ok)
        self.out = r / "out"
        self.data = _write_dataset(r / "data")
        self.sd = _write_sd_configs(r / "sd")

    def fill(self, args: list[str]) -> list[str]:
        values = {"{ok}": self.ok, "{out}": self.out, "{data}": self.data, "{sd}": self.sd, "{root}": self.root}
        out = []
        for a in args:
            for key, value in values.items():
                a = a.replace(key, str(value))
            out.append(a)
        return out


def _run_folder(env: Env, **options: Any) -> Path:
    """A run folder with its config.json (no image evaluated, no model loaded)."""
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(env.out, dataset="generic", root=env.data, model="toyworld", method="diffseg", **options)
    run.prepare()
    run.close()
    return env.out


# --------------------------------------------------------------------------------------------
# set-ups of the cases that need more than the common files


def _setup(env: Env, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = env.root
    if name == "text-as-png":
        (r / "notes.png").write_text("hello")
    elif name == "empty-jpg":
        (r / "empty.jpg").write_bytes(b"")
    elif name == "truncated-png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(r / "full.png")
        data = (r / "full.png").read_bytes()
        (r / "truncated.png").write_bytes(data[: len(data) // 2])
        (r / "full.png").unlink()
    elif name == "bomb-png":
        _png_header_only(r / "huge.png", 20000, 9000)  # 180 MP
    elif name == "empty-folder":
        (r / "empty").mkdir()
    elif name == "folder-of-text":
        (r / "texts").mkdir()
        (r / "texts" / "a.txt").write_text("a")
    elif name == "one-pixel":
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(r / "dot.png")
    elif name in ("out-is-file", "gen-out-is-file", "eval-out-is-file", "toy-out-is-file"):
        env.out.write_text("not a folder")
    elif name == "out-under-file":
        (r / "plain.txt").write_text("x")
    elif name == "out-not-writable":
        (r / "locked").mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == r / "locked"
                            else real(p, mode, *a, **k))
    elif name == "store-dir-is-file":
        (r / "stores.txt").write_text("x")
    elif name == "model-is-file":
        (r / "model.bin").write_text("x")
    elif name == "model-no-index":
        (r / "nomodel").mkdir()
    elif name == "index-invalid-json":
        _write_sd_configs(r / "m", {"model_index.json": "{not json"})
    elif name == "index-is-list":
        _write_sd_configs(r / "m", {"model_index.json": [1, 2]})
    elif name == "index-no-class":
        _write_sd_configs(r / "m", {"model_index.json": {"unet": ["diffusers", "UNet2DConditionModel"]}})
    elif name == "index-pixart":
        _write_sd_configs(r / "m", {"model_index.json": {"_class_name": "PixArtSigmaPipeline"}})
    elif name == "flux-index-no-t5":
        _write_flux_configs(r / "m", {"model_index.json": {**_FLUX_INDEX, "text_encoder_2": [None, None]}})
    elif name == "flux-t5-folder-missing":
        _write_flux_configs(r / "m")
        shutil.rmtree(r / "m" / "text_encoder_2")
    elif name == "flux-t5-width-mismatch":
        _write_flux_configs(r / "m", {"text_encoder_2/config.json": {"d_model": 64}})
    elif name == "flux-vae-channels-mismatch":
        _write_flux_configs(r / "m", {"transformer/config.json": {"in_channels": 64, "joint_attention_dim": 32}})
    elif name == "flux-size-not-token":
        _write_flux_configs(r / "m")
    elif name == "index-unknown-transformer":
        _write_sd_configs(r / "m", {"model_index.json": {"_class_name": "HunyuanDiTPipeline",
                                                         "transformer": ["diffusers", "HunyuanDiT2DModel"]}})
    elif name == "index-unknown-class":
        _write_sd_configs(r / "m", {"model_index.json": {"_class_name": "KandinskyPipeline"}})
    elif name == "sd-with-sdxl-unet":
        _write_sd_configs(r / "m", {"unet/config.json": {"sample_size": 128, "cross_attention_dim": 2048,
                                                         "addition_embed_type": "text_time"}})
    elif name == "text-width-mismatch":
        _write_sd_configs(r / "m", {"unet/config.json": {"sample_size": 16, "cross_attention_dim": 768}})
    elif name == "vae-config-missing":
        _write_sd_configs(r / "m", {"vae/config.json": None})
    elif name == "unet-config-invalid":
        _write_sd_configs(r / "m", {"unet/config.json": "[1, 2"})
    elif name == "toy-config-invalid":
        (r / "toy").mkdir()
        (r / "toy" / "model.safetensors").write_bytes(b"")
        (r / "toy" / "config.json").write_text("{broken")
    elif name == "hub-unreachable":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    elif name == "hub-offline-not-cached":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif name == "captions-invalid":
        (r / "captions.json").write_text("{oops")
    elif name == "captions-missing-ids":
        (r / "captions.json").write_text(json.dumps({"img0": ["circle"]}))
    elif name == "dataset-empty":
        shutil.rmtree(env.data / "images")
        (env.data / "images").mkdir()
    elif name == "dataset-label-missing":
        (env.data / "labels" / "img1.png").unlink()
    elif name == "dataset-label-size":
        shutil.rmtree(env.data)
        _write_dataset(env.data, label_size=(30, 40))
    elif name == "dataset-label-rgb":
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(env.data / "labels" / "img0.png")
    elif name == "dataset-unknown-class":
        (env.data / "classes.txt").write_text("background\ncircle\ngiraffe\n")
    elif name == "dataset-no-classes":
        (env.data / "classes.txt").unlink()
    elif name in ("run-changed-config", "report-matching-unknown"):
        _run_folder(env)
    elif name == "run-results-without-config":
        env.out.mkdir()
        (env.out / "results-0.jsonl").write_text('{"id": "img0"}\n')
    elif name == "run-locked":
        from attnseg.eval.lock import RunLock

        _run_folder(env)
        lock = RunLock(env.out, 0).acquire()  # held through another open file: as another process would
        env.cleanups.append(lock.release)
    elif name in ("report-broken-line", "report-record-without-counts", "report-config-invalid"):
        _run_folder(env)
        good = {"id": "img0", "index": 0, "metrics": {}, "counts": {}}
        if name == "report-broken-line":
            (env.out / "results-0.jsonl").write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
        elif name == "report-record-without-counts":
            (env.out / "results-0.jsonl").write_text(json.dumps({"id": "img0", "index": 0, "metrics": {}}) + "\n")
        else:
            (env.out / "config.json").write_text("{broken")
    elif name == "report-not-a-run":
        (r / "plain").mkdir()
    elif name == "store-text":
        (r / "s.safetensors").write_text("just text")
    elif name == "store-no-header":
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(r / "s.safetensors"))
    elif name == "store-header-invalid-json":
        _write_store(r / "s.safetensors", None, raw_header="{not json")
    elif name == "store-header-list":
        _write_store(r / "s.safetensors", [1, 2, 3])
    elif name == "store-header-missing-key":
        _write_store(r / "s.safetensors", {k: v for k, v in _GOOD_HEADER.items() if k != "layers"})
    elif name == "store-header-bad-dtype":
        _write_store(r / "s.safetensors", {**_GOOD_HEADER, "dtype": "banana"})
    elif name == "store-header-meta-list":
        _write_store(r / "s.safetensors", {**_GOOD_HEADER, "meta": [1]})
    elif name == "store-header-entries-list":
        _write_store(r / "s.safetensors", {**_GOOD_HEADER, "entries": [1]})
    elif name == "store-newer-version":
        _write_store(r / "s.safetensors", {**_GOOD_HEADER, "version": 99})
    elif name == "store-entry-without-tensor":
        entries = {"cross/2x2": {"kind": "cross", "grid": [2, 2], "layers": ["a.attn2"], "count": 1}}
        _write_store(r / "s.safetensors", {**_GOOD_HEADER, "entries": entries})
    elif name == "store-truncated":
        _write_store(r / "full.safetensors", _GOOD_HEADER)
        data = (r / "full.safetensors").read_bytes()
        (r / "s.safetensors").write_bytes(data[: len(data) // 2])
        (r / "full.safetensors").unlink()
    elif name == "toy-not-empty":
        env.out.mkdir()
        (env.out / "images").mkdir()
        (env.out / "images" / "old.png").write_bytes(b"x")
    elif name == "internal-error":
        def broken(*_: Any, **__: Any) -> Any:
            raise ZeroDivisionError("division by zero")

        monkeypatch.setattr("attnseg.cli.validate.check_images", broken)
    elif name == "cuda-missing":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")


# --------------------------------------------------------------------------------------------
# the corpus: (id, arguments, what the error line must say[, exit code])

SEG = ["segment", "{ok}", "--model", "toyworld", "--out", "{out}"]
EVAL = ["evaluate", "--dataset", "generic", "--root", "{data}", "--model", "toyworld", "--out", "{out}"]
GEN = ["generate", "a red circle", "--model", "toyworld", "--out", "{out}"]

CASES: list[tuple[Any, ...]] = [
    # ---- segment: files
    ("missing-image", ["segment", "{root}/missing.jpg", "--model", "toyworld", "--out", "{out}"], "image not found"),
    ("text-as-png", ["segment", "{root}/notes.png", "--model", "toyworld", "--out", "{out}"], "not an image file"),
    ("empty-jpg", ["segment", "{root}/empty.jpg", "--model", "toyworld", "--out", "{out}"], "not an image file"),
    ("truncated-png", ["segment", "{root}/truncated.png", "--model", "toyworld", "--out", "{out}"],
     "cannot read image"),
    ("bomb-png", ["segment", "{root}/huge.png", "--model", "toyworld", "--out", "{out}"], "too large to decode"),
    ("empty-folder", ["segment", "{root}/empty", "--model", "toyworld", "--out", "{out}"], "contains no images"),
    ("folder-of-text", ["segment", "{root}/texts", "--model", "toyworld", "--out", "{out}"], "contains no images"),
    ("one-pixel", ["segment", "{root}/dot.png", "--model", "toyworld", "--out", "{out}"], "needs at least 2 px"),
    # ---- segment: parameters
    ("k-letters", [*SEG, "--method", "clustering", "--k", "abc"], "--k takes whole numbers"),
    ("k-fraction", [*SEG, "--method", "clustering", "--k", "2.5"], "'2.5' is not one"),
    ("k-empty", [*SEG, "--method", "clustering", "--k", ","], "--k is empty"),
    ("k-zero", [*SEG, "--method", "clustering", "--k", "0"], "--k values must be >= 1"),
    ("k-for-diffseg", [*SEG, "--k", "2,3"], "--k does not apply to method 'diffseg'"),
    ("size-negative", [*SEG, "--size", "-8"], "--size must be >= 1"),
    ("size-zero", [*SEG, "--size", "0"], "--size must be >= 1"),
    ("size-text", [*SEG, "--size", "abc"], "Invalid value for '--size'"),
    ("timestep-negative", [*SEG, "--timestep", "-1"], "--timestep must be >= 0"),
    ("timestep-beyond-schedule", [*SEG, "--timestep", "5000"], "outside this model's training schedule"),
    ("param-timestep-beyond-schedule", [*SEG, "-P", "timestep=1000"], "diffseg's timestep"),
    ("dtype-unknown", [*SEG, "--dtype", "float64"], "--dtype 'float64' is not supported"),
    ("device-banana", [*SEG, "--device", "banana"], "--device 'banana' is not a device"),
    ("cuda-missing", [*SEG, "--device", "cuda"], "CUDA is not available"),
    ("method-unknown", [*SEG, "--method", "nope"], "unknown method 'nope'"),
    ("param-no-equals", [*SEG, "-P", "nonsense"], "NAME=VALUE"),
    ("param-bad-name", [*SEG, "-P", "1abc=3"], "is not a name"),
    ("param-unknown", [*SEG, "-P", "no_such_param=1"], "has no parameter no_such_param"),
    ("param-bad-value", [*SEG, "-P", "kl_thresholds=-1,1"], "kl_thresholds"),
    ("goca-without-classes", [*SEG, "--method", "goca"], "needs --classes"),
    ("target-for-goca", [*SEG, "--method", "goca", "--classes", "circle", "--target", "square"],
     "--target does not apply to method 'goca'"),
    ("out-is-file", SEG, "is a file"),
    ("out-under-file", ["segment", "{ok}", "--model", "toyworld", "--out", "{root}/plain.txt/out"],
     "cannot be created"),
    ("out-not-writable", ["segment", "{ok}", "--model", "toyworld", "--out", "{root}/locked/out"],
     "cannot be written"),
    ("option-unknown", [*SEG, "--bogus"], "No such option: --bogus"),
    ("out-missing", ["segment", "{ok}", "--model", "toyworld"], "Missing option '--out'"),
    # ---- segment: placement and streaming options
    ("model-not-given", ["segment", "{ok}", "--out", "{out}"], "--model is required"),
    ("fit-unknown", [*SEG, "--fit", "banana"], "--fit 'banana' is not a fit"),
    ("fit-native-square-grids", [*SEG, "--fit", "native"], "needs square attention grids"),
    ("batch-size-zero", [*SEG, "--batch-size", "0"], "--batch-size must be >= 1"),
    ("max-megapixels-zero", [*SEG, "--max-megapixels", "0"], "--max-megapixels must be a positive number"),
    ("max-megapixels-nan", [*SEG, "--max-megapixels", "nan"], "--max-megapixels must be a positive number"),
    ("over-max-megapixels", [*SEG, "--max-megapixels", "0.001"], "over the limit of 0.001 megapixels"),
    # ---- segment: words the model cannot represent
    ("goca-unknown-class", [*SEG, "--method", "goca", "--classes", "circle, giraffe"], "cannot represent 'giraffe'"),
    ("target-unknown", [*SEG, "--method", "target", "--target", "giraffe"], "cannot represent 'giraffe'"),
    ("target-default-unknown", [*SEG, "--method", "target"], "cannot represent 'hair'"),
    ("goca-background-unknown", [*SEG, "--method", "goca", "--classes", "circle", "-P", "background_objects=zebra"],
     "cannot represent 'zebra'"),
    ("goca-all-unknown-allowed", [*SEG, "--method", "goca", "--classes", "giraffe, zebra", "--allow-unknown"],
     "any of the classes"),
    ("target-unknown-allowed", [*SEG, "--method", "target", "--target", "giraffe", "--allow-unknown"],
     "nothing left to segment"),
    # ---- segment: models
    ("model-missing-folder", ["segment", "{ok}", "--model", "./no/such/model", "--out", "{out}"],
     "model folder not found"),
    ("model-is-file", ["segment", "{ok}", "--model", "{root}/model.bin", "--out", "{out}"], "is a file"),
    ("model-no-index", ["segment", "{ok}", "--model", "{root}/nomodel", "--out", "{out}"],
     "not a diffusers model folder"),
    ("index-invalid-json", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "is not valid JSON"),
    ("index-is-list", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "must hold a JSON object"),
    ("index-no-class", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "has no _class_name"),
    ("index-pixart", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "has no PixArt transformer"),
    ("flux-index-no-t5", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "has no T5 text encoder"),
    ("flux-t5-folder-missing", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"],
     "is missing its T5 text encoder (text_encoder_2/)"),
    ("flux-t5-width-mismatch", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"],
     "expects text states of width 32"),
    ("flux-vae-channels-mismatch", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"],
     "takes 64 input channels but the VAE gives 4 latent channels (packed 2x2)"),
    ("flux-size-not-token", ["segment", "{ok}", "--model", "{root}/m", "--size", "34", "--out", "{out}"],
     "a multiple of 4 (one image token)"),
    ("index-unknown-transformer", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"],
     "transformer class HunyuanDiT2DModel"),
    ("index-unknown-class", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"],
     "KandinskyPipeline is not supported"),
    ("sd-with-sdxl-unet", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "SDXL UNet"),
    ("text-width-mismatch", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "text features of width"),
    ("vae-config-missing", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "vae/config.json is missing"),
    ("unet-config-invalid", ["segment", "{ok}", "--model", "{root}/m", "--out", "{out}"], "is not valid JSON"),
    ("toy-config-invalid", ["segment", "{ok}", "--model", "{root}/toy", "--out", "{out}"], "is not valid JSON"),
    ("size-not-multiple", ["segment", "{ok}", "--model", "{sd}", "--size", "33", "--out", "{out}"],
     "a multiple of 2"),
    ("hub-offline-not-cached", ["segment", "{ok}", "--model", "someone/not-a-cached-model", "--out", "{out}"],
     "not in the Hugging Face cache"),
    ("hub-unreachable", ["segment", "{ok}", "--model", "someone/not-a-cached-model", "--out", "{out}"],
     "cannot be reached"),
    ("hub-id-invalid", ["segment", "{ok}", "--model", "bad id!", "--out", "{out}"], "nor a valid Hub id"),
    # ---- generate
    ("guidance-nan", [*GEN, "--guidance", "nan"], "--guidance must be a finite number"),
    ("guidance-negative", [*GEN, "--guidance", "-1"], "--guidance must be >= 0"),
    ("steps-zero", [*GEN, "--steps", "0"], "--steps must be >= 1"),
    ("steps-beyond-schedule", [*GEN, "--steps", "5000"], "exceeds the model's training schedule"),
    ("gen-k-letters", [*GEN, "--k", "x,y"], "--k takes whole numbers"),
    ("gen-size-zero", [*GEN, "--size", "0"], "--size must be >= 1"),
    ("gen-goca-without-classes", [*GEN, "--method", "goca"], "needs -P classes=VALUE"),
    ("gen-out-is-file", GEN, "is a file"),
    # ---- evaluate: options, datasets, run folders
    ("eval-root-missing", ["evaluate", "--dataset", "generic", "--root", "{root}/nope", "--model", "toyworld",
                           "--out", "{out}"], "does not exist"),
    ("eval-no-root", ["evaluate", "--dataset", "generic", "--model", "toyworld", "--out", "{out}"],
     "dataset root is required"),
    ("eval-protocol-unknown", ["evaluate", "--protocol", "nope", "--root", "{data}", "--out", "{out}"],
     "unknown protocol 'nope'"),
    ("eval-protocol-dataset-mismatch", ["evaluate", "--protocol", "diffseg-cocostuff27", "--dataset", "generic",
                                        "--root", "{data}", "--out", "{out}"], "evaluates dataset"),
    ("eval-matching-mismatch", [*EVAL, "--matching", "semantic"], "cannot be scored"),
    ("eval-param-unknown", [*EVAL, "-P", "nope=1"], "no parameter nope"),
    ("eval-class-source-agnostic", [*EVAL, "--class-source", "oracle"], "takes no class names"),
    ("eval-dataset-option-unknown", [*EVAL, "-D", "bogus=1"], "has no option(s) bogus"),
    ("eval-limit-zero", [*EVAL, "--limit", "0"], "limit must be a positive integer"),
    ("eval-size-zero", [*EVAL, "--size", "0"], "size must be a positive integer"),
    ("eval-dtype-unknown", [*EVAL, "--dtype", "int8"], "--dtype 'int8' is not supported"),
    ("eval-device-banana", [*EVAL, "--device", "banana"], "not a device"),
    ("eval-offset-nan", [*EVAL, "--method", "goca", "--background-offset", "nan"], "must be a finite number"),
    ("eval-timestep-beyond-schedule", [*EVAL, "-P", "timestep=4000"], "outside this model's training schedule"),
    ("eval-model-missing", ["evaluate", "--dataset", "generic", "--root", "{data}", "--model", "./nope/model",
                            "--out", "{out}"], "model folder not found"),
    ("eval-out-is-file", EVAL, "is a file"),
    ("store-dir-is-file", [*EVAL, "--store-dir", "{root}/stores.txt"], "--store-dir"),
    ("captions-invalid", [*EVAL, "--method", "goca", "--class-source", "captions", "--captions",
                          "{root}/captions.json"], "is not valid JSON"),
    ("captions-missing-ids", [*EVAL, "--method", "goca", "--class-source", "captions", "--captions",
                              "{root}/captions.json"], "has no entry for 1 image"),
    ("captions-without-source", [*EVAL, "--captions", "{root}/x.json"], "only used with --class-source captions"),
    ("dataset-empty", EVAL, "no images"),
    ("dataset-label-missing", EVAL, "label file(s) missing"),
    ("dataset-label-size", EVAL, "is 40x30 px but its image is 40x40 px"),
    ("dataset-unknown-class", [*EVAL, "--method", "goca"], "cannot represent the class name(s) 'giraffe'"),
    ("dataset-no-classes", EVAL, "has no class names"),
    ("run-changed-config", [*EVAL, "-P", "num_anchors=4"], "another configuration"),
    ("run-results-without-config", EVAL, "holds result files but no config.json"),
    ("run-locked", EVAL, "is being written by process"),
    # ---- report
    ("report-missing", ["report", "{root}/no-run"], "does not exist"),
    ("report-not-a-run", ["report", "{root}/plain"], "not an evaluation run folder"),
    ("report-broken-line", ["report", "{out}"], "line 2 is not valid JSON"),
    ("report-record-without-counts", ["report", "{out}"], "no 'counts' object"),
    ("report-config-invalid", ["report", "{out}"], "is not valid JSON"),
    ("report-matching-unknown", ["report", "{out}", "--matching", "semantic"], "can only be re-scored"),
    # ---- stores (attnseg inspect reads them in full)
    ("store-missing", ["inspect", "{root}/none.safetensors"], "not found"),
    ("store-folder", ["inspect", "{root}"], "it is a folder"),
    ("store-text", ["inspect", "{root}/s.safetensors"], "not a readable safetensors file"),
    ("store-no-header", ["inspect", "{root}/s.safetensors"], "not an attnseg attention store"),
    ("store-header-invalid-json", ["inspect", "{root}/s.safetensors"], "header is not valid JSON"),
    ("store-header-list", ["inspect", "{root}/s.safetensors"], "not an object"),
    ("store-header-missing-key", ["inspect", "{root}/s.safetensors"], "its header lacks 'layers'"),
    ("store-header-bad-dtype", ["inspect", "{root}/s.safetensors"], "unknown dtype 'banana'"),
    ("store-header-meta-list", ["inspect", "{root}/s.safetensors"], "its meta is not an object"),
    ("store-header-entries-list", ["inspect", "{root}/s.safetensors"], "a header field is malformed"),
    ("store-newer-version", ["inspect", "{root}/s.safetensors"], "written by a newer attnseg"),
    ("store-entry-without-tensor", ["inspect", "{root}/s.safetensors"], "has no tensor"),
    ("store-truncated", ["inspect", "{root}/s.safetensors"], "not a readable safetensors file"),
    # ---- toyworld generate
    ("toy-not-empty", ["toyworld", "generate", "--out", "{out}", "--n", "2"], "is not empty; pass --overwrite"),
    ("toy-n-zero", ["toyworld", "generate", "--out", "{out}", "--n", "0"], "--n must be >= 1"),
    ("toy-split-unknown", ["toyworld", "generate", "--out", "{out}", "--split", "banana"], "is not a split"),
    ("toy-image-size-small", ["toyworld", "generate", "--out", "{out}", "--image-size", "4"],
     "--image-size must be >= 8"),
    ("toy-out-is-file", ["toyworld", "generate", "--out", "{out}"], "is a file"),
    # ---- an unexpected exception (a bug) is one line too, with exit code 1 and the --debug hint
    ("internal-error", SEG, "unexpected ZeroDivisionError: division by zero (an attnseg bug; re-run with --debug", 1),
]


def _tree(root: Path) -> dict[str, Any]:
    """Every file and folder under ``root`` with size and modification time (what "unchanged" is checked on)."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case must fail before a model loads: loading one is an error here."""
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("attnseg.models.loading.load_model", refuse)
    monkeypatch.setattr("attnseg.models.loading.load_components", refuse)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(case: tuple[Any, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, args, message, *rest = case
    code = rest[0] if rest else 2
    env = Env(tmp_path)
    _setup(env, name, monkeypatch)
    before = _tree(tmp_path)
    try:
        res = RUNNER.invoke(app, env.fill(args))
        after = _tree(tmp_path)
    finally:
        for cleanup in env.cleanups:
            cleanup()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == code, f"exit code {res.exit_code}: {res.output!r} {res.exception!r}"
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in res.output and res.stdout == ""
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}  # nothing created or changed


def test_the_corpus_is_large_and_distinct() -> None:
    names = [c[0] for c in CASES]
    assert len(names) >= 50 and len(set(names)) == len(names)


# --------------------------------------------------------------------------------------------
# the same checks from a shell: timing, --debug


def _attnseg(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    environ = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    environ.pop("ATTNSEG_DEBUG", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "attnseg.cli.app", *args], env=environ, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def test_missing_image_answers_at_once_from_a_shell(tmp_path: Path) -> None:
    """No torch, no diffusers, not even numpy on this path: one line in well under a second. The bound is generous
    for a loaded machine (the best of up to five runs counts; the measured figures are printed), and what makes it
    fast is checked exactly: none of the heavy modules is imported."""
    args = ["segment", str(tmp_path / "missing.jpg"), "--model", "toyworld", "--out", str(tmp_path / "out")]
    times = []
    for _ in range(5):
        proc, seconds = _attnseg(*args)
        times.append(seconds)
        if seconds < 1.5:
            break
    seconds = min(times)
    print(f"segment missing.jpg: {', '.join(f'{t:.3f}' for t in times)} s wall, exit {proc.returncode}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.jpg'} (check the path)"]
    assert not (tmp_path / "out").exists()
    probe = (
        "import atexit, runpy, sys\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'numpy', 'PIL')\n"
        "atexit.register(lambda: print('imported:', [m for m in heavy if m in sys.modules], file=sys.__stdout__))\n"
        f"sys.argv = ['attnseg', *{args!r}]\n"
        "runpy.run_module('attnseg.cli.app', run_name='__main__')\n"
    )
    environ = {**os.environ, "PYTHONPATH": str(SRC)}
    checked = subprocess.run([sys.executable, "-c", probe], env=environ, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and checked.stdout.strip() == "imported: []", checked.stdout + checked.stderr
    assert seconds < 1.5


def test_unreachable_hub_is_one_quiet_line_from_a_shell(tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE, an unknown Hub id on a machine that cannot reach the Hub: one line, no retries."""
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    proc, seconds = _attnseg("segment", str(tmp_path / "ok.png"), "--model", "someone/unknown-model", "--out",
                             str(tmp_path / "out"), env=env)
    print(f"unreachable Hub: {seconds:.3f} s wall")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be reached" in lines[0], proc.stderr
    assert seconds < 10


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for args in (["--debug", "segment"], ["segment"]):
        extra = [] if args[0] == "--debug" else ["--debug"]  # accepted before the command or after its options
        proc, _ = _attnseg(*args, str(tmp_path / "missing.jpg"), "--model", "toyworld", "--out",
                           str(tmp_path / "out"), *extra)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr and "ImageError: image not found" in proc.stderr


def test_evaluate_on_a_locked_shard_from_another_process(tmp_path: Path) -> None:
    """A live process holds the shard: the second exits with one line; once it is killed (SIGKILL, no clean-up) the
    lock it left is stale and the next process takes it over."""
    from attnseg.eval.lock import RunLock

    env = Env(tmp_path)
    _run_folder(env)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from attnseg.eval.lock import RunLock; "
         f"lock = RunLock({str(env.out)!r}, 0).acquire(); print('held', flush=True); time.sleep(120)"],
        env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = RUNNER.invoke(app, env.fill(EVAL))
        assert res.exit_code == 2 and f"is being written by process {holder.pid}" in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(env.out, 0).acquire()  # the dead holder's lock is stale: taken over
    assert lock.held and json.loads((env.out / ".lock-0").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (env.out / ".lock-0").exists()
