"""The toy world: seeded synthetic scenes of textured shapes with exact masks and captions.

A scene is a square RGB image with a textured background and a few shapes. An object's class is its
**shape only** (circle, square, triangle, cross); its colour and texture (plain, striped, dotted, shaded)
are drawn independently of the shape, from the same palette and the same kinds of texture as the
background, so colour and texture carry no class information. Scenes often hold two objects of the
same colour touching or overlapping, and smooth lighting and noise run over the whole image. Low-level
cues (colour clusters, superpixels, a threshold on the colours the caption names) therefore do not
solve the task, while a person still reads every shape at a glance.

Every scene comes with its semantic mask (class ids, ``0`` = background), its instance mask and a caption
naming every object with its texture and colour, objects ordered left to right, e.g.
``"a striped red circle and a red square on a dotted green background"``.

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

WORLD_VERSION = 2
"""Version of the scene generator; stored in every config so a model trained on another world is refused."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the toy world; scenes are a function of this config and a seed.

    Attributes:
        image_size: side of the square image in pixels.
        classes: class names, id ``i`` = ``classes[i]``; id 0 is the background. The class is the shape.
        colours: colour name -> RGB (0-255); objects and backgrounds draw from the same palette (an object never
            takes its background's main colour, but often its second tone).
        object_textures: textures of objects (caption adjective; ``"plain"`` is not named in captions).
        object_texture_weights: sampling weight of each object texture (plain objects are the easiest for
            colour clustering, so they are rare).
        background_textures: textures of backgrounds (always named: "on a dotted green background").
        min_objects, max_objects: number of shapes attempted per scene (inclusive).
        size_range: object radius as a fraction of ``image_size`` (uniform in the range).
        min_visible: fraction of an object's own area that must stay visible after later objects are drawn.
        touch_prob: probability that an object after the first is placed touching (or overlapping) an
            earlier one, taking that object's colour (so same-colour objects meet often).
        second_colour_prob: probability that the second tone of a background texture, or of an object's
            stripes, is another palette colour (often an object's colour for a background; never the background's
            colour for an object, so its outline stays whole); otherwise a darker or lighter shade of its own
            colour.
        lighting: largest relative change of brightness of the smooth lighting field (whole image).
        noise: standard deviation of the per-pixel Gaussian noise (0-255 units, whole image).
        version: the scene generator's version (:data:`WORLD_VERSION`).
        templates: caption templates; ``{objects}`` is the object list, ``{background}`` the background phrase.
        template_weights: sampling weight of each template (the first, canonical one dominates by default).
        max_tries: placement attempts per object before it is dropped.
    """

    image_size: int = 32
    classes: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross")
    colours: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {
            "red": (205, 45, 40),
            "green": (45, 160, 60),
            "blue": (45, 80, 215),
            "yellow": (225, 195, 40),
            "purple": (140, 60, 175),
        }
    )
    object_textures: tuple[str, ...] = ("plain", "striped", "dotted", "shaded")
    object_texture_weights: tuple[float, ...] = (0.1, 0.35, 0.3, 0.25)
    background_textures: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "shaded")
    min_objects: int = 2
    max_objects: int = 4
    size_range: tuple[float, float] = (0.17, 0.28)
    min_visible: float = 0.65
    touch_prob: float = 0.6
    second_colour_prob: float = 0.7
    lighting: float = 0.3
    noise: float = 6.0
    version: int = WORLD_VERSION
    templates: tuple[str, ...] = (
        "{objects} on a {background} background",
        "a picture of {objects} on a {background} background",
        "{objects}",
    )
    template_weights: tuple[float, ...] = (0.8, 0.1, 0.1)
    max_tries: int = 30

    def __post_init__(self) -> None:
        if self.version != WORLD_VERSION:
            raise ValueError(
                f"toy world version {self.version} is not this generator's ({WORLD_VERSION}); "
                "re-train the model for this world"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if len(self.classes) < 2 or self.classes[0] != "background":
            raise ValueError(f"classes must start with 'background' and name at least one shape, got {self.classes}")
        unknown = set(self.classes[1:]) - set(_SHAPES)
        if unknown:
            raise ValueError(f"classes: unknown shapes {sorted(unknown)}; known: {sorted(_SHAPES)}")
        if len(self.colours) < 2:
            raise ValueError("colours must name at least two colours")
        for name, known, what in (
            ("object_textures", _OBJECT_TEXTURES, self.object_textures),
            ("background_textures", _BACKGROUND_TEXTURES, self.background_textures),
        ):
            bad = set(what) - set(known)
            if not what or bad:
                raise ValueError(f"{name} must be a non-empty subset of {sorted(known)}, got {what}")
        ow = self.object_texture_weights
        if len(ow) != len(self.object_textures) or any(w < 0 for w in ow) or sum(ow) <= 0:
            raise ValueError(f"object_texture_weights must be >= 0, one per object texture, got {ow}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        lo, hi = self.size_range
        if not 0 < lo <= hi < 0.5:
            raise ValueError(f"size_range must satisfy 0 < lo <= hi < 0.5, got {self.size_range}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        for name in ("touch_prob", "second_colour_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.lighting < 1:
            raise ValueError(f"lighting must be in [0, 1), got {self.lighting}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
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
        """Inverse of :meth:`to_dict`; a dict without ``version`` is the first toy world (refused)."""
        d = dict(d)
        d.setdefault("version", 1)
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra and d["version"] == WORLD_VERSION:
            raise ValueError(f"unknown toy world fields {sorted(extra)}")
        if d["version"] != WORLD_VERSION:
            raise ValueError(
                f"toy world version {d['version']} is not this generator's ({WORLD_VERSION}); "
                "re-train the model for this world"
            )
        tuples = ("classes", "object_textures", "object_texture_weights", "background_textures", "size_range",
                  "templates", "template_weights")
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
        colour: colour name; ``texture`` its texture (``"plain"`` is not named in the caption).
        center: ``(y, x)`` centre in pixels; ``radius`` its size in pixels.
        angle: rotation in degrees.
        area: visible pixels.
        span: ``(start, end)`` characters of the object's phrase ("striped red circle") in the caption.
        word_spans: caption character span of each word of the phrase, keyed by word.
    """

    instance: int
    shape: str
    class_id: int
    colour: str
    texture: str
    center: tuple[float, float]
    radius: float
    angle: float
    area: int
    span: tuple[int, int]
    word_spans: dict[str, tuple[int, int]]

    @property
    def phrase(self) -> str:
        """The caption phrase of the object: ``"striped red circle"``, or ``"red circle"`` when plain."""
        return " ".join(_phrase_words(self.texture, self.colour, self.shape))


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
        pattern: the background texture name.
        background_colour: the background's (main) colour name.
        template: index of the caption template used.
    """

    seed: int
    image: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    caption: str
    objects: tuple[SceneObject, ...]
    pattern: str
    background_colour: str
    template: int

    def words(self) -> dict[str, Any]:
        """The JSON record of ``captions.json``: caption, background and per-object words and spans."""
        return {
            "caption": self.caption,
            "pattern": self.pattern,
            "background_colour": self.background_colour,
            "objects": [
                {
                    "instance": o.instance,
                    "class": o.shape,
                    "class_id": o.class_id,
                    "colour": o.colour,
                    "texture": o.texture,
                    "words": _phrase_words(o.texture, o.colour, o.shape),
                    "span": list(o.span),
                    "word_spans": {k: list(v) for k, v in o.word_spans.items()},
                    "area": o.area,
                }
                for o in self.objects
            ],
        }


def _phrase_words(texture: str, colour: str, shape: str) -> list[str]:
    return [colour, shape] if texture == "plain" else [texture, colour, shape]


# -- shapes -------------------------------------------------------------------------------------
# Each shape is sized so its area is close to a circle's of the same radius r (pi r^2).


def _circle(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(angle)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    return u, v


def _square(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    u, v = _rotated(yy, xx, cy, cx, angle)
    half = 0.89 * r
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def _cross(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    # A plus sign: two bars of half-length 1.2 r and half-width 0.42 r (area ~ 3.3 r^2).
    u, v = _rotated(yy, xx, cy, cx, angle)
    arm, half = 1.2 * r, 0.42 * r
    return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))


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


_SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross}
# How far a shape reaches from its centre, in radii (for placement inside the image).
_REACH = {"circle": 1.0, "square": 1.26, "triangle": 1.25, "cross": 1.3}

# -- textures ------------------------------------------------------------------------------------

_OBJECT_TEXTURES = ("plain", "striped", "dotted", "shaded")
_BACKGROUND_TEXTURES = ("plain", "striped", "dotted", "checkered", "shaded")


def _texture(rng: np.random.Generator, texture: str, yy: np.ndarray, xx: np.ndarray, scale: float) -> np.ndarray:
    """Weight of the second tone per pixel, in [0, 1]; ``scale`` sets the texture's period in pixels."""
    if texture == "plain":
        return np.zeros_like(yy)
    if texture == "striped":
        period = rng.uniform(0.9, 1.4) * scale
        a = rng.uniform(0, math.pi)
        phase = rng.uniform(0, period)
        return (((xx * math.cos(a) + yy * math.sin(a) + phase) % period) < period / 2).astype(np.float64)
    if texture == "dotted":
        step = rng.uniform(0.9, 1.3) * scale
        oy, ox = rng.uniform(0, step, size=2)
        r = rng.uniform(0.22, 0.3) * step
        dy = (yy - oy + step / 2) % step - step / 2
        dx = (xx - ox + step / 2) % step - step / 2
        return (dy**2 + dx**2 <= r**2).astype(np.float64)
    if texture == "checkered":
        cell = rng.uniform(0.5, 0.8) * scale
        oy, ox = rng.uniform(0, cell, size=2)
        return ((np.floor((yy + oy) / cell) + np.floor((xx + ox) / cell)) % 2).astype(np.float64)
    if texture == "shaded":
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        lo, hi = float(t.min()), float(t.max())
        return (t - lo) / max(hi - lo, 1e-9)
    raise ValueError(f"unknown texture {texture!r}")  # pragma: no cover - validated in WorldConfig


def _second_tone(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """A darker or lighter shade of ``rgb`` (the second tone of a texture that names one colour)."""
    if rng.random() < 0.5:
        return rgb * rng.uniform(0.4, 0.55)
    return rgb + (255 - rgb) * rng.uniform(0.45, 0.6)


def _paint(rng: np.random.Generator, texture: str, rgb: np.ndarray, second: np.ndarray, yy: np.ndarray,
           xx: np.ndarray, scale: float) -> np.ndarray:
    w = _texture(rng, texture, yy, xx, scale)[..., None]
    return rgb[None, None, :] * (1 - w) + second[None, None, :] * w


def _lighting(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A smooth multiplicative brightness field: a linear ramp plus one broad blob, within 1 +- strength."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    a = rng.uniform(0, 2 * math.pi)
    ramp = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)  # in about [-0.7, 0.7]
    cy, cx = rng.uniform(0, 1, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.15, 0.35) ** 2))
    field_ = rng.uniform(-1, 1) * ramp / 0.7 + rng.uniform(-1, 1) * blob
    return 1 + strength * np.clip(field_, -1, 1)


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
        for w in _split_words(t.replace("{objects}", " ").replace("{background}", " ")):
            if w not in words:
                words.append(w)
    for w in ("a", "and", ","):  # object-list glue
        if w not in words:
            words.append(w)
    textures = [t for t in (*config.object_textures, *config.background_textures) if t != "plain"]
    plain = ["plain"] if "plain" in config.background_textures else []
    for w in (*config.colours, *config.shape_classes, *textures, *plain):
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


