"""Diffusion transformers (PixArt, SD3, Flux): layer descriptions of the real architectures, joint-attention
capture against a literal float64 recomputation, T5 tokens, and every method on every family."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.capture.store import AttentionStore
from attnseg.capture.tracer import AttentionTracer
from attnseg.types import LayerInfo

FIXTURES = Path(__file__).parent.parent / "fixtures" / "configs"
FAMILIES = ("pixart", "sd3", "flux")


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((FIXTURES / name).read_text()).items() if not k.startswith("_")}


def _meta_adapter(family: str):
    """An adapter over the real transformer config on the meta device (no weights; only the description runs)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    from attnseg.models.flux import FluxAdapter
    from attnseg.models.pixart import PixArtAdapter
    from attnseg.models.sd3 import SD3Adapter
    from attnseg.testing import clip_tokenizer

    with torch.device("meta"):
        vae = AutoencoderKL(**_config("flux1_vae.json"))
        if family == "flux":
            transformer = FluxTransformer2DModel(**_config("flux1_dev_transformer.json"))
            sched = FlowMatchEulerDiscreteScheduler(**_config("flux1_scheduler.json"))
            return FluxAdapter(transformer, vae, None, None, None, None, sched, max_sequence_length=512)
        if family == "sd3":
            transformer = SD3Transformer2DModel(**_config("sd35_medium_transformer.json"))
            # the T5 encoder only has to be there (the description reads its token count, not its weights)
            return SD3Adapter(transformer, vae, None, clip_tokenizer(), None, None, FlowMatchEulerDiscreteScheduler(),
                              text_encoder_3=torch.nn.Module(), tokenizer_3=object())
        transformer = PixArtTransformer2DModel(**_config("pixart_sigma_1024_transformer.json"))
        return PixArtAdapter(transformer, vae, None, None, DDPMScheduler())


@pytest.fixture(scope="module")
def meta_adapters():
    return {f: _meta_adapter(f) for f in FAMILIES}


# -- the real architectures -------------------------------------------------------------------------------------------


def test_flux1_dev_layers(meta_adapters):
    adapter = meta_adapters["flux"]
    assert adapter.resolution == (1024, 1024)
    layers = adapter.attention_layers()
    joint = [i for i in layers.values() if i.kind == "joint"]
    assert len(joint) == 57 and adapter.describe()["layers"] == {"joint": 57}
    assert adapter.describe()["parts"] == {"self": 57, "cross": 57, "reverse": 57}
    assert {(i.grid, i.heads, i.head_dim, i.text_tokens, i.layout) for i in joint} == {
        ((64, 64), 24, 128, 512, ("text", "image"))
    }
    double = [i for i in joint if i.position == "block"]
    single = [i for i in joint if i.position == "single"]
    assert len(double) == 19 and len(single) == 38
    assert not any(i.joined for i in double) and all(i.joined for i in single)
    assert [i.index for i in sorted(joint, key=lambda i: i.index)] == list(range(57))
    assert single[8].name == "single_transformer_blocks.8.attn" and single[8].index == 27  # GoCA's block 27
    assert single[8].output_module == "single_transformer_blocks.8.proj_out"
    assert double[0].output_module == "transformer_blocks.0.attn.to_out.0"
    # a 4096-token image after 512 text tokens; non-square inputs give non-square grids
    assert single[0].image_span(512 + 4096) == (512, 4608)
    assert adapter.attention_layers((512, 768))["transformer_blocks.0.attn"].grid == (32, 48)


