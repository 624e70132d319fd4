"""The evaluation runner: scoring, retention, agreement, reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import tiny

from vlmcut.eval.datasets import load_dataset
from vlmcut.eval.runner import evaluate, markdown_table, retention, score_answers, sweep, write_reports


def _sample(family: str, answer: str):
    return SimpleNamespace(family=family, answer=answer, vocabulary=None)


def test_scoring_and_retention_by_hand() -> None:
    samples = [
        _sample("color", "red"),
        _sample("color", "blue"),
        _sample("count", "2"),
        _sample("count", "3"),
    ]
    acc, fam = score_answers(samples, ["red", "green", "2", "2"])
    assert acc == 0.5 and fam == {"color": 0.5, "count": 0.5}
    assert retention({"color": 0.25, "count": 0.5}, {"color": 0.5, "count": 0.5}) == pytest.approx(0.75)
    assert retention({"color": 0.4}, {"color": 0.0, "count": 0.8}) != retention(
        {"color": 0.4}, {"count": 0.8}
    )


def test_keep_all_reproduces_the_unpruned_answers_and_reports(tmp_path) -> None:
    model = tiny.llava(seed=12)
    proc = tiny.processor()
    samples = list(load_dataset("scenes", "validation", n=6, image_size=tiny.IMAGE))
    ref = evaluate(model, proc, samples, "scenes", batch_size=4, progress=False)
    same = evaluate(
        model, proc, samples, "scenes", "flowcut", tiny.GRID**2, ref, batch_size=4, progress=False
    )
    assert same.answers == ref.answers
    assert same.agreement == 1.0
    assert same.accuracy == ref.accuracy
    deep = tiny.llava(seed=12, text_layers=4)
    results = sweep(
        deep,
        proc,
        {"scenes": samples},
        ["flowcut", "grid", "pdrop"],
        keeps=(16, 4),
        batch_size=6,
        progress=False,
    )
    # PDrop cannot average 4 visual tokens when its unpruned first layers alone average 16: skipped
    assert [(r.method, r.keep) for r in results] == [
        ("unpruned", None),
        ("flowcut", 16),
        ("flowcut", 4),
        ("grid", 16),
        ("grid", 4),
        ("pdrop", 16),
    ]
    assert all(0.0 <= r.agreement <= 1.0 for r in results)
    paths = write_reports(results, tmp_path, "sweep")
    table = paths["md"].read_text()
    assert "| scenes | grid | 4 |" in table
    pivot = table.split("\n\n| data |")[0]
    assert "| method | 16 tokens | 4 tokens |" in pivot
    assert [
        line.split(" | ")[0] for line in pivot.splitlines() if line.startswith("| ") and "---" not in line
    ] == [
        "| method",
        "| flowcut",
        "| grid",
        "| pdrop",
    ]
    pdrop_row = next(line for line in pivot.splitlines() if line.startswith("| pdrop"))
    assert pdrop_row.endswith("| n/a |")  # pdrop at 4 tokens
    data = json.loads(paths["json"].read_text())
    assert len(data) == 6 and len(data[0]["answers"]) == 6
    assert paths["png"].stat().st_size > 1000
    assert markdown_table(results).startswith("| data | method | tokens |")


def test_evaluate_rejects_half_a_pruning_spec() -> None:
    with pytest.raises(ValueError, match="both method and keep"):
        evaluate(None, None, [], "x", method="flowcut")
