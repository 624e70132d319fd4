"""Module-level gate for tests that need the real small LLaVA (vlmcut.zoo).

Without the zoo's packages they are skipped, with the command that installs them. CI sets
``VLMCUT_REQUIRE_ZOO=1``: there a missing package is an error, so these tests can never be skipped silently.
"""

from __future__ import annotations

import os

import pytest

from vlmcut.zoo import missing_requirements


def require_zoo() -> None:
    missing = missing_requirements()
    if missing is None:
        return
    if os.environ.get("VLMCUT_REQUIRE_ZOO"):
        raise RuntimeError(f"VLMCUT_REQUIRE_ZOO is set but {missing}")
    pytest.skip(missing, allow_module_level=True)
