"""Protocols: every registered protocol is consistent with the dataset registry and serialises."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from attnseg.errors import ConfigError
from attnseg.eval.datasets import DATASETS, list_datasets
from attnseg.eval.protocols import (
    CLASS_SOURCES,
    MATCHING_MODES,
    Protocol,
    get_protocol,
    list_protocols,
    register_protocol,
)

_GENERIC_OPTIONS = {"ids", "limit", "reverse"}


@pytest.mark.parametrize("name", list_protocols())
def test_every_protocol_names_a_dataset_and_serialises(name: str) -> None:
    p = get_protocol(name)
    assert p.dataset in list_datasets()
    reader = DATASETS.get(p.dataset)
    options = {q.name for q in inspect.signature(reader.__init__).parameters.values() if q.kind is q.KEYWORD_ONLY}
    assert set(p.dataset_kwargs) <= options | _GENERIC_OPTIONS, p.dataset_kwargs
    assert p.matching in MATCHING_MODES and p.class_source in CLASS_SOURCES
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Protocol.from_dict(d) == p
    assert d["id"] == f"{name}@v{p.version}"


def test_one_protocol_per_paper_table() -> None:
    names = list_protocols()
    for expected in (
        "diffseg-cocostuff27",
        "diffseg-cityscapes27",
        "goca-voc-oracle",
        "goca-context-oracle",
        "goca-coco-object-oracle",
        "goca-cityscapes-oracle",
        "goca-ade-oracle",
        "hair-figaro1k",
        "pcc-voc-bestmatch",
        "pcc-cityscapes-bestmatch",
    ):
        assert expected in names
    assert list_protocols("diffseg-*") == ["diffseg-cityscapes27", "diffseg-cocostuff27"]


def test_oracle_threshold_only_in_explicitly_named_protocols() -> None:
    for name in list_protocols():
        p = get_protocol(name)
        assert (p.background == "oracle-threshold") == name.endswith("-oracle")
    base = get_protocol("goca-voc-oracle")
    with pytest.raises(ConfigError, match="-oracle"):
        dataclasses.replace(base, name="goca-voc-sneaky")
    honest = get_protocol("goca-voc")
    assert honest.background == "held-out-threshold" and honest.held_out_split == "val"


def test_protocol_validation_and_lookup() -> None:
    p = get_protocol("diffseg-cocostuff27")
    assert get_protocol("diffseg-cocostuff27@v1") is p
    with pytest.raises(ConfigError, match="version"):
        get_protocol("diffseg-cocostuff27@v9")
    with pytest.raises(ConfigError, match="unknown protocol"):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="matching"):
        dataclasses.replace(p, matching="majority")
    with pytest.raises(ConfigError, match="background"):
        dataclasses.replace(p, background="threshold:high")
    fixed = dataclasses.replace(p, name="x", background="threshold:0.25")
    assert fixed.threshold == 0.25 and p.threshold is None
    with pytest.raises(ConfigError, match="held_out_split"):
        dataclasses.replace(p, background="held-out-threshold")
    with pytest.raises(ConfigError, match="registered twice"):
        register_protocol(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.split = "train"  # type: ignore[misc]
