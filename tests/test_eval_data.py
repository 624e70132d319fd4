"""Tests of the VQA benchmark data: synthetic scenes, easy-VQA loading and the dataset registry."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from vlmcut.eval.datasets import dataset_names, load_dataset
from vlmcut.eval.scenes import (
    COLORS,
    DEFAULT_N_SCENES,
    FAMILIES,
    MAX_OBJECTS,
    MAX_OCCLUDED_FRACTION,
    MIN_OBJECTS,
    POPE_SUBFAMILIES,
    SCENES_VOCABULARY,
    SHAPES,
    SPLIT_SEEDS,
    VQASample,
    _shape_polygon,
    generate_scene,
    make_split,
    normalize_answer,
    object_popularity,
    render_scene,
    scene_questions,
    score,
)

N_SCENES = 60  # enough for every family and a meaningful balance check, small enough to stay fast
EXISTENCE_RE = re.compile(r"^Is there a (?:(\w+) )?(\w+) in the image\?$")
POSITION_RE = re.compile(r"^Is the (\w+ \w+) (to the left of|to the right of|above|below) the (\w+ \w+)\?$")


@pytest.fixture(scope="module")
def test_split():
    return make_split("test", n_scenes=N_SCENES)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(SPLIT_SEEDS["test"], i, split="test") for i in range(N_SCENES)]


# ----------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_questions_and_images():
    a, b = make_split("validation", n_scenes=4), make_split("validation", n_scenes=4)
    assert a.records == b.records
    for scene_id in a.scene_ids():
        assert a.image(scene_id).tobytes() == b.image(scene_id).tobytes()


def test_different_seeds_and_splits_differ():
    base = make_split("test", n_scenes=4)
    other = make_split("test", n_scenes=4, seed=SPLIT_SEEDS["test"] + 1)
    train = make_split("train", n_scenes=4)
    assert [r.question for r in base.records] != [r.question for r in other.records]
    assert base.image(base.scene_ids()[0]).tobytes() != other.image(other.scene_ids()[0]).tobytes()
    assert base.image(base.scene_ids()[0]).tobytes() != train.image(train.scene_ids()[0]).tobytes()
    assert len(set(SPLIT_SEEDS.values())) == len(SPLIT_SEEDS)


def test_smaller_split_is_a_prefix():
    small, large = make_split("test", n_scenes=3), make_split("test", n_scenes=6)
    assert large.records[: len(small)] == small.records


# ----------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------


def test_scene_layout_constraints(scenes):
    for scene in scenes:
        assert MIN_OBJECTS <= len(scene.objects) <= MAX_OBJECTS
        pairs = [(o.shape, o.color) for o in scene.objects]
        assert len(set(pairs)) == len(pairs), "an object must be uniquely named by colour + shape"
        for obj in scene.objects:
            assert obj.visible_fraction >= 1.0 - MAX_OCCLUDED_FRACTION
            left, top, right, bottom = obj.bbox
            assert 0 <= left and right <= scene.image_size and 0 <= top and bottom <= scene.image_size


def test_object_centres_have_object_colour(scenes):
    for scene in scenes[:20]:
        pixels = np.asarray(render_scene(scene)).astype(int)
        for obj in scene.objects:
            centre = pixels[int(round(obj.y)), int(round(obj.x))]
            assert np.abs(centre - np.array(COLORS[obj.color])).max() == 0, (scene.scene_id, obj)


def _area(obj) -> float:
    """Exact area of an object's shape (shoelace formula on its polygon; pi r^2 for the circle)."""
    points = _shape_polygon(obj.shape, obj.x, obj.y, obj.radius)
    if points is None:
        return float(np.pi * obj.radius**2)
    xs, ys = np.array(points).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def test_each_colour_covers_its_objects_area(scenes):
    # Independent of the centre check: the pixels of each colour match the visible area of its objects
    # (anti-aliased edge pixels are blends, hence the lower tolerance).
    for scene in scenes[:10]:
        pixels = np.asarray(render_scene(scene)).astype(int)
        for color, rgb in COLORS.items():
            n_pixels = int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 2).sum())
            expected = sum(_area(o) * o.visible_fraction for o in scene.objects if o.color == color)
            assert 0.7 * expected <= n_pixels <= 1.05 * expected + 1, (scene.scene_id, color)


