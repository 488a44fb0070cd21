"""Method settings: constructor defaults < family or paper preset < the user's keywords."""

from __future__ import annotations

import pytest

from attnseg.errors import ConfigError
from attnseg.methods.diffseg import PAPER_THRESHOLD, RELATIVE_THRESHOLD
from attnseg.presets import resolve_settings

RECOMMENDED = {
    "diffseg": {"kl_thresholds": (3.0, 3.0, 3.0), "run": {"timestep": 100, "size": (64, 64)}},
    "target": {"tau": 0.4},
}


def test_family_preset_then_user() -> None:
    s = resolve_settings("diffseg", RECOMMENDED, params={"num_anchors": 8}, run={"timestep": None, "prompt": "x"})
    assert s.params == {"kl_thresholds": (3.0, 3.0, 3.0), "num_anchors": 8}
    assert s.run == {"timestep": 100, "size": (64, 64), "prompt": "x"}
    assert s.sources == {"kl_thresholds": "family", "timestep": "family", "size": "family", "num_anchors": "user",
                         "prompt": "user"}
    # The table is not modified.
    assert RECOMMENDED["diffseg"]["run"] == {"timestep": 100, "size": (64, 64)}


def test_paper_preset_ignores_the_family() -> None:
    s = resolve_settings("diffseg", RECOMMENDED, preset="paper")
    assert s.params == {"threshold_mode": "absolute", "kl_thresholds": (PAPER_THRESHOLD,) * 3} and s.run == {}
    t = resolve_settings("target", RECOMMENDED, preset="paper")
    assert t.params == {"tau_mode": "absolute", "tau": 0.9}


def test_a_mode_given_by_the_user_drops_the_presets_values_for_the_other_mode() -> None:
    s = resolve_settings("diffseg", RECOMMENDED, params={"threshold_mode": "absolute"})
    assert "kl_thresholds" not in s.params
    from attnseg.methods.diffseg import DiffSeg

    assert DiffSeg(**s.params).kl_thresholds == (PAPER_THRESHOLD,) * 3
    s = resolve_settings("diffseg", RECOMMENDED, preset="paper", params={"threshold_mode": "relative"})
    assert DiffSeg(**s.params).kl_thresholds == (RELATIVE_THRESHOLD,) * 3
    s = resolve_settings("diffseg", RECOMMENDED, params={"threshold_mode": "absolute", "kl_thresholds": (2, 2)})
    assert s.params["kl_thresholds"] == (2, 2)


def test_bad_presets_are_refused() -> None:
    with pytest.raises(ConfigError, match="preset"):
        resolve_settings("diffseg", None, preset="mine")
    with pytest.raises(ConfigError, match="run options"):
        resolve_settings("diffseg", {"diffseg": {"run": {"steps": 3}}})


def test_pipeline_applies_the_preset(tmp_path) -> None:
    import torch

    from attnseg.pipeline import AttentionSegmentationPipeline
    from attnseg.testing import tiny_sd_adapter

    adapter = tiny_sd_adapter()
    adapter.recommended = {"diffseg": {"kl_thresholds": (5.0, 5.0), "run": {"timestep": 50, "size": (16, 16)}}}
    pipe = AttentionSegmentationPipeline(adapter, "diffseg")
    assert pipe.method.kl_thresholds == (5.0, 5.0)
    assert pipe.options().timestep == 50 and pipe.options(timestep=7).timestep == 7
    assert pipe.input_size() == (16, 16) and pipe.input_size((8, 8)) == (8, 8)
    paper = AttentionSegmentationPipeline(adapter, "diffseg", preset="paper")
    assert paper.method.threshold_mode == "absolute" and paper.options().timestep == 300
    out = pipe.run(torch.rand(3, 40, 40), seed=0)
    assert out.store.meta["image_size"] == [16, 16] and out.store.meta["timestep"] == 50


def test_variant_settings_come_from_the_family_table() -> None:
    """The variant that runs (the user's, else the family entry's, else the method's default) picks its overrides."""
    table = {"goca": {"variant": "vanilla", "timestep": 300,
                      "variants": {"vanilla": {"timestep": 200}, "goca": {"timestep": 50}}}}
    s = resolve_settings("goca", table, params={"classes": ["cat"]})
    assert s.params == {"variant": "vanilla", "timestep": 200, "classes": ["cat"]}
    assert resolve_settings("goca", table, params={"variant": "goca"}).params["timestep"] == 50
    assert resolve_settings("goca", table, params={"variant": "baseline"}).params["timestep"] == 300
    # no variant in the entry: GoCA's own default variant ("goca") picks its overrides
    assert resolve_settings("goca", {"goca": {"variants": {"goca": {"timestep": 7}}}}).params == {"timestep": 7}
    assert "variants" in table["goca"]  # the table is not modified


def test_an_adapter_gives_the_family_settings_of_its_model() -> None:
    """With an adapter, its method_defaults (which may adapt names to the loaded model) is what resolves."""

    class Adapter:
        def method_defaults(self, method: str, *, variant: str | None = None) -> dict:
            return {"timestep": 11 if variant == "vanilla" else 22, "run": {"size": (8, 8)}}

    s = resolve_settings("goca", Adapter(), params={"variant": "vanilla"})
    assert s.params == {"timestep": 11, "variant": "vanilla"} and s.run == {"size": (8, 8)}
    assert resolve_settings("goca", Adapter()).params == {"timestep": 22}


def test_goca_paper_settings_are_the_familys_reference_configs() -> None:
    table = {"goca": {"refine_order": 5, "reference_layer": "blocks.13.attn2.to_q", "run": {"timestep": 100}}}
    s = resolve_settings("goca", table, preset="paper", params={"classes": "cat"})
    assert s.params == {"refine_order": 5, "reference_layer": "blocks.13.attn2.to_q", "rescale_floor": 0.0,
                        "layer_balance": False, "classes": "cat"}
    assert s.run == {"timestep": 100}
    # DiffSeg's paper settings are the same on every model: the family's table does not enter.
    d = resolve_settings("diffseg", {"diffseg": {"num_anchors": 8}}, preset="paper")
    assert "num_anchors" not in d.params
