"""GBox cloud Android boxes as an `Env`, driven through the official async SDK (`gbox-sdk` 0.1.0a41).

One episode = one box: `reset` creates a labelled box with `expiresIn` (so leaked boxes can be swept and die
anyway), runs the task's setup commands and returns a screenshot; `step` sends one action; `evaluate` runs
the task's validator (shell checks through `sh -c`) while the box is still alive; the box is terminated at
the next `reset` or at `close`. With `pool_boxes=True` the box is kept and reused with an app reset.

Retries (why they differ): reads and box creation retry with exponential backoff on 408/409/423/429/5xx.
Actions never retry on 408, 5xx or a lost connection: the SDK sends no idempotency key, so the action may
already have run and a retried click could run twice. They retry only on 423 (device busy) and 429 (rate
limited), which the API answers *before* running anything. Errors left after retries raise `EnvError`.

Linux boxes (desktop, `computer_use`) are not supported yet: only `box_type="android"`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shlex
import uuid
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from PIL import Image

from cua_kit.actions import Action
from cua_kit.envs.base import Env, EnvError, Observation, StepResult, Task

T = TypeVar("T")

KIT_LABELS = {"cua-kit": "1"}  # every box this kit creates carries these; `sweep_boxes` looks for them
READ_RETRY_STATUSES = frozenset({408, 409, 423, 429})  # plus every 5xx
ACTION_RETRY_STATUSES = frozenset({423, 429})  # refused before running: safe to send again
ANDROID_BUTTONS = {"home": "home", "back": "back", "menu": "menu", "recent": "appSwitch",
                   "app_switch": "appSwitch", "appswitch": "appSwitch", "power": "power",
                   "volume_up": "volumeUp", "volume_down": "volumeDown"}
KEYS = {"enter": "enter", "return": "enter", "tab": "tab", "backspace": "backspace", "delete": "delete",
        "escape": "escape", "esc": "escape", "space": "space", "arrowup": "arrowUp",
        "arrowdown": "arrowDown", "arrowleft": "arrowLeft", "arrowright": "arrowRight"}
LAUNCHER_PACKAGES = ("com.google.android.apps.nexuslauncher", "com.android.launcher3")
# Apps whose data `pool_boxes` clears between episodes unless a task names its own `reset_packages`.
DEFAULT_RESET_PACKAGES = ("com.example.notes", "com.google.android.apps.messaging")


def make_client(api_key: str | None = None, base_url: str | None = None) -> Any:
    """An `AsyncGboxClient` with SDK retries off (we retry ourselves, per call kind).

    The key comes from `api_key` or GBOX_API_KEY; the base URL from `base_url` or GBOX_CLIENT_BASE_URL.
    """
    key = api_key or os.environ.get("GBOX_API_KEY")
    if not key:
        raise EnvError("GBOX_API_KEY is not set: export GBOX_API_KEY=<your key from https://gbox.ai> "
                       "(or pass api_key=...) to use the gbox env")
    try:
        from gbox_sdk import AsyncGboxClient
    except ImportError as err:
        raise EnvError("the gbox env needs the GBox SDK: pip install 'cua-kit[gbox]'") from err
    return AsyncGboxClient(api_key=key, base_url=base_url, max_retries=0, timeout=60.0)


def _status_of(err: Exception) -> int | None:
    """HTTP status of an SDK error, None for connection errors and timeouts (outcome unknown)."""
    return getattr(err, "status_code", None)


async def with_backoff(what: str, call: Callable[[], Awaitable[T]], retry_statuses: frozenset[int],
                       retry_5xx: bool = True, max_attempts: int = 5, backoff_s: float = 0.5) -> T:
    """Await `call()`, retrying on the given statuses with exponential backoff; else raise `EnvError`."""
    from gbox_sdk import APIConnectionError, APIStatusError

    for attempt in range(max_attempts):
        try:
            return await call()
        except (APIStatusError, APIConnectionError) as err:
            status = _status_of(err)
            retryable = status in retry_statuses or (retry_5xx and (status is None or status >= 500))
            if not retryable or attempt == max_attempts - 1:
                tried = f" after {attempt + 1} attempts" if retryable else ""
                raise EnvError(f"gbox {what} failed{tried}: {status or 'connection error'}: {err}") from err
        await asyncio.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def decode_screenshot(uri: str) -> Image.Image:
    """A `data:image/png;base64,...` URI -> RGB PIL image."""
    header, _, payload = uri.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise EnvError(f"gbox screenshot is not a base64 data URI: {uri[:60]!r}")
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


@dataclass(frozen=True)
class Check:
    """One validator check: `cmd` run through `sh -c`; passes on exit 0 and `expect` (whole stdout,
    stripped) or `contains` (substring)."""

    cmd: str
    expect: str | None = None
    contains: str | None = None

    def passed(self, exit_code: int, stdout: str) -> bool:
        if exit_code != 0:
            return False
        if self.expect is not None:
            return stdout.strip() == self.expect
        return self.contains is not None and self.contains in stdout


def parse_checks(task: Task) -> list[Check]:
    """The task's validator as checks; a malformed one fails with the task id and the expected shape."""
    rows = task.params.get("validator")
    shape = "validator: [{cmd: 'settings get global airplane_mode_on', expect: '1'}, ...]"
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"gbox task {task.id!r}: params need a non-empty validator list, e.g. {shape}")
    checks = []
    for row in rows:
        if not isinstance(row, dict) or "cmd" not in row or set(row) - {"cmd", "expect", "contains"} \
                or ("expect" in row) == ("contains" in row):
            raise ValueError(f"gbox task {task.id!r}: bad validator check {row!r}; each needs cmd and "
                             f"exactly one of expect/contains, e.g. {shape}")
        checks.append(Check(str(row["cmd"]), _opt_str(row.get("expect")), _opt_str(row.get("contains"))))
    return checks


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class UiNode:
    """One node of a uiautomator dump, bounds in display pixels."""

    text: str
    desc: str
    resource_id: str
    cls: str
    checked: bool
    focused: bool
    bounds: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bounds
        return (x0 + x1) / 2, (y0 + y1) / 2


