"""The toy world: seeded synthetic scenes of coloured shapes with exact masks and captions.

A scene is a square RGB image with a textured background and a few shapes (circle, square, triangle) in a
few colours. Every scene comes with its semantic mask (class ids, ``0`` = background), its instance mask and
a caption naming every visible shape with its colour, objects ordered left to right, e.g.
``"a red circle and a blue square on a striped background"``.

Scenes are a pure function of ``(WorldConfig, seed)``. Splits are disjoint ranges of seeds
(:data:`SPLITS`), so a test scene can never be a training scene.

Example:
    >>> from attnseg.toyworld.world import WorldConfig, generate_scene, scene_seed
    >>> scene = generate_scene(scene_seed("test", 0), WorldConfig(image_size=32))
    >>> scene.image.shape, scene.semantic.dtype.name
    ((32, 32, 3), 'int64')
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "format_objects",
    "generate_scene",
    "scene_seed",
    "world_words",
    "write_dataset",
]

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_100_000),
    "test": (1_100_000, 1_200_000),
}
"""Split name -> half-open range ``[start, stop)`` of scene seeds; the ranges are disjoint."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the toy world; scenes are a function of this config and a seed.

    Attributes:
        image_size: side of the square image in pixels.
        classes: class names, id ``i`` = ``classes[i]``; id 0 is the background.
        colours: colour name -> RGB (0-255) of the objects.
        patterns: background pattern names (each also a caption word).
        min_objects, max_objects: number of shapes attempted per scene (inclusive).
        size_range: object radius as a fraction of ``image_size`` (uniform in the range).
        min_visible: fraction of an object's own area that must stay visible after later objects are drawn.
        max_rotation: largest rotation of squares (degrees, either way); triangles rotate freely.
        colour_jitter: per-object uniform jitter of each RGB channel (0-255 units).
        distractor_prob: probability of sprinkling small specks of object colours over the background.
        templates: caption templates; ``{objects}`` is the object list, ``{pattern}`` the background pattern.
        template_weights: sampling weight of each template (the first, canonical one dominates by default).
        max_tries: placement attempts per object before it is dropped.
    """

    image_size: int = 32
    classes: tuple[str, ...] = ("background", "circle", "square", "triangle")
    colours: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {
            "red": (220, 40, 40),
            "green": (40, 175, 60),
            "blue": (45, 85, 225),
            "yellow": (235, 205, 35),
        }
    )
    patterns: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
    min_objects: int = 1
    max_objects: int = 3
    size_range: tuple[float, float] = (0.14, 0.26)
    min_visible: float = 0.6
    max_rotation: float = 20.0
    colour_jitter: int = 20
    distractor_prob: float = 0.25
    templates: tuple[str, ...] = (
        "{objects} on a {pattern} background",
        "a picture of {objects} on a {pattern} background",
        "{objects}",
    )
    template_weights: tuple[float, ...] = (0.8, 0.1, 0.1)
    max_tries: int = 30

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if len(self.classes) < 2 or self.classes[0] != "background":
            raise ValueError(f"classes must start with 'background' and name at least one shape, got {self.classes}")
        unknown = set(self.classes[1:]) - set(_SHAPES)
        if unknown:
            raise ValueError(f"classes: unknown shapes {sorted(unknown)}; known: {sorted(_SHAPES)}")
        if not self.colours:
            raise ValueError("colours must not be empty")
        unknown = set(self.patterns) - set(_PATTERNS)
        if not self.patterns or unknown:
            raise ValueError(f"patterns must be a non-empty subset of {sorted(_PATTERNS)}, got {self.patterns}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        lo, hi = self.size_range
        if not 0 < lo <= hi < 0.5:
            raise ValueError(f"size_range must satisfy 0 < lo <= hi < 0.5, got {self.size_range}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 0 <= self.distractor_prob <= 1:
            raise ValueError(f"distractor_prob must be in [0, 1], got {self.distractor_prob}")
        if not self.templates or len(self.templates) != len(self.template_weights):
            raise ValueError("templates and template_weights must be non-empty and of equal length")
        if any(w < 0 for w in self.template_weights) or sum(self.template_weights) <= 0:
            raise ValueError(f"template_weights must be >= 0 with a positive sum, got {self.template_weights}")
        for t in self.templates:
            if "{objects}" not in t:
                raise ValueError(f"template {t!r} lacks '{{objects}}'")

    @property
    def shape_classes(self) -> tuple[str, ...]:
        """The shape class names (ids ``1..``)."""
        return self.classes[1:]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` reads back."""
        d = asdict(self)
        d["colours"] = {k: list(v) for k, v in self.colours.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        d = dict(d)
        tuples = ("classes", "patterns", "size_range", "templates", "template_weights")
        for key in tuples:
            if key in d:
                d[key] = tuple(d[key])
        if "colours" in d:
            d["colours"] = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in d["colours"].items()}
        return cls(**d)


