"""MiniWoB++ tasks in real headless Chromium: the kit's embedded real environment.

The task pages come from the PyPI `miniwob` wheel (plain HTML, no network); which of them run and why the
others are refused is `miniwob_tasks.py`. One `MiniWobBrowser`
(a Chromium process driven by async Playwright) is shared by many `MiniWobEnv`s in a process; each env
has its own BrowserContext and page. The agent sees only the 160x210 CSS px task area, rendered at
`device_scale_factor=2` (a 320x420 screenshot), and acts in pixels of that screenshot.

Reward: the page's *raw* reward (`WOB_RAW_REWARD_GLOBAL`: 1 success, -1 failure, partial values on a few
tasks), clipped to [0, 1]. We clip rather than map -1..1 to 0..1 because an episode that never ended
has raw reward 0, which must score 0, not 0.5. Success = raw reward > 0.

A dead browser (crash, OOM kill) makes the next call raise `EnvError` promptly; a later `reset` of a
shared-browser env starts a fresh browser.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import weakref
from pathlib import Path
from typing import Any

from PIL import Image

from cua_kit.actions import Action
from cua_kit.envs.base import Env, EnvError, Observation, StepResult, Task
from cua_kit.envs.miniwob_tasks import check_task, miniwob_html_dir, task_names  # noqa: F401 (re-exported)

# Debian's chromium-headless-shell (the old headless mode, what Playwright itself runs headless) is the
# default. On the 2-core dev VM, 8 envs, same flags (docs/BENCHMARKS.md): with the old env code it did
# 1.3-2.3x the steps per CPU-second of the full `chromium` binary (9.2-12.9 vs 5.7-9.4; 8 idle pages
# cost full chromium 0.46 CPU-s per second); with this file's fewer round trips 11.1-12.5 vs 6.6-10.2,
# at about half the memory (~530 vs ~1,000 MiB PSS). The full binary stays the fallback when only it
# is installed.
HEADLESS_SHELL_PATH = "/usr/lib/chromium/chromium-headless-shell"
FULL_CHROMIUM_PATH = "/usr/lib/chromium/chromium"
INSTALL_LINE = "apt-get install -y --no-install-recommends chromium-headless-shell"
# Measured flags (platform-facts): no network chatter, no first-run work, no GPU on these machines.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TASK_AREA = (0, 0, 160, 210)  # x, y, width, height in CSS px: MiniWoB's native #wrap
# Larger than the task area: jQuery UI places widgets (click-dialog's 300 px wide dialog) with
# "collision: fit" inside the window; a window narrower than 300 px leaves them off-screen.
VIEWPORT = {"width": 400, "height": 300}
SCALE = 2  # device_scale_factor: screenshots are 320x420 px
OP_TIMEOUT_S = 20.0  # one browser call; a live page answers in ~50 ms, so this only catches hangs
MAX_WAIT_S = 10.0
RELOAD_EVERY = 50  # episodes of one task on one page before a fresh load (bounds leftover page state)
# Runs in the page right before every screenshot, in the same evaluate that reads the result, and
# does what Playwright's `screenshot(animations="disabled", caret="hide")` did in its own extra round
# trips: hide the text caret (a stylesheet added once per document instead of a style set and
# restored per shot), finish finite CSS animations/transitions and show infinite ones at their start
# (they run again until the next observation, as after Playwright's restore). Returns
# [done, raw reward, page scroll x, page scroll y]; the scroll keeps the clip viewport-relative as
# Playwright's was (its Page.getLayoutMetrics round trip).
OBSERVE_FN = """function cuaKitObserve() {
  if (!document.getElementById('cua-kit-no-caret')) {
    const style = document.createElement('style');
    style.id = 'cua-kit-no-caret';
    style.textContent = '* { caret-color: transparent !important; }';
    document.documentElement.append(style);
  }
  for (const a of window.cuaKitCancelled || []) { try { a.play(); } catch (e) {} }
  window.cuaKitCancelled = [];
  for (const a of document.getAnimations()) {
    if (!a.effect || a.playbackRate === 0) continue;
    try {
      if (Number.isFinite(a.effect.getComputedTiming().endTime)) a.finish();
      else { a.cancel(); window.cuaKitCancelled.push(a); }
    } catch (e) {}
  }
  const v = window.visualViewport;
  return [WOB_DONE_GLOBAL === true, WOB_RAW_REWARD_GLOBAL, v ? v.pageLeft : scrollX, v ? v.pageTop : scrollY];
}"""
OBSERVE_JS = f"() => ({OBSERVE_FN})()"
# The instruction text. Three email pages (email-inbox-nl-turk, -forward-nl, -forward-nl-turk) make
# core.getUtterance() return {utterance, fields} (the fields are for DOM agents): the agent gets the text.
UTTERANCE_JS = "(u => typeof u === 'string' ? u : u.utterance)(core.getUtterance())"
# End any running episode, clear focus, seed the page's RNG and start. Pages time out after 7-30 s of
# real time (a slow policy would score -1), so the limit is lifted to an hour. The page's countdown
# display (right of the task area, never in a screenshot) is stopped: its 1 s repaint cost every idle
# page ~5% of a core in the renderer. A page whose problem is ready at once (all but a few) also
# returns its instruction and observation state: one round trip for the whole start.
START_EPISODE_JS = f"""seed => {{
  if (core.EP_TIMER !== null) core.endEpisode(0);
  if (document.activeElement) document.activeElement.blur();
  core.EPISODE_MAX_TIME = 3600000;
  Math.seedrandom(seed);
  core.startEpisodeReal();
  clearInterval(core.CD_TIMER);
  if (WOB_TASK_READY !== true) return null;
  return [{UTTERANCE_JS}, ({OBSERVE_FN})()];
}}"""


def default_chromium() -> str:
    """Debian's chromium-headless-shell if installed, else Debian's full chromium, else the shell's path
    (so the error names the package to install)."""
    return next((p for p in (HEADLESS_SHELL_PATH, FULL_CHROMIUM_PATH) if os.path.isfile(p)), HEADLESS_SHELL_PATH)


CHROMIUM_PATH = default_chromium()  # the default binary on this machine, as found at import


def resolve_chromium(path: str | None = None) -> str:
    """The Chromium binary to run: `path`, else $CUA_KIT_CHROMIUM, else `default_chromium()`. Missing ->
    EnvError with the apt line."""
    path = path or os.environ.get("CUA_KIT_CHROMIUM") or default_chromium()
    if not os.path.isfile(path):
        raise EnvError(f"Chromium not found at {path}. Install it with: {INSTALL_LINE} "
                       "(or pass chromium_path= / set CUA_KIT_CHROMIUM)")
    return path


def _proc_children() -> dict[int, list[int]]:
    """ppid -> child pids of every process, read from /proc (no psutil dependency)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of process `pid`."""
    children, found, todo = _proc_children(), [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def process_group_pids(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (Playwright starts Chromium as a group leader)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


class MiniWobBrowser:
    """One Chromium process shared by many envs. Started lazily; closed by `close()` or, when
    `close_when_unused`, as soon as the last env using it releases it."""

    def __init__(self, chromium_path: str | None = None, close_when_unused: bool = False):
        self.chromium_path = resolve_chromium(chromium_path)
        self.close_when_unused = close_when_unused
        self.pid: int | None = None  # the browser's main process (a process-group leader)
        self.users = 0
        self.closed = False
        self._playwright: Any = None
        self._browser: Any = None
        self._start_lock: asyncio.Lock | None = None

    @property
    def alive(self) -> bool:
        return self._browser is not None and self._browser.is_connected() and not self.closed

    @property
    def dead(self) -> bool:
        """Started once and now gone (crashed, killed or closed)."""
        return self.closed or (self._browser is not None and not self._browser.is_connected())

    async def start(self) -> None:
        """Launch Chromium once; concurrent callers wait for the same launch."""
        if self.closed:
            raise EnvError("this MiniWobBrowser was closed; make a new one")
        self._start_lock = self._start_lock or asyncio.Lock()
        async with self._start_lock:
            if self._browser is None:
                await self._launch()
        if not self.alive:
            raise EnvError(f"Chromium (pid {self.pid}) exited: it crashed or was killed. Make a new env.")

    async def _launch(self) -> None:
        from playwright.async_api import async_playwright

        before = set(descendant_pids(os.getpid()))
        self._playwright = await async_playwright().start()
        try:
            self._browser = await self._playwright.chromium.launch(
                executable_path=self.chromium_path, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:
            await self._playwright.stop()
            raise EnvError(f"Chromium at {self.chromium_path} failed to start: {exc}") from exc
        self._browser.on("disconnected", lambda _: self._kill_leftovers())
        self.pid = self._find_browser_pid(before)

    def _find_browser_pid(self, before: set[int]) -> int | None:
        """The new Chromium main process: a descendant of ours running our binary, not a child of one."""
        real = os.path.realpath(self.chromium_path)
        new = [p for p in descendant_pids(os.getpid()) if p not in before]
        ours = set()
        for pid in new:
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == real:
                    ours.add(pid)
            except OSError:
                continue
        leaders = [p for p in ours if os.getpgid(p) == p] if ours else []
        return min(leaders or ours) if ours else None

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever is left of our Chromium's process group (after a crash, zygotes and the
        crash handler can outlive the main process). Only this browser's own group is touched."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def new_page(self) -> tuple[Any, Any, Any]:
        """A fresh BrowserContext and page sized and scaled for MiniWoB, and the page's CDP session."""
        await self.start()
        context = await self._browser.new_context(viewport=VIEWPORT, device_scale_factor=SCALE)
        try:
            page = await context.new_page()
            cdp = await context.new_cdp_session(page)
            # Chromium sizes a capture by the *calling* session's emulation: without Playwright's own
            # override repeated here, this session's screenshots come out at 1x (160x210). With it they
            # are byte-identical to `page.screenshot`'s.
            await cdp.send("Emulation.setDeviceMetricsOverride", {
                "mobile": False, "width": VIEWPORT["width"], "height": VIEWPORT["height"],
                "screenWidth": VIEWPORT["width"], "screenHeight": VIEWPORT["height"], "deviceScaleFactor": SCALE,
                "screenOrientation": {"angle": 0, "type": "landscapePrimary"}})
            return context, page, cdp
        except BaseException:
            await context.close()
            raise

    async def acquire(self) -> None:
        self.users += 1

    async def release(self) -> None:
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.close_when_unused:
            await self.close()

    async def close(self) -> None:
        """Close Chromium and the Playwright driver; no process is left behind. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._browser is not None and self._browser.is_connected():
                await asyncio.wait_for(self._browser.close(), OP_TIMEOUT_S)
        except Exception:  # a dying browser: the process-group kill below still cleans up
            pass
        self._kill_leftovers()
        if self._playwright is not None:
            await self._playwright.stop()
        _forget_shared(self)


# One shared browser per (event loop, binary): Playwright objects belong to the loop that made them.
_SHARED: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, MiniWobBrowser]]" = (
    weakref.WeakKeyDictionary())


def shared_browser(chromium_path: str | None = None) -> MiniWobBrowser:
    """The process-wide browser for this event loop; a new one if the last one closed or died."""
    path = resolve_chromium(chromium_path)
    per_loop = _SHARED.setdefault(asyncio.get_running_loop(), {})
    browser = per_loop.get(path)
    if browser is None or browser.dead:
        browser = per_loop[path] = MiniWobBrowser(path, close_when_unused=True)
    return browser


def _forget_shared(browser: MiniWobBrowser) -> None:
    for per_loop in list(_SHARED.values()):
        for path, known in list(per_loop.items()):
            if known is browser:
                del per_loop[path]


# Key names as models write them -> Playwright's names. Combos are joined with "+" (ctrl+a).
KEY_ALIASES = {
    "enter": "Enter", "return": "Enter", "tab": "Tab", "esc": "Escape", "escape": "Escape",
    "backspace": "Backspace", "delete": "Delete", "del": "Delete", "space": "Space", "up": "ArrowUp",
    "down": "ArrowDown", "left": "ArrowLeft", "right": "ArrowRight", "arrowup": "ArrowUp",
    "arrowdown": "ArrowDown", "arrowleft": "ArrowLeft", "arrowright": "ArrowRight", "home": "Home",
    "end": "End", "pageup": "PageUp", "pagedown": "PageDown", "ctrl": "Control", "control": "Control",
    "alt": "Alt", "shift": "Shift", "meta": "Meta", "cmd": "Meta", "super": "Meta", "win": "Meta",
    "insert": "Insert",
}
# Phone system buttons have no meaning in a web page ("back" would even leave the task page).
NO_WEB_KEYS = {"back", "menu", "recent", "volume_up", "volume_down", "power"}
SCROLL_DELTA = {"up": (0, -60), "down": (0, 60), "left": (-60, 0), "right": (60, 0)}  # CSS px


def playwright_key(name: str) -> str:
    """'ctrl+a' -> 'Control+a', 'enter' -> 'Enter', 'ArrowDown' stays. Raises ValueError on phone keys."""
    name = name.strip()
    if name.lower() in NO_WEB_KEYS:
        raise ValueError(f"key {name!r} is a phone button; a web page has none")
    if len(name) == 1 or name == "+":
        return name
    parts = [p.strip() for p in name.split("+")]
    fixed = []
    for part in parts:
        low = part.lower()
        if low in KEY_ALIASES:
            fixed.append(KEY_ALIASES[low])
        elif len(part) == 1 or (low.startswith("f") and low[1:].isdigit()):
            fixed.append(part if len(part) == 1 else part.upper())
        else:
            fixed.append(part)  # already a Playwright name (e.g. "PageDown"); Playwright checks it
    return "+".join(fixed)


class MiniWobEnv(Env):
    """One MiniWoB++ page in a shared headless Chromium. `task.params`: {"task": "click-button", "seed": 3}."""

    name = "miniwob"
    tool = "computer_use"
    task_key = "task"

    def __init__(self, browser: MiniWobBrowser | None = None, chromium_path: str | None = None, **_: Any):
        self._own_browser = browser is None  # shared per loop, refcounted; else the caller closes it
        self.chromium_path = resolve_chromium(chromium_path if browser is None else browser.chromium_path)
        self.browser = browser
        self._context: Any = None
        self._page: Any = None
        self._cdp: Any = None  # the page's CDP session (screenshots)
        self.task: Task | None = None
        self.done = False
        self.instruction = ""  # the page's #query text of the current episode
        self.history: list[Action] = []  # actions taken this episode
        self._loaded: str | None = None  # the task page now loaded
        self._episodes_on_page = 0
        self.last_screenshot: bytes = b""  # PNG bytes of the last observation

    # ---- browser plumbing -------------------------------------------------------------------------
    async def _call(self, coro: Any, what: str) -> Any:
        """Run one browser call; a dead browser or a hang becomes EnvError (never a policy failure)."""
        if self.browser is None or self.browser.dead:
            coro.close()
            raise EnvError(f"miniwob: Chromium is gone during {what} (crashed or killed); reset or make a new env")
        try:
            return await asyncio.wait_for(coro, OP_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            raise EnvError(f"miniwob: {what} took over {OP_TIMEOUT_S:.0f} s (browser hung)") from exc
        except EnvError:
            raise
        except Exception as exc:  # playwright.Error: target closed, browser disconnected, ...
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # not the browser log
            raise EnvError(f"miniwob: {what} failed: {first_line}") from exc

    async def _open_page(self) -> None:
        """A page in a live browser; after a crash a shared-browser env moves to a fresh browser."""
        if self._page is not None and self.browser is not None and self.browser.alive:
            return
        await self._drop_page()
        if self._own_browser:
            self.browser = shared_browser(self.chromium_path)
        assert self.browser is not None
        await self.browser.acquire()
        try:
            self._context, self._page, self._cdp = await self._call(self.browser.new_page(), "opening a page")
        except BaseException:
            await self.browser.release()
            raise

    async def _drop_page(self) -> None:
        if self._context is None or self.browser is None:
            return
        context, self._context, self._page, self._cdp, self._loaded = self._context, None, None, None, None
        try:
            if self.browser.alive:
                await asyncio.wait_for(context.close(), OP_TIMEOUT_S)
        except Exception:  # closing a context of a dying browser: nothing left to release
            pass
        finally:  # even when cancelled mid-close: a reference never released keeps the browser running forever
            await self.browser.release()

    async def _screenshot(self, state: list) -> Image.Image:
        """The task area as PNG, `state` from OBSERVE_FN (run just before, same task of the page).

        One CDP `Page.captureScreenshot` on the page's own session. Playwright's `page.screenshot` sends
        the same command with the same clip, but wraps it in four more page round trips (caret and
        animation prepare, `document.fonts.ready`, `Page.getLayoutMetrics`, restore): measured 20.3 ms
        CPU (all processes) per shot against 11.0 ms for the bare capture, in the headless shell, with
        the same 33 ms wall (both wait for a fresh compositor frame). OBSERVE_FN does the prepare work
        inside the result read that a step makes anyway. Same task+seed still gives identical bytes
        (tests/test_miniwob.py); an earlier raw-CDP try that skipped the caret/animation work did not."""
        x, y, w, h = TASK_AREA
        clip = {"x": state[2] + x, "y": state[3] + y, "width": w, "height": h, "scale": 1}
        shot = await self._call(self._cdp.send("Page.captureScreenshot", {"format": "png", "clip": clip}),
                                "screenshot")
        png = base64.b64decode(shot["data"])
        self.last_screenshot = png
        return Image.open(io.BytesIO(png)).convert("RGB")

    async def _js(self, script: str, arg: Any = None, what: str = "reading the page") -> Any:
        return await self._call(self._page.evaluate(script, arg), what)

    # ---- Env protocol -----------------------------------------------------------------------------
    @classmethod
    def validate_task(cls, task: Task) -> None:
        """A task the wheel lacks or the kit refuses: ValueError with the closest names or the reason."""
        try:
            check_task(task.params.get("task"))
        except ValueError as exc:
            raise ValueError(f"task {task.id!r}: {exc}") from None

    async def reset(self, task: Task) -> Observation:
        self.validate_task(task)
        name = task.params["task"]
        page_file = miniwob_html_dir() / f"{name}.html"
        await self._open_page()
        self.task, self.done, self.history = task, False, []
        # Reload only for another task or every RELOAD_EVERY episodes: a reload costs ~100 ms, twice
        # the rest of a reset; tests check that same seed -> same screenshot either way.
        self._episodes_on_page += 1
        if self._loaded != name or self._episodes_on_page > RELOAD_EVERY:
            self._loaded = None  # until the page has loaded: a failed load is never taken for the old page
            await self._call(self._page.goto(page_file.as_uri()), f"loading {name}")
            self._loaded, self._episodes_on_page = name, 1
        # Park the mouse outside the task area: no hover style from the last episode's click.
        await self._call(self._page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] - 1), "moving the mouse")
        started = await self._js(START_EPISODE_JS, task.params.get("seed", 0), "starting the episode")
        if started is None:  # a few pages build their problem asynchronously
            await self._call(self._page.wait_for_function("WOB_TASK_READY === true"), "waiting for the task")
            started = await self._js(f"() => [{UTTERANCE_JS}, ({OBSERVE_FN})()]")
        self.instruction, state = started
        return Observation(screenshot=await self._screenshot(state), instruction=self.instruction)

    async def step(self, action: Action) -> StepResult:
        if self._page is None or self.task is None:
            raise RuntimeError("call reset(task) before step()")
        info: dict[str, Any] = {}
        if self.done:
            info["ignored"] = "the episode already ended"
        elif action.kind == "finish":
            self.done = True
        else:
            self.history.append(action)
            problem = await self._perform(action)
            if problem:
                info["invalid"] = problem
        state = await self._js(OBSERVE_JS, what="reading the result")
        self.done = self.done or bool(state[0])
        info["raw_reward"] = float(state[1])
        observation = Observation(screenshot=await self._screenshot(state), instruction=self.instruction)
        return StepResult(observation=observation, done=self.done, info=info)

    async def _perform(self, action: Action) -> str | None:
        """Do `action` in the page. Returns why it could not be done (a policy mistake), else None."""
        mouse, keyboard = self._page.mouse, self._page.keyboard
        kind = action.kind
        if kind == "wait":
            await asyncio.sleep(min(max(action.duration or 0.5, 0.0), MAX_WAIT_S))
            return None
        if kind == "type":
            await self._call(keyboard.type(action.text or ""), "typing")
            return None
        if kind == "key":
            try:
                key = playwright_key(action.text or "")
            except ValueError as exc:
                return str(exc)
            try:
                await asyncio.wait_for(keyboard.press(key), OP_TIMEOUT_S)
            except Exception as exc:
                if self.browser is None or not self.browser.alive:
                    raise EnvError(f"miniwob: Chromium is gone while pressing {key!r}") from exc
                return f"unknown key {action.text!r} ({exc})"
            return None
        point = self._to_css(action.x, action.y)
        if isinstance(point, str):
            if kind == "scroll" and action.x is None:  # a scroll without a place scrolls the task area
                point = (TASK_AREA[0] + TASK_AREA[2] / 2, TASK_AREA[1] + TASK_AREA[3] / 2)
            else:
                return point
        x, y = point
        if kind == "click":
            await self._call(mouse.click(x, y), "clicking")
        elif kind == "double_click":
            await self._call(mouse.dblclick(x, y), "double-clicking")
        elif kind == "long_press":
            await self._call(mouse.move(x, y), "moving the mouse")
            await self._call(mouse.down(), "pressing the mouse")
            await asyncio.sleep(min(action.duration or 1.0, MAX_WAIT_S))
            await self._call(mouse.up(), "releasing the mouse")
        elif kind == "swipe":
            end = self._to_css(action.x2, action.y2)
            if isinstance(end, str):
                return end
            await self._call(mouse.move(x, y), "moving the mouse")
            await self._call(mouse.down(), "pressing the mouse")
            await self._call(mouse.move(end[0], end[1], steps=8), "dragging")
            await self._call(mouse.up(), "releasing the mouse")
        elif kind == "scroll":
            if (action.direction or "") not in SCROLL_DELTA:
                return f"scroll direction {action.direction!r} is not one of {sorted(SCROLL_DELTA)}"
            await self._call(mouse.move(x, y), "moving the mouse")
            await self._call(mouse.wheel(*SCROLL_DELTA[action.direction or ""]), "scrolling")
        else:
            return f"action {kind!r} is not supported by miniwob"
        return None

    def _to_css(self, x: int | None, y: int | None) -> tuple[float, float] | str:
        """Screenshot pixels -> CSS px of the page (undo the 2x scale, add the crop origin)."""
        width, height = TASK_AREA[2] * SCALE, TASK_AREA[3] * SCALE
        if x is None or y is None:
            return "this action needs x and y"
        if not (0 <= x < width and 0 <= y < height):
            return f"point ({x}, {y}) is outside the {width}x{height} screenshot"
        return TASK_AREA[0] + (x + 0.5) / SCALE, TASK_AREA[1] + (y + 0.5) / SCALE

    async def oracle_action(self) -> Action:
        """What a perfect pixel-only agent does now. The DOM gives only *where* things are (and what the
        screen shows, e.g. a field's text); the result is a pixel Action like any policy's."""
        if self.task is None:
            raise RuntimeError("call reset(task) before oracle_action()")
        name = self.task.params["task"]
        if name not in ORACLES:
            raise NotImplementedError(f"no miniwob oracle for {name!r}; tasks with one: {sorted(ORACLES)}")
        if self.done:
            return Action(kind="finish", status="success")
        # The oracle remembers what it did this episode (as any agent does), e.g. "clicked ONE already".
        # Waits are left out: they change nothing on the page (choose-list reads "typed just before").
        history = [a.kind for a in self.history if a.kind != "wait"]
        plan = await self._js(f"async history => {{ {ORACLE_JS_HELPERS}\nawait settled();\n{ORACLES[name]} }}",
                              history, "oracle")
        if plan["kind"] in ("click", "double_click"):
            return Action(kind=plan["kind"], x=self._to_pixel(plan["x"], 0), y=self._to_pixel(plan["y"], 1))
        if plan["kind"] == "wait":
            return Action(kind="wait", duration=plan["duration"])
        return Action(kind=plan["kind"], text=plan["text"])

    @staticmethod
    def _to_pixel(css: float, axis: int) -> int:
        """CSS px of the page -> pixels of the screenshot (the inverse of `_to_css`)."""
        size = TASK_AREA[2 + axis] * SCALE
        return min(size - 1, max(0, int((css - TASK_AREA[axis]) * SCALE)))

    async def evaluate(self) -> float:
        if self._page is None:
            raise RuntimeError("call reset(task) before evaluate()")
        raw = await self._js("WOB_RAW_REWARD_GLOBAL", what="reading the reward")
        return min(1.0, max(0.0, float(raw)))

    async def close(self) -> None:
        await self._drop_page()
        self.task = None


# ---- oracles --------------------------------------------------------------------------------------
# Each oracle is the body of a JS function that returns the next step: click(element), type(text) or
# key(name). It reads the query text and what is on screen (labels, a field's value, which box is
# ticked); the DOM only tells it where those things are. It is stateless: every call looks afresh.
ORACLE_JS_HELPERS = f"const q = {UTTERANCE_JS};" + r"""
const quoted = [...q.matchAll(/"([^"]*)"/g)].map(m => m[1]);
const all = sel => [...document.querySelectorAll(sel)];
const text = el => el.textContent.trim();
const byText = (sel, t) => all(sel).find(el => text(el) === t);
// Click the visible point of `el` nearest its centre (another element may cover part of it). The
// centre is tried first: it is the grid's nearest point when visible, and one hit test instead of 81
// (the full grid was ~85 hit tests per benchmark step, ~4 ms of renderer time).
const click = el => {
  const r = el.getClientRects()[0] || el.getBoundingClientRect();
  const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
  const centre = document.elementFromPoint(cx, cy);
  if (centre && (centre === el || el.contains(centre))) return {kind: 'click', x: cx, y: cy};
  let best = {x: cx, y: cy}, bestDist = Infinity;
  for (let i = 1; i < 10; i++) for (let j = 1; j < 10; j++) {
    const x = r.left + r.width * i / 10, y = r.top + r.height * j / 10, hit = document.elementFromPoint(x, y);
    const dist = (x - cx) ** 2 + (y - cy) ** 2;
    if (hit && (hit === el || el.contains(hit)) && dist < bestDist) { best = {x, y}; bestDist = dist; }
  }
  return {kind: 'click', x: best.x, y: best.y};
};
// Resolves once no jQuery animation runs (an accordion opening), at most after 2 s: positions read
// mid-animation are stale by the time a click lands, so the oracle looks once the page is still, as a
// person would. With the faster steps this mattered: click-collapsible failed 1 of ~680 benchmark
// episodes, clicking a Submit button that was still moving. (Waiting here, not as a `wait` action,
// keeps the step count of an episode what it was.)
const settled = () => new Promise(resolve => {
  const end = Date.now() + 2000;
  const poll = () => (window.jQuery && jQuery.timers && jQuery.timers.length && Date.now() < end)
    ? setTimeout(poll, 20) : resolve();
  poll();
});
const type = t => ({kind: 'type', text: t});
const key = k => ({kind: 'key', text: k});
const wait = s => ({kind: 'wait', duration: s});
// Put `want` in `input`: click it, clear what is wrong (select all, then type over it), type.
const fill = (input, want) => {
  if (input.value === want) return null;
  if (document.activeElement !== input) return click(input);
  const allSelected = input.selectionStart === 0 && input.selectionEnd === input.value.length;
  if (input.value && !allSelected) return key('ctrl+a');
  return type(want);
};
const labelBox = (label) => label.querySelector('input');
"""

ORACLES: dict[str, str] = {
    "click-test": "return click(document.querySelector('#subbtn'));",
    "click-button": "return click(all('#area button').find(b => text(b) === quoted[0]));",
    "click-link": "return click(all('#area .alink').find(a => text(a) === quoted[0]));",
    "click-dialog": "return click(document.querySelector('.ui-dialog-titlebar-close'));",
    "focus-text": "return click(document.querySelector('#tt'));",
    "click-button-sequence": """
        const clicks = history.filter(k => k === 'click').length;
        return click(document.querySelector(clicks === 0 ? '#subbtn' : '#subbtn2'));""",
    "click-test-2": "return click(byText('#area button', 'ONE'));",
    "focus-text-2": """
        const nth = {'1st': 0, '2nd': 1, '3rd': 2}[q.match(/(1st|2nd|3rd)/)[1]];
        return click(all('#area input')[nth]);""",
    "enter-text-dynamic": """
        return fill(document.querySelector('#tt'), quoted[0]) || click(document.querySelector('#subbtn'));""",
    "click-collapsible": """
        const open = all('.ui-accordion-content').some(c => c.offsetHeight > 0);
        return click(open ? document.querySelector('#subbtn') : document.querySelector('#area h3'));""",
    "click-widget": """
        const kind = quoted[0];
        const w = all('#area .widget').find(w => w.querySelector('[data-type]').dataset.type === kind);
        return click(w.querySelector('[data-type]'));""",
    "click-tab": """
        const n = q.match(/Tab #(\\d)/)[1];
        return click(all('#area ul a').find(a => text(a) === 'Tab #' + n));""",
    "click-option": """
        const want = q.replace(/^Select /, '').replace(/ and click Submit\\.$/, '');
        const label = all('#boxes label').find(l => text(l) === want);
        if (!labelBox(label).checked) return click(labelBox(label));
        return click(document.querySelector('#subbtn'));""",
    "click-checkboxes": """
        const list = q.replace(/^Select /, '').replace(/ and click Submit\\.$/, '');
        const wanted = list === 'nothing' ? [] : list.split(', ');
        for (const label of all('#boxes label')) {
          const box = labelBox(label);
          if (box.checked !== wanted.includes(text(label))) return click(box);
        }
        return click(document.querySelector('#subbtn'));""",
    "enter-text": """
        return fill(document.querySelector('#tt'), quoted[0]) || click(document.querySelector('#subbtn'));""",
    "enter-text-2": """
        const want = q.includes('upper case') ? quoted[0].toUpperCase() : quoted[0].toLowerCase();
        return fill(document.querySelector('#tt'), want) || click(document.querySelector('#subbtn'));""",
    "enter-password": """
        return fill(document.querySelector('#password'), quoted[0])
            || fill(document.querySelector('#verify'), quoted[0]) || click(document.querySelector('#subbtn'));""",
    "login-user": """
        return fill(document.querySelector('#username'), quoted[0])
            || fill(document.querySelector('#password'), quoted[1]) || click(document.querySelector('#subbtn'));""",
    "choose-list": """
        // The native popup is invisible in headless screenshots: open it, type the name, press Enter.
        const want = q.replace(/^Select /, '').replace(/ from the list and click Submit\\.$/, '');
        const sel = document.querySelector('#options');
        if (sel.options[sel.selectedIndex].text === want) return click(byText('#area button', 'Submit'));
        if (history[history.length - 1] === 'type') return key('Enter');
        return document.activeElement === sel ? type(want) : click(sel);""",
    "use-autocomplete": """
        // Type the asked start, then click the suggestion with the asked end (or, with no end, any).
        const start = quoted[0], end = quoted.length > 1 ? quoted[1] : '';
        const input = document.querySelector('#tags');
        const items = all('ul.ui-autocomplete li').filter(li => li.offsetHeight > 0);
        const pick = items.find(li => text(li).startsWith(start) && text(li).endsWith(end));
        // The page checks only the start and the end, so a typed prefix can already be an answer.
        if (input.value.startsWith(start) && input.value.endsWith(end)) return click(document.querySelector('#subbtn'));
        if (pick) return click(pick);
        // jQuery UI shows suggestions 300 ms after the last key: wait for them like a person would.
        return fill(input, start) || wait(0.4);""",
}
