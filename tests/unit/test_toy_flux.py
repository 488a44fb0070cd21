"""The Flux-architecture toy model: packing, position ids, loss, save/load and training resume (tiny sizes)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attnseg.toyworld.flux import PACK, build_toy_flux_model, default_toy_flux_config, image_ids, pack, unpack
from attnseg.toyworld.model import load_toy_model, save_toy_model
from attnseg.toyworld.world import WorldConfig

torch.set_num_threads(1)


def _tiny():
    return default_toy_flux_config(image_size=8, width=32, heads=2, double_layers=1, single_layers=1, text_width=16,
                                   world=WorldConfig(image_size=8, size_range=(0.2, 0.3)))


def test_pack_matches_a_literal_loop_and_unpack_inverts_it() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 2 * 3, 3 * PACK * PACK)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected = [x[b, c, 2 * i + dy, 2 * j + dx] for c in range(3) for dy in range(2) for dx in range(2)]
                assert tokens[b, i * 3 + j].tolist() == torch.stack(expected).tolist()
    torch.testing.assert_close(unpack(tokens, 4, 6), x, rtol=0, atol=0)


def test_image_ids_are_row_and_column() -> None:
    ids = image_ids((2, 3))
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_config_keeps_flux_proportions() -> None:
    config = default_toy_flux_config()
    t = config.transformer
    assert t["in_channels"] == 12 and t["patch_size"] == 1
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert t["axes_dims_rope"][1] == t["axes_dims_rope"][2]
    with pytest.raises(ValueError, match="multiple"):
        default_toy_flux_config(width=130, heads=4)


def test_flow_loss_matches_a_literal_computation_and_round_trips(tmp_path) -> None:
    model = build_toy_flux_model(_tiny(), seed=0)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    ids = torch.tensor(model.tokenizer.batch(["a red circle", ""]))
    draws = model.draw(pixels, gen)
    assert draws["sigma"].shape == (2,) and ((draws["sigma"] > 0) & (draws["sigma"] < 1)).all()
    loss = model.loss(pixels, ids, draws, bf16=False)
    s = draws["sigma"].view(-1, 1, 1, 1)
    states, pooled = model.condition(ids)
    pred = model.predict((1 - s) * pixels + s * draws["noise"], draws["sigma"], states, pooled)
    torch.testing.assert_close(loss, ((pred - (draws["noise"] - pixels)) ** 2).mean())
    # Words-only conditioning (the default for new models): a zero pooled projection
    assert torch.count_nonzero(pooled) == 0
    # Flux's conditioning: the pooled projection is the mean over non-padding tokens.
    flux_like = _conditioning_model(words_only=False, causal_text=False)
    states, pooled = flux_like.condition(ids)
    n = flux_like.tokenizer("a red circle").length
    torch.testing.assert_close(pooled[0], states[0, :n].mean(0))

    save_toy_model(model, tmp_path / "m", {"steps": 0}, dtype="float32")
    loaded = load_toy_model(tmp_path / "m")
    assert type(loaded).__name__ == "ToyFluxModel"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_training_resumes_to_identical_weights(tmp_path) -> None:
    from attnseg.toyworld.train import train

    config = _tiny()
    full = train(tmp_path / "full", steps=3, batch_size=2, config=config, image_size=8, checkpoint_every=1)

    def stop_after_two(done: int, total: int, loss: float) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "part", steps=3, batch_size=2, config=config, image_size=8, checkpoint_every=1,
              progress=stop_after_two)
    resumed = train(tmp_path / "part", steps=3, batch_size=2, config=config, image_size=8, checkpoint_every=1)
    assert resumed.meta["sha256"] == full.meta["sha256"]


def _conditioning_model(**flags):
    return build_toy_flux_model(replace(_tiny(), **flags), seed=0)


def test_causal_text_word_states_ignore_later_words() -> None:
    """With a causal encoder a word's state depends on the words before it only; bidirectional T5 mixes in the
    words after it (the control that shows the test can fail)."""
    causal, bidirectional = _conditioning_model(causal_text=True), _conditioning_model(causal_text=False)
    a, b = "a red circle and a blue square", "a red circle and a green triangle"
    n = 3  # "a red circle"
    for model, same in ((causal, True), (bidirectional, False)):
        sa, _ = model.encode_text([a])
        sb, _ = model.encode_text([b])
        assert torch.equal(sa[0, :n], sb[0, :n]) is same


def test_words_only_zeroes_what_follows_the_words_and_the_pooled_vector() -> None:
    model = _conditioning_model(words_only=True, causal_text=True)
    ids = torch.tensor(model.tokenizer.batch(["a red circle", "a blue square on a green background"]))
    states, pooled = model.condition(ids)
    after = (ids == model.tokenizer.eos_id) | (ids == model.tokenizer.pad_id)
    assert after.any() and (~after).any()
    assert torch.count_nonzero(states[after]) == 0
    assert torch.count_nonzero(states[~after].abs().sum(-1)) == int((~after).sum())
    assert torch.count_nonzero(pooled) == 0
    plain = _conditioning_model(words_only=False, causal_text=True)
    states, pooled = plain.condition(ids)
    assert torch.count_nonzero(states[after].abs().sum(-1)) == int(after.sum())
    assert torch.count_nonzero(pooled.abs().sum(-1)) == 2


def test_configs_without_the_text_flags_read_as_flux(tmp_path) -> None:
    """A config written before the text flags existed loads as Flux's conditioning (bidirectional, all states);
    a saved model keeps its flags."""
    from attnseg.toyworld.flux import ToyFluxConfig

    d = _tiny().to_dict()
    assert d["words_only"] is True and d["causal_text"] is True  # the defaults for new models
    old = {k: v for k, v in d.items() if k not in ("words_only", "causal_text")}
    config = ToyFluxConfig.from_dict(old)
    assert config.words_only is False and config.causal_text is False
    model = build_toy_flux_model(config, seed=0)
    save_toy_model(model, tmp_path / "m")
    loaded = load_toy_model(tmp_path / "m", arch="flux")
    assert loaded.config == config