def test_answers_match_ground_truth(scenes):
    for scene in scenes:
        for rec in scene_questions(scene, "test"):
            if rec.family == "existence":
                color, shape = EXISTENCE_RE.match(rec.question).groups()
                assert rec.answer == ("yes" if scene.has(shape, color) else "no"), rec
            elif rec.family == "count":
                plural = re.match(r"^How many (\w+) are there\?$", rec.question).group(1)
                shape = next(s for s in SHAPES if plural in (s + "s", s + "es"))
                assert rec.answer == str(scene.count(shape))
            elif rec.family == "color":
                shape = re.match(r"^What color is the (\w+)\?$", rec.question).group(1)
                matches = [o for o in scene.objects if o.shape == shape]
                assert len(matches) == 1 and matches[0].color == rec.answer
            elif rec.family == "shape":
                color = re.match(r"^What shape is the (\w+) object\?$", rec.question).group(1)
                matches = [o for o in scene.objects if o.color == color]
                assert len(matches) == 1 and matches[0].shape == rec.answer
            elif rec.family == "position":
                a, rel, b = POSITION_RE.match(rec.question).groups()
                oa = next(o for o in scene.objects if o.name == a)
                ob = next(o for o in scene.objects if o.name == b)
                truth = {
                    "to the left of": oa.x < ob.x,
                    "to the right of": oa.x > ob.x,
                    "above": oa.y < ob.y,
                    "below": oa.y > ob.y,
                }[rel]
                assert rec.answer == ("yes" if truth else "no")


def test_popularity_matches_empirical_frequency():
    scenes = [generate_scene(SPLIT_SEEDS["train"], i) for i in range(300)]
    counts = Counter((o.shape, o.color) for scene in scenes for o in scene.objects)
    empirical_top = {sc for sc, _ in counts.most_common(5)}
    assert object_popularity()[0] in empirical_top


# ----------------------------------------------------------------------------------------------------------
# Families, balance, vocabulary
# ----------------------------------------------------------------------------------------------------------


def test_pope_subfamilies_are_balanced(test_split):
    for sub in POPE_SUBFAMILIES:
        answers = [r.answer for r in test_split.records if r.family == "existence" and r.subfamily == sub]
        assert len(answers) == 2 * N_SCENES
        assert answers.count("yes") == answers.count("no")


def test_position_is_roughly_balanced(test_split):
    answers = [r.answer for r in test_split.records if r.family == "position"]
    assert len(answers) > N_SCENES // 2
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_every_family_appears_and_answers_in_vocabulary(test_split):
    assert set(test_split.families()) == set(FAMILIES)
    assert set(test_split.family_counts()) == set(FAMILIES)
    assert {r.answer for r in test_split.records} <= set(SCENES_VOCABULARY)
    assert len({r.sample_id for r in test_split.records}) == len(test_split)


def test_dataset_protocol(test_split, tmp_path):
    sample = test_split[0]
    assert isinstance(sample, VQASample)
    assert sample.image.size == (224, 224) and sample.image.mode == "RGB"
    assert sample.vocabulary == SCENES_VOCABULARY and sample.dataset == "scenes" and sample.split == "test"
    assert sample.prompt().startswith(sample.question)
    assert test_split.evaluation_only
    assert sum(1 for _ in test_split[:7]) == 7
    counts = test_split.filter(family="existence", subfamily="popular").family_counts(by_subfamily=True)
    assert counts == {"existence/popular": 2 * N_SCENES}

    small = test_split[:12]
    path = small.to_jsonl(tmp_path / "data.jsonl", image_dir=tmp_path / "images")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["question"] == sample.question
    assert (tmp_path / rows[0]["image"]).is_file()