@dataclass(frozen=True)
class SceneObject:
    """One visible object of a scene.

    Attributes:
        instance: its id in :attr:`Scene.instances` (1-based, in caption order).
        shape: class name (``"circle"``...), ``class_id`` its id in :attr:`WorldConfig.classes`.
        colour: colour name.
        center: ``(y, x)`` centre in pixels; ``radius`` its size in pixels.
        angle: rotation in degrees.
        area: visible pixels.
        span: ``(start, end)`` characters of the object's phrase ("red circle") in the caption.
        word_spans: caption character span of each word of the phrase, keyed by word.
    """

    instance: int
    shape: str
    class_id: int
    colour: str
    center: tuple[float, float]
    radius: float
    angle: float
    area: int
    span: tuple[int, int]
    word_spans: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Scene:
    """A generated scene.

    Attributes:
        seed: the scene seed.
        image: ``(H, W, 3) uint8`` RGB.
        semantic: ``(H, W) int64`` class ids (0 = background).
        instances: ``(H, W) int64`` instance ids (0 = background, ``k`` = ``objects[k - 1]``).
        caption: the caption naming every object, left to right.
        objects: the visible objects, in caption order.
        pattern: the background pattern name.
        template: index of the caption template used.
    """

    seed: int
    image: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    caption: str
    objects: tuple[SceneObject, ...]
    pattern: str
    template: int

    def words(self) -> dict[str, Any]:
        """The JSON record of ``captions.json``: caption, pattern and per-object words and spans."""
        return {
            "caption": self.caption,
            "pattern": self.pattern,
            "objects": [
                {
                    "instance": o.instance,
                    "class": o.shape,
                    "class_id": o.class_id,
                    "colour": o.colour,
                    "words": [o.colour, o.shape],
                    "span": list(o.span),
                    "word_spans": {k: list(v) for k, v in o.word_spans.items()},
                    "area": o.area,
                }
                for o in self.objects
            ],
        }


# -- shapes -------------------------------------------------------------------------------------


