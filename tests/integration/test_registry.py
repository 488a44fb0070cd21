"""Every registered method runs end to end on the tiny model through the same pipeline and store round trip."""

from __future__ import annotations

import inspect

import pytest
import torch

from attnseg.methods.base import METHODS, list_methods
from attnseg.pipeline import AttentionSegmentationPipeline

REQUIRED = {"classes": ["cat", "grass"]}  # values for required hyper-parameters, by name


def _kwargs(name: str) -> dict:
    params = inspect.signature(METHODS.get(name)).parameters
    return {k: REQUIRED[k] for k, p in params.items() if p.default is inspect.Parameter.empty and k in REQUIRED}


@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_and_is_reproducible(name, tiny_adapter, rgb_image, tmp_path):
    pipe = AttentionSegmentationPipeline(tiny_adapter, name, **_kwargs(name))
    out = pipe.run(rgb_image, seed=0)
    labels = out.model_result.labels
    assert labels.shape == (32, 32) and labels.dtype == torch.int64 and labels.min() >= 0
    assert out.result.size == (48, 40) and set(out.result.labels.unique().tolist()) <= set(labels.unique().tolist())
    assert out.result.method == name
    assert torch.equal(pipe.run(rgb_image, seed=0).model_result.labels, labels)
    # exactly the layers the method selected were captured (the others stayed on the fused path)
    assert set(out.store.layers) == set(pipe.method.select_layers(tiny_adapter.attention_layers()))


def test_every_method_has_validated_keyword_only_parameters():
    for name in list_methods():
        cls = METHODS.get(name)
        params = inspect.signature(cls).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
        assert cls.name == name and cls.__doc__
