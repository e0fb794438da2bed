"""Shared pytest fixtures. Each helper section is a clearly marked block; add new ones at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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


# ---- the chaos suite's figures (tests/test_chaos.py): cases tried, failures, time, printed at the end -----
@dataclass
class ChaosCase:
    """One row of the chaos table: a test adds to `tried` as it goes and may leave a `note` (a measured figure)."""

    name: str
    tried: int = 0
    note: str = ""
    failures: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


CHAOS_ROWS: list[ChaosCase] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.chaos_failed = report.failed


@pytest.fixture
def chaos(request: pytest.FixtureRequest):
    """A ChaosCase for this test (set `name` to a short label); it joins the table when the test ends (a failed
    test counts as a failure)."""
    case = ChaosCase(request.node.name.removeprefix("test_"))
    yield case
    case.seconds = time.monotonic() - case.started
    case.failures += int(getattr(request.node, "chaos_failed", False))
    CHAOS_ROWS.append(case)


def pytest_terminal_summary(terminalreporter) -> None:
    if not CHAOS_ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("chaos suite (tests/test_chaos.py)")
    write(f"{'case':36s} {'tried':>6s} {'failures':>8s} {'time s':>7s}  figure")
    for row in CHAOS_ROWS:
        write(f"{row.name[:36]:36s} {row.tried:6d} {row.failures:8d} {row.seconds:7.1f}  {row.note}")
# ---- end chaos suite ---------------------------------------------------------------------------------------
