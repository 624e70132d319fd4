"""Synthetic VQA scenes with exact ground truth, for measuring what visual token pruning costs.

Every scene is a small image (default 224x224 RGB) holding 2-6 flat-coloured shapes on a plain or lightly
noise-textured light background. Objects may overlap, but each keeps at least 85% of its area and its
centre visible, and objects of the same colour never touch. Because the generator knows every object, each
question has an exact single-word answer. The question families mirror the probes used in pruning papers
(POPE hallucination, attribute recognition, counting, spatial relations):

* ``existence``: "Is there a red circle in the image?" (yes/no). POPE-style negatives in three subfamilies,
  each with exactly one "yes" and one "no" per scene, so every subfamily is balanced 50/50:

  - ``random``: a uniformly random absent colour+shape (or, sometimes, an absent shape on its own);
  - ``popular``: one of the :data:`POPULAR_TOP_K` most frequent objects of the dataset that is absent;
    object frequencies follow the generator's fixed, skewed prior (:data:`SHAPE_WEIGHTS` x
    :data:`COLOR_WEIGHTS`), so "most frequent in the dataset" is the same for every split and size;
  - ``adversarial``: an absent object that shares its colour *and* shape with present objects (a
    binding swap: red circle + blue square -> "blue circle?"), else one sharing colour *or* shape.

* ``color``: "What color is the triangle?" - only when exactly one triangle is present.
* ``shape``: "What shape is the red object?" - only when exactly one red object is present.
* ``count``: "How many circles are there?" - answered with a digit ("0"-"6"; see :func:`normalize_answer`
  for how "two" or "Two circles." map back to "2").
* ``position``: "Is the red circle to the left of the blue square?" (yes/no), subfamily ``horizontal`` or
  ``vertical``; only for pairs whose bounding boxes are separated along that axis by a margin.

Determinism: scene ``i`` of a split is generated from its own RNG seeded with ``(seed, i)``, so the same seed
gives byte-identical images and identical questions, and a split of 100 scenes is a prefix of one of 1000.
The split seeds are fixed in :data:`SPLIT_SEEDS` (train 1000, validation 2000, test 3000).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_N_SCENES",
    "FAMILIES",
    "POPE_SUBFAMILIES",
    "SCENES_VOCABULARY",
    "SHAPES",
    "SHORT_ANSWER_HINT",
    "SPLIT_SEEDS",
    "QuestionRecord",
    "Scene",
    "SceneObject",
    "VQADataset",
    "VQASample",
    "answer_kind",
    "generate_scene",
    "load_scenes",
    "make_split",
    "normalize_answer",
    "object_popularity",
    "render_scene",
    "scene_questions",
    "score",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary and generator constants
# ----------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
# Saturated, hue-separated colours that stay distinct from each other and from the light background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 25),
    "purple": (140, 55, 180),
    "orange": (245, 130, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
# Circumradius of an object as a fraction of the image side (224 px -> ~15 px and ~26 px).
SIZE_RADIUS_FRAC: dict[str, float] = {"small": 0.065, "large": 0.115}

# A skewed prior over shapes and colours, so that some objects are genuinely more frequent than others and
# POPE's "popular" negatives are meaningful. Distinct weights keep the popularity ranking unambiguous.
SHAPE_WEIGHTS: dict[str, float] = {
    "circle": 7,
    "square": 6,
    "triangle": 5,
    "star": 4,
    "cross": 3,
    "hexagon": 2,
}
COLOR_WEIGHTS: dict[str, float] = {
    "red": 7,
    "blue": 6,
    "green": 5,
    "yellow": 4,
    "purple": 3,
    "orange": 2,
}

MIN_OBJECTS = 2
MAX_OBJECTS = 6
# Probability that a new object reuses a shape already in the scene, so that counts above 1 are common.
SHAPE_REUSE_PROB = 0.35
# Occlusion bound: an object keeps at least 85% of its pixels visible (so a star loses less than one arm),
# and its centre stays uncovered.
MAX_OCCLUDED_FRACTION = 0.15
# Half-width (px) of the patch around an object's centre that no later object may cover.
CENTER_CLEARANCE_PX = 2
# Same-coloured objects never touch (they would merge into one blob): minimum gap, fraction of the side.
SAME_COLOR_GAP_FRAC = 0.03
# Objects keep this distance from the image border, as a fraction of the side.
BORDER_FRAC = 0.02
MAX_PLACEMENT_TRIES = 200
# Spatial relations are asked only when the two bounding boxes are separated by this fraction of the side.
POSITION_MARGIN_FRAC = 0.03

# Light backgrounds; "noise" adds a small grey-level texture so the background is not perfectly flat.
BACKGROUND_COLORS: tuple[tuple[int, int, int], ...] = ((242, 242, 242), (236, 234, 226), (228, 233, 238))
TEXTURES: tuple[str, ...] = ("plain", "noise")
NOISE_AMPLITUDE = 6
# Shapes are drawn at this multiple of the output size and box-filtered down: anti-aliased edges while
# object interiors (and the nearest-upsampled background) keep their exact colours.
SUPERSAMPLE = 4

DEFAULT_IMAGE_SIZE = 224
# Fixed seeds of the splits (documented in the module docstring; never change them, results depend on them).
SPLIT_SEEDS: dict[str, int] = {"train": 1000, "validation": 2000, "test": 3000}
DEFAULT_N_SCENES: dict[str, int] = {"train": 2000, "validation": 200, "test": 500}

# ----------------------------------------------------------------------------------------------------------
# Question constants
# ----------------------------------------------------------------------------------------------------------

FAMILIES: tuple[str, ...] = ("existence", "color", "shape", "count", "position")
POPE_SUBFAMILIES: tuple[str, ...] = ("random", "popular", "adversarial")
POSITION_SUBFAMILIES: tuple[str, ...] = ("horizontal", "vertical")
# Popular negatives are drawn among the K most frequent absent objects (POPE uses the top-k list too).
POPULAR_TOP_K = 3
# In the "random" subfamily, this share of pairs asks about a bare shape ("Is there a star ...?").
RANDOM_SHAPE_ONLY_PROB = 0.3
# Share of count questions about an absent shape (answer "0").
COUNT_ABSENT_PROB = 0.1
# Minimum number of samples a scene contributes (the POPE pairs), used to size splits from a sample count.
EXISTENCE_PER_SCENE = 2 * len(POPE_SUBFAMILIES)

YES, NO = "yes", "no"
DIGITS: tuple[str, ...] = tuple(str(i) for i in range(MAX_OBJECTS + 1))
SCENES_VOCABULARY: tuple[str, ...] = (YES, NO, *COLORS, *SHAPES, *DIGITS)
SHORT_ANSWER_HINT = "Answer with a single word."

_PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith(("s", "x")) else "s") for shape in SHAPES}
_RELATION_TEXT: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
_OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}


# ----------------------------------------------------------------------------------------------------------
# Scene data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``x``, ``y``, ``radius`` are in output pixels (radius = circumradius)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    visible_fraction: float = 1.0

    @property
    def name(self) -> str:
        """The object's referring expression, e.g. ``"red circle"`` (unique within a scene)."""
        return f"{self.color} {self.shape}"

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Tight bounding box ``(left, top, right, bottom)`` of the full (unoccluded) shape."""
        points = _shape_polygon(self.shape, self.x, self.y, self.radius)
        if points is None:
            return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Scene:
    """Ground truth of one scene; objects are listed in drawing order (later ones on top)."""

    scene_id: str
    index: int
    seed: int
    image_size: int
    background: tuple[int, int, int]
    texture: str
    texture_seed: int
    objects: tuple[SceneObject, ...]

    def count(self, shape: str) -> int:
        """Number of objects with this shape."""
        return sum(obj.shape == shape for obj in self.objects)

    def has(self, shape: str, color: str | None = None) -> bool:
        """Whether an object of this shape (and colour, if given) is present."""
        return any(o.shape == shape and (color is None or o.color == color) for o in self.objects)


def _regular_polygon(x: float, y: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (x + r * math.cos(phase + 2 * math.pi * k / n), y + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


# Shape proportions relative to the circumradius, chosen so all shapes have a comparable visual weight.
_SQUARE_HALF = 0.82
_STAR_INNER = 0.45
_CROSS_HALF_WIDTH = 0.32
_CROSS_ARM = 0.95
_HEXAGON_RADIUS = 0.95


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape centred at ``(x, y)``; ``None`` for the circle (drawn as an ellipse)."""
    up = -math.pi / 2  # image y grows downwards, so -90 degrees points up
    if shape == "circle":
        return None
    if shape == "square":
        h = _SQUARE_HALF * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return _regular_polygon(x, y, r, 3, up)
    if shape == "star":
        outer = _regular_polygon(x, y, r, 5, up)
        inner = _regular_polygon(x, y, _STAR_INNER * r, 5, up + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        w, a = _CROSS_HALF_WIDTH * r, _CROSS_ARM * r
        # A plus sign, traced clockwise from the top-left corner of the upper arm.
        offsets = [
            (-w, -a),
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
        return [(x + dx, y + dy) for dx, dy in offsets]
    if shape == "hexagon":
        return _regular_polygon(x, y, _HEXAGON_RADIUS * r, 6, 0.0)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_object(
    draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int | tuple[int, int, int], scale: float
) -> None:
    x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
    points = _shape_polygon(obj.shape, x, y, r)
    if points is None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Boolean footprint of an object at output resolution (used for the occlusion bound)."""
    canvas = Image.new("L", (size, size), 0)
    draw_object(ImageDraw.Draw(canvas), obj, 255, 1.0)
    return np.asarray(canvas) > 0


def _center_patch(obj: SceneObject, size: int) -> tuple[slice, slice]:
    cx, cy = int(round(obj.x)), int(round(obj.y))
    c = CENTER_CLEARANCE_PX
    return slice(max(cy - c, 0), min(cy + c + 1, size)), slice(max(cx - c, 0), min(cx + c + 1, size))


def object_popularity() -> list[tuple[str, str]]:
    """All ``(shape, color)`` objects, most frequent first under the generator's prior.

    Ties are broken by vocabulary order.
    """
    combos = [(s, c) for s in SHAPES for c in COLORS]
    return sorted(
        combos,
        key=lambda sc: (
            -SHAPE_WEIGHTS[sc[0]] * COLOR_WEIGHTS[sc[1]],
            SHAPES.index(sc[0]),
            list(COLORS).index(sc[1]),
        ),
    )


def _scene_rng(seed: int, index: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and platforms.
    # Separate streams for layout and questions: changing question logic never changes the images.
    return random.Random(f"vlmcut.eval.scenes/{purpose}/{seed}/{index}")


def _sample_attributes(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Draw ``n`` (shape, colour, size) triples with distinct (shape, colour) pairs."""
    chosen: list[tuple[str, str, str]] = []
    for _ in range(n):
        if chosen and rng.random() < SHAPE_REUSE_PROB:
            shape = rng.choice([s for s, _, _ in chosen])
        else:
            shape = rng.choices(SHAPES, weights=[SHAPE_WEIGHTS[s] for s in SHAPES])[0]
        used = {c for s, c, _ in chosen if s == shape}
        free = [c for c in COLORS if c not in used]
        if not free:  # cannot happen with MAX_OBJECTS <= len(COLORS), kept as a guard
            continue
        color = rng.choices(free, weights=[COLOR_WEIGHTS[c] for c in free])[0]
        chosen.append((shape, color, rng.choice(SIZES)))
    return chosen


def generate_scene(
    seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE, split: str = "custom"
) -> Scene:
    """Generate (layout only, no pixels) scene ``index`` of the stream identified by ``seed``."""
    rng = _scene_rng(seed, index, "layout")
    size = image_size
    n_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    attributes = _sample_attributes(rng, n_objects)

    placed: list[SceneObject] = []
    masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for shape, color, size_name in attributes:
        radius = SIZE_RADIUS_FRAC[size_name] * size
        lo, hi = radius + BORDER_FRAC * size, size - radius - BORDER_FRAC * size
        for _ in range(MAX_PLACEMENT_TRIES):
            cand = SceneObject(shape, color, size_name, rng.uniform(lo, hi), rng.uniform(lo, hi), radius)
            update = _try_place(cand, placed, masks, visible, size)
            if update is not None:
                for k, vis in update.items():
                    visible[k] = vis
                mask = _object_mask(cand, size)
                placed.append(cand)
                masks.append(mask)
                visible.append(mask.copy())
                break
        # An object that finds no valid place is dropped; the first two always fit on an empty canvas.

    objects = tuple(
        replace(obj, visible_fraction=round(float(vis.sum() / max(mask.sum(), 1)), 4))
        for obj, mask, vis in zip(placed, masks, visible, strict=True)
    )
    return Scene(
        scene_id=f"scenes-{split}-{seed}-{index:06d}",
        index=index,
        seed=seed,
        image_size=size,
        background=rng.choice(BACKGROUND_COLORS),
        texture=rng.choice(TEXTURES),
        texture_seed=rng.getrandbits(63),
        objects=objects,
    )


def _try_place(
    cand: SceneObject,
    placed: list[SceneObject],
    masks: list[np.ndarray],
    visible: list[np.ndarray],
    size: int,
) -> dict[int, np.ndarray] | None:
    """Check a candidate drawn on top of ``placed``.

    Returns the updated visibility masks of the objects it overlaps, or None if it breaks a constraint.
    """
    gap = SAME_COLOR_GAP_FRAC * size
    overlapping = []
    for k, other in enumerate(placed):
        dist = math.hypot(cand.x - other.x, cand.y - other.y)
        if other.color == cand.color and dist < cand.radius + other.radius + gap:
            return None
        if dist < cand.radius + other.radius:  # circumcircles intersect: check pixels
            overlapping.append(k)
    if not overlapping:
        return {}
    cand_mask = _object_mask(cand, size)
    update: dict[int, np.ndarray] = {}
    for k in overlapping:
        other = placed[k]
        if cand_mask[_center_patch(other, size)].any():
            return None
        new_visible = visible[k] & ~cand_mask
        if new_visible.sum() < (1.0 - MAX_OCCLUDED_FRACTION) * masks[k].sum():
            return None
        update[k] = new_visible
    return update


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene to an RGB image; byte-identical for the same :class:`Scene`."""
    size = scene.image_size
    base = np.empty((size, size, 3), dtype=np.int16)
    base[...] = scene.background
    if scene.texture == "noise":
        noise = np.random.default_rng(scene.texture_seed).integers(
            -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(size, size, 1), dtype=np.int16
        )
        base += noise  # grey-level noise: texture without adding any hue
    big = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").resize(
        (size * SUPERSAMPLE, size * SUPERSAMPLE), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        draw_object(draw, obj, COLORS[obj.color], float(SUPERSAMPLE))
    return big.resize((size, size), Image.Resampling.BOX)


def widen(scene: Scene, image: Image.Image, aspect: float) -> Image.Image:
    """The rendered scene in a wider canvas (``aspect`` = width / height > 1), centred, the new sides filled
    with the scene's own background and texture: a non-square photo, which a pad-to-square processor
    pads back with flat mean-colour bands above and below. Questions stay true (nothing moves relative
    to anything else)."""
    size = scene.image_size
    width = int(round(aspect * size))
    base = np.empty((size, width, 3), dtype=np.int16)
    base[...] = scene.background
    if scene.texture == "noise":
        noise = np.random.default_rng(scene.texture_seed + 1).integers(
            -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(size, width, 1), dtype=np.int16
        )
        base += noise
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    canvas.paste(image, ((width - size) // 2, 0))
    return canvas


# ----------------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionRecord:
    """A question without its image (the image is looked up by ``scene_id``)."""

    sample_id: str
    scene_id: str
    question: str
    answer: str
    family: str
    subfamily: str | None = None


def _existence_question(shape: str, color: str | None) -> str:
    return f"Is there a {color + ' ' if color else ''}{shape} in the image?"


def _pope_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Return (question, answer, subfamily) with one yes and one no per POPE subfamily."""
    objects = list(scene.objects)
    present = {(o.shape, o.color) for o in objects}
    present_shapes = {o.shape for o in objects}
    present_colors = {o.color for o in objects}
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
    # Different positives per subfamily where the scene has enough objects.
    positives = rng.sample(objects, k=min(len(objects), len(POPE_SUBFAMILIES)))
    while len(positives) < len(POPE_SUBFAMILIES):
        positives.append(rng.choice(objects))

    out: list[tuple[str, str, str]] = []
    for subfamily, pos in zip(POPE_SUBFAMILIES, positives, strict=True):
        pair: list[tuple[str, str, str]]
        absent_shapes = [s for s in SHAPES if s not in present_shapes]
        if subfamily == "random" and absent_shapes and rng.random() < RANDOM_SHAPE_ONLY_PROB:
            neg_shape = rng.choice(absent_shapes)
            pair = [
                (_existence_question(pos.shape, None), YES, subfamily),
                (_existence_question(neg_shape, None), NO, subfamily),
            ]
        else:
            if subfamily == "random":
                neg = rng.choice(absent)
            elif subfamily == "popular":
                ranked = [sc for sc in object_popularity() if sc not in present]
                neg = rng.choice(ranked[:POPULAR_TOP_K])
            else:
                swaps = [(s, c) for s, c in absent if s in present_shapes and c in present_colors]
                shared = [(s, c) for s, c in absent if s in present_shapes or c in present_colors]
                neg = rng.choice(swaps or shared)
            pair = [
                (_existence_question(pos.shape, pos.color), YES, subfamily),
                (_existence_question(neg[0], neg[1]), NO, subfamily),
            ]
        rng.shuffle(pair)
        out.extend(pair)
    return out


def _relations(a: SceneObject, b: SceneObject, margin: float) -> list[str]:
    """Clear spatial relations of ``a`` with respect to ``b`` (bounding boxes separated by ``margin``)."""
    al, at, ar, ab = a.bbox
    bl, bt, br, bb = b.bbox
    rels = []
    if ar + margin <= bl:
        rels.append("left")
    if br + margin <= al:
        rels.append("right")
    if ab + margin <= bt:
        rels.append("above")
    if bb + margin <= at:
        rels.append("below")
    return rels


def scene_questions(scene: Scene, split: str = "custom") -> list[QuestionRecord]:
    """All questions of a scene, in a fixed family order (existence, color, shape, count, position)."""
    rng = _scene_rng(scene.seed, scene.index, "questions")
    objects = scene.objects
    qa: list[tuple[str, str, str, str | None]] = [
        (q, a, "existence", sub) for q, a, sub in _pope_pairs(scene, rng)
    ]

    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    unique_shapes = [o for o in objects if shape_counts[o.shape] == 1]
    if unique_shapes:
        obj = rng.choice(unique_shapes)
        qa.append((f"What color is the {obj.shape}?", obj.color, "color", None))
    unique_colors = [o for o in objects if color_counts[o.color] == 1]
    if unique_colors:
        obj = rng.choice(unique_colors)
        qa.append((f"What shape is the {obj.color} object?", obj.shape, "shape", None))

    absent_shapes = [s for s in SHAPES if s not in shape_counts]
    if absent_shapes and rng.random() < COUNT_ABSENT_PROB:
        shape = rng.choice(absent_shapes)
    else:
        shape = rng.choice(sorted(shape_counts, key=SHAPES.index))
    qa.append((f"How many {_PLURALS[shape]} are there?", str(shape_counts.get(shape, 0)), "count", None))

    margin = POSITION_MARGIN_FRAC * scene.image_size
    candidates = [
        (a, b, rel) for a in objects for b in objects if a is not b for rel in _relations(a, b, margin)
    ]
    if candidates:
        a, b, rel = rng.choice(candidates)
        answer = YES if rng.random() < 0.5 else NO
        asked = rel if answer == YES else _OPPOSITE[rel]  # the opposite of a clear relation is clearly false
        axis = "horizontal" if rel in ("left", "right") else "vertical"
        qa.append((f"Is the {a.name} {_RELATION_TEXT[asked]} the {b.name}?", answer, "position", axis))

    return [
        QuestionRecord(f"{scene.scene_id}-q{k:02d}", scene.scene_id, q, a, fam, sub)
        for k, (q, a, fam, sub) in enumerate(qa)
    ]


# ----------------------------------------------------------------------------------------------------------
# Samples and datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQASample:
    """One evaluation sample: an image, a question and its canonical single-word answer."""

    sample_id: str
    image: Image.Image
    question: str
    answer: str
    family: str
    subfamily: str | None
    scene_id: str
    vocabulary: tuple[str, ...]
    dataset: str
    split: str

    def prompt(self, hint: str | None = SHORT_ANSWER_HINT) -> str:
        """The question, optionally followed by an instruction to answer with one word."""
        return f"{self.question} {hint}" if hint else self.question


# How many rendered/loaded images a dataset keeps; samples of one scene are contiguous, so a few suffice.
_IMAGE_CACHE_SIZE = 8


@dataclass
class VQADataset:
    """A sequence of :class:`VQASample`; images are produced lazily by ``image_loader(scene_id)``."""

    name: str
    split: str
    records: list[QuestionRecord]
    image_loader: Callable[[str], Image.Image]
    vocabulary: tuple[str, ...]
    _cache: OrderedDict[str, Image.Image] = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def evaluation_only(self) -> bool:
        """True for test splits: use them to report results, never to train or tune."""
        return self.split == "test"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | slice) -> VQASample | VQADataset:
        if isinstance(index, slice):
            return self._subset(self.records[index])
        record = self.records[index]
        return VQASample(
            sample_id=record.sample_id,
            image=self.image(record.scene_id),
            question=record.question,
            answer=record.answer,
            family=record.family,
            subfamily=record.subfamily,
            scene_id=record.scene_id,
            vocabulary=self.vocabulary,
            dataset=self.name,
            split=self.split,
        )

    def __iter__(self) -> Iterator[VQASample]:
        for k in range(len(self.records)):
            yield self[k]  # type: ignore[misc]

    def image(self, scene_id: str) -> Image.Image:
        """The image of a scene (a fresh copy, so callers may modify it)."""
        cached = self._cache.get(scene_id)
        if cached is None:
            cached = self.image_loader(scene_id)
            self._cache[scene_id] = cached
            if len(self._cache) > _IMAGE_CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(scene_id)
        return cached.copy()

    def scene_ids(self) -> list[str]:
        """Distinct scene ids in order of first appearance."""
        return list(dict.fromkeys(r.scene_id for r in self.records))

    def families(self) -> list[str]:
        """Question families present, in order of first appearance."""
        return list(dict.fromkeys(r.family for r in self.records))

    def family_counts(self, by_subfamily: bool = False) -> dict[str, int]:
        """Number of samples per family (or per ``family/subfamily``)."""
        keys = (
            f"{r.family}/{r.subfamily}" if by_subfamily and r.subfamily else r.family for r in self.records
        )
        return dict(Counter(keys))

    def filter(self, family: str | None = None, subfamily: str | None = None) -> VQADataset:
        """Samples of one family and/or subfamily."""
        return self._subset(
            [
                r
                for r in self.records
                if (family is None or r.family == family) and (subfamily is None or r.subfamily == subfamily)
            ]
        )

    def _subset(self, records: list[QuestionRecord]) -> VQADataset:
        return VQADataset(self.name, self.split, records, self.image_loader, self.vocabulary)

    def save_images(self, directory: str | Path) -> dict[str, Path]:
        """Write each distinct image once as ``<scene_id>.png``; returns scene id -> path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for scene_id in self.scene_ids():
            path = out / f"{scene_id}.png"
            self.image(scene_id).save(path)
            paths[scene_id] = path
        return paths

    def to_jsonl(self, path: str | Path, image_dir: str | Path | None = None) -> Path:
        """Write one JSON object per sample; with ``image_dir`` also save the images and reference them.

        Image paths are stored relative to the JSONL file's folder when possible.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = self.save_images(image_dir) if image_dir is not None else {}
        with path.open("w", encoding="utf-8") as fh:
            for r in self.records:
                row: dict[str, object] = {
                    "sample_id": r.sample_id,
                    "dataset": self.name,
                    "split": self.split,
                    "scene_id": r.scene_id,
                    "question": r.question,
                    "answer": r.answer,
                    "family": r.family,
                    "subfamily": r.subfamily,
                }
                if r.scene_id in images:
                    img = images[r.scene_id]
                    try:
                        row["image"] = str(img.resolve().relative_to(path.parent.resolve()))
                    except ValueError:
                        row["image"] = str(img)
                fh.write(json.dumps(row) + "\n")
        return path


def make_split(
    split: str,
    n_scenes: int | None = None,
    seed: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    aspect: float = 1.0,
) -> VQADataset:
    """Generate the questions of ``n_scenes`` scenes of a split (default :data:`DEFAULT_N_SCENES`).

    ``seed`` overrides the split's fixed seed (:data:`SPLIT_SEEDS`). The ``test`` split is for reporting
    results only; tune on ``validation``. ``aspect`` > 1 renders every scene in a wider canvas
    (:func:`widen`; the data set is then named ``scenes-wide``), the same questions.
    """
    if isinstance(aspect, bool) or not isinstance(aspect, int | float) or not 1.0 <= aspect <= 4.0:
        raise ValueError(f"aspect must be a number in [1, 4] (width / height), got {aspect!r}")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; known splits: {sorted(SPLIT_SEEDS)}")
    seed = SPLIT_SEEDS[split] if seed is None else int(seed)
    n_scenes = DEFAULT_N_SCENES[split] if n_scenes is None else int(n_scenes)
    if n_scenes < 0:
        raise ValueError(f"n_scenes must be >= 0, got {n_scenes}")
    scenes = {}
    records: list[QuestionRecord] = []
    for index in range(n_scenes):
        scene = generate_scene(seed, index, image_size, split)
        scenes[scene.scene_id] = scene
        records.extend(scene_questions(scene, split))
    if aspect == 1.0:
        return VQADataset(
            "scenes", split, records, lambda scene_id: render_scene(scenes[scene_id]), SCENES_VOCABULARY
        )
    return VQADataset(
        "scenes-wide",
        split,
        records,
        lambda scene_id: widen(scenes[scene_id], render_scene(scenes[scene_id]), aspect),
        SCENES_VOCABULARY,
    )


# The non-square variant: 3:2, the shape of most photos (and of scikit-image's chelsea, 451 x 300).
WIDE_ASPECT = 1.5


def load_scenes(
    split: str,
    n: int | None = None,
    seed: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    aspect: float = 1.0,
) -> VQADataset:
    """The first ``n`` samples of a scenes split (all default scenes when ``n`` is None)."""
    if n is None:
        return make_split(split, seed=seed, image_size=image_size, aspect=aspect)
    # Every scene has at least EXISTENCE_PER_SCENE questions, so this many scenes always suffices.
    n_scenes = math.ceil(n / EXISTENCE_PER_SCENE)
    dataset = make_split(split, n_scenes=n_scenes, seed=seed, image_size=image_size, aspect=aspect)
    return dataset[:n]  # type: ignore[return-value]


def load_wide_scenes(
    split: str, n: int | None = None, seed: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> VQADataset:
    """The scenes of a split rendered at 3:2 (:data:`WIDE_ASPECT`): same questions, non-square images."""
    return load_scenes(split, n, seed, image_size, aspect=WIDE_ASPECT)


# ----------------------------------------------------------------------------------------------------------
# Answer normalisation and scoring
# ----------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Words recognised as answers of each kind (a superset of both datasets' vocabularies).
_KIND_WORDS: dict[str, tuple[str, ...]] = {
    "yes_no": (YES, NO),
    "count": tuple(str(i) for i in range(len(_NUMBER_WORDS))),
    "color": (
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "gray",
        "teal",
        "black",
        "brown",
        "white",
        "pink",
        "cyan",
    ),
    "shape": ("circle", "square", "triangle", "star", "cross", "hexagon", "rectangle", "pentagon", "diamond"),
    "position": ("left", "right", "above", "below"),
}
# token -> candidate canonical answers, most preferred first; the first one in the vocabulary wins.
_ALIASES: dict[str, tuple[str, ...]] = {
    "yeah": (YES,),
    "yep": (YES,),
    "true": (YES,),
    "correct": (YES,),
    "nope": (NO,),
    "false": (NO,),
    "incorrect": (NO,),
    "grey": ("gray",),
    "violet": ("purple",),
    "turquoise": ("teal",),
    "round": ("circle",),
    "circular": ("circle",),
    "triangular": ("triangle",),
    "hexagonal": ("hexagon",),
    "rectangular": ("rectangle", "square"),
    "plus": ("cross",),
    # A square is a rectangle: accept either name for the other when only one is in the vocabulary.
    "square": ("square", "rectangle"),
    "rectangle": ("rectangle", "square"),
    **{word: (str(i),) for i, word in enumerate(_NUMBER_WORDS)},
}
# Fallback aliases, used only when no token matched directly: "no circles" / "none" -> "0" for counts.
_FALLBACK_ALIASES: dict[str, tuple[str, ...]] = {"no": ("0",), "none": ("0", NO), "zero": ("0",)}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _singular(token: str) -> str:
    for shape in _KIND_WORDS["shape"]:
        if token in (shape + "s", shape + "es"):
            return shape
    return token


def answer_kind(answer: str) -> str | None:
    """The kind of a canonical answer: ``yes_no``, ``count``, ``color``, ``shape``, ``position`` or None."""
    for kind, words in _KIND_WORDS.items():
        if answer in words:
            return kind
    return None


def _default_vocabulary() -> tuple[str, ...]:
    return tuple(w for words in _KIND_WORDS.values() for w in words)


def normalize_answer(text: str, vocabulary: Sequence[str] | None = None) -> str:
    """Map a model's free-text answer to a canonical answer word.

    Lowercases, drops punctuation, maps number words to digits ("two" -> "2"), plurals to singular and a few
    synonyms ("grey" -> "gray"), then returns the first word found in ``vocabulary`` (default: every known
    answer word). If nothing matches, the cleaned text is returned (it scores as wrong).
    """
    vocab = tuple(vocabulary) if vocabulary is not None else _default_vocabulary()
    vocab_set = set(vocab)
    cleaned = " ".join(_PUNCTUATION.sub(" ", text.lower().replace("_", " ")).split())
    if cleaned in vocab_set:
        return cleaned
    tokens = [_singular(t) for t in cleaned.split()]
    for aliases in (_ALIASES, _FALLBACK_ALIASES):
        for token in tokens:
            if aliases is _ALIASES and token in vocab_set:
                return token
            for candidate in aliases.get(token, ()):
                if candidate in vocab_set:
                    return candidate
    return cleaned


def score(pred: str, gold: str, vocabulary: Sequence[str] | None = None) -> float:
    """1.0 if the prediction, normalised against answers of the gold answer's kind, equals ``gold``.

    Restricting to the gold's kind lets "The triangle is red." score for a colour question and "There are
    no stars" for a count of zero, while a yes/no question still needs a yes or a no.
    """
    kind = answer_kind(gold)
    candidates: Sequence[str] | None = vocabulary
    if kind is not None:
        allowed = set(vocabulary) if vocabulary is not None else None
        candidates = [w for w in _KIND_WORDS[kind] if allowed is None or w in allowed] or [gold]
    return 1.0 if normalize_answer(pred, candidates) == gold else 0.0