def _place(rng: np.random.Generator, config: WorldConfig, shape: str, r: float,
           anchor: dict[str, Any] | None) -> tuple[float, float] | None:
    """A centre for a new object: anywhere it fits, or touching ``anchor`` (centre distance ~ sum of radii)."""
    size = config.image_size
    margin = 0.5 + _REACH[shape] * r * 0.85
    if size - 2 * margin <= 0:
        return None
    if anchor is None:
        cy, cx = rng.uniform(margin, size - margin, size=2)
        return float(cy), float(cx)
    theta = rng.uniform(0, 2 * math.pi)
    dist = (anchor["radius"] + r) * rng.uniform(0.85, 1.1)
    cy = anchor["center"][0] + dist * math.sin(theta)
    cx = anchor["center"][1] + dist * math.cos(theta)
    if not (margin <= cy <= size - margin and margin <= cx <= size - margin):
        return None
    return float(cy), float(cx)


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
    palette = {k: np.asarray(v, dtype=np.float64) for k, v in config.colours.items()}
    colour_names = list(config.colours)
    scale = size / 8  # texture period: about 4 px at 32 px

    # Background: a palette colour with a texture whose second tone is a shade or another palette colour.
    pattern = str(rng.choice(config.background_textures))
    bg_colour = str(rng.choice(colour_names))

    object_colours = [c for c in colour_names if c != bg_colour]
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    instance_map = np.zeros((size, size), dtype=np.int64)
    full_area: list[int] = []
    placed: list[dict[str, Any]] = []
    for _ in range(n_objects):
        shape = str(rng.choice(config.shape_classes))
        r = float(rng.uniform(*config.size_range)) * size
        angle = {"square": rng.uniform(-25, 25), "cross": rng.uniform(-25, 25), "triangle": rng.uniform(0, 120)}
        angle_ = float(angle.get(shape, 0.0))
        anchor = placed[int(rng.integers(len(placed)))] if placed and rng.random() < config.touch_prob else None
        # A touching object takes its neighbour's colour; no object takes the background's main colour, so every
        # outline stays visible (the background's second tone may well be an object's colour).
        colour = anchor["colour"] if anchor is not None else str(rng.choice(object_colours))
        tw = np.asarray(config.object_texture_weights, dtype=np.float64)
        texture = str(rng.choice(config.object_textures, p=tw / tw.sum()))
        for _try in range(config.max_tries):
            centre = _place(rng, config, shape, r, anchor if _try < config.max_tries // 2 else None)
            if centre is None:
                continue
            mask = _SHAPES[shape](yy, xx, centre[0], centre[1], r, angle_)
            if mask.sum() < 6:
                continue
            new_map = np.where(mask, len(placed) + 1, instance_map)
            ok = all((new_map == k + 1).sum() >= config.min_visible * full_area[k] for k in range(len(placed)))
            if ok:
                instance_map = new_map
                full_area.append(int(mask.sum()))
                placed.append({"shape": shape, "colour": colour, "texture": texture, "center": centre,
                               "radius": r, "angle": angle_})
                break

    if not placed:
        # Every scene names at least one object: fall back to a centred circle of mid size.
        r = float(np.mean(config.size_range)) * size
        shape = config.shape_classes[0]
        colour = object_colours[0]
        mask = _SHAPES[shape](yy, xx, size / 2, size / 2, r, 0.0)
        instance_map = np.where(mask, 1, instance_map)
        placed.append({"shape": shape, "colour": colour, "texture": "plain", "center": (size / 2, size / 2),
                       "radius": r, "angle": 0.0})

    # The background's second tone is often the colour of an object, and an object's stripes or dots are
    # often the background's colour or another palette colour: colour clusters then cut across objects.
    others = [c for c in colour_names if c != bg_colour]
    used = sorted({p["colour"] for p in placed} - {bg_colour})
    if rng.random() < config.second_colour_prob:
        pool = used if used and rng.random() < 0.6 else others
        bg_second = palette[str(rng.choice(pool))]
    else:
        bg_second = _second_tone(rng, palette[bg_colour])
    image = _paint(rng, pattern, palette[bg_colour], bg_second, yy, xx, 1.3 * scale)
    for k, p in enumerate(placed):
        vis = instance_map == k + 1
        rgb = palette[p["colour"]]
        second = _second_tone(rng, rgb)
        if p["texture"] == "striped" and rng.random() < config.second_colour_prob:
            others = [c for c in colour_names if c not in (p["colour"], bg_colour)]
            second = palette[str(rng.choice(others))]
        paint = _paint(rng, p["texture"], rgb, second, yy, xx, scale)
        image[vis] = paint[vis]

    image = image * _lighting(rng, size, config.lighting)[..., None]
    image += rng.normal(0, config.noise, size=image.shape)

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
    words = [_phrase_words(placed[old]["texture"], placed[old]["colour"], placed[old]["shape"]) for old in order]
    phrases = [" ".join(w) for w in words]
    caption = config.templates[template].format(objects=format_objects(phrases), background=f"{pattern} {bg_colour}")

    # Character spans of each object's phrase: the list is built in caption order, so search forward.
    objects: list[SceneObject] = []
    cursor = caption.index(format_objects(phrases))
    for new, old in enumerate(order):
        p = placed[old]
        start = caption.index(phrases[new], cursor)
        end = start + len(phrases[new])
        cursor = end
        spans: dict[str, tuple[int, int]] = {}
        pos = start
        for w in words[new]:
            spans[w] = (pos, pos + len(w))
            pos += len(w) + 1
        objects.append(
            SceneObject(
                instance=new + 1,
                shape=p["shape"],
                class_id=class_of[p["shape"]],
                colour=p["colour"],
                texture=p["texture"],
                center=p["center"],
                radius=p["radius"],
                angle=p["angle"],
                area=int((instances == new + 1).sum()),
                span=(start, end),
                word_spans=spans,
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
        background_colour=bg_colour,
        template=template,
    )


def write_dataset(
    root: str | Path, split: str, n: int, seed: int = 0, *, config: WorldConfig | None = None
) -> Path:
    """Write ``n`` scenes of ``split`` in the generic on-disk layout.

    Layout: ``root/images/<id>.png`` (RGB), ``root/labels/<id>.png`` (uint8 class ids),
    ``root/instances/<id>.png`` (uint8 instance ids), ``root/captions.json`` (id -> caption, background and
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
