"""The Flux-architecture toy model: packing, position ids, loss, save/load and training resume (tiny sizes)."""

from __future__ import annotations

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
    # The pooled projection is the mean over non-padding tokens.
    n = model.tokenizer("a red circle").length
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
