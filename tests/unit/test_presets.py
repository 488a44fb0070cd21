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
