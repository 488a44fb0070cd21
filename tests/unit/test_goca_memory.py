"""GoCA's capture memory: G2's layer scores computed as the maps arrive, only the prompt's text columns kept, and what
the store holds, checked against the behaviour that kept every map (a float64 recomputation from a plain capture,
stores in the format saved before scores existed, and the store's keep-every-map mode)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from attnseg.capture.goca import (
    HeadWeightedStore,
    cross_maps,
    cross_rest,
    layer_scores_of,
    reference_self_maps,
    refine_affinity,
)
from attnseg.capture.memory import estimate_capture, nbytes
from attnseg.capture.store import AttentionStore, _Entry
from attnseg.capture.tracer import AttentionTracer
from attnseg.errors import AttnSegError, ConfigError
from attnseg.methods.goca import GoCA, resize_self_attention
from attnseg.presets import resolve_settings
from attnseg.types import LayerInfo

torch.set_num_threads(1)

FAMILIES = ("sd", "pixart", "sd3", "flux")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
MiB = 2**20

#: The reference layers whose maps are held until the reference feature arrives, by hand from the tiny models'
#: layer order and each family's reference feature (the output of Flux's single block 0 comes after its own
#: probabilities; PixArt's and SD3's ``to_q`` run inside their block, SD3's before any of its probabilities).
HELD = {
    "sd": {f"{b}.transformer_blocks.0.attn1" for b in (
        "down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
        "up_blocks.0.attentions.0", "up_blocks.0.attentions.1")},
    "pixart": {"transformer_blocks.0.attn1"},
    "sd3": set(),
    "flux": {"transformer_blocks.0.attn:self", "transformer_blocks.1.attn:self",
             "single_transformer_blocks.0.attn:self"},
}


@pytest.fixture(scope="module")
def adapters(tiny_adapter, tiny_dits):
    return {"sd": tiny_adapter, **tiny_dits}


def _well_conditioned(store: AttentionStore) -> AttentionStore:
    """The store with a local G6 affinity (a Gaussian of the pixel distance) instead of the random model's nearly
    uniform one, whose ``S^k m`` has so small a range that the final minmax blows float32 rounding up to 1e-1; the
    affinity itself is compared on its own."""
    r = int(store.meta["goca"]["map_grid"][0])
    ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    store._entries["refine"].sum = torch.softmax(-torch.cdist(pos, pos) ** 2 / 2, 1)[None]
    store._entries["refine"].count = 1
    return store


def _method(adapter, **params) -> GoCA:
    return GoCA(**resolve_settings("goca", adapter, params={"classes": "cat, grass", **params}).params)


class Run:
    """One GoCA capture on a tiny model, and a plain capture of the same layers on the same input."""

    def __init__(self, adapter, method: GoCA, rgb_image, *, reference_map_dtype=torch.float16) -> None:
        self.adapter, self.method = adapter, method
        self.layers = adapter.attention_layers()
        self.selected = {n: self.layers[n] for n in method.select_layers(self.layers)}
        self.prompt = adapter.encode_prompt(method.prompt)
        self.meta = {"image_size": list(adapter.resolution), "prompt": method.prompt,
                     "tokens": list(self.prompt.tokens[: self.prompt.length])}
        from PIL import Image

        with Image.open(rgb_image) as img:
            self.latents = adapter.encode_image(adapter.preprocess(img.convert("RGB")), sample=False)
        self.store = method.make_store(adapter, dict(self.selected), copy.deepcopy(self.meta))
        self.store.reference_map_dtype = reference_map_dtype
        self.held: dict[str, tuple[torch.dtype, int]] = {}
        record, store = self.held, self.store
        original = store.add_feature

        def spy(name, value):  # what is held when the reference feature arrives
            if name == store.reference_feature:
                record.update({n: (t.dtype, t.nbytes) for n, t in store._awaiting.items()})
            original(name, value)

        store.add_feature = spy  # type: ignore[method-assign]
        self.forward(self.store)
        self.plain = AttentionStore(heads="mean", group="layer")
        self.forward(self.plain)

    def forward(self, store) -> None:
        with AttentionTracer(self.adapter, store, select=list(self.selected), layers=self.layers,
                             features=self.method.features(self.adapter)):
            self.adapter.denoise(self.latents, self.method.timestep, self.prompt)

    @property
    def gmeta(self) -> dict:
        return self.store.meta["goca"]

    def literal_scores(self) -> dict[str, float]:
        """G2's scores in float64 from the plain capture: ``sum(Pi * resize(S_l))``, ``Pi = softmax(F F^T / sqrt C)``.
        """
        ref, rgrid = self.gmeta["reference_layer"], tuple(self.gmeta["reference_grid"])
        f = self.plain.features[ref][0].double()
        pi = torch.softmax(f @ f.T / math.sqrt(f.shape[1]), dim=-1)
        out = {}
        for s in set(self.gmeta["pairs"].values()):
            maps = resize_self_attention(self.plain.get(s).double(), self.plain.layers[s].grid, rgrid)
            out[s] = float((pi * maps).sum())
        return out

    def old_format_store(self) -> AttentionStore:
        """The store GoCA saved before layer scores, built from the plain capture: head-averaged ``(N, T)`` cross maps
        with every text column, ``<layer>@reference`` maps at the reference grid, the refinement affinity and the
        reference feature (valid for ``head_method="average"``)."""
        g = self.gmeta
        rgrid, map_grid = tuple(g["reference_grid"]), tuple(g["map_grid"])
        old = AttentionStore(meta={**copy.deepcopy(self.meta), "goca": {
            k: v for k, v in g.items() if k not in ("text_columns", "reference_map_dtype")}})
        old.layers = dict(self.plain.layers)
        for name in g["cross_layers"]:
            old._entries[name] = _Entry("cross", self.plain.layers[name].grid, [name], self.plain.get(name)[None], 1)
        for s in set(g["pairs"].values()):
            m = resize_self_attention(self.plain.get(s), self.plain.layers[s].grid, rgrid)
            old._entries[s + "@reference"] = _Entry("self@reference", rgrid, [s], m[None], 1)
        if g["refine_layers"]:
            total = sum(resize_self_attention(self.plain.get(r), self.plain.layers[r].grid, map_grid)
                        for r in g["refine_layers"])
            old._entries["refine"] = _Entry("self@refine", map_grid, list(g["refine_layers"]), total[None],
                                            len(g["refine_layers"]))
        ref = g["reference_layer"]
        old.features[ref] = self.plain.features[ref]
        old._feature_counts[ref] = 1
        return old


# ----------------------------------------------------------------------------------------------------------------------
# On every family: scores, weights and labels as the behaviour that kept every map
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_text_columns_and_labels_equal_the_old_behaviour(adapters, rgb_image, family, tmp_path):
    adapter = adapters[family]
    run = Run(adapter, _method(adapter, head_method="average"), rgb_image)
    store, g = run.store, run.gmeta
    # only the layers that run before the reference feature were held, in float16, and nothing is left over
    assert set(run.held) == HELD[family]
    assert all(dtype == torch.float16 for dtype, _ in run.held.values())
    assert store.awaiting_reference() == [] and store._pi is None and not store.features

    # G2: one score per layer, equal to the float64 recomputation; a float16 map is off by at most 2^-11 of each
    # (positive) term, so its score by at most 2^-11 of the score
    literal = run.literal_scores()
    scores = layer_scores_of(store)
    assert set(scores) == set(literal) == set(g["pairs"].values())
    for name, value in scores.items():
        rtol = 2**-11 + 1e-5 if name in HELD[family] else 1e-5
        assert float(value) == pytest.approx(literal[name], rel=rtol), name

    # text columns: the prompt's L columns and the sum of the others, as the plain capture's maps
    cols = len(run.meta["tokens"])
    assert g["text_columns"] == cols
    rest = cross_rest(store)
    for name, kept in cross_maps(store).items():
        full = run.plain.get(name)
        assert cols < full.shape[1] and kept.shape == (full.shape[0], cols)
        torch.testing.assert_close(kept, full[:, :cols], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rest[name], full[:, cols:].sum(1, keepdim=True), rtol=1e-5, atol=1e-6)

    # G6's affinity: the mean of the refinement layers' resized maps
    g6 = sum(resize_self_attention(run.plain.get(r), run.plain.layers[r].grid, tuple(g["map_grid"]))
             for r in g["refine_layers"]) / len(g["refine_layers"])
    torch.testing.assert_close(refine_affinity(store), g6, rtol=1e-5, atol=1e-7)

    # the result: equal to segmenting the old-format store (saved, loaded), whose G2 and G3 run from the full maps
    path = run.old_format_store().save(tmp_path / "old.safetensors")
    size = tuple(adapter.resolution)
    # (without G4's per-pixel rescaling too, where G3's normalisation over all tokens, the rest column, shows)
    plain_g3 = GoCA(**{**run.method.params(), "rescale": False})
    for loaded in (AttentionStore.load(path), HeadWeightedStore.load(path)):
        for method in (run.method, plain_g3):
            old = method.segment(_well_conditioned(loaded), prompt=run.prompt, out_size=size)
            new = method.segment(_well_conditioned(store), prompt=run.prompt, out_size=size)
            _assert_same_segmentation(new, old, rel=1e-4, atol=1e-4)


def _assert_same_segmentation(new, old, *, rel: float, atol: float) -> None:
    """Same layer weights (to ``rel``), scores (to ``atol``) and labels (exactly)."""
    assert new.meta["layer_weights"].keys() == old.meta["layer_weights"].keys()
    for name, w in old.meta["layer_weights"].items():
        assert new.meta["layer_weights"][name] == pytest.approx(w, rel=rel), name
    torch.testing.assert_close(new.scores, old.scores, rtol=0, atol=atol)
    assert torch.equal(new.labels, old.labels)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_float32_held_maps_equal_the_old_behaviour_to_rounding(adapters, rgb_image, family, tmp_path):
    adapter = adapters[family]
    run = Run(adapter, _method(adapter, head_method="average"), rgb_image, reference_map_dtype=torch.float32)
    assert run.held and all(dtype == torch.float32 for dtype, _ in run.held.values())
    literal = run.literal_scores()
    for name, value in layer_scores_of(run.store).items():
        assert float(value) == pytest.approx(literal[name], rel=1e-5), name
    loaded = AttentionStore.load(run.old_format_store().save(tmp_path / "old.safetensors"))
    old = run.method.segment(_well_conditioned(loaded), prompt=run.prompt)
    new = run.method.segment(_well_conditioned(run.store), prompt=run.prompt)
    _assert_same_segmentation(new, old, rel=1e-6, atol=2e-6)


@pytest.mark.parametrize("head_method", ["dot-product w/o clamp", "dot-product"])
def test_per_pixel_head_weights_against_the_store_that_keeps_every_map(adapters, rgb_image, head_method, tmp_path):
    """Head weights from per-head outputs: signed ones keep every text column, clamped ones the prompt's and the
    others' sum; both equal a store of the same capture that keeps all maps and columns (scores against the
    float64 recomputation)."""
    adapter = adapters["sd"]
    run = Run(adapter, _method(adapter, head_method=head_method), rgb_image, reference_map_dtype=torch.float32)
    new = run.store
    legacy = HeadWeightedStore(
        out_weights=new.out_weights, head_method=head_method, reference_layers=new.reference_layers,
        reference_grid=new.reference_grid, refine_layers=new.refine_layers, refine_grid=new.refine_grid,
        meta=copy.deepcopy(new.meta),
    )
    run.forward(legacy)
    assert layer_scores_of(legacy) == {} and set(reference_self_maps(legacy)) == set(layer_scores_of(new))
    signed = head_method == "dot-product w/o clamp"
    cols = None if signed else len(run.meta["tokens"])
    assert new.meta["goca"]["text_columns"] == cols and bool(cross_rest(new)) != signed
    for name, full in cross_maps(legacy).items():
        kept = cross_maps(new)[name]
        torch.testing.assert_close(kept, full[:, : kept.shape[1]], rtol=1e-5, atol=1e-7)
        if not signed:
            torch.testing.assert_close(cross_rest(new)[name], full[:, cols:].sum(1, keepdim=True), rtol=1e-5,
                                       atol=1e-6)
    literal = run.literal_scores()
    for name, value in layer_scores_of(new).items():
        assert float(value) == pytest.approx(literal[name], rel=1e-5), name
    torch.testing.assert_close(refine_affinity(new), refine_affinity(legacy), rtol=1e-5, atol=1e-7)
    a = run.method.segment(_well_conditioned(new), prompt=run.prompt)
    b = run.method.segment(_well_conditioned(AttentionStore.load(legacy.save(tmp_path / "legacy.safetensors"))),
                           prompt=run.prompt)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    assert torch.equal(a.labels, b.labels)


# ----------------------------------------------------------------------------------------------------------------------
# The store on synthetic maps: any blocks of rows and heads, any grid ratio, any order of feature and layers
# ----------------------------------------------------------------------------------------------------------------------


def _feed(store: HeadWeightedStore, info: LayerInfo, probs: torch.Tensor, head_blocks, row_step: int) -> None:
    n = info.num_tokens
    for h0, h1 in head_blocks:
        for q0 in range(0, n, row_step):
            q1 = min(n, q0 + row_step)
            store.add_chunk(info, probs[:, h0:h1, q0:q1], slice(h0, h1), queries=slice(q0, q1))
    store.end_call(info)


def _pi64(feature: torch.Tensor) -> torch.Tensor:
    f = feature.double()
    return torch.softmax(f @ f.transpose(-1, -2) / math.sqrt(f.shape[-1]), dim=-1)


@pytest.mark.parametrize(("grid", "size"), [((4, 4), (2, 2)), ((2, 2), (4, 4)), ((3, 5), (4, 4)), ((6, 6), (4, 4)),
                                            ((2, 3), (5, 5)), ((4, 4), (4, 4))])
def test_rows_in_any_blocks_give_the_resized_maps_and_scores(grid, size):
    gen = torch.Generator().manual_seed(3)
    heads, n, r = 3, grid[0] * grid[1], size[0] * size[1]
    before = LayerInfo("a.attentions.0.transformer_blocks.0.attn1", "self", grid, heads, 4, "down", 0, "a")
    after = LayerInfo("c.attentions.0.transformer_blocks.0.attn1", "self", grid, heads, 4, "up", 2, "c")
    probs = {i.name: torch.softmax(torch.randn(2, heads, n, n, generator=gen) * 3, -1) for i in (before, after)}
    feature = torch.randn(2, r, 6, generator=gen)
    expected = {k: resize_self_attention(p.mean(1), grid, size) for k, p in probs.items()}  # (2, r, r)
    pi = _pi64(feature)
    literal = {k: (pi * m.double()).sum((1, 2)) for k, m in expected.items()}
    blocks = [(0, 2), (2, 3)]

    keep = HeadWeightedStore(head_method="average", reference_layers=probs, reference_grid=size,
                             refine_layers=probs, refine_grid=size)
    scored = HeadWeightedStore(head_method="average", reference_layers=probs, reference_grid=size,
                               reference_feature="b.feature", reference_map_dtype=torch.float32)
    for store in (keep, scored):
        _feed(store, before, probs[before.name], blocks, 5)
        store.add_feature("b.feature", feature)  # after the first layer, before the second
        _feed(store, after, probs[after.name], blocks, 3)
    for b in range(2):
        maps = {k.removesuffix("@reference"): keep.get(k, b) for k in keep if k.endswith("@reference")}
        for k in probs:
            torch.testing.assert_close(maps[k], expected[k][b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(keep.get("refine", b), (expected[before.name][b] + expected[after.name][b]) / 2,
                                   rtol=1e-5, atol=1e-7)
        scores = layer_scores_of(scored, b)
        for k in probs:  # the first layer held until the feature came, the second scored as its rows came
            assert float(scores[k]) == pytest.approx(float(literal[k][b]), rel=1e-5)
    assert not scored.features and scored.awaiting_reference() == [] and scored._pi is None
    assert keep.features["b.feature"].shape == feature.shape  # the keep-every-map store keeps the feature


def test_float16_held_maps_and_a_second_pass():
    gen = torch.Generator().manual_seed(4)
    info = LayerInfo("a.attn1", "self", (4, 4), 2, 4, "down", 0, "a")
    later = LayerInfo("c.attn1", "self", (4, 4), 2, 4, "up", 2, "c")
    probs = torch.softmax(torch.randn(1, 2, 16, 16, generator=gen), -1)
    feature = torch.randn(1, 16, 8, generator=gen)
    store = HeadWeightedStore(head_method="average", reference_layers={info.name, later.name}, reference_grid=(4, 4),
                              reference_feature="f")
    mean = probs.mean(1)
    for _ in range(2):  # two identical passes: the running mean of two equal scores is that score
        _feed(store, info, probs, [(0, 2)], 16)
        assert store.awaiting_reference() == [info.name] and store._awaiting[info.name].dtype == torch.float16
        # held as float16: the float32 head mean rounded once
        assert torch.equal(store._awaiting[info.name], mean.to(torch.float16))
        store.add_feature("f", feature)
        assert store.awaiting_reference() == [] and store._pi is not None
        _feed(store, later, probs, [(0, 1), (1, 2)], 16)
        assert store._pi is None  # every reference layer scored: Pi is dropped
    pi = _pi64(feature)[0]
    scores = layer_scores_of(store)
    assert store._entries[info.name + "@score"].count == 2
    assert float(scores[info.name]) == pytest.approx(float((pi * mean[0].half().double()).sum()), rel=1e-6)
    assert float(scores[later.name]) == pytest.approx(float((pi * mean[0].double()).sum()), rel=1e-5)
    # a layer whose held map never met its feature cannot start a new call
    _feed(store, info, probs, [(0, 2)], 16)
    with pytest.raises(AttnSegError, match="reference feature 'f'"):
        _feed(store, info, probs, [(0, 2)], 16)


def test_text_columns_need_non_negative_head_weights():
    with pytest.raises(ConfigError, match="non-negative head weights"):
        HeadWeightedStore(head_method="dot-product w/o clamp", text_columns=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="text_columns"):
            HeadWeightedStore(head_method="average", text_columns=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reference_map_dtype"):
        HeadWeightedStore(head_method="average", reference_map_dtype=torch.int8)


def test_average_heads_with_text_columns_by_hand():
    # one pixel, two heads, four text columns, two kept: head mean (0.3, 0.2 | 0.1, 0.4) -> kept (0.3, 0.2), rest 0.5
    info = LayerInfo("b.attn2", "cross", (1, 1), heads=2, head_dim=4, position="up", index=0, block="b")
    store = HeadWeightedStore(head_method="average", text_columns=2)
    probs = torch.tensor([[[[0.4, 0.2, 0.2, 0.2]], [[0.2, 0.2, 0.0, 0.6]]]])
    store.add(info, probs)
    torch.testing.assert_close(cross_maps(store)["b.attn2"], torch.tensor([[0.3, 0.2]]))
    torch.testing.assert_close(cross_rest(store)["b.attn2"], torch.tensor([[0.5]]))


def test_segment_refuses_tokens_beyond_the_kept_columns(adapters, rgb_image):
    adapter = adapters["flux"]
    run = Run(adapter, _method(adapter), rgb_image)
    longer = adapter.encode_prompt("a big grey cat, some green grass")
    with pytest.raises(ConfigError, match="captured with"):
        GoCA(classes="cat, grass", prompt="a big grey cat, some green grass").segment(run.store, prompt=longer)


# ----------------------------------------------------------------------------------------------------------------------
# Memory: what the store keeps is what memory_items says; the full Flux.1 at 1024 px from its config
# ----------------------------------------------------------------------------------------------------------------------


def _layer_of(key: str) -> str:
    return "" if key == "refine" else key.split("@")[0]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_kept_memory_per_layer_is_what_memory_items_says(adapters, rgb_image, family):
    adapter = adapters[family]
    run = Run(adapter, _method(adapter, head_method="average"), rgb_image)
    t = int(run.prompt.embeddings.shape[1])
    items = run.store.memory_items(run.selected, batch=1, text_tokens=t)
    said: dict[str, int] = {}
    for it in items:
        if it.phase == "kept":
            said[it.layer] = said.get(it.layer, 0) + it.nbytes
    held: dict[str, int] = {}
    for key in run.store:
        e = run.store._entries[key]
        held[_layer_of(key)] = held.get(_layer_of(key), 0) + e.sum.numel() * e.sum.element_size()
    assert said == held and sum(said.values()) == run.store.nbytes()
    # the maps held until the reference feature came: what the estimate's largest store moment says, plus blocks of Pi
    moment = [it for it in items if it.phase == "capture" and "held until it arrives" in it.what]
    g = math.prod(run.store.reference_grid)
    assert len(moment) == 1
    assert 0 < moment[0].nbytes - sum(b for _, b in run.held.values()) <= 4 * g * g * 4


def _flux1_dev_estimate(store_kwargs: dict | None = None):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from attnseg.models.flux import FluxAdapter
    from attnseg.prompts import tokenize
    from attnseg.testing import t5_tokenizer

    def config(name: str) -> dict:
        return {k: v for k, v in json.loads((FIXTURES / name).read_text()).items() if not k.startswith("_")}

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config("flux1_dev_transformer.json"))
        vae = AutoencoderKL(**config("flux1_vae.json"))
        scheduler = FlowMatchEulerDiscreteScheduler(**config("flux1_scheduler.json"))
    adapter = FluxAdapter(transformer, vae, None, None, None, None, scheduler, max_sequence_length=512)
    goca = GoCA(classes="cat, grass, wall", **adapter.method_defaults("goca"))
    layers = adapter.attention_layers((1024, 1024))
    selected = {n: layers[n] for n in goca.select_layers(layers)}
    tok = tokenize(t5_tokenizer(512), goca.prompt, 512)
    store = goca.make_store(adapter, selected, {"image_size": [1024, 1024], "tokens": list(tok.tokens[: tok.length])})
    store.device = torch.device("cpu")  # the meta adapter's store, placed where the estimate runs
    for k, v in (store_kwargs or {}).items():
        setattr(store, k, v)
    est = estimate_capture(store, selected, text_tokens=512, model_dtype=torch.bfloat16, device="cpu", method=goca)
    return est, store, tok.length


def test_flux1_dev_at_1024_px_estimate_by_hand():
    """Flux.1-dev (19 + 38 blocks, 64x64 image tokens, 512 T5 tokens), GoCA's Flux settings: the store keeps 57
    prompt-column maps and the 4096^2 refinement affinity, and holds 28 float16 maps (blocks 0-27) until block 27's
    output arrives; before, it kept 57 float32 4096^2 maps and 57 maps of all 512 columns."""
    est, _, length = _flux1_dev_estimate()
    n = 4096
    kept = 57 * n * (length + 1) * 4 + n * n * 4 + 57 * 4  # cross maps + rest, affinity, scores
    assert est.kept_bytes() == kept
    held = [it for it in est.items if "held until it arrives" in it.what]
    assert len(held) == 1 and 28 * n * n * 2 <= held[0].nbytes <= 28 * n * n * 2 + 16 * MiB
    store_peak = kept + held[0].nbytes
    assert store_peak < 0.96 * 2**30  # the store's part of the +1 GB budget
    # the behaviour that kept every map and column: 57 x 64 MiB + 57 x 8 MiB + 64 MiB, over 4 GiB
    old, _, _ = _flux1_dev_estimate({"reference_feature": None, "text_columns": None})
    assert old.kept_bytes() == 57 * n * n * 4 + 57 * n * 512 * 4 + n * n * 4
    assert old.kept_bytes() > 4 * store_peak
    # capture transients of the largest call (the processor's blocks, float32 queries, outputs) come on top
    assert est.peak_bytes() == est.kept_bytes() + est.capture_bytes()
    assert nbytes((1, 24, 4608, 128), torch.float32) < est.capture_bytes() - held[0].nbytes < 128 * MiB
