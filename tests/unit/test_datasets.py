"""Dataset readers: each test writes a tiny dataset (8x12 px) in the real on-disk layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnseg.errors import AttnSegError, ConfigError, DatasetError
from attnseg.eval.datasets import DATASETS, Sample, create_dataset, list_datasets
from attnseg.eval.datasets.base import data_file, load_json

H, W = 8, 12


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _label(path: Path, values: list[int], *, palette: bool = False) -> np.ndarray:
    """Write an (H, W) uint8 label whose columns cycle through ``values``; return the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([values[i % len(values)] for i in range(W)], dtype=np.uint8)[None].repeat(H, axis=0)
    if palette:  # VOC-style palette PNG: pixel values are palette indices
        img = Image.frombytes("P", (W, H), arr.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        img = Image.fromarray(arr)
    img.save(path)
    return arr


def _columns(label: np.ndarray, n: int) -> list[int]:
    return label[0, :n].tolist()


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lists_every_reader() -> None:
    names = list_datasets()
    for name in (
        "cocostuff27",
        "cityscapes27",
        "cityscapes19",
        "voc2012",
        "pascal-context-60",
        "pascal-context-59",
        "coco-object",
        "ade20k-150",
        "ade20k-151",
        "figaro1k",
        "generic",
    ):
        assert name in names
        assert DATASETS.get(name).name == name
    assert list_datasets("cityscapes*") == ["cityscapes19", "cityscapes27"]
    with pytest.raises(ConfigError, match="unknown dataset"):
        create_dataset("nope", "/tmp")


def test_missing_root_is_a_dataset_error(tmp_path: Path) -> None:
    for name in list_datasets():
        with pytest.raises(DatasetError) as err:
            create_dataset(name, tmp_path / "missing")
        assert "does not exist" in str(err.value)
        assert isinstance(err.value, AttnSegError)


def test_unknown_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="boundary"):
        create_dataset("cityscapes27", tmp_path, boundary="ignore")


# ---------------------------------------------------------------------------------------------
# COCO-Stuff-27


def _coco_stuff(root: Path, label_dir: str = "annotations/stuffthingmaps_trainval2017/val2017") -> None:
    for k, i in enumerate(("000000000139", "000000000724")):
        _image(root / "images" / "val2017" / f"{i}.jpg", k)
        # fine ids (= COCO category id - 1): 0 person, 91 banner, 181 wood, 255 unlabeled
        _label(root / label_dir / f"{i}.png", [0, 91, 181, 255])


def test_cocostuff27_all_subset(tmp_path: Path) -> None:
    _coco_stuff(tmp_path)
    ds = create_dataset("cocostuff27", tmp_path, split="val", subset="all")
    assert ds.ids == ["000000000139", "000000000724"]
    assert ds.num_classes == 27 and len(set(ds.class_names)) == 27
    s = ds[0]
    assert isinstance(s, Sample) and s.image_path.name == "000000000139.jpg"
    assert s.label.shape == (H, W) and s.label.dtype == np.int64
    # fine 0 (person) -> 9 'person'; 91 (banner) -> 17 'textile'; 181 (wood) -> 24 'solid'; 255 ignored
    assert _columns(s.label, 4) == [9, 17, 24, 255]
    assert [ds.class_names[c] for c in (9, 17, 24)] == ["person", "textile", "solid"]


def test_cocostuff27_layout_variant(tmp_path: Path) -> None:
    _coco_stuff(tmp_path, label_dir="stuffthingmaps_trainval2017/val2017")
    ds = create_dataset("cocostuff27", tmp_path, subset="all")
    assert len(ds) == 2