def test_sd35_medium_layers(meta_adapters):
    adapter = meta_adapters["sd3"]
    layers = adapter.attention_layers()
    joint = [i for i in layers.values() if i.kind == "joint"]
    dual = [i for i in layers.values() if i.kind == "self" and not i.part]
    assert len(joint) == 24 and len(dual) == 13  # SD3.5-medium: a second attention in blocks 0-12
    assert {(i.grid, i.heads, i.head_dim, i.layout, i.text_tokens) for i in joint} == {
        ((64, 64), 24, 64, ("image", "text"), 77 + 256)
    }
    assert joint[0].image_span(4096 + 333) == (0, 4096)
    adapter.text_encoder_3, adapter.tokenizer_3 = None, None  # without T5, SD3 uses 77 zero states in its place
    try:
        assert {i.text_tokens for i in adapter.attention_layers().values() if i.kind == "joint"} == {77 + 77}
    finally:
        adapter.text_encoder_3, adapter.tokenizer_3 = torch.nn.Module(), object()
    # forward order: block 0's joint attention, then its second attention, then block 1...
    first = sorted(layers.values(), key=lambda i: (i.index, i.part))
    assert [i.name for i in first if not i.part][:3] == [
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"
    ]


def test_pixart_sigma_layers(meta_adapters):
    adapter = meta_adapters["pixart"]
    layers = adapter.attention_layers()
    assert adapter.describe()["layers"] == {"self": 28, "cross": 28}
    assert {(i.grid, i.heads, i.head_dim) for i in layers.values()} == {((64, 64), 16, 72)}
    assert {i.text_tokens for i in layers.values() if i.kind == "cross"} == {300}
    assert not any(i.layout or i.part for i in layers.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_recommended_layers_exist_on_the_reference_architecture(meta_adapters, family):
    """The family defaults name layers of the real model, of the kinds GoCA needs, for every variant."""
    from attnseg.methods.base import create_method

    adapter = meta_adapters[family]
    layers = adapter.attention_layers()
    for variant in ("goca", "vanilla", "baseline"):
        params = adapter.method_defaults("goca", variant=variant)
        rec = dict(adapter.recommended["goca"])
        assert params == {k: v for k, v in rec.items() if k != "variants"} | rec.get("variants", {}).get(variant, {})
        for name in params.get("refine_layers", []):
            assert layers[name].kind == "self"
        for name in params.get("cross_layers", []):
            assert layers[name].kind == "cross"
        ref = params["reference_layer"]
        assert any(ref == i.module_name or ref.startswith(i.module_name + ".") for i in layers.values())
        method = create_method("goca", classes="cat", variant=variant, **params)
        chosen = method.select_layers(layers)
        assert chosen and all(layers[n].kind in ("self", "cross") for n in chosen)
    assert adapter.method_defaults("goca") == {k: v for k, v in adapter.recommended["goca"].items() if k != "variants"}


def test_flux_goca_defaults_follow_the_paper(meta_adapters):
    d = meta_adapters["flux"].method_defaults("goca")
    assert d["head_method"] == "average" and d["refine_order"] == 2
    assert d["reference_layer"] == "single_transformer_blocks.8.attn"
    assert d["refine_layers"] == ["transformer_blocks.12.attn:self", "transformer_blocks.18.attn:self"]
    # t = 407 is sigma 0.407: FluxImg2ImgPipeline(strength 0.15, 28 steps) starts at 5/28 shifted with mu = 1.15
    mu = meta_adapters["flux"].shift_mu((1024, 1024))
    assert mu == pytest.approx(1.15)
    s = 5 / 28
    assert math.exp(mu) / (math.exp(mu) + 1 / s - 1) == pytest.approx(d["timestep"] / 1000, abs=1e-3)
    p = meta_adapters["pixart"].method_defaults("goca")
    assert p["refine_order"] == 5 and p["refine_layers"] == [f"transformer_blocks.{i}.attn1" for i in range(10, 18)]


def test_defaults_scale_to_a_smaller_model(tiny_dits):
    layers = tiny_dits["flux"].attention_layers()
    d = tiny_dits["flux"].method_defaults("goca", variant="vanilla")
    # 19 + 38 blocks -> 2 + 2: block 8 of 38 -> 0, blocks 12 and 18 of 19 -> 1, cross layers likewise
    assert d["reference_layer"] == "single_transformer_blocks.0.attn"
    assert d["refine_layers"] == ["transformer_blocks.1.attn:self"]
    assert d["cross_layers"] == ["transformer_blocks.0.attn:cross", "single_transformer_blocks.0.attn:cross",
                                 "single_transformer_blocks.1.attn:cross"]
    assert all(n in layers for n in d["cross_layers"] + d["refine_layers"])


def test_layer_info_round_trip_and_old_stores():
    old = {"name": "a.attn1", "kind": "self", "grid": [2, 2], "heads": 2, "head_dim": 4, "position": "down",
           "index": 0, "block": "a"}
    info = LayerInfo.from_dict(old)
    assert info.text_tokens == 0 and info.layout == () and info.rows_sum_to_one and info.to_dict() == old
    joint = LayerInfo("b.attn", "joint", (2, 3), 2, 4, "single", 1, "b", text_tokens=5, layout=("text", "image"),
                      joined=True, output_projection="b.proj_out")
    part = joint.part_info("text->image")
    assert part.name == "b.attn:reverse" and part.kind == "reverse" and part.num_queries == 5
    assert LayerInfo.from_dict(json.loads(json.dumps(part.to_dict()))) == part


# -- capture ---------------------------------------------------------------------------------------------------------


def _inputs(adapter, text="a photo of a cat on the grass"):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((1, 3, *adapter.resolution), generator=g) * 2 - 1
    latents = adapter.add_noise(adapter.encode_image(pixels), 300, generator=g)
    return latents, adapter.encode_prompt(text)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["reuse", "beside"])