def test_image_size_is_configurable():
    ds = make_split("validation", n_scenes=2, image_size=96)
    assert ds[0].image.size == (96, 96)


def test_default_split_sizes():
    assert DEFAULT_N_SCENES["test"] > 0
    with pytest.raises(ValueError, match="known splits"):
        make_split("dev")


# ----------------------------------------------------------------------------------------------------------
# Answer normalisation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("  NO!", "no"),
        ("two", "2"),
        ("2.", "2"),
        ("There are three circles.", "3"),
        ("Red", "red"),
        ("It is a star.", "star"),
        ("Crosses", "cross"),
        ("grey", "gray"),
        ("Hexagonal", "hexagon"),
        ("I am not sure", "i am not sure"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_respects_vocabulary():
    assert normalize_answer("square", ["rectangle", "circle"]) == "rectangle"
    assert normalize_answer("none", ["0", "1", "2"]) == "0"


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("Yes, there is.", "yes", 1.0),
        ("There is a red circle.", "yes", 0.0),
        ("No, there is no red circle.", "no", 1.0),
        ("The triangle is red.", "red", 1.0),
        ("The triangle is red.", "blue", 0.0),
        ("Two", "2", 1.0),
        ("There are no stars.", "0", 1.0),
        ("No, there are 2.", "2", 1.0),
        ("circles", "circle", 1.0),
    ],
)
def test_score(pred, gold, expected):
    assert score(pred, gold) == expected


# ----------------------------------------------------------------------------------------------------------
# easy-VQA and the registry
# ----------------------------------------------------------------------------------------------------------


def test_easy_vqa_test_split():
    pytest.importorskip("easy_vqa")
    ds = load_dataset("easy-vqa", "test")
    assert len(ds) == 9673 and len(ds.scene_ids()) == 1000
    assert ds.evaluation_only
    assert set(ds.families()) == {"existence", "color", "shape"}
    assert len(ds.vocabulary) == 13
    counts = ds.family_counts()
    assert counts["existence"] == 7136  # the yes/no count stated in easy-vqa's README
    shapes = {"circle", "rectangle", "triangle"}
    colors = set(ds.vocabulary) - shapes - {"yes", "no"}
    for rec in ds.records:
        expected = {"existence": {"yes", "no"}, "color": colors, "shape": shapes}[rec.family]
        assert rec.answer in expected, rec
    sample = ds[0]
    assert sample.image.size == (64, 64) and sample.answer in sample.vocabulary


def test_easy_vqa_train_validation_partition_and_upscale():
    pytest.importorskip("easy_vqa")
    train, val = load_dataset("easy-vqa", "train"), load_dataset("easy-vqa", "validation")
    assert len(train) + len(val) == 38575
    assert not set(train.scene_ids()) & set(val.scene_ids())
    assert not train.evaluation_only and not val.evaluation_only
    sub = load_dataset("easy_vqa", "test", n=20, seed=0, image_size=224)
    assert len(sub) == 20 and sub[0].image.size == (224, 224)
    assert sub.records == load_dataset("easy-vqa", "test", n=20, seed=0).records
    # Nearest-neighbour upscaling only replicates pixels: no new colours appear.
    native = load_dataset("easy-vqa", "test", n=20, seed=0)[0].image
    assert native.size == (64, 64)
    colors = {tuple(p) for p in np.asarray(native).reshape(-1, 3)}
    assert {tuple(p) for p in np.asarray(sub[0].image).reshape(-1, 3)} == colors


def test_registry():
    assert dataset_names() == ["easy-vqa", "scenes", "scenes-wide"]
    ds = load_dataset("scenes", "validation", n=15)
    assert len(ds) == 15 and ds.name == "scenes"
    with pytest.raises(ValueError, match="easy-vqa, scenes, scenes-wide"):
        load_dataset("coco", "test")