def test_cocostuff27_curated_list(tmp_path: Path) -> None:
    ids = data_file("cocostuff27_curated_val2017.txt").read_text().split()
    assert len(ids) == len(set(ids)) == 2175
    assert ids[0] == "000000000139" and all(len(i) == 12 for i in ids)
    mapping = load_json("cocostuff27_fine_to_coarse.json")["fine_to_coarse"]
    assert len(mapping) == 182 and set(mapping.values()) == set(range(27))
    _coco_stuff(tmp_path)
    with pytest.raises(DatasetError, match="2173 image file"):
        create_dataset("cocostuff27", tmp_path)
    with pytest.raises(ConfigError, match="curated"):
        create_dataset("cocostuff27", tmp_path, split="train")


def test_cocostuff27_bad_root(tmp_path: Path) -> None:
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="stuffthingmaps_trainval2017"):
        create_dataset("cocostuff27", tmp_path)


# ---------------------------------------------------------------------------------------------
# Cityscapes


def _cityscapes(root: Path) -> None:
    for k, (city, stem) in enumerate((("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019"))):
        _image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", k)
        _label(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", [0, 6, 7, 9, 26, 33])


def test_cityscapes27_and_19(tmp_path: Path) -> None:
    _cityscapes(tmp_path / "cityscapes")
    ds = create_dataset("cityscapes27", tmp_path)  # parent folder accepted
    assert ds.ids == ["frankfurt_000000_000294", "lindau_000001_000019"]
    assert ds.num_classes == 27
    s = ds[1]
    assert s.meta["city"] == "lindau"
    # labelIds 0, 6 -> ignored; 7 road -> 0; 9 parking -> 2; 26 car -> 19; 33 bicycle -> 26
    assert _columns(s.label, 6) == [255, 255, 0, 2, 19, 26]
    assert ds.class_names[19] == "car"
    ds19 = create_dataset("cityscapes19", tmp_path / "cityscapes")
    # trainIds: road 0, parking ignored, car 13, bicycle 18
    assert _columns(ds19[0].label, 6) == [255, 255, 0, 255, 13, 18]
    assert ds19.num_classes == 19 and ds19.class_names[13] == "car"


def test_cityscapes_bad_root_names_expected_folder(tmp_path: Path) -> None:
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        create_dataset("cityscapes27", tmp_path)
    msg = str(err.value)
    assert msg.startswith("Cityscapes: expected folder")
    assert str(tmp_path / "gtFine" / "val") in msg and "gtFine_trainvaltest.zip" in msg


def test_cityscapes_missing_label_file(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="1 label file"):
        create_dataset("cityscapes27", tmp_path)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012


def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000033", "2007_000042", "2007_000061"]
    for k, i in enumerate(ids):
        _image(voc / "JPEGImages" / f"{i}.jpg", k)
        _label(voc / "SegmentationClass" / f"{i}.png", [0, 15, 255, 20], palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(ids[2] + "\n")
    return voc


def test_voc_palette_labels_and_boundary(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    assert Image.open(voc / "SegmentationClass" / "2007_000033.png").mode == "P"
    ds = create_dataset("voc2012", tmp_path, split="val")
    assert ds.ids == ["2007_000033", "2007_000042"]
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    assert _columns(ds[0].label, 4) == [0, 15, 255, 20]
    bg = create_dataset("voc2012", voc, split="train", boundary="background")
    assert bg.ids == ["2007_000061"]
    assert _columns(bg[0].label, 4) == [0, 15, 0, 20]


def test_voc_missing_split_list(tmp_path: Path) -> None:
    _voc(tmp_path)
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/trainaug\.txt"):
        create_dataset("voc2012", tmp_path, split="trainaug")


def test_voc_rgb_label_is_rejected(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    Image.new("RGB", (W, H)).save(voc / "SegmentationClass" / "2007_000033.png")
    ds = create_dataset("voc2012", tmp_path)
    with pytest.raises(DatasetError, match="single-channel"):
        ds[0]


def test_voc_unexpected_label_value(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    _label(voc / "SegmentationClass" / "2007_000042.png", [0, 40])
    with pytest.raises(DatasetError, match=r"unexpected value\(s\) \[40\]"):
        create_dataset("voc2012", tmp_path)[1]


# ---------------------------------------------------------------------------------------------
# PASCAL Context


def _context(root: Path) -> None:
    base = root / "VOC2010"
    ids = ["2008_000002", "2008_000003", "2008_000007"]
    for k, i in enumerate(ids):
        _image(base / "JPEGImages" / f"{i}.jpg", k)
        _label(base / "SegmentationClassContext" / f"{i}.png", [0, 1, 37, 59])
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "train.txt").write_text("\n".join(ids) + "\n")


def test_pascal_context_60_and_59(tmp_path: Path) -> None:
    _context(tmp_path)
    ds = create_dataset("pascal-context-60", tmp_path, split="train")
    assert ds.num_classes == 60 and ds.class_names[0] == "background"
    # 1 = aeroplane, 37 = person, 59 = wood
    assert [ds.class_names[k] for k in (1, 37, 59)] == ["aeroplane", "person", "wood"]
    assert _columns(ds[0].label, 4) == [0, 1, 37, 59]
    ds59 = create_dataset("pascal-context-59", tmp_path, split="train")
    assert ds59.num_classes == 59
    assert _columns(ds59[0].label, 4) == [255, 0, 36, 58]
    # GoCA's subset: first N of the reversed list
    sub = create_dataset("pascal-context-60", tmp_path, split="train", reverse=True, limit=2)
    assert sub.ids == ["2008_000007", "2008_000003"]


def test_pascal_context_bad_root(tmp_path: Path) -> None:
    (tmp_path / "VOC2010" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match="SegmentationClassContext"):
        create_dataset("pascal-context-60", tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO-Object


def test_coco_object_converted_layout(tmp_path: Path) -> None:
    for k, i in enumerate(("000000000139", "000000000285")):
        _image(tmp_path / "images" / "val2017" / f"{i}.jpg", k)
        _label(tmp_path / "annotations" / "val2017" / f"{i}_instanceTrainIds.png", [0, 1, 80, 255])
    ds = create_dataset("coco-object", tmp_path)
    assert ds.num_classes == 81 and ds.class_names[:2] == ("background", "person")
    assert ds.class_names[80] == "toothbrush"
    assert _columns(ds[0].label, 4) == [0, 1, 80, 255]


def test_coco_object_from_stuffthingmaps(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "val2017" / "000000000139.jpg")
    # fine 0 person -> 1; fine 12 (stop sign, COCO id 13; id 12 is unused) -> 12; fine 100 (stuff) -> 0
    _label(tmp_path / "annotations" / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", [0, 12, 100, 255])
    ds = create_dataset("coco-object", tmp_path, labels="stuffthingmaps")
    assert _columns(ds[0].label, 4) == [1, 12, 0, 255]
    assert ds.class_names[12] == "stop sign"
    with pytest.raises(DatasetError, match="instanceTrainIds"):
        create_dataset("coco-object", tmp_path)


# ---------------------------------------------------------------------------------------------
# ADE20K


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for k, i in enumerate(("ADE_val_00000001", "ADE_val_00000002")):
        _image(base / "images" / "validation" / f"{i}.jpg", k)
        _label(base / "annotations" / "validation" / f"{i}.png", [0, 1, 13, 150])
    ds = create_dataset("ade20k-150", tmp_path)
    assert ds.ids == ["ADE_val_00000001", "ADE_val_00000002"] and ds.split == "validation"
    assert ds.num_classes == 150 and ds.class_names[12] == "person"
    assert _columns(ds[0].label, 4) == [255, 0, 12, 149]
    ds151 = create_dataset("ade20k-151", base, split="validation")
    assert ds151.num_classes == 151 and ds151.class_names[0] == "background"
    assert _columns(ds151[0].label, 4) == [0, 1, 13, 150]
    with pytest.raises(DatasetError, match=r"images/training"):
        create_dataset("ade20k-150", tmp_path, split="train")


# ---------------------------------------------------------------------------------------------
# Figaro-1k


def test_figaro_pbm_polarity_and_duplicates(tmp_path: Path) -> None:
    base = tmp_path / "Figaro1k"
    hair = np.zeros((H, W), dtype=bool)
    hair[:3] = True  # white = hair
    for split in ("Training", "Testing"):
        for k, stem in enumerate(("Frame00001", "Frame00002")):
            _image(base / "Original" / split / f"{stem}-org.jpg", k)
            (base / "GT" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(hair).convert("1").save(base / "GT" / split / f"{stem}-gt.pbm")
    # the archive's duplicate, with the opposite polarity: must never be read
    Image.fromarray(~hair).convert("1").save(base / "GT" / "Training" / "Frame00001-gt(1).pbm")
    ds = create_dataset("figaro1k", tmp_path)  # default split: test
    assert ds.split == "Testing" and ds.ids == ["Frame00001", "Frame00002"]
    assert ds.class_names == ("background", "hair") and ds.ignore_index is None
    s = ds[0]
    assert s.label.dtype == np.int64 and set(np.unique(s.label).tolist()) == {0, 1}
    np.testing.assert_array_equal(s.label, hair.astype(np.int64))
    train = create_dataset("figaro1k", base, split="train")
    np.testing.assert_array_equal(train[0].label, hair.astype(np.int64))
    assert len(train) == 2


# ---------------------------------------------------------------------------------------------
# generic


def _generic(root: Path, *, classes: bool = True) -> None:
    for k, stem in enumerate(("b", "a", "c")):
        _image(root / "images" / f"{stem}.png", k)
        _label(root / "labels" / f"{stem}.png", [0, 1, 2, 255])
    if classes:
        (root / "classes.txt").write_text("sky\ncube\nsphere\n")


def test_generic_layout(tmp_path: Path) -> None:
    _generic(tmp_path)
    ds = create_dataset("generic", tmp_path)
    assert ds.ids == ["a", "b", "c"]
    assert ds.class_names == ("sky", "cube", "sphere")
    assert _columns(ds[0].label, 4) == [0, 1, 2, 255]
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.txt").write_text("c\nb\n")
    assert create_dataset("generic", tmp_path, split="test").ids == ["c", "b"]


def test_generic_class_count_checked(tmp_path: Path) -> None:
    _generic(tmp_path, classes=False)
    assert create_dataset("generic", tmp_path).class_names == ()
    assert create_dataset("generic", tmp_path, num_classes=3).class_names == ("0", "1", "2")
    ds = create_dataset("generic", tmp_path, class_names=["x", "y"])
    with pytest.raises(DatasetError, match="value 2 but there are 2 classes"):
        ds[0]


def test_generic_missing_label(tmp_path: Path) -> None:
    _generic(tmp_path)
    (tmp_path / "labels" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"labels/b\.png"):
        create_dataset("generic", tmp_path)
    (tmp_path / "only_images" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"expected folder .*only_images/labels"):
        create_dataset("generic", tmp_path / "only_images")


# ---------------------------------------------------------------------------------------------
# views


def test_shard_take_select(tmp_path: Path) -> None:
    _generic(tmp_path)
    ds = create_dataset("generic", tmp_path)
    shards = [ds.shard(r, 2) for r in range(2)]
    assert [s.ids for s in shards] == [["a", "c"], ["b"]]
    assert sorted(i for s in shards for i in s.ids) == ds.ids
    assert shards[1][0].id == "b" and len(ds) == 3  # views leave the original alone
    assert ds.take(2).ids == ["a", "b"]
    assert ds.select(["c", "a"]).ids == ["c", "a"]
    assert ds.index("c") == 2
    assert [s.id for s in ds] == ["a", "b", "c"]
    assert create_dataset("generic", tmp_path, ids=["b"]).ids == ["b"]
    with pytest.raises(ConfigError):
        ds.shard(2, 2)
    with pytest.raises(DatasetError, match="'z'"):
        ds.select(["z"])
    assert ds[0].open_image().size == (W, H)
