"""Synth: procedurally generated phone screens drawn with Pillow, for fast, GPU-free agent training.

Four levels, each deterministic in `task.params["seed"]` and `task.params["level"]`:

    0  tap the single button                    ("Tap the 'Send' button")
    1  tap the labelled button among distractors; tapping a distractor ends the episode as a failure
    2  open an app from a home-screen grid, then switch a named setting on or off in it (8-12 apps with
       3-5 settings each; `params["apps"]` / `params["settings"]` set the counts, and such a task's icons are
       scattered over the grid: 1 and 1 is a 2-turn task with nothing to read, find the icon then the switch;
       docs/BENCHMARKS.md "Multi-turn on CPU" shows what the tiny model made of it)
    3  tap a text field, type a phrase into it and submit (Cancel, or submitting a wrong text, fails)

Success is read from the simulator's state (`evaluate()` returns 1.0 or 0.0), never from the agent's
`finish` status. The episode ends (`done=True`) when the goal is reached, on a failing tap, on `finish`,
or after `max_steps` (per level, overridable with `task.params["max_steps"]`).

Speed: FreeType text costs ~0.5 ms a call on our CPUs, so every piece of text and every widget is drawn
once into a sprite cached for the process; a screenshot is then one copy of the cached empty screen plus
a few sprite pastes (see bench/env_synth.py for the measured rate).
"""

from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cua_kit.actions import Action
from cua_kit.envs.base import Env, Observation, StepResult, Task

LEVELS = (0, 1, 2, 3)
DEFAULT_MAX_STEPS = {0: 5, 1: 5, 2: 10, 3: 10}
EVAL_SEED0 = 100_000  # eval tasks use seeds from here on: disjoint from train seeds 0..99_999

BUTTON_LABELS = ("Send", "Cancel", "Save", "Delete", "Share", "Next", "Reply", "Archive", "Call", "Open",
                 "Done", "Edit", "Skip", "Accept", "Decline", "Retry", "Submit", "Close", "Search", "Add")
APP_NAMES = ("Settings", "Mail", "Camera", "Music", "Maps", "Clock", "Notes", "Photos", "Weather",
             "Calendar", "Phone", "Files", "Chat", "News", "Health", "Wallet")
SETTING_NAMES = ("Wi-Fi", "Bluetooth", "Airplane mode", "Dark mode", "Location", "Notifications",
                 "Auto sync", "Do not disturb", "Battery saver", "Auto-rotate", "Sounds", "Vibration")
FIELD_NAMES = ("Name", "Email", "Message", "City", "Subject", "Phone")
PHRASES = ("hello world", "see you at 5", "blue sky", "order 42", "on my way", "happy birthday",
           "call me back", "lunch at noon", "thanks a lot", "meet at the park")
SCREEN_TITLES = ("Messages", "Inbox", "Compose", "Gallery", "Tasks", "Contacts")

# Colors (RGB)
BG = (246, 246, 248)
INK = (33, 33, 33)
MUTED = (120, 120, 128)
WHITE = (255, 255, 255)
BAR = (28, 28, 32)
ACCENT = (33, 118, 210)
PALETTE = ((33, 118, 210), (46, 160, 67), (211, 47, 47), (123, 31, 162), (239, 108, 0), (0, 137, 123),
           (84, 110, 122), (194, 24, 91))
WALLPAPERS = ((38, 50, 92), (24, 78, 72), (70, 40, 90), (44, 62, 80))


