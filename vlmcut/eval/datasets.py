"""Registry of the VQA benchmark data sets: ``load_dataset(name, split, n=None, seed=None)``."""

from __future__ import annotations

from collections.abc import Callable

from vlmcut.eval.easyvqa import load_easy_vqa
from vlmcut.eval.scenes import VQADataset, load_scenes, load_wide_scenes

__all__ = ["DATASETS", "dataset_names", "load_dataset"]

# name -> loader(split, n=None, seed=None, **options)
DATASETS: dict[str, Callable[..., VQADataset]] = {
    "scenes": load_scenes,
    "scenes-wide": load_wide_scenes,  # the same questions, images 3:2 (padded to square by the processor)
    "easy-vqa": load_easy_vqa,
}
# Spellings accepted for convenience, mapped to the canonical names above.
_ALIASES: dict[str, str] = {"easy_vqa": "easy-vqa", "easyvqa": "easy-vqa", "scenes_wide": "scenes-wide"}


def dataset_names() -> list[str]:
    """Canonical names of the known data sets."""
    return sorted(DATASETS)


def load_dataset(
    name: str, split: str, n: int | None = None, seed: int | None = None, **options: object
) -> VQADataset:
    """Load ``n`` samples (all when None) of a data set's split.

    ``seed`` means, per data set: ``scenes`` - the generation seed, replacing the split's fixed seed;
    ``easy-vqa`` - the seed of a random subset of ``n`` questions (None: the first ``n``). Extra keyword
    options go to the loader (``image_size`` for both; ``resample`` for easy-vqa). ``test`` splits are for
    evaluation only.
    """
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return DATASETS[key](split, n=n, seed=seed, **options)