def _circle(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _square(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    # Half-side chosen so a square's area is close to a circle's of the same radius (pi r^2 ~ (2 * 0.89 r)^2).
    half = 0.89 * r
    a = math.radians(angle)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def _triangle(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    # Equilateral, circumradius scaled up so its area is comparable to the other shapes.
    rr = 1.25 * r
    pts = [
        (cy - rr * math.cos(math.radians(angle + k * 120.0)), cx + rr * math.sin(math.radians(angle + k * 120.0)))
        for k in range(3)
    ]
    inside = np.ones_like(yy, dtype=bool)
    for k in range(3):
        (y0, x0), (y1, x1) = pts[k], pts[(k + 1) % 3]
        # Vertices run clockwise in image coordinates, so the interior is on the same side of every edge.
        cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        inside &= cross >= 0
    return inside


_SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle}


# -- backgrounds ---------------------------------------------------------------------------------

_PATTERNS = ("plain", "striped", "dotted", "checkered")


def _background(rng: np.random.Generator, pattern: str, size: int) -> np.ndarray:
    """``(size, size, 3) float64`` in 0-255: a muted two-tone pattern, so saturated shapes stand out."""
    base = rng.uniform(70, 170)
    tint = rng.uniform(-18, 18, size=3)
    c0 = np.clip(base + tint, 0, 255)
    contrast = rng.uniform(25, 55) * rng.choice([-1.0, 1.0])
    c1 = np.clip(c0 + contrast + rng.uniform(-8, 8, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if pattern == "plain":
        sel = np.zeros((size, size), dtype=np.float64)
    elif pattern == "striped":
        period = rng.uniform(3.0, 7.0)
        a = rng.uniform(0, math.pi)
        phase = rng.uniform(0, period)
        sel = (((xx * math.cos(a) + yy * math.sin(a) + phase) % period) < period / 2).astype(np.float64)
    elif pattern == "dotted":
        step = int(rng.integers(4, 7))
        oy, ox = rng.integers(0, step, size=2)
        r = rng.uniform(0.8, 1.4)
        dy = (yy - oy + step / 2) % step - step / 2
        dx = (xx - ox + step / 2) % step - step / 2
        sel = (dy**2 + dx**2 <= r**2).astype(np.float64)
    elif pattern == "checkered":
        cell = int(rng.integers(3, 7))
        oy, ox = rng.integers(0, cell, size=2)
        sel = ((((yy + oy) // cell) + ((xx + ox) // cell)) % 2).astype(np.float64)
    else:  # pragma: no cover - validated in WorldConfig
        raise ValueError(f"unknown pattern {pattern!r}")
    img = c0[None, None, :] * (1 - sel[..., None]) + c1[None, None, :] * sel[..., None]
    img += rng.normal(0, 4.0, size=img.shape)
    return img


# -- scenes --------------------------------------------------------------------------------------


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split`` (``"train"``, ``"val"``, ``"test"``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise ValueError(f"index must be in [0, {stop - start}) for split {split!r}, got {index}")
    return start + index


def world_words(config: WorldConfig | None = None) -> list[str]:
    """Every word a caption of ``config`` can contain, in a stable order (the tokenizer's vocabulary)."""
    config = config or WorldConfig()
    words: list[str] = []
    for t in config.templates:
        for w in _split_words(t.replace("{objects}", " ").replace("{pattern}", " ")):
            if w not in words:
                words.append(w)
    for w in ("a", "and", ","):  # object-list glue
        if w not in words:
            words.append(w)
    for w in (*config.colours, *config.shape_classes, *config.patterns):
        if w not in words:
            words.append(w)
    return words


def _split_words(text: str) -> list[str]:
    out: list[str] = []
    for chunk in text.split():
        out.extend(w for w in chunk.replace(",", " , ").split() if w)
    return out


def format_objects(phrases: list[str]) -> str:
    """``["red circle", "blue square"]`` -> ``"a red circle and a blue square"`` (Oxford-comma-free list)."""
    items = [f"a {p}" for p in phrases]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def generate_scene(seed: int, config: WorldConfig | None = None) -> Scene:
    """Generate one scene; the same ``(seed, config)`` always gives identical arrays and caption.

    Args:
        seed: non-negative scene seed (see :func:`scene_seed` for the split ranges).
        config: the world; default :class:`WorldConfig()`.

    Returns:
        a :class:`Scene` with ``image (H, W, 3) uint8``, ``semantic (H, W) int64``, ``instances (H, W) int64``.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres

    pattern = str(rng.choice(config.patterns))
    image = _background(rng, pattern, size)

    if rng.random() < config.distractor_prob:
        # Distractor texture: sparse one-pixel specks in object colours, still labelled background.
        n_specks = int(rng.integers(size // 4, size // 2 + 1))
        ys, xs = rng.integers(0, size, size=(2, n_specks))
        palette = np.array(list(config.colours.values()), dtype=np.float64)
        image[ys, xs] = 0.5 * image[ys, xs] + 0.5 * palette[rng.integers(0, len(palette), size=n_specks)]

    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    instance_map = np.zeros((size, size), dtype=np.int64)
    full_area: list[int] = []
    placed: list[dict[str, Any]] = []
    colour_names = list(config.colours)
    for _ in range(n_objects):
        shape = str(rng.choice(config.shape_classes))
        colour = str(rng.choice(colour_names))
        r = float(rng.uniform(*config.size_range)) * size
        angle = float(rng.uniform(-config.max_rotation, config.max_rotation)) if shape == "square" else 0.0
        if shape == "triangle":
            angle = float(rng.uniform(0, 120))
        jitter = rng.uniform(-config.colour_jitter, config.colour_jitter, size=3)
        for _try in range(config.max_tries):
            margin = 1.0 + (1.25 * r if shape == "triangle" else r)
            if size - 2 * margin <= 0:
                break
            cy, cx = rng.uniform(margin, size - margin, size=2)
            mask = _SHAPES[shape](yy, xx, float(cy), float(cx), r, angle)
            if mask.sum() < 4:
                continue
            new_map = np.where(mask, len(placed) + 1, instance_map)
            ok = all((new_map == k + 1).sum() >= config.min_visible * full_area[k] for k in range(len(placed)))
            if ok:
                instance_map = new_map
                full_area.append(int(mask.sum()))
                placed.append(
                    {"shape": shape, "colour": colour, "center": (float(cy), float(cx)), "radius": r,
                     "angle": angle, "mask": mask, "jitter": jitter}
                )
                break

    if not placed:
        # Every scene names at least one object: fall back to a centred circle of mid size.
        r = float(np.mean(config.size_range)) * size
        shape = config.shape_classes[0]
        mask = _SHAPES[shape](yy, xx, size / 2, size / 2, r, 0.0)
        instance_map = np.where(mask, 1, instance_map)
        placed.append({"shape": shape, "colour": colour_names[0], "center": (size / 2, size / 2), "radius": r,
                       "angle": 0.0, "mask": mask, "jitter": np.zeros(3)})

    for k, p in enumerate(placed):
        vis = instance_map == k + 1
        rgb = np.clip(np.array(config.colours[p["colour"]], dtype=np.float64) + p["jitter"], 0, 255)
        shade = rng.normal(0, 3.0, size=(int(vis.sum()), 3))
        image[vis] = rgb[None, :] + shade

    # Caption order: left to right by the visible centroid (ties: top to bottom), so word order is consistent.
    cents = []
    for k in range(len(placed)):
        ys, xs = np.nonzero(instance_map == k + 1)
        cents.append((float(xs.mean()), float(ys.mean()), k))
    order = [k for _, _, k in sorted(cents)]
    remap = np.zeros(len(placed) + 1, dtype=np.int64)
    for new, old in enumerate(order):
        remap[old + 1] = new + 1
    instances = remap[instance_map]
    class_of = {name: i for i, name in enumerate(config.classes)}
    semantic = np.zeros((size, size), dtype=np.int64)
    for new, old in enumerate(order):
        semantic[instances == new + 1] = class_of[placed[old]["shape"]]

    weights = np.asarray(config.template_weights, dtype=np.float64)
    template = int(rng.choice(len(config.templates), p=weights / weights.sum()))
    phrases = [f"{placed[old]['colour']} {placed[old]['shape']}" for old in order]
    caption = config.templates[template].format(objects=format_objects(phrases), pattern=pattern)

    # Character spans of each object's phrase: the list is built in caption order, so search forward.
    objects: list[SceneObject] = []
    cursor = caption.index(format_objects(phrases))
    for new, old in enumerate(order):
        p = placed[old]
        start = caption.index(phrases[new], cursor)
        end = start + len(phrases[new])
        cursor = end
        cstart = start
        sstart = start + len(p["colour"]) + 1
        objects.append(
            SceneObject(
                instance=new + 1,
                shape=p["shape"],
                class_id=class_of[p["shape"]],
                colour=p["colour"],
                center=p["center"],
                radius=p["radius"],
                angle=p["angle"],
                area=int((instances == new + 1).sum()),
                span=(start, end),
                word_spans={p["colour"]: (cstart, cstart + len(p["colour"])), p["shape"]: (sstart, end)},
            )
        )

    return Scene(
        seed=seed,
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        semantic=semantic,
        instances=instances,
        caption=caption,
        objects=tuple(objects),
        pattern=pattern,
        template=template,
    )


def write_dataset(
    root: str | Path, split: str, n: int, seed: int = 0, *, config: WorldConfig | None = None
) -> Path:
    """Write ``n`` scenes of ``split`` in the generic on-disk layout.

    Layout: ``root/images/<id>.png`` (RGB), ``root/labels/<id>.png`` (uint8 class ids),
    ``root/instances/<id>.png`` (uint8 instance ids), ``root/captions.json`` (id -> caption, pattern and
    per-object words and spans), ``root/classes.txt`` (line ``i`` names class ``i``) and
    ``root/world.json`` (the :class:`WorldConfig` and the scene seeds).

    Args:
        root: output folder (created).
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of scenes.
        seed: index of the first scene within the split: scenes ``seed .. seed + n - 1`` are written,
            so the same arguments always write the same files.
        config: the world; default :class:`WorldConfig()`.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    from PIL import Image

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    config = config or WorldConfig()
    if len(config.classes) > 256:
        raise ValueError("labels are written as uint8 PNGs: at most 256 classes")
    root = Path(root)
    for sub in ("images", "labels", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    captions: dict[str, Any] = {}
    seeds: dict[str, int] = {}
    for i in range(n):
        s = scene_seed(split, seed + i)
        scene = generate_scene(s, config)
        if len(scene.objects) > 255:
            raise ValueError("instances are written as uint8 PNGs: at most 255 objects")
        sid = f"{split}_{seed + i:06d}"
        Image.fromarray(scene.image).save(root / "images" / f"{sid}.png")
        Image.fromarray(scene.semantic.astype(np.uint8)).save(root / "labels" / f"{sid}.png")
        Image.fromarray(scene.instances.astype(np.uint8)).save(root / "instances" / f"{sid}.png")
        captions[sid] = scene.words()
        seeds[sid] = s
    (root / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    (root / "classes.txt").write_text("\n".join(config.classes) + "\n")
    (root / "world.json").write_text(
        json.dumps({"split": split, "config": config.to_dict(), "seeds": seeds}, indent=1) + "\n"
    )
    return root