def test_capture_leaves_outputs_unchanged(tiny_dits, family, mode):
    adapter = tiny_dits[family]
    latents, prompt = _inputs(adapter)
    before = {n: type(p).__name__ for n, p in adapter.denoiser.attn_processors.items()}
    plain = adapter.denoise(latents, 300, prompt)
    with AttentionTracer(adapter, mode=mode) as tracer:
        hooked = adapter.denoise(latents, 300, prompt)
    if mode == "beside":
        assert torch.equal(hooked, plain)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    assert {n: type(p).__name__ for n, p in adapter.denoiser.attn_processors.items()} == before
    # every module's parts were stored, and the self + cross parts of a joint layer hold the whole softmax
    layers = adapter.attention_layers()
    stored = set(tracer.store.keys())
    assert stored == {n for n, i in layers.items() if i.kind != "joint"}


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    eps = norm.eps if getattr(norm, "eps", None) is not None else torch.finfo(torch.float32).eps
    w = norm.weight.double() if getattr(norm, "weight", None) is not None else 1.0
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _linear(x: torch.Tensor, lin) -> torch.Tensor:
    out = x.double() @ lin.weight.double().T
    return out + lin.bias.double() if lin.bias is not None else out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs, written out: (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2].double(), sin[None, :, None, 0::2].double()
    out = torch.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = b * c + a * s
    return out


def _literal_joint(module, info: LayerInfo, seen: dict) -> torch.Tensor:
    """softmax(RoPE(q) RoPE(k)^T / sqrt(d)) in float64 over the joint sequence, from the module's own weights."""
    d = info.head_dim
    h = seen["hidden_states"].double()

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], -1, d)

    q, k = heads(_linear(h, module.to_q)), heads(_linear(h, module.to_k))
    q, k = _rms(q, module.norm_q), _rms(k, module.norm_k)
    e = seen.get("encoder_hidden_states")
    if e is not None:
        eq, ek = heads(_linear(e.double(), module.add_q_proj)), heads(_linear(e.double(), module.add_k_proj))
        eq, ek = _rms(eq, module.norm_added_q), _rms(ek, module.norm_added_k)
        if info.layout[0] == "text":
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
        else:
            q, k = torch.cat([q, eq], 1), torch.cat([k, ek], 1)
    rope = seen.get("image_rotary_emb")
    if rope is not None:
        q, k = _rope(q, *rope), _rope(k, *rope)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    return scores.softmax(-1)[0]  # (H, S, S)


