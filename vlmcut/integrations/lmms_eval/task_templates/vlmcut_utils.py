"""Task functions of the lmms-eval tasks that `vlmcut lmms export` writes (copied next to their YAML)."""

from __future__ import annotations

from typing import Any

from vlmcut.eval.scenes import normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    # The exact text `vlmcut eval` asks (VQASample.prompt(): the question and the one-word hint).
    return doc["prompt"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    # vlmcut.eval.runner.score_answers: exact match after normalising both to the data set's vocabulary.
    vocabulary = list(doc["vocabulary"])
    pred = normalize_answer(results[0], vocabulary)
    return {"acc": float(pred == normalize_answer(doc["answer"], vocabulary))}
