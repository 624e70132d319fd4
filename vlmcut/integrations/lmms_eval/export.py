"""vlmcut's VQA data sets as local lmms-eval tasks, and the small zoo LLaVA as a model directory.

:func:`export_tasks` writes, per data set, ``vlmcut_<name>.parquet`` (question, prompt, answer, family,
vocabulary, choices and the image), the generation task ``vlmcut_<name>.yaml``, its multiple-choice variant
``vlmcut_<name>_mc.yaml`` and the task functions ``vlmcut_utils.py``; run them with
``--include_path DIR --tasks vlmcut_scenes``. Needs the ``datasets`` package (an lmms-eval dependency), not
lmms-eval itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcut.eval.datasets import load_dataset
from vlmcut.eval.scenes import answer_kind

TEMPLATES = Path(__file__).parent / "task_templates"
TASK_PREFIX = "vlmcut_"  # lmms-eval's built-in tasks win over local ones of the same name


@dataclass
class ExportedTask:
    """One exported data set: its parquet file, its task names and YAML files."""

    dataset: str
    parquet: Path
    tasks: dict[str, Path]  # task name -> YAML
    n: int


def task_name(dataset: str, multiple_choice: bool = False) -> str:
    """``vlmcut_scenes``, ``vlmcut_easy_vqa``, ``vlmcut_scenes_mc``..."""
    base = TASK_PREFIX + dataset.strip().lower().replace("-", "_")
    return base + "_mc" if multiple_choice else base


def choices_for(answer: str, vocabulary: list[str]) -> list[str]:
    """The multiple-choice options of a question: the vocabulary's answers of the gold answer's kind."""
    kind = answer_kind(answer)
    options = [w for w in vocabulary if kind is not None and answer_kind(w) == kind]
    return options if answer in options else [*options, answer]


def _rows(samples: list[Any]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "id",
            "question",
            "prompt",
            "answer",
            "family",
            "subfamily",
            "vocabulary",
            "choices",
            "label",
        )
    }
    cols["image"] = []
    for s in samples:
        vocabulary = list(s.vocabulary)
        choices = choices_for(s.answer, vocabulary)
        cols["id"].append(s.sample_id)
        cols["question"].append(s.question)
        cols["prompt"].append(s.prompt())
        cols["answer"].append(s.answer)
        cols["family"].append(s.family)
        cols["subfamily"].append(s.subfamily or "")
        cols["vocabulary"].append(vocabulary)
        cols["choices"].append(choices)
        cols["label"].append(choices.index(s.answer))
        cols["image"].append(s.image)
    return cols


def export_tasks(
    datasets: list[str], split: str, n: int | None, out_dir: str | Path, seed: int | None = None
) -> list[ExportedTask]:
    """Write each data set's ``split`` (the same first ``n`` questions ``vlmcut eval --n`` asks) as lmms-eval
    tasks under ``out_dir``; returns what was written."""
    try:
        from datasets import Dataset, Features, Image, Sequence, Value
    except ImportError as err:
        raise ImportError(
            "exporting lmms-eval tasks needs the 'datasets' package (an lmms-eval dependency): "
            "pip install datasets"
        ) from err
    if not datasets:
        raise ValueError("give at least one data set: scenes, easy-vqa")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / "vlmcut_utils.py", out / "vlmcut_utils.py")
    features = Features(
        {
            **{k: Value("string") for k in ("id", "question", "prompt", "answer", "family", "subfamily")},
            "vocabulary": Sequence(Value("string")),
            "choices": Sequence(Value("string")),
            "label": Value("int64"),
            "image": Image(),
        }
    )
    written = []
    for name in datasets:
        samples = list(load_dataset(name, split, n=n, seed=seed))
        if not samples:
            raise ValueError(f"dataset {name!r} split {split!r} has no samples to export")
        dataset = samples[0].dataset
        parquet = (out / f"{task_name(dataset)}.parquet").resolve()
        Dataset.from_dict(_rows(samples), features=features).to_parquet(str(parquet))
        tasks = {}
        for mc, template in ((False, "generate.yaml"), (True, "multiple_choice.yaml")):
            task = task_name(dataset, mc)
            text = (TEMPLATES / template).read_text()
            text = text.replace("__TASK__", task).replace("__DATA__", str(parquet))
            (out / f"{task}.yaml").write_text(text)
            tasks[task] = out / f"{task}.yaml"
        written.append(ExportedTask(dataset, parquet, tasks, len(samples)))
    return written


def export_zoo_model(out_dir: str | Path) -> Path:
    """Save the small zoo LLaVA that ``vlmcut eval`` uses by default (with the shipped trained projector) as
    a Hugging Face model directory, for ``--model_args pretrained=DIR``."""
    from vlmcut.zoo import TRAINED_WEIGHTS, load_small_llava

    if not TRAINED_WEIGHTS.is_file():
        raise FileNotFoundError(f"the zoo's trained projector {TRAINED_WEIGHTS} is missing; reinstall vlmcut")
    model, processor = load_small_llava(projector_path=TRAINED_WEIGHTS)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; pass a directory path")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