@pytest.mark.parametrize(("family", "name"), [
    ("flux", "transformer_blocks.1.attn"),  # double stream, text first, RoPE
    ("flux", "single_transformer_blocks.0.attn"),  # single stream: one joined sequence
    ("sd3", "transformer_blocks.1.attn"),  # image first, q/k RMS norms, last block (context_pre_only)
])
def test_joint_probabilities_equal_a_literal_float64_recomputation(tiny_dits, family, name):
    adapter = tiny_dits[family]
    latents, prompt = _inputs(adapter)
    layers = adapter.attention_layers()
    info = layers[name]
    module = adapter.denoiser.get_submodule(name)
    seen: dict = {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)
        if args:
            seen["hidden_states"] = args[0]

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        store = AttentionStore(heads="all", group="layer")
        with AttentionTracer(adapter, store, select=[name], mode="reuse", chunk_bytes=4096):  # many small blocks
            adapter.denoise(latents, 300, prompt)
    finally:
        handle.remove()
    expected = _literal_joint(module, info, seen)
    s = expected.shape[-1]
    i0, i1 = info.image_span(s)
    text = [j for j in range(s) if not i0 <= j < i1]
    assert len(text) == info.text_tokens
    got = {p: store.get(f"{name}:{p}").double() for p in ("self", "cross", "reverse")}
    torch.testing.assert_close(got["self"], expected[:, i0:i1, i0:i1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["cross"], expected[:, i0:i1][:, :, text], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["reverse"], expected[:, text][:, :, i0:i1], rtol=1e-4, atol=1e-6)
    # image->text rows do not sum to 1; with the image->image part they do
    rows = got["self"].sum(-1) + got["cross"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert float(got["cross"].sum(-1).max()) < 1 - 1e-3
    assert store.is_partial(f"{name}:cross")
    by_res = store.cross_attention()  # renormalised per pixel over the text tokens for the methods
    sums = next(iter(by_res.values())).sum(-1)  # (heads, N)
    torch.testing.assert_close(sums, torch.ones(info.heads, info.num_tokens))


def test_pixart_cross_attention_masks_t5_padding(tiny_dits):
    adapter = tiny_dits["pixart"]
    latents, prompt = _inputs(adapter)
    name = "transformer_blocks.0.attn2"
    module = adapter.denoiser.get_submodule(name)
    seen: dict = {}
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.update(k, h=a[0] if a else k["hidden_states"]),
                                              with_kwargs=True)
    try:
        with AttentionTracer(adapter, select=[name]) as tracer:
            adapter.denoise(latents, 100, prompt)
    finally:
        handle.remove()
    got = tracer.store.get(name)  # head mean, (N, T)
    d = layers_d = adapter.attention_layers()[name].head_dim
    q = _linear(seen["h"], module.to_q).reshape(1, -1, module.heads, d)
    k = _linear(seen["encoder_hidden_states"], module.to_k).reshape(1, -1, module.heads, layers_d)
    bias = (1 - prompt.extra["attention_mask"].double()) * -10000.0
    expected = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + bias[:, None, None]).softmax(-1).mean(1)[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert float(got[:, prompt.length:].max()) < 1e-6  # padding never attended
    assert len(prompt.tokens) == 300 and prompt.tokens[prompt.length - 1] == "</s>"


def test_flux_reference_feature_is_cut_to_image_tokens(tiny_dits):
    adapter = tiny_dits["flux"]
    latents, prompt = _inputs(adapter)
    name = "single_transformer_blocks.0.attn"
    with AttentionTracer(adapter, select=[f"{name}:self"], features=[name]) as tracer:
        adapter.denoise(latents, 300, prompt)
    info = adapter.attention_layers()[name]
    assert tracer.store.features[name].shape == (1, info.num_tokens, info.heads * info.head_dim)


# -- T5 tokens ---------------------------------------------------------------------------------------------------------


def test_t5_word_lookup_with_a_trained_sentencepiece_model():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from attnseg.prompts import content_tokens, find_word, tokenize
    from attnseg.types import Prompt

    spm = pytest.importorskip("sentencepiece")
    import io

    words = ["a", "photo", "of", "the", "cat", "dog", "grass", "wall", "sky", "tree", "with", "on", "red", "blue",
             "man", "moon", "hut", ",", "."]
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 8)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tok = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], 2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         extra_ids=0, model_max_length=40)

    text = "a photo of a hippopotamus, grass"
    enc = tokenize(t5, text)
    prompt = Prompt(text=text, embeddings=torch.zeros(1, 40, 1), **enc.fields())
    assert prompt.tokens[0] != "</s>" and prompt.tokens[0].startswith("▁")  # no start token
    end = prompt.length - 1
    assert prompt.tokens[end] == "</s>" and set(prompt.tokens[end + 1:]) == {"<pad>"} and prompt.special[end]
    hippo = find_word(prompt, "hippopotamus").indices
    assert len(hippo) > 2  # split into several pieces, all of them kept
    assert "".join(prompt.tokens[i] for i in hippo).replace("▁", "") == "hippopotamus"
    assert find_word(prompt, "grass").indices == (prompt.tokens.index("▁grass"),)
    content = content_tokens(prompt)
    assert set(hippo) | {prompt.tokens.index("▁grass")} == set(content)  # no stop word, comma, </s> or padding
    assert not any(prompt.special[i] for i in content)


