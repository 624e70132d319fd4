"""The built wheel holds everything vlmcut needs at run time, under its own name."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("wheel") is None:
        pytest.skip("building the wheel needs setuptools and wheel (the dev extra)")
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    names = tracked.stdout.split() if tracked.returncode == 0 else []
    if not names:  # not a git checkout (an sdist): copy the package and the project files
        names = [str(p.relative_to(ROOT)) for p in (ROOT / "vlmcut").rglob("*") if p.is_file()]
        names += ["pyproject.toml", "README.md"]
    for name in names:
        if name.startswith(("vlmcut/", "pyproject.toml", "README.md")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        ".",
    ]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=600)
    (built,) = out.glob("vlmcut-*.whl")
    return zipfile.ZipFile(built)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_wheel_ships_every_module_and_data_file(wheel: zipfile.ZipFile) -> None:
    inside = set(wheel.namelist())
    package = [p for p in (ROOT / "vlmcut").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    expected = {str(p.relative_to(ROOT)) for p in package if p.suffix in {".py", ".safetensors", ".typed"}}
    assert "vlmcut/zoo/projector.safetensors" in expected and "vlmcut/py.typed" in expected
    missing = sorted(expected - inside)
    assert not missing, f"the wheel lacks {missing}; list them in [tool.setuptools.package-data]"
    # the trained weights byte for byte
    weights = wheel.read("vlmcut/zoo/projector.safetensors")
    assert _sha(weights) == _sha((ROOT / "vlmcut/zoo/projector.safetensors").read_bytes())
    # nothing but the package (no tests, docs or a top-level `flowcut` that would clash with the release)
    tops = {n.split("/")[0] for n in inside}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vlmcut"}


def test_wheel_metadata_names_vlmcut_its_cli_and_the_tested_range(wheel: zipfile.ZipFile) -> None:
    from vlmcut.compat import TESTED_TRANSFORMERS

    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(info).decode()
    assert "\nName: vlmcut\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: transformers")]
    assert len(requires) == 1 and all(bound in requires[0] for bound in TESTED_TRANSFORMERS), requires
    entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "vlmcut = vlmcut.cli:main" in entry_points


def test_tested_range_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmcut import compat
    from vlmcut.bench.table5 import check_transformers

    for version, inside in (((5, 17, 0), False), ((5, 19, 0), True), ((5, 24, 9), True), ((5, 25, 0), False)):
        monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", version)
        assert (compat.outside_tested_range() is None) is inside, version
        assert (check_transformers() is None) is inside
    assert "--any-transformers" in check_transformers()