# ---------------------------------------------------------------------------------------------
# Sprites: every piece of text and widget is drawn once per process (text is the slow part)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=8192)
def _text_sprite(text: str, size: int, fg: tuple, bg: tuple) -> Image.Image:
    """`text` on a `bg` rectangle just large enough for it."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text or " ")
    image = Image.new("RGB", (max(1, right - left), max(1, bottom - top)), bg)
    ImageDraw.Draw(image).text((-left, -top), text, font=font, fill=fg)
    return image


def _paste_text(canvas: Image.Image, text: str, size: int, fg: tuple, bg: tuple, at: tuple[int, int],
                anchor: str = "mm") -> None:
    """Paste cached text; anchor 'mm' centers it on `at`, 'lm' puts its left-middle there."""
    sprite = _text_sprite(text, size, fg, bg)
    x = at[0] - sprite.width // 2 if anchor == "mm" else at[0]
    canvas.paste(sprite, (x, at[1] - sprite.height // 2))


@functools.lru_cache(maxsize=4096)
def _button_sprite(label: str, w: int, h: int, fill: tuple, bg: tuple) -> Image.Image:
    image = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(image).rounded_rectangle((0, 0, w - 1, h - 1), radius=h // 4, fill=fill)
    _paste_text(image, label, max(10, h * 2 // 5), WHITE, fill, (w // 2, h // 2))
    return image


@functools.lru_cache(maxsize=1024)
def _icon_sprite(name: str, cell_w: int, icon: int, bg: tuple) -> Image.Image:
    """An app icon: a colored rounded square with the initial, the app name under it."""
    font_px = max(9, icon // 5)
    image = Image.new("RGB", (cell_w, icon + font_px * 2), bg)
    color = PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]
    left = (cell_w - icon) // 2
    ImageDraw.Draw(image).rounded_rectangle((left, 0, left + icon - 1, icon - 1), radius=icon // 4, fill=color)
    _paste_text(image, name[0], icon // 2, WHITE, color, (cell_w // 2, icon // 2))
    _paste_text(image, name, font_px, WHITE, bg, (cell_w // 2, icon + font_px))
    return image


@functools.lru_cache(maxsize=4096)
def _setting_row_sprite(label: str, w: int, h: int, on: bool) -> Image.Image:
    """A settings row: label on the left, a switch on the right (green knob right = on)."""
    image = Image.new("RGB", (w, h), WHITE)
    draw = ImageDraw.Draw(image)
    draw.line((0, h - 1, w, h - 1), fill=(224, 224, 228))
    _paste_text(image, label, max(10, h // 3), INK, WHITE, (h // 3, h // 2), anchor="lm")
    sw, sh = h, h // 2
    x0, y0 = w - sw - h // 3, (h - sh) // 2
    draw.rounded_rectangle((x0, y0, x0 + sw, y0 + sh), radius=sh // 2, fill=(52, 168, 83) if on else (189, 189, 189))
    knob_x = x0 + sw - sh if on else x0
    draw.ellipse((knob_x + 2, y0 + 2, knob_x + sh - 2, y0 + sh - 2), fill=WHITE)
    return image


@functools.lru_cache(maxsize=64)
def _chrome(width: int, height: int, bg: tuple) -> Image.Image:
    """An empty phone screen: status bar (time, wifi, battery) on top, navigation bar at the bottom."""
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    status_h, nav_h = _bars(width, height)
    draw.rectangle((0, 0, width, status_h - 1), fill=BAR)
    _paste_text(image, "9:41", max(9, status_h * 11 // 20), WHITE, BAR, (status_h // 2, status_h // 2), anchor="lm")
    bx, by, bh = width - status_h * 2, status_h // 4, status_h // 2
    draw.rectangle((bx, by, bx + bh * 2, by + bh), outline=WHITE)
    draw.rectangle((bx + 2, by + 2, bx + bh * 3 // 2, by + bh - 2), fill=WHITE)
    for i in range(3):  # wifi bars
        x = bx - status_h + i * (bh // 2 + 1)
        draw.rectangle((x, by + bh - (i + 1) * bh // 3, x + bh // 3, by + bh), fill=WHITE)
    top = height - nav_h
    draw.rectangle((0, top, width, height), fill=BAR)
    r, cy = nav_h // 5, top + nav_h // 2
    for cx, shape in zip((width // 4, width // 2, width * 3 // 4), ("back", "home", "recents")):
        if shape == "back":
            draw.polygon(((cx + r, cy - r), (cx + r, cy + r), (cx - r, cy)), outline=WHITE)
        elif shape == "home":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=WHITE, width=2)
        else:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), outline=WHITE, width=2)
    return image


def _bars(width: int, height: int) -> tuple[int, int]:
    """Heights of the status bar and the navigation bar."""
    return max(12, height // 25), max(20, height // 14)


# ---------------------------------------------------------------------------------------------
# Scenario: what a (level, seed) asks for (size independent), and the widgets of each screen
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Widget:
    """A tappable thing on a screen. `box` = (x0, y0, x1, y1), inclusive-exclusive pixels."""

    kind: str  # button | icon | row | field | nav | header_back
    label: str
    box: tuple[int, int, int, int]

    def contains(self, x: int, y: int) -> bool:
        return self.box[0] <= x < self.box[2] and self.box[1] <= y < self.box[3]

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass
class Scenario:
    """The goal of one task: generated from (level, seed) alone, so task files can carry the instruction."""

    level: int
    seed: int
    instruction: str
    target: str  # the button label / app name / field name
    labels: list[str] = field(default_factory=list)  # L1 distractors' labels, L2 app names, L3 field names
    setting: str = ""  # L2: the setting to switch
    turn_on: bool = True  # L2: the value to switch it to
    settings: dict[str, dict[str, bool]] = field(default_factory=dict)  # L2: app -> setting -> initial
    text: str = ""  # L3: the phrase to type
    scattered: bool = False  # L2: icons in random home-grid cells instead of filled from the top-left


L2_SIZES = {"apps": (1, len(APP_NAMES)), "settings": (1, len(SETTING_NAMES))}  # task params: (min, max)


def make_scenario(level: int, seed: int, apps: int | None = None, settings: int | None = None) -> Scenario:
    """The goal of task (level, seed): deterministic, independent of screen size. L2 only: `apps` apps on the
    home screen and `settings` settings in each (None: drawn from the seed, 8-12 and 3-5)."""
    rng = random.Random(f"synth-goal:{level}:{seed}")
    if level in (0, 1):
        labels = rng.sample(BUTTON_LABELS, 1 if level == 0 else rng.randint(3, 5))
        return Scenario(level, seed, f"Tap the '{labels[0]}' button", labels[0], labels)
    if level == 2:
        names = rng.sample(APP_NAMES, apps if apps is not None else rng.randint(8, 12))
        values = {app: {s: rng.random() < 0.5
                        for s in rng.sample(SETTING_NAMES, settings if settings is not None else rng.randint(3, 5))}
                  for app in names}
        app = names[0]
        setting = rng.choice(sorted(values[app]))
        turn_on = not values[app][setting]
        instruction = f"Open {app} and turn {'on' if turn_on else 'off'} {setting}"
        return Scenario(level, seed, instruction, app, names, setting, turn_on, values, scattered=apps is not None)
    if level == 3:
        fields = rng.sample(FIELD_NAMES, 2)
        target, text = rng.choice(fields), rng.choice(PHRASES)
        return Scenario(level, seed, f"Type '{text}' in the {target} field and tap Submit", target, fields,
                        text=text)
    raise ValueError(f"synth level must be one of {LEVELS}, got {level!r}")


def synth_tasks(level: int, n: int, split: str = "train", seed0: int | None = None, **sizes: int) -> list[Task]:
    """`n` tasks of `level` with seeds seed0.. (default 0 for train, EVAL_SEED0 for eval); `sizes`: L2's
    `apps` / `settings` counts, carried in each task's params.

    Ids look like `synth-L1-0042` (the number is the seed, so ids never collide across splits); tasks with sizes
    end in them, e.g. `synth-L2-0042-apps1-settings1`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    _check_sizes(level, sizes, "synth_tasks")
    start = seed0 if seed0 is not None else (0 if split == "train" else EVAL_SEED0)
    suffix = "".join(f"-{key}{value}" for key, value in sorted(sizes.items()))
    return [Task(id=f"synth-L{level}-{seed:04d}{suffix}", env="synth", split=split,  # type: ignore[arg-type]
                 instruction=make_scenario(level, seed, **sizes).instruction,
                 params={"level": level, "seed": seed, **sizes})
            for seed in range(start, start + n)]


