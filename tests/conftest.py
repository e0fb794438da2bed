"""Shared pytest fixtures. Each helper section is a clearly marked block; add new ones at the end."""

from __future__ import annotations

import pytest


# ---- MiniWoB++ / Chromium (tests/test_miniwob.py) ------------------------------------------------
@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium binary. Missing -> the test FAILS with the install line (CI installs it)."""
    from cua_kit.envs.base import EnvError
    from cua_kit.envs.miniwob import resolve_chromium

    try:
        return resolve_chromium()
    except EnvError as exc:
        pytest.fail(str(exc))
# ---- end MiniWoB++ / Chromium -----------------------------------------------------------------------