def parse_layout(xml: str) -> tuple[str, list[UiNode]]:
    """uiautomator XML -> (foreground package, nodes)."""
    root = ET.fromstring(xml.encode())
    top = root.find("node")
    package = top.get("package", "") if top is not None else ""
    nodes = []
    for el in root.iter("node"):
        nums = [int(n) for n in el.get("bounds", "[0,0][0,0]").replace("][", ",").strip("[]").split(",")]
        nodes.append(UiNode(el.get("text", ""), el.get("content-desc", ""), el.get("resource-id", ""),
                            el.get("class", ""), el.get("checked") == "true", el.get("focused") == "true",
                            (nums[0], nums[1], nums[2], nums[3])))
    return package, nodes


class GboxEnv(Env):
    """A GBox Android box per episode (or a pooled one), seen through screenshots, driven by SDK actions.

    Task params: `validator` (required, see `Check`), `setup` (shell commands run at reset; must be
    idempotent, they may be retried), `oracle` (the plan `oracle_action` follows), `reset_packages`
    (apps cleared when a pooled box is reused).
    """

    name = "gbox"
    tool = "mobile_use"

    def __init__(self, box_type: str = "android", pool_boxes: bool = False, run_id: str | None = None,
                 labels: dict[str, str] | None = None, expires_in: str = "30m", create_timeout: str = "120s",
                 api_key: str | None = None, base_url: str | None = None, max_attempts: int = 5,
                 backoff_s: float = 0.5, client: Any = None) -> None:
        if box_type != "android":
            raise ValueError(f"gbox box_type={box_type!r} is not supported yet; use box_type='android'")
        self.client = client or make_client(api_key, base_url)
        self._own_client = client is None
        # Actions must never be retried by the SDK (no idempotency key: a retried click may run twice).
        self.actions_client = self.client.with_options(max_retries=0)
        self.pool_boxes = pool_boxes
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.labels = {**KIT_LABELS, "run": self.run_id, **(labels or {})}
        self.expires_in, self.create_timeout = expires_in, create_timeout
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.box_id: str | None = None
        self.task: Task | None = None
        self.checks: list[Check] = []
        self.display_size: tuple[int, int] = (0, 0)  # (width, height) of the box's screen
        self.last_screenshot: Image.Image | None = None
        self.last_checks: list[dict[str, Any]] = []  # what `evaluate` saw, for traces and debugging

    # ---- calls --------------------------------------------------------------------------------------
    async def _read(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await with_backoff(what, call, READ_RETRY_STATUSES, True, self.max_attempts, self.backoff_s)

    async def _act(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await with_backoff(what, call, ACTION_RETRY_STATUSES, False, self.max_attempts, self.backoff_s)

    async def run_command(self, command: str) -> tuple[int, str, str]:
        """Run a shell command on the box -> (exit code, stdout, stderr). Wrap pipes in `sh -c` yourself."""
        res = await self._read("command", lambda: self.client.v1.boxes.execute_commands(
            self._require_box(), command=command))
        return int(res.exit_code), res.stdout, res.stderr

    def _require_box(self) -> str:
        if self.box_id is None:
            raise EnvError("gbox env has no box: call reset(task) first")
        return self.box_id

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def _create_box(self, task: Task) -> str:
        # A 408 deletes the timed-out box (API docs), so retrying creation cannot leak; after a 5xx a box
        # may exist anyway: its labels and expiresIn let `sweep_boxes` (or the cloud) remove it.
        config = {"labels": {**self.labels, "task": task.id}, "expires_in": self.expires_in}
        box = await self._read("create box", lambda: self.client.v1.boxes.create_android(
            config=config, wait=True, api_timeout=self.create_timeout,
            timeout=360.0))  # HTTP timeout above the API's longest wait (5m), so the API's 408 wins
        return box.id

    async def _terminate(self) -> None:
        box_id, self.box_id = self.box_id, None
        if box_id is not None:
            await self._read("terminate box", lambda: self.client.v1.boxes.terminate(box_id))

    async def _reset_pooled_box(self, task: Task) -> None:
        for package in task.params.get("reset_packages", DEFAULT_RESET_PACKAGES):
            await self.run_command(f"pm clear {shlex.quote(package)}")
        await self.run_command("input keyevent KEYCODE_HOME")

    async def reset(self, task: Task) -> Observation:
        if task.env != self.name:
            raise ValueError(f"task {task.id!r} is for env {task.env!r}, not 'gbox'")
        self.task, self.checks = task, parse_checks(task)
        if self.box_id is not None and self.pool_boxes:
            await self._reset_pooled_box(task)
        else:
            await self._terminate()
            self.box_id = await self._create_box(task)
        for command in task.params.get("setup", []):
            code, _, err = await self.run_command(command)
            if code != 0:
                raise EnvError(f"gbox task {task.id!r}: setup command {command!r} failed ({code}): {err}")
        display = await self._read("display", lambda: self.client.v1.boxes.display(self._require_box()))
        self.display_size = (int(display.resolution.width), int(display.resolution.height))
        return await self._observe()

    async def close(self) -> None:
        try:
            await self._terminate()
        except EnvError as err:  # expiresIn still ends the box; sweep_boxes finds it by label
            warnings.warn(f"{err}; run `cua-kit env sweep gbox` to remove leaked boxes", stacklevel=2)
        finally:
            if self._own_client:
                await self.client.close()
                self._own_client = False

    # ---- observe and act ----------------------------------------------------------------------------
    async def _observe(self) -> Observation:
        shot = await self._read("screenshot", lambda: self.client.v1.boxes.actions.screenshot(
            self._require_box()))
        self.last_screenshot = decode_screenshot(shot.uri)
        return Observation(self.last_screenshot, self.task.instruction if self.task else "")

    def _to_display(self, x: float, y: float) -> tuple[int, int]:
        """Screenshot pixels -> display pixels (they differ when the box scales its screenshots)."""
        shot_w, shot_h = self.last_screenshot.size
        return round(x * self.display_size[0] / shot_w), round(y * self.display_size[1] / shot_h)

    def _to_screenshot(self, x: float, y: float) -> tuple[int, int]:
        shot_w, shot_h = self.last_screenshot.size
        return round(x * shot_w / self.display_size[0]), round(y * shot_h / self.display_size[1])

    async def step(self, action: Action) -> StepResult:
        box_id = self._require_box()
        if action.kind == "finish":
            return StepResult(Observation(self.last_screenshot, self.task.instruction), done=True,
                              info={"status": action.status or "success", "answer": action.answer})
        if action.kind == "wait":
            await asyncio.sleep(min(action.duration or 1.0, 10.0))
            return StepResult(await self._observe())
        problem = self._why_invalid(action)
        if problem:  # a policy mistake, not an infrastructure failure: report it, run nothing
            return StepResult(await self._observe(), info={"error": problem})
        result = await self._act(action.kind, lambda: self._send(box_id, action))
        return StepResult(await self._observe(), info={"message": result.message})

    def _why_invalid(self, action: Action) -> str | None:
        needs_xy = action.kind in ("click", "double_click", "long_press", "swipe")
        if needs_xy and (action.x is None or action.y is None):
            return f"{action.kind} needs x and y"
        if action.kind == "swipe" and (action.x2 is None or action.y2 is None):
            return "swipe needs x2 and y2"
        if action.kind == "type" and not action.text:
            return "type needs text"
        if action.kind == "scroll" and action.direction not in ("up", "down", "left", "right"):
            return f"scroll direction must be up|down|left|right, got {action.direction!r}"
        if action.kind == "key" and (action.text or "").lower() not in {**ANDROID_BUTTONS, **KEYS}:
            return f"unknown key {action.text!r}; known: {', '.join(sorted({**ANDROID_BUTTONS, **KEYS}))}"
        return None

    def _send(self, box_id: str, action: Action) -> Awaitable[Any]:
        """One SDK action call (not awaited, so `_act` can decide about retries)."""
        acts = self.actions_client.v1.boxes.actions
        if action.kind in ("click", "double_click"):
            x, y = self._to_display(action.x, action.y)
            return acts.click(box_id, x=x, y=y, double=action.kind == "double_click")
        if action.kind == "long_press":
            x, y = self._to_display(action.x, action.y)
            return acts.long_press(box_id, x=x, y=y, duration=f"{int((action.duration or 1.0) * 1000)}ms")
        if action.kind == "swipe":
            (x, y), (x2, y2) = self._to_display(action.x, action.y), self._to_display(action.x2, action.y2)
            return acts.swipe(box_id, start={"x": x, "y": y}, end={"x": x2, "y": y2})
        if action.kind == "scroll":
            return self._scroll(box_id, action)
        if action.kind == "type":
            return acts.type(box_id, text=action.text)
        name = action.text.lower()
        if name in ANDROID_BUTTONS:
            return acts.press_button(box_id, buttons=[ANDROID_BUTTONS[name]])
        return acts.press_key(box_id, keys=[KEYS[name]])

    def _scroll(self, box_id: str, action: Action) -> Awaitable[Any]:
        # The SDK wrapper's scroll drops x/y (platform-facts): use the raw call with explicit deltas.
        width, height = self.display_size
        x, y = (self._to_display(action.x, action.y) if action.x is not None and action.y is not None
                else (width // 2, height // 2))
        dx = {"left": -width * 0.4, "right": width * 0.4}.get(action.direction, 0.0)
        dy = {"up": -height * 0.4, "down": height * 0.4}.get(action.direction, 0.0)
        return self.actions_client.v1.boxes.actions.scroll(box_id, scroll_x=dx, scroll_y=dy, x=x, y=y)

    # ---- reward -------------------------------------------------------------------------------------
    async def evaluate(self) -> float:
        """1.0 when every validator check passes on the live box, else 0.0."""
        self.last_checks = []
        for check in self.checks:
            code, out, _ = await self.run_command(f"sh -c {shlex.quote(check.cmd)}")
            self.last_checks.append({"cmd": check.cmd, "exit_code": code, "stdout": out,
                                     "passed": check.passed(code, out)})
        return 1.0 if self.last_checks and all(c["passed"] for c in self.last_checks) else 0.0

    # ---- oracle -------------------------------------------------------------------------------------
    async def oracle_action(self) -> Action:
        """The next action of a perfect agent, read off the live screen layout and the task's `oracle` plan.

        Plans: {kind: toggle, label, want} | {kind: open_app, app, package} | {kind: home} |
        {kind: enter_text, app, package, text, submit, done_id, done_text?}.
        """
        plan = dict((self.task.params if self.task else {}).get("oracle") or {})
        if not plan:
            raise NotImplementedError(f"gbox task {self.task.id if self.task else None!r} has no oracle plan")
        layout = await self._read("screen layout", lambda: self.client.v1.boxes.actions.screen_layout(
            self._require_box()))
        package, nodes = parse_layout(layout.content)
        kind = plan["kind"]
        if kind == "home":
            return _finish() if package in LAUNCHER_PACKAGES else Action("key", text="home")
        app_package = {"toggle": "com.android.settings"}.get(kind, plan.get("package"))
        if package != app_package:  # get to the app first: home screen, then its icon
            if package not in LAUNCHER_PACKAGES:
                return Action("key", text="home")
            return self._tap(_find(nodes, text=plan.get("app", "Settings")))
        if kind == "open_app":
            return _finish()
        if kind == "toggle":
            switch = _find(nodes, desc=plan["label"], cls="android.widget.Switch")
            return _finish() if switch.checked == bool(plan["want"]) else self._tap(switch)
        if kind == "enter_text":
            return self._enter_text_step(plan, nodes)
        raise ValueError(f"gbox task {self.task.id!r}: unknown oracle kind {kind!r}")

    def _enter_text_step(self, plan: dict[str, Any], nodes: list[UiNode]) -> Action:
        text = str(plan["text"])
        # Done when the app shows the result: a "Saved" status (notes) or the sent bubble (messages).
        done_text = str(plan.get("done_text", text))
        done = any(n.resource_id == plan["done_id"] and n.text == done_text for n in nodes)
        field = _find(nodes, cls="android.widget.EditText")
        if done and field.text in (text, ""):
            return _finish()
        if field.text == text:
            return self._tap(_find(nodes, text=plan["submit"]))
        return Action("type", text=text) if field.focused else self._tap(field)

    def _tap(self, node: UiNode) -> Action:
        x, y = self._to_screenshot(*node.center)
        return Action("click", x=x, y=y)


def _finish() -> Action:
    return Action("finish", status="success")


def _find(nodes: list[UiNode], text: str | None = None, desc: str | None = None,
          cls: str | None = None) -> UiNode:
    for node in nodes:
        if (text is None or node.text == text) and (desc is None or node.desc == desc) \
                and (cls is None or node.cls == cls):
            return node
    raise EnvError(f"gbox oracle: no node with text={text!r} desc={desc!r} class={cls!r} on screen")


async def sweep_boxes(client: Any = None, labels: dict[str, str] | None = None,
                      dry_run: bool = False) -> list[str]:
    """Find boxes carrying `labels` (default: every box cua-kit made) that still run, and terminate them.

    Returns their ids; with `dry_run` only lists them. Wired to `cua-kit env sweep gbox`.
    """
    labels = dict(KIT_LABELS if labels is None else labels)
    if not labels:
        raise ValueError("sweep_boxes needs at least one label: an empty filter would match every box "
                         "of the account")
    own = client is None
    client = client or make_client()
    try:
        ids = await _list_box_ids(client, labels)
        if not dry_run:
            for box_id in ids:
                await with_backoff("terminate box", lambda b=box_id: client.v1.boxes.terminate(b),
                                   READ_RETRY_STATUSES)
        return ids
    finally:
        if own:
            await client.close()


async def _list_box_ids(client: Any, labels: dict[str, str], page_size: int = 50) -> list[str]:
    # All pages first, then terminate: terminating while paging would shift later pages.
    ids: list[str] = []
    page = 1
    while True:
        resp = await with_backoff("list boxes", lambda p=page: client.v1.boxes.list(
            labels=labels, status=["pending", "running"], page=p, page_size=page_size), READ_RETRY_STATUSES)
        ids += [box.id for box in resp.data]
        if not resp.data or page * page_size >= resp.total:
            return ids
        page += 1