def test_prompt_longer_than_the_t5_limit_is_refused(tiny_dits):
    from attnseg.errors import ConfigError

    with pytest.raises(ConfigError, match="at most 32"):
        tiny_dits["flux"].encode_prompt(" ".join(["cat"] * 40))


def test_sd3_reads_clip_tokens_and_optionally_t5(tiny_dits):
    from attnseg.prompts import find_word
    from attnseg.testing import tiny_sd3_components

    p = tiny_dits["sd3"].encode_prompt("a cat on the grass")
    assert len(p.tokens) == tiny_dits["sd3"].text_length == 77 + 256
    assert find_word(p, "cat").indices == (2,)  # CLIP: <start> a cat ...
    from attnseg.models.sd3 import SD3Adapter

    t5_reader = SD3Adapter(**tiny_sd3_components(), read_tokens="t5", resolution=32)
    q = t5_reader.encode_prompt("a cat on the grass")
    (i,) = find_word(q, "cat").indices
    assert i >= 77 and q.tokens[i] == "▁cat"
    torch.testing.assert_close(q.embeddings[:, :77], p.embeddings[:, :77])  # same weights (seed 0), same states


# -- every method on every family (Python API) -------------------------------------------------------------------------


METHODS = [
    ("diffseg", {"num_anchors": 4}),
    ("goca", {"classes": "cat, grass"}),
    ("goca", {"classes": "cat, grass", "variant": "vanilla"}),
    ("goca", {"classes": "cat, grass", "variant": "baseline"}),
    ("target", {"target": "cat", "prompt": "a photo of a cat"}),
    ("clustering", {"ks": (2, 3)}),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_on_every_family(tiny_dits, rgb_image, family):
    from attnseg.pipeline import AttentionSegmentationPipeline

    adapter = tiny_dits[family]
    for name, kwargs in METHODS:
        pipe = AttentionSegmentationPipeline(adapter, name, **kwargs)
        out = pipe.run(rgb_image, seed=0)
        # the model saw a 32 px input (the image letterboxed into it); results come back at the image's 48x40
        assert out.model_result.labels.shape == (32, 32), (name, kwargs)
        assert out.result.labels.shape == (48, 40), (name, kwargs)
        if name == "goca":
            assert set(out.result.labels.unique().tolist()) <= {0, 1, 2}
            meta = out.store.meta["goca"]
            defaults = adapter.method_defaults("goca", variant=kwargs.get("variant"))
            assert meta["head_method"] == pipe.method.head_method
            if "cross_layers" in defaults:
                assert meta["cross_layers"] == defaults["cross_layers"]
            # per-pixel rescaling over content tokens only: classes' tokens, never </s> or padding
            tokens = out.result.meta["content_tokens"]
            prompt = adapter.encode_prompt(pipe.method.prompt)
            assert tokens and not any(prompt.special[i] for i in tokens)
        elif name == "target":
            assert set(out.result.labels.unique().tolist()) <= {0, 1}
        elif name == "clustering":
            assert {k for k in out.store.meta.get("ks", (2, 3))} >= {2}
    goca = AttentionSegmentationPipeline(adapter, "goca", classes="cat, grass").method
    assert goca.timestep == adapter.method_defaults("goca").get("timestep", 100)


def test_flux_goca_uses_average_heads_and_the_reference_feature(tiny_dits, rgb_image):
    from attnseg.pipeline import AttentionSegmentationPipeline

    out = AttentionSegmentationPipeline(tiny_dits["flux"], "goca", classes="cat, grass").run(rgb_image, seed=0)
    meta = out.store.meta["goca"]
    assert meta["head_method"] == "average"
    assert meta["reference_layer"] == "single_transformer_blocks.0.attn" and meta["reference_grid"] == [8, 8]
    assert set(out.result.meta["layer_weights"]) == {i for i, v in tiny_dits["flux"].attention_layers().items()
                                                     if v.kind == "cross"}
    assert abs(sum(out.result.meta["layer_weights"].values()) - 1) < 1e-5


def test_flow_noise_and_img2img_capture(tiny_dits, rgb_image):
    from attnseg.generation import img2img_capture

    adapter = tiny_dits["flux"]
    x0 = torch.ones(1, 4, 16, 16)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    noisy = adapter.add_noise(x0, 250, generator=g1)
    noise = torch.randn(x0.shape, generator=g2)
    torch.testing.assert_close(noisy, 0.75 * x0 + 0.25 * noise)  # x_t = (1 - sigma) x0 + sigma noise
    cap = img2img_capture(adapter, rgb_image, "diffseg", strength=0.5, num_inference_steps=4, seed=0)
    assert len(cap.timesteps) == 2 and all(isinstance(t, float | int) for t in cap.timesteps)
    # the Flux grid: linspace(1, 1/4, 4) shifted with mu for 64 tokens
    mu = adapter.shift_mu()
    s = np.array([0.5, 0.25])
    expected = np.exp(mu) / (np.exp(mu) + 1 / s - 1) * 1000
    np.testing.assert_allclose(cap.timesteps, expected, rtol=1e-5)
    assert cap.store.self_attention()


def test_a_pixel_space_flux_subclass_reuses_capture_and_description(rgb_image):
    """The override points of FluxAdapter: pixel space (3 channels packed 2x2 into 12), and a pooled vector made
    from the text states; capture, layer description and methods come unchanged from the base class."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from attnseg.models.flux import FluxAdapter
    from attnseg.pipeline import AttentionSegmentationPipeline
    from attnseg.testing import _t5_encoder, t5_tokenizer

    class PixelFlux(FluxAdapter):
        family = "flux"

        @property
        def latent_scale(self) -> int:
            return 1

        @property
        def latent_channels(self) -> int:
            return 3

        def encode_image(self, pixels, *, sample=False, generator=None):
            return pixels.to(self.device, self.dtype)

        def decode(self, latents):
            return latents.float().clamp(-1, 1)

        def pooled_projection(self, text, states):
            return states.mean(1)

    torch.manual_seed(0)
    tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
    ).eval().requires_grad_(False)
    adapter = PixelFlux(transformer, None, None, None, _t5_encoder(len(tok), 32).requires_grad_(False), tok,
                        FlowMatchEulerDiscreteScheduler(), resolution=16)
    assert adapter.attention_layers()["transformer_blocks.0.attn"].grid == (8, 8)  # 16 px, 2x2 pixels per token
    out = AttentionSegmentationPipeline(adapter, "goca", classes="cat, grass").run(rgb_image, seed=0)
    assert out.model_result.labels.shape == (16, 16) and out.result.labels.shape == (48, 40)
    assert out.store.meta["goca"]["head_method"] == "average"


# -- with the pipeline: one resolution of family settings, descriptions before loading, memory, prompt parts ----------


def test_the_pipeline_resolves_family_settings_through_the_adapter(tiny_dits):
    """Variants and depth-mapped layer names reach the method through ``resolve_settings`` (one mechanism); the
    user's keywords win; GoCA's paper preset is its reference's per-model configuration, which the family table
    holds, with the options the reference does not have switched off."""
    from attnseg.pipeline import AttentionSegmentationPipeline

    flux = tiny_dits["flux"]
    # Flux.1's Vanilla blocks 8 (of 19) and 9, 28 (of 38) on a 2 + 2 block model: floor(i * 2 / depth)
    hand = ["transformer_blocks.0.attn:cross", "single_transformer_blocks.0.attn:cross",
            "single_transformer_blocks.1.attn:cross"]
    vanilla = AttentionSegmentationPipeline(flux, "goca", classes="cat, grass", variant="vanilla")
    assert list(vanilla.method.cross_layers) == hand
    assert vanilla.settings.sources["cross_layers"] == "family" and vanilla.settings.sources["variant"] == "user"
    assert vanilla.method.timestep == 407 and vanilla.method.reference_layer == "single_transformer_blocks.0.attn"
    plain = AttentionSegmentationPipeline(flux, "goca", classes="cat, grass")  # GoCA's own variant: no overrides
    assert plain.method.cross_layers is None and plain.method.timestep == 407
    mine = AttentionSegmentationPipeline(flux, "goca", classes="cat, grass", variant="vanilla", timestep=50,
                                         cross_layers=["transformer_blocks.1.attn:cross"])
    assert mine.method.timestep == 50 and list(mine.method.cross_layers) == ["transformer_blocks.1.attn:cross"]
    paper = AttentionSegmentationPipeline(flux, "goca", classes="cat, grass", variant="vanilla", preset="paper")
    assert list(paper.method.cross_layers) == hand and paper.method.timestep == 407  # the reference's Flux config
    assert paper.method.rescale_floor == 0 and paper.method.layer_balance is False
    assert paper.settings.sources["rescale_floor"] == "paper" and paper.options().timestep == 407


def test_describe_model_agrees_with_the_loaded_transformers(tiny_dit_dirs):
    """What the command line checks before loading (JSON files and tokenizers only) is what the loaded adapter
    does: sizes, schedule, the tokenizer words are read with and the prompt limits."""
    from attnseg.models.loading import load_model
    from attnseg.models.spec import describe_model

    for family, folder in tiny_dit_dirs.items():
        spec = describe_model(str(folder))
        adapter = load_model(str(folder))
        assert spec.family == adapter.family == family
        assert spec.latent_scale == adapter.latent_scale
        assert spec.latent_scale * spec.patch_size == adapter.token_scale
        assert spec.resolution == tuple(adapter.resolution)
        assert spec.num_train_timesteps == adapter.scheduler.config.num_train_timesteps
        words = {"pixart": adapter.tokenizer, "sd3": adapter.tokenizer, "flux": getattr(adapter, "tokenizer_2", None)}
        assert len(spec.tokenizer()) == len(words[family])
        limits = [(limit, what) for _, limit, what in adapter.prompt_limits()]
        assert [(limit, what) for _, limit, what in spec.prompt_limits] == limits
        assert spec.text_max_length == limits[0][0]
        spec.check_prompt("a photo of a cat")  # fits
        with pytest.raises(Exception, match="at most"):
            spec.check_prompt(" ".join(["cat"] * 400))


def test_memory_estimate_counts_joint_layers_with_image_and_text_keys(tiny_dits):
    """The parts of a joint layer are computed from one softmax over N + T keys: the estimate counts the module's
    call with N + T keys (and text query rows), and the store's kept maps with their own shapes, equal to what a
    capture allocates."""
    from attnseg.capture.memory import estimate_capture
    from attnseg.capture.processor import block_plan
    from attnseg.pipeline import AttentionSegmentationPipeline

    flux = tiny_dits["flux"]
    n, t = 8 * 8, flux.max_sequence_length  # 32 px: an 8x8 token grid; T5: 32 tokens
    assert t == 32
    pipe = AttentionSegmentationPipeline(flux, "diffseg", num_anchors=4)
    est = pipe.estimate(size=(32, 32))
    assert est.kept_bytes() == n * n * 4  # the self parts of every block, averaged into one 64 x 64 map
    heads, rows = block_plan(1, 2, n, n + t)  # 2 heads x 8 channels, the image rows are the larger group
    assert (heads, rows) == (2, n)
    assert est.capture_bytes() == 3 * (1 * heads * rows * (n + t) * 4) + 1 * 2 * (n + t) * 8 * 4
    out = pipe.run(torch.rand(3, 32, 32), seed=0)
    assert sum(e.sum.numel() * e.sum.element_size() for e in out.store._entries.values()) == est.kept_bytes()

    # a whole joint layer selected: its three parts, (N, N), (N, T) and (T, N)
    name = "transformer_blocks.0.attn"
    layers = flux.attention_layers((32, 32))
    store = AttentionStore(group="layer")
    est = estimate_capture(store, {name: layers[name]}, text_tokens=t)
    assert est.kept_bytes() == 4 * (n * n + n * t + t * n)
    encoded = flux.encode_prompt("a cat")
    latents = flux.encode_image(flux.preprocess(Image.new("RGB", (32, 32)), (32, 32)))
    with AttentionTracer(flux, store, select=[name], layers=layers):
        flux.denoise(latents, 100, encoded)
    assert {tuple(e.sum.shape) for e in store._entries.values()} == {(1, n, n), (1, n, t), (1, t, n)}
    assert sum(e.sum.numel() * e.sum.element_size() for e in store._entries.values()) == est.kept_bytes()


def test_goca_spreads_classes_over_prompts_on_a_model_that_refuses_long_prompts(tiny_dits, rgb_image):
    """Flux refuses a prompt longer than T5's limit (32 tokens here) instead of cutting it; GoCA's classes are still
    spread over several prompts, each as long as it can be (the next class would not fit)."""
    from attnseg.pipeline import AttentionSegmentationPipeline

    flux = tiny_dits["flux"]
    classes = ["cat", "dog", "grass", "wall", "sky", "tree", "person", "car", "road", "man", "hair", "house",
               "water", "field", "table", "chair", "bird", "horse", "boat", "red car", "blue sky", "green tree"]
    pipe = AttentionSegmentationPipeline(flux, "goca", classes=classes)
    parts = pipe.prompt_parts()
    count = lambda text: len(flux.tokenizer_2(text)["input_ids"])  # noqa: E731
    assert len(parts) > 1 and [c for p in parts for c in p.classes] == classes
    for i, part in enumerate(parts):
        assert count(part.prompt) <= 32
        flux.check_prompt(part.prompt)
        if i + 1 < len(parts):  # the next class would have made it too long
            assert count(", ".join([*part.classes, parts[i + 1].classes[0]])) > 32
    out = pipe.run(rgb_image, seed=0)
    assert out.result.meta["prompts"] == len(parts) and len(out.stores) == len(parts)
    assert out.result.label_names == ("background", *classes)


def test_block_names_map_to_the_model_depth_and_other_values_stay():
    """Names move to the same relative depth (floor(i * n / ref)); a list of names loses the duplicates this
    makes; numbers, sizes and weights are kept item for item (a size (64, 64) stays two numbers)."""
    from attnseg.models.dit import scale_block_names

    depth, ref = {"transformer_blocks": 2, "single_transformer_blocks": 3}, {"transformer_blocks": 19,
                                                                           "single_transformer_blocks": 38}
    settings = {
        "reference_layer": "single_transformer_blocks.8.attn",
        "refine_layers": ["transformer_blocks.12.attn:self", "transformer_blocks.18.attn:self",
                          "transformer_blocks.2.attn:self"],
        "run": {"size": (64, 64), "timestep": 407},
        "cross_weights": (0.3, 0.5, 0.1, 0.1),
        "other": "down_blocks.3.attn",
    }
    assert scale_block_names(settings, depth, ref) == {
        "reference_layer": "single_transformer_blocks.0.attn",  # 8 * 3 // 38 = 0
        "refine_layers": ["transformer_blocks.1.attn:self", "transformer_blocks.0.attn:self"],  # 12*2//19=1, 18->1
        "run": {"size": (64, 64), "timestep": 407},
        "cross_weights": (0.3, 0.5, 0.1, 0.1),
        "other": "down_blocks.3.attn",
    }