def _check_sizes(level: int, sizes: dict[str, Any], where: str) -> None:
    """ValueError unless `sizes` are L2_SIZES keys of an L2 task, each an integer in its range."""
    for key, value in sizes.items():
        if key not in L2_SIZES or level != 2:
            raise ValueError(f"{where}: {key}={value!r} is not a size of a level-{level} task (level 2 takes "
                             f"{', '.join(L2_SIZES)})")
        low, high = L2_SIZES[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{where}: {key} must be an integer in {low}..{high}, got {value!r}")


TASK_FILE_COUNTS = {"train": (200, 200, 200, 200), "eval": (50, 50, 50, 50)}  # per level 0..3


def default_task_set() -> list[Task]:
    """The tasks of data/synth_tasks.jsonl: 800 train + 200 eval over the 4 levels, disjoint seeds.

    Regenerate the file with: python -m cua_kit.envs.synth > data/synth_tasks.jsonl
    """
    return [task for split, counts in TASK_FILE_COUNTS.items()
            for level, n in zip(LEVELS, counts) for task in synth_tasks(level, n, split)]


def _slots(rng: random.Random, area: tuple[int, int, int, int], cols: int, rows: int, k: int
           ) -> list[tuple[int, int, int, int]]:
    """k distinct random cells of a cols x rows grid over `area`."""
    x0, y0, x1, y1 = area
    cw, ch = (x1 - x0) // cols, (y1 - y0) // rows
    cells = rng.sample(range(cols * rows), k)
    return [(x0 + (c % cols) * cw, y0 + (c // cols) * ch, x0 + (c % cols + 1) * cw, y0 + (c // cols + 1) * ch)
            for c in cells]


def _icon_size(width: int, height: int) -> int:
    """App icon side: a seventh of the width, but small enough that icon + name fit a home-grid cell."""
    status_h, nav_h = _bars(width, height)
    cell_h = (height - nav_h - height // 40 - status_h - height // 20) // 5
    return max(8, min(width // 7, cell_h * 3 // 5, cell_h - 18))  # 18: two lines of the 9 px minimum font


def _nav_widgets(width: int, height: int) -> list[Widget]:
    top = height - _bars(width, height)[1]
    return [Widget("nav", "back", (width // 4 - width // 8, top, width // 4 + width // 8, height)),
            Widget("nav", "home", (width // 2 - width // 8, top, width // 2 + width // 8, height))]


def layout(scenario: Scenario, width: int, height: int) -> dict[str, list[Widget]]:
    """Widgets of every screen of the scenario, keyed by screen name (main, home, app:<name>, form)."""
    rng = random.Random(f"synth-layout:{scenario.level}:{scenario.seed}:{width}x{height}")
    status_h, nav_h = _bars(width, height)
    header_h = height // 12
    content = (width // 20, status_h + header_h + height // 40, width - width // 20, height - nav_h - height // 40)
    nav = _nav_widgets(width, height)
    if scenario.level in (0, 1):
        bw, bh = width * 2 // 5, max(24, height // 14)
        widgets = []
        for label, (x0, y0, x1, y1) in zip(scenario.labels, _slots(rng, content, 2, 6, len(scenario.labels))):
            bx, by = rng.randint(x0, max(x0, x1 - bw)), rng.randint(y0, max(y0, y1 - bh))
            widgets.append(Widget("button", label, (bx, by, bx + bw, by + bh)))
        return {"main": widgets + nav}
    if scenario.level == 2:
        return _layout_apps(scenario, rng, width, height, content, nav)
    return _layout_form(scenario, width, height, content, nav)


def _layout_apps(scenario: Scenario, rng: random.Random, width: int, height: int,
                 content: tuple[int, int, int, int], nav: list[Widget]) -> dict[str, list[Widget]]:
    status_h = _bars(width, height)[0]
    home_area = (content[0], status_h + height // 20, content[2], content[3])
    cell_w = (home_area[2] - home_area[0]) // 4
    icon = _icon_size(width, height)
    icon_h = icon + max(9, icon // 5) * 2
    apps = rng.sample(scenario.labels, len(scenario.labels))  # labels[0] is the target: shuffle it away
    cells = _slots(rng, home_area, 4, 5, 20)
    if not scenario.scattered:  # filled in order, as a phone does; a sized task's few icons go anywhere
        cells.sort(key=lambda box: (box[1], box[0]))
    screens = {"home": [Widget("icon", app, (x0, y0, x0 + cell_w, min(y1, y0 + icon_h)))
                        for app, (x0, y0, _, y1) in zip(apps, cells)] + nav}
    header_h, row_h = height // 12, max(28, height // 12)
    for app, settings in scenario.settings.items():
        back = Widget("header_back", "back", (0, status_h, header_h * 3 // 2, status_h + header_h))
        rows = [Widget("row", name, (0, status_h + header_h + i * row_h, width, status_h + header_h + (i + 1) * row_h))
                for i, name in enumerate(settings)]
        screens[f"app:{app}"] = [back] + rows + nav
    return screens


def _layout_form(scenario: Scenario, width: int, height: int, content: tuple[int, int, int, int],
                 nav: list[Widget]) -> dict[str, list[Widget]]:
    x0, y0, x1, _ = content
    field_h, gap = max(26, height // 15), height // 12
    fields = [Widget("field", name, (x0, y0 + gap // 2 + i * (field_h + gap), x1, y0 + gap // 2 + i * (field_h + gap) + field_h))
              for i, name in enumerate(scenario.labels)]
    by = fields[-1].box[3] + gap // 2
    bw, bh = width * 2 // 5, max(24, height // 14)
    buttons = [Widget("button", "Cancel", (x0, by, x0 + bw, by + bh)),
               Widget("button", "Submit", (x1 - bw, by, x1, by + bh))]
    return {"form": fields + buttons + nav}


# ---------------------------------------------------------------------------------------------
# Drawing the screens (from cached sprites)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _header_sprite(title: str, width: int, h: int, back: bool) -> Image.Image:
    image = Image.new("RGB", (width, h), WHITE)
    draw = ImageDraw.Draw(image)
    draw.line((0, h - 1, width, h - 1), fill=(224, 224, 228))
    if back:  # a "<" chevron
        cx, cy, r = h * 3 // 4, h // 2, h // 5
        draw.line((cx + r // 2, cy - r, cx - r // 2, cy, cx + r // 2, cy + r), fill=INK, width=3)
    _paste_text(image, title, max(11, h * 2 // 5), INK, WHITE, (h * 3 // 2 if back else h // 3, h // 2), anchor="lm")
    return image


def _draw_field(canvas: Image.Image, widget: Widget, value: str, focused: bool) -> None:
    x0, y0, x1, y1 = widget.box
    h = y1 - y0
    draw = ImageDraw.Draw(canvas)
    draw.rectangle(widget.box, fill=WHITE, outline=ACCENT if focused else (170, 170, 176), width=2 if focused else 1)
    _paste_text(canvas, widget.label, max(9, h * 2 // 5), MUTED, BG, (x0, y0 - h * 2 // 5), anchor="lm")
    pad, room = h // 4, x1 - x0 - h // 2
    end = x0 + pad
    if value:
        sprite = _text_sprite(value, max(10, h // 2), INK, WHITE)
        if sprite.width > room:  # show the tail, like a real field does
            sprite = sprite.crop((sprite.width - room, 0, sprite.width, sprite.height))
        canvas.paste(sprite, (x0 + pad, (y0 + y1) // 2 - sprite.height // 2))
        end = x0 + pad + sprite.width + 2
    if focused:
        draw.line((end, y0 + pad, end, y1 - pad), fill=ACCENT, width=2)


def _button_color(label: str, seed: int) -> tuple:
    return PALETTE[zlib.crc32(f"{label}:{seed}".encode()) % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# The env
# ---------------------------------------------------------------------------------------------

class SynthEnv(Env):
    """A simulated phone. Options: screen_size=(width, height) in pixels (default 360x640 portrait)."""

    name = "synth"
    tool = "mobile_use"

    def __init__(self, screen_size: tuple[int, int] = (360, 640), **_: Any) -> None:
        width, height = int(screen_size[0]), int(screen_size[1])
        if width < 160 or height < 240:
            raise ValueError(f"synth screen_size must be at least 160x240, got {screen_size!r}")
        self.screen_size = (width, height)
        self._scenario: Scenario | None = None
        self._closed = False

    # -- protocol -------------------------------------------------------------------------------

    async def reset(self, task: Task) -> Observation:
        if self._closed:
            raise RuntimeError("this SynthEnv is closed; create a new one")
        level, seed = self._task_params(task)
        sizes = {key: task.params[key] for key in L2_SIZES if key in task.params}
        _check_sizes(level, sizes, f"task {task.id!r}")
        self._scenario = make_scenario(level, seed, **sizes)
        self._instruction = task.instruction or self._scenario.instruction
        self._screens = layout(self._scenario, *self.screen_size)
        self._max_steps = int(task.params.get("max_steps", DEFAULT_MAX_STEPS[level]))
        self._screen = {0: "main", 1: "main", 2: "home", 3: "form"}[level]
        self._values = {app: dict(s) for app, s in self._scenario.settings.items()}  # L2 switches
        self._fields = {name: "" for name in self._scenario.labels} if level == 3 else {}
        self._focus: str | None = None
        self._pressed: str | None = None  # L0/L1: label of the button tapped
        self._submitted = False
        self._done, self._steps = False, 0
        return self._observe()

    async def step(self, action: Action) -> StepResult:
        if self._scenario is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset(task) to start a new one")
        self._steps += 1
        event = self._apply(action)
        info: dict[str, Any] = {"event": event}
        if not self._done and self._steps >= self._max_steps:
            self._done, info["truncated"] = True, True
        info["success"] = self._success()
        return StepResult(self._observe(), done=self._done, info=info)

    async def evaluate(self) -> float:
        if self._scenario is None:
            raise RuntimeError("call reset(task) before evaluate()")
        return 1.0 if self._success() else 0.0

    async def oracle_action(self) -> Action:
        if self._scenario is None:
            raise RuntimeError("call reset(task) before oracle_action()")
        if self._done or self._success():
            return Action("finish", status="success" if self._success() else "fail")
        s = self._scenario
        if s.level in (0, 1):
            return self._click(self._widget("button", s.target))
        if s.level == 2:
            if self._screen == "home":
                return self._click(self._widget("icon", s.target))
            if self._screen != f"app:{s.target}":
                return Action("key", text="back")
            return self._click(self._widget("row", s.setting))
        value = self._fields[s.target]
        if self._focus != s.target:
            return self._click(self._widget("field", s.target))
        if value == s.text:
            return self._click(self._widget("button", "Submit"))
        if s.text.startswith(value):
            return Action("type", text=s.text[len(value):])
        return Action("key", text="clear")

    async def close(self) -> None:
        self._closed = True

    # -- state machine --------------------------------------------------------------------------

    @staticmethod
    def _task_params(task: Task) -> tuple[int, int]:
        if task.env != "synth":
            raise ValueError(f"task {task.id!r} is for env {task.env!r}, not 'synth'")
        level, seed = task.params.get("level"), task.params.get("seed")
        if level not in LEVELS or isinstance(level, bool):
            raise ValueError(f"task {task.id!r}: params.level must be one of {LEVELS}, got {level!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"task {task.id!r}: params.seed must be an integer, got {seed!r}")
        return level, seed

    def _apply(self, action: Action) -> str:
        """Run one action against the simulated phone; returns a short description of what happened."""
        if action.kind == "finish":
            self._done = True
            return "finish"
        if action.kind in ("click", "double_click"):
            event = self._tap(action.x, action.y)
            if action.kind == "double_click" and not self._done:
                event = self._tap(action.x, action.y)
            return event
        if action.kind == "key":
            return self._key((action.text or "").lower())
        if action.kind == "type":
            if self._focus is None:
                return "typed with no focused field"
            self._fields[self._focus] += action.text or ""
            return f"typed into {self._focus}"
        return f"{action.kind}: nothing happens"

    def _tap(self, x: int | None, y: int | None) -> str:
        if x is None or y is None:
            return "tap without a point"
        hit = next((w for w in self._screens[self._screen] if w.contains(x, y)), None)
        if hit is None:
            return "tap on nothing"
        if hit.kind in ("nav", "header_back"):
            return self._key(hit.label)
        if hit.kind == "icon":
            self._screen = f"app:{hit.label}"
            return f"opened {hit.label}"
        if hit.kind == "row":
            app = self._screen.removeprefix("app:")
            self._values[app][hit.label] = not self._values[app][hit.label]
            self._done = self._success()
            return f"switched {hit.label}"
        if hit.kind == "field":
            self._focus = hit.label
            return f"focused {hit.label}"
        return self._press(hit.label)

    def _press(self, label: str) -> str:
        if self._scenario.level in (0, 1):  # any button press ends the episode: right or wrong
            self._pressed, self._done = label, True
            return f"pressed {label}"
        self._done = True  # L3: Submit submits, Cancel abandons the form
        self._submitted = label == "Submit"
        return "submitted" if self._submitted else "cancelled"

    def _key(self, key: str) -> str:
        if key in ("back", "home") and self._screen.startswith("app:"):
            self._screen = "home"
            return "went home"
        if key == "back" and self._focus is not None:
            self._focus = None
            return "unfocused"
        if self._focus is not None and key in ("enter", "backspace", "del", "delete", "clear"):
            if key == "enter":
                return self._press("Submit")
            value = self._fields[self._focus]
            self._fields[self._focus] = "" if key == "clear" else value[:-1]
            return f"edited {self._focus}"
        return f"key {key}: nothing happens"

    def _success(self) -> bool:
        s = self._scenario
        if s.level in (0, 1):
            return self._pressed == s.target
        if s.level == 2:
            return self._values[s.target][s.setting] == s.turn_on
        return self._submitted and self._fields[s.target] == s.text

    def _widget(self, kind: str, label: str) -> Widget:
        return next(w for w in self._screens[self._screen] if w.kind == kind and w.label == label)

    @staticmethod
    def _click(widget: Widget) -> Action:
        x, y = widget.center
        return Action("click", x=x, y=y)

    # -- rendering ------------------------------------------------------------------------------

    def _observe(self) -> Observation:
        # Drawn afresh each time: one copy of the cached chrome plus a few cached sprites is as cheap as a
        # frame cache would be (which costs a second copy to hand out), and keeps no per-episode memory.
        return Observation(screenshot=self._render(), instruction=self._instruction)

    def _render(self) -> Image.Image:
        width, height = self.screen_size
        s, status_h = self._scenario, _bars(width, height)[0]
        header_h = height // 12
        if self._screen == "home":
            canvas = _chrome(width, height, WALLPAPERS[s.seed % len(WALLPAPERS)]).copy()
            for w in self._screens["home"]:
                if w.kind == "icon":
                    canvas.paste(_icon_sprite(w.label, w.box[2] - w.box[0], _icon_size(width, height),
                                              WALLPAPERS[s.seed % len(WALLPAPERS)]), w.box[:2])
            return canvas
        canvas = _chrome(width, height, BG).copy()
        if self._screen.startswith("app:"):
            app = self._screen.removeprefix("app:")
            canvas.paste(_header_sprite(app, width, header_h, True), (0, status_h))
            for w in self._screens[self._screen]:
                if w.kind == "row":
                    size = (w.box[2] - w.box[0], w.box[3] - w.box[1])
                    canvas.paste(_setting_row_sprite(w.label, *size, self._values[app][w.label]), w.box[:2])
            return canvas
        title = "New entry" if self._screen == "form" else SCREEN_TITLES[s.seed % len(SCREEN_TITLES)]
        canvas.paste(_header_sprite(title, width, header_h, False), (0, status_h))
        for w in self._screens[self._screen]:
            if w.kind == "button":
                fill = (ACCENT if w.label == "Submit" else (117, 117, 117)) if s.level == 3 else _button_color(w.label, s.seed)
                canvas.paste(_button_sprite(w.label, w.box[2] - w.box[0], w.box[3] - w.box[1], fill, BG), w.box[:2])
            elif w.kind == "field":
                _draw_field(canvas, w, self._fields[w.label], self._focus == w.label)
        return canvas


def _main() -> None:
    """Print a task file: the default set, or one level with chosen split sizes (data/synth_L0.jsonl)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write synth tasks as JSONL to stdout.")
    parser.add_argument("--level", type=int, choices=LEVELS, help="one level only (default: the default set)")
    parser.add_argument("--train", type=int, default=200, help="train tasks of --level (seeds 0..)")
    parser.add_argument("--eval", type=int, default=50, help=f"eval tasks of --level (seeds {EVAL_SEED0}..)")
    for key, (low, high) in L2_SIZES.items():
        parser.add_argument(f"--{key}", type=int, help=f"level 2: {key} per task, {low}..{high} (default: drawn)")
    args = parser.parse_args()
    sizes = {key: getattr(args, key) for key in L2_SIZES if getattr(args, key) is not None}
    if args.level is None and sizes:
        parser.error("--apps/--settings need --level 2")
    try:
        tasks = (default_task_set() if args.level is None else synth_tasks(args.level, args.train, "train", **sizes)
                 + synth_tasks(args.level, args.eval, "eval", **sizes))
    except ValueError as exc:
        parser.error(str(exc))
    for task in tasks:
        print(json.dumps(task.to_dict()))


if __name__ == "__main__":
    _main()
