"""`vlmcut demo` and `vlmcut eval` on the real small LLaVA (skipped without the zoo extra)."""

from __future__ import annotations

import json

from zoo_gate import require_zoo

require_zoo()

from vlmcut.cli import main  # noqa: E402


def test_demo_prints_both_runs_and_saves_pictures(tmp_path, capsys) -> None:
    from vlmcut.demo import run_demo

    run_demo(tmp_path, keep=64, n_scenes=1, max_new_tokens=2)
    out = capsys.readouterr().out
    assert out.count("[256 tokens]") == out.count("[ 64 tokens]") == 4  # 1 scene + 3 photos
    assert len(list(tmp_path.glob("*-flowcut64.png"))) == 4


def test_eval_cli_writes_reports(tmp_path, capsys) -> None:
    code = main(
        [
            "eval",
            "--data",
            "scenes",
            "--split",
            "validation",
            "--n",
            "4",
            "--method",
            "grid",
            "--keep",
            "16",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "eval-grid-16.json").read_text())
    assert [r["method"] for r in rows] == ["unpruned", "grid"] and rows[1]["keep"] == 16
    assert 0.0 <= rows[1]["agreement"] <= 1.0
    assert "| scenes | grid | 16 |" in capsys.readouterr().out
