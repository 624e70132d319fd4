"""The easy-VQA data set (PyPI ``easy-vqa``), read offline from the files the package ships.

easy-VQA has 64x64 images with one shape (circle, rectangle, triangle) in one of eight colours, 4000 train
images / 38575 questions and 1000 test images / 9673 questions, and 13 answers. Questions come from fixed
templates, so the family is derived from the question text:

* ``existence`` (yes/no): subfamily ``shape`` ("is there a circle?") or ``color`` ("is a red shape present?"),
  suffixed ``_negated`` for the negated templates ("is there not a circle?", "is no red shape present?");
* ``color``: "what color is the circle?", subfamily ``named_shape`` or ``generic`` ("... the shape?");
* ``shape``: "what is the red shape?" (subfamily ``named_color``) or "what shape is present?" (``generic``).

Splits: ``train`` and ``validation`` partition the upstream train set by image (images whose id is a
multiple of :data:`VALIDATION_IMAGE_MODULUS` form ``validation``), so tuning never sees a training image's
questions; ``test`` is the upstream test set and is **for evaluation only**.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from PIL import Image

from vlmcut.eval.scenes import QuestionRecord, VQADataset

__all__ = [
    "EASY_VQA_SPLITS",
    "RESAMPLE_MODES",
    "VALIDATION_IMAGE_MODULUS",
    "classify_question",
    "easy_vqa_vocabulary",
    "load_easy_vqa",
]

EASY_VQA_SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Upstream train images with ``image_id % 10 == 0`` (400 of 4000) are held out as the validation split.
VALIDATION_IMAGE_MODULUS = 10
NATIVE_IMAGE_SIZE = 64
RESAMPLE_MODES: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}

EASY_SHAPES = ("circle", "rectangle", "triangle")
EASY_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPE_RE = re.compile(rf"\b({'|'.join(EASY_SHAPES)})\b")
COLOR_RE = re.compile(rf"\b({'|'.join(EASY_COLORS)})\b")
_NEGATION_RE = re.compile(r"\b(not|no)\b")
_COLOR_QUESTION_RE = re.compile(r"^what (color is|is the color of)\b")
_SHAPE_QUESTION_RE = re.compile(r"^what (shape|is the \w+ shape)\b")


def _easy_vqa():  # noqa: ANN202 - the module type is not worth importing
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("easy-VQA needs the 'easy-vqa' package: pip install 'vlmcut[eval]'") from exc
    return easy_vqa


def easy_vqa_vocabulary() -> tuple[str, ...]:
    """The 13 canonical answers, in the package's ``answers.txt`` order."""
    return tuple(_easy_vqa().get_answers())


def classify_question(question: str) -> tuple[str, str]:
    """``(family, subfamily)`` of an easy-VQA question, from its template."""
    text = question.strip().lower()
    if _COLOR_QUESTION_RE.match(text):
        return "color", "named_shape" if SHAPE_RE.search(text) else "generic"
    if _SHAPE_QUESTION_RE.match(text):
        return "shape", "named_color" if COLOR_RE.search(text) else "generic"
    if text.startswith(("is ", "does ")):
        kind = "color" if COLOR_RE.search(text) else "shape"
        return "existence", f"{kind}_negated" if _NEGATION_RE.search(text) else kind
    raise ValueError(f"unrecognised easy-VQA question template: {question!r}")


def load_easy_vqa(
    split: str,
    n: int | None = None,
    seed: int | None = None,
    image_size: int | None = None,
    resample: str = "nearest",
) -> VQADataset:
    """Load an easy-VQA split as :class:`VQADataset` (no network access; the package ships the data).

    The ``test`` split is for evaluation only: never train, tune or select hyperparameters on it; use
    ``validation`` for that.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        n: keep at most ``n`` questions: the first ``n`` in upstream order, or a random subset (kept in
            upstream order) when ``seed`` is given.
        seed: seed of that random subset.
        image_size: upscale the 64x64 images to ``image_size`` squared (e.g. 224); None keeps 64x64.
        resample: ``"nearest"`` (default: keeps the exact flat colours, edges stay blocky; 224/64 = 3.5 so
            source pixels become 3 or 4 pixels wide) or ``"bicubic"`` (smooth edges, but blends colours at
            edges and can ring slightly).
    """
    if split not in EASY_VQA_SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; known splits: {list(EASY_VQA_SPLITS)}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"unknown resample mode {resample!r}; known: {list(RESAMPLE_MODES)}")
    ev = _easy_vqa()
    upstream = "test" if split == "test" else "train"
    if upstream == "test":
        texts, answers, image_ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    else:
        texts, answers, image_ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()

    def keep(image_id: int) -> bool:
        if split == "test":
            return True
        held_out = image_id % VALIDATION_IMAGE_MODULUS == 0
        return held_out if split == "validation" else not held_out

    records = []
    for k, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True)):
        if not keep(image_id):
            continue
        family, subfamily = classify_question(text)
        scene_id = f"easy-vqa-{upstream}-{image_id:05d}"
        sample_id = f"easy-vqa-{upstream}-q{k:05d}"
        records.append(QuestionRecord(sample_id, scene_id, text, answer, family, subfamily))

    if n is not None and n < len(records):
        if seed is None:
            records = records[:n]
        else:
            chosen = sorted(random.Random(seed).sample(range(len(records)), n))
            records = [records[i] for i in chosen]

    prefix = f"easy-vqa-{upstream}-"
    mode = RESAMPLE_MODES[resample]

    def load_image(scene_id: str) -> Image.Image:
        path = Path(paths[int(scene_id[len(prefix) :])])
        with Image.open(path) as im:
            image = im.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), mode)
        return image

    return VQADataset("easy-vqa", split, records, load_image, easy_vqa_vocabulary())
