"""The action vocabulary, and the Qwen3-VL tool-call format that speaks it.

Actions are in *screen pixels* of the env's screenshot. The parser maps model coordinates
(relative 0-999 grid for Qwen3-VL, absolute pixels for Qwen2.5-VL) to pixels; the formatter maps back.
Anything the parser can't turn into a valid action becomes an `InvalidAction` with a reason: it never
raises into the rollout loop.

The wire format (what Qwen3-VL was trained on; text before/after it, e.g. a thought, is ignored):

    <tool_call>
    {"name": "mobile_use", "arguments": {"action": "click", "coordinate": [x, y]}}
    </tool_call>

The first tool call wins; a bare JSON object (the call, or just its arguments) is accepted too.

mobile_use -> our kinds:
    click(coordinate) -> click;  long_press(coordinate, time) -> long_press(duration=time)
    swipe(coordinate, coordinate2) -> swipe;  type(text) -> type;  key(text) -> key(text)
    system_button(button: Back|Home|Menu|Enter) -> key(text="back"|"home"|"menu"|"enter")
    wait(time) -> wait(duration);  terminate(status success|failure) -> finish(status "success"|"fail")
    answer(text) -> finish(status="success", answer=text): answering is how a question task ends.
computer_use -> our kinds:
    left_click(coordinate) -> click;  double_click(coordinate) -> double_click
    left_click_drag(start_coordinate, coordinate) -> swipe (the parser keeps no cursor, so the start
        must be given; without it the call is invalid)
    scroll(pixels, coordinate?) -> scroll up (pixels > 0) / down;  hscroll -> scroll right (> 0) / left
    key(keys: list) -> key(text="+".join(keys));  type, wait, terminate, answer as for mobile_use
    mouse_move, right_click, middle_click, triple_click -> InvalidAction: our envs can't do them, and
        running a different action than the model asked for would credit it for the wrong thing.
The formatter writes the inverse; a scroll is written with `SCROLL_PIXELS` (our Action has no amount),
and a finish with an answer but status "fail" is written as terminate(failure) (the answer is dropped).

Coordinates, relative mode (per axis, side = width or height in pixels):
    pixel -> grid: m = round(p * 999 / (side - 1))      grid -> pixel: p = round(m * (side - 1) / 999)
so 0 <-> 0 and 999 <-> side - 1 (Qwen's cookbook uses round(m / 999 * side), which can land one pixel
off-screen). Rounding is half-up in integer arithmetic. Inverse property: let k = 999 / (side - 1).
If side <= 1000 (k >= 1), m = round(p k) gives |m - p k| <= 1/2, so |m / k - p| <= 1 / (2k) <= 1/2,
with equality only when k = 1 and then m = p exactly; hence round(m / k) = p: every pixel round-trips
and parse(format(a)) == a for every valid action. If side > 1000 the same argument with the roles
swapped shows every grid value round-trips, so format(parse(t)) == t for every valid text. In both
cases format(parse(t)) == t for the canonical texts (those format_action writes).
Grid values outside 0..999 (Qwen3-VL sometimes says 1000) are invalid, as are pixels off-screen.

Bounds (the action grammar of `inference/grammar.py` has the same ones, so a constrained completion is always
an action the parser accepts): numbers of at most NUMBER_DIGITS digits, times in [0, SECONDS_MAX] seconds,
texts of at most TEXT_MAX_CHARS characters, at most KEYS_MAX keys. Texts are made valid Unicode (a lone
surrogate escape such as "\\ud800" becomes U+FFFD).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

ActionKind = Literal[
    "click", "double_click", "long_press", "swipe", "scroll", "type", "key", "wait", "finish"
]
ACTION_KINDS: tuple[str, ...] = ActionKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Action:
    """One GUI action. Which fields matter depends on `kind`:

    click/double_click/long_press: x, y (+ duration for long_press, seconds)
    swipe (drag): x, y -> x2, y2
    scroll: x, y (where; optional) and direction up|down|left|right
    type: text
    key: text = a key or system button name (back, home, menu, enter, Tab, ArrowDown, ...)
    wait: duration (seconds)
    finish: status success|fail, optional answer
    """

    kind: ActionKind
    x: int | None = None
    y: int | None = None
    x2: int | None = None
    y2: int | None = None
    direction: str | None = None
    text: str | None = None
    duration: float | None = None
    status: str | None = None
    answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set: compact JSON for the trace store."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Action":
        return cls(**row)


@dataclass(frozen=True)
class InvalidAction:
    """A completion that is not a valid action. `reason` says why, `raw` is the text."""

    reason: str
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"invalid": self.reason}


# ---------------------------------------------------------------------------------------------
# Coordinates: model space <-> screen pixels
# ---------------------------------------------------------------------------------------------

GRID_MAX = 999  # relative mode: the model sees a 0..999 grid on each axis (Qwen3-VL's convention)
# Bounds the parser enforces and the action grammar (inference/grammar.py) writes into its rules, so that
# constrained decoding can only write what the parser accepts, and no number or text the parser accepts can
# overflow an env or crash the next turn's tokenizer.
NUMBER_DIGITS = 5  # pixel coordinates and scroll amounts have at most 5 digits
NUMBER_MAX = 10 ** NUMBER_DIGITS - 1
SECONDS_MAX = 100.0  # `time` of wait / long_press, seconds
TEXT_MAX_CHARS = 1000  # characters of a typed text, an answer, a key name
KEYS_MAX = 8  # keys pressed together in one computer_use `key` action
COORD_MODES: tuple[str, ...] = ("relative", "absolute")
TOOLS: tuple[str, ...] = ("mobile_use", "computer_use")
SCROLL_PIXELS = 300  # computer_use scroll amount the formatter writes; our Action has no amount


def _round_div(num: int, den: int) -> int:
    """round(num/den) with halves rounded up, in exact integer arithmetic (no float drift)."""
    return (2 * num + den) // (2 * den)


def _check_screen(screen_size: tuple[int, int]) -> tuple[int, int]:
    width, height = int(screen_size[0]), int(screen_size[1])
    if width < 2 or height < 2:
        raise ValueError(f"screen_size must be at least 2x2 pixels, got {screen_size!r}")
    return width, height


def _check_mode(coord_mode: str) -> None:
    if coord_mode not in COORD_MODES:
        raise ValueError(f"coord_mode must be one of {COORD_MODES}, got {coord_mode!r}")


def to_model_coords(x: int, y: int, screen_size: tuple[int, int], coord_mode: str) -> tuple[int, int]:
    """Pixel (x, y) -> the coordinates the model speaks. relative: m = round(p * 999 / (side - 1))."""
    _check_mode(coord_mode)
    width, height = _check_screen(screen_size)
    if coord_mode == "absolute":
        return int(x), int(y)
    return _round_div(int(x) * GRID_MAX, width - 1), _round_div(int(y) * GRID_MAX, height - 1)


def to_pixels(mx: int, my: int, screen_size: tuple[int, int], coord_mode: str) -> tuple[int, int]:
    """Model coordinates -> pixel (x, y). relative: p = round(m * (side - 1) / 999).

    Raises ValueError when the point lies outside the grid (relative) or the screen (absolute).
    """
    _check_mode(coord_mode)
    width, height = _check_screen(screen_size)
    if coord_mode == "absolute":
        if not (0 <= mx < width and 0 <= my < height):
            raise ValueError(f"point ({mx}, {my}) is outside the {width}x{height} screen")
        return int(mx), int(my)
    if not (0 <= mx <= GRID_MAX and 0 <= my <= GRID_MAX):
        raise ValueError(f"point ({mx}, {my}) is outside the 0..{GRID_MAX} grid")
    return _round_div(int(mx) * (width - 1), GRID_MAX), _round_div(int(my) * (height - 1), GRID_MAX)


# ---------------------------------------------------------------------------------------------
# Parsing: completion text -> Action | InvalidAction
# ---------------------------------------------------------------------------------------------

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_SYSTEM_BUTTONS = {"back": "Back", "home": "Home", "menu": "Menu", "enter": "Enter"}
_UNSUPPORTED = {  # computer_use actions our vocabulary can't express, and what to use instead
    "mouse_move": "hover has no effect in cua-kit envs; use left_click with a coordinate",
    "right_click": "cua-kit envs have no context-menu click; use left_click",
    "middle_click": "cua-kit envs have no middle click; use left_click",
    "triple_click": "cua-kit envs have no triple click; use double_click",
    "open": "opening apps by name is not supported; click the app icon",
}


class _Bad(Exception):
    """Internal: why a completion is not a valid action (becomes InvalidAction.reason)."""


def _find_call(text: str) -> dict[str, Any]:
    """The first tool call in `text` (inside <tool_call> tags, or the first bare JSON object)."""
    match = _TOOL_CALL.search(text)
    body = match.group(1) if match else text
    decoder = json.JSONDecoder()
    for start in [i for i, ch in enumerate(body) if ch == "{"][:50]:
        try:
            obj, _ = decoder.raw_decode(body, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    raise _Bad("no JSON tool call found" if not match else "tool_call does not hold a JSON object")


def _call_arguments(call: dict[str, Any], tool: str) -> dict[str, Any]:
    """{"name": tool, "arguments": {...}} -> the arguments; a bare {"action": ...} is accepted too."""
    if "action" in call and "arguments" not in call:
        return call
    if call.get("name") != tool:
        raise _Bad(f"unknown tool {_short(call.get('name'))}; expected {tool!r}")
    args = call.get("arguments")
    if isinstance(args, str):  # OpenAI-style servers send arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise _Bad("arguments is a string that is not JSON") from None
    if not isinstance(args, dict):
        raise _Bad("arguments must be a JSON object")
    return args


def _short(value: Any) -> str:
    """A value for a reason: its repr, cut (a completion can hold a 1,000-digit number or a 10 kB string)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 60 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    """An int or a finite float (not a bool). Huge ints pass here and fail the range checks: math.isfinite
    would raise OverflowError on them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _number(args: dict[str, Any], key: str, low: float, high: float) -> float:
    value = args.get(key)
    if not _is_number(value):
        raise _Bad(f"{key!r} must be a number, got {_short(value)}")
    if not low <= value <= high:
        raise _Bad(f"{key!r} must be in [{low:g}, {high:g}], got {_short(value)}")
    return float(value) + 0.0  # + 0.0: -0.0 becomes 0.0, which the formatter and the grammar write


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (JSON allows "\\ud800") replaced by U+FFFD: such a string can't be encoded
    as UTF-8, so it would crash the tokenizer of the next turn's prompt, the trace and the env."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _text(args: dict[str, Any], key: str) -> str:
    return _string(args.get(key), key)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string, got {_short(value)}")
    if len(value) > TEXT_MAX_CHARS:
        raise _Bad(f"{key!r} is longer than {TEXT_MAX_CHARS} characters ({len(value)})")
    return valid_unicode(value)


def _point(args: dict[str, Any], key: str, screen_size: tuple[int, int], coord_mode: str) -> tuple[int, int]:
    value = args.get(key)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise _Bad(f"{key!r} must be [x, y] with two numbers, got {_short(value)}")
    if not all(abs(v) <= NUMBER_MAX for v in value):
        raise _Bad(f"{key!r}: point {_short(value)} is off any screen (|x|, |y| <= {NUMBER_MAX})")
    mx, my = value
    try:
        return to_pixels(math.floor(mx + 0.5), math.floor(my + 0.5), screen_size, coord_mode)
    except ValueError as e:
        raise _Bad(f"{key!r}: {e}") from None


def _status(args: dict[str, Any]) -> str:
    status = _text(args, "status").lower()
    if status not in ("success", "failure", "fail"):
        raise _Bad(f"'status' must be success or failure, got {_short(status)}")
    return "success" if status == "success" else "fail"


def _duration(args: dict[str, Any]) -> float:
    return _number(args, "time", 0, SECONDS_MAX)


def _mobile_action(name: str, args: dict[str, Any], size: tuple[int, int], mode: str) -> Action:
    if name == "click":
        x, y = _point(args, "coordinate", size, mode)
        return Action("click", x=x, y=y)
    if name == "long_press":
        x, y = _point(args, "coordinate", size, mode)
        return Action("long_press", x=x, y=y, duration=_duration(args))
    if name == "swipe":
        (x, y), (x2, y2) = _point(args, "coordinate", size, mode), _point(args, "coordinate2", size, mode)
        return Action("swipe", x=x, y=y, x2=x2, y2=y2)
    if name == "system_button":
        button = _text(args, "button").lower()
        if button not in _SYSTEM_BUTTONS:
            raise _Bad(f"'button' must be one of Back, Home, Menu, Enter, got {_short(args['button'])}")
        return Action("key", text=button)
    if name == "key":
        return Action("key", text=_text(args, "text"))
    return _common_action(name, args)


def _computer_action(name: str, args: dict[str, Any], size: tuple[int, int], mode: str) -> Action:
    if name in ("left_click", "double_click"):
        x, y = _point(args, "coordinate", size, mode)
        return Action("click" if name == "left_click" else "double_click", x=x, y=y)
    if name == "left_click_drag":
        if "start_coordinate" not in args:
            raise _Bad("left_click_drag needs 'start_coordinate' and 'coordinate' (the parser keeps no cursor)")
        (x, y), (x2, y2) = _point(args, "start_coordinate", size, mode), _point(args, "coordinate", size, mode)
        return Action("swipe", x=x, y=y, x2=x2, y2=y2)
    if name in ("scroll", "hscroll"):
        pixels = _number(args, "pixels", -NUMBER_MAX, NUMBER_MAX)
        if pixels == 0:
            raise _Bad("'pixels' must not be 0")
        direction = {("scroll", True): "up", ("scroll", False): "down",
                     ("hscroll", True): "right", ("hscroll", False): "left"}[(name, pixels > 0)]
        x = y = None
        if args.get("coordinate") is not None:
            x, y = _point(args, "coordinate", size, mode)
        return Action("scroll", x=x, y=y, direction=direction)
    if name == "key":
        keys = args.get("keys")
        if not (isinstance(keys, list) and 0 < len(keys) <= KEYS_MAX and all(isinstance(k, str) and k for k in keys)):
            raise _Bad(f"'keys' must be a list of 1 to {KEYS_MAX} key names, got {_short(keys)}")
        if any("+" in k for k in keys[:-1]) or ("+" in keys[-1] and keys[-1] != "+"):
            # our Action joins keys with "+": only a lone "+" key, last, reads back unambiguously
            raise _Bad(f"a key name can't hold '+' (only a lone '+' key, last), got {_short(keys)}")
        return Action("key", text="+".join(_string(k, "keys") for k in keys))
    return _common_action(name, args)


def _common_action(name: str, args: dict[str, Any]) -> Action:
    """Actions spelled the same way by both tools."""
    if name == "type":
        return Action("type", text=_text(args, "text"))
    if name == "wait":
        return Action("wait", duration=_duration(args))
    if name == "terminate":
        return Action("finish", status=_status(args))
    if name == "answer":
        return Action("finish", status="success", answer=_text(args, "text"))
    if name in _UNSUPPORTED:
        raise _Bad(f"action {name!r} is not supported: {_UNSUPPORTED[name]}")
    raise _Bad(f"unknown action {_short(name)}")


def _check_tool(tool: str) -> None:
    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {TOOLS}, got {tool!r}")


def parse_action(
    text: str,
    screen_size: tuple[int, int],
    coord_mode: str = "relative",
    tool: str = "mobile_use",
    allowed: set[str] | None = None,
) -> Action | InvalidAction:
    """Turn a completion into an Action in screen pixels, or an InvalidAction saying why not.

    Never raises on any `text`; a wrong `screen_size`, `coord_mode` or `tool` (caller bugs) raise ValueError.
    `allowed` (optional) holds action names, ours (`click`, `key`, ...) or the tool's (`system_button`,
    `left_click`, ...): an action matching neither is invalid.
    """
    _check_tool(tool)
    _check_mode(coord_mode)
    _check_screen(screen_size)
    raw = text if isinstance(text, str) else repr(text)
    try:
        args = _call_arguments(_find_call(raw), tool)
        name = args.get("action")
        if not isinstance(name, str):
            raise _Bad(f"'action' must be a string, got {_short(name)}")
        to_action = _mobile_action if tool == "mobile_use" else _computer_action
        action = to_action(name, args, screen_size, coord_mode)
        if allowed is not None and name not in allowed and action.kind not in allowed:
            raise _Bad(f"action {_short(name)} is not allowed here; allowed: {sorted(allowed)}")
        return action
    except _Bad as e:
        return InvalidAction(reason=str(e), raw=raw)
    except RecursionError:  # absurdly nested JSON
        return InvalidAction(reason="JSON nested too deeply", raw=raw)


# ---------------------------------------------------------------------------------------------
# Formatting: Action -> the canonical tool-call text (what an SFT target or a demo shows)
# ---------------------------------------------------------------------------------------------

DEFAULT_LONG_PRESS_S = 1.0
DEFAULT_WAIT_S = 1.0


def _model_point(x: int | None, y: int | None, size: tuple[int, int], mode: str) -> list[int]:
    if x is None or y is None:
        raise ValueError("this action needs x and y")
    if not (0 <= x < size[0] and 0 <= y < size[1]):
        raise ValueError(f"point ({x}, {y}) is outside the {size[0]}x{size[1]} screen")
    return list(to_model_coords(x, y, size, mode))


def _finish_args(action: Action) -> dict[str, Any]:
    if action.answer is not None and action.status != "fail":
        return {"action": "answer", "text": action.answer}
    return {"action": "terminate", "status": "failure" if action.status == "fail" else "success"}


def _mobile_args(a: Action, size: tuple[int, int], mode: str) -> dict[str, Any]:
    if a.kind == "click":
        return {"action": "click", "coordinate": _model_point(a.x, a.y, size, mode)}
    if a.kind == "long_press":
        return {"action": "long_press", "coordinate": _model_point(a.x, a.y, size, mode),
                "time": a.duration if a.duration is not None else DEFAULT_LONG_PRESS_S}
    if a.kind == "swipe":
        return {"action": "swipe", "coordinate": _model_point(a.x, a.y, size, mode),
                "coordinate2": _model_point(a.x2, a.y2, size, mode)}
    if a.kind == "key" and (a.text or "").lower() in _SYSTEM_BUTTONS:
        return {"action": "system_button", "button": _SYSTEM_BUTTONS[(a.text or "").lower()]}
    if a.kind == "key":
        return {"action": "key", "text": a.text or ""}
    return _common_args(a, "mobile_use")


def _key_list(text: str) -> list[str]:
    """'ctrl+c' -> ['ctrl', 'c']; a literal '+' key survives ('ctrl++' -> ['ctrl', '+'])."""
    if text.endswith("+"):
        head = text[:-1].rstrip("+") if text != "+" else ""
        return (head.split("+") if head else []) + ["+"]
    return text.split("+")


def _computer_args(a: Action, size: tuple[int, int], mode: str) -> dict[str, Any]:
    if a.kind in ("click", "double_click"):
        name = "left_click" if a.kind == "click" else "double_click"
        return {"action": name, "coordinate": _model_point(a.x, a.y, size, mode)}
    if a.kind == "swipe":
        return {"action": "left_click_drag", "start_coordinate": _model_point(a.x, a.y, size, mode),
                "coordinate": _model_point(a.x2, a.y2, size, mode)}
    if a.kind == "scroll":
        if a.direction not in ("up", "down", "left", "right"):
            raise ValueError(f"scroll direction must be up|down|left|right, got {a.direction!r}")
        sign = 1 if a.direction in ("up", "right") else -1
        args: dict[str, Any] = {"action": "scroll" if a.direction in ("up", "down") else "hscroll",
                                "pixels": sign * SCROLL_PIXELS}
        if a.x is not None:
            args["coordinate"] = _model_point(a.x, a.y, size, mode)
        return args
    if a.kind == "key":
        return {"action": "key", "keys": _key_list(a.text or "")}
    return _common_args(a, "computer_use")


def _common_args(a: Action, tool: str) -> dict[str, Any]:
    if a.kind == "type":
        return {"action": "type", "text": a.text or ""}
    if a.kind == "wait":
        return {"action": "wait", "time": a.duration if a.duration is not None else DEFAULT_WAIT_S}
    if a.kind == "finish":
        return _finish_args(a)
    raise ValueError(f"the {tool} tool cannot express a {a.kind!r} action")


def format_action(
    action: Action, screen_size: tuple[int, int], coord_mode: str = "relative", tool: str = "mobile_use"
) -> str:
    """The canonical Qwen3-VL tool call for `action` (pixels -> model coordinates).

    Raises ValueError for an action the tool cannot express (e.g. scroll in mobile_use).
    """
    _check_tool(tool)
    _check_mode(coord_mode)
    size = _check_screen(screen_size)
    args = (_mobile_args if tool == "mobile_use" else _computer_args)(action, size, coord_mode)
    call = {"name": tool, "arguments": args}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


# ---------------------------------------------------------------------------------------------
# The tool description for the system prompt, in Qwen's function-call style
# ---------------------------------------------------------------------------------------------

_MOBILE_ACTIONS = {
    "click": "Click the point on the screen with coordinate (x, y).",
    "long_press": "Press the point on the screen with coordinate (x, y) for `time` seconds.",
    "swipe": "Swipe from the point `coordinate` (x, y) to the point `coordinate2` (x2, y2).",
    "type": "Input the specified text into the activated input box.",
    "key": "Press a key by name (adb keyevent names, e.g. \"volume_up\", \"clear\").",
    "system_button": "Press the system button `button`.",
    "wait": "Wait `time` seconds for the change to happen.",
    "answer": "Give the answer to the user's question in `text`; this ends the task.",
    "terminate": "Terminate the current task and report its completion status.",
}
_COMPUTER_ACTIONS = {
    "key": "Press the keys in `keys` together, in order (e.g. [\"ctrl\", \"c\"]).",
    "type": "Type a string of text on the keyboard.",
    "left_click": "Click the left mouse button at `coordinate`.",
    "double_click": "Double-click the left mouse button at `coordinate`.",
    "left_click_drag": "Press the left button at `start_coordinate`, drag to `coordinate`, release.",
    "scroll": "Scroll vertically by `pixels` (positive up, negative down), at `coordinate` if given.",
    "hscroll": "Scroll horizontally by `pixels` (positive right, negative left), at `coordinate` if given.",
    "wait": "Wait `time` seconds for the change to happen.",
    "answer": "Give the answer to the user's question in `text`; this ends the task.",
    "terminate": "Terminate the current task and report its completion status.",
}


def _coordinate_text(coord_mode: str, screen_size: tuple[int, int] | None) -> str:
    if coord_mode == "relative":
        return (f"* Coordinates are on a 0-{GRID_MAX} grid on each axis, whatever the real resolution: "
                f"(0, 0) is the top-left corner and ({GRID_MAX}, {GRID_MAX}) the bottom-right corner.")
    if screen_size is None:
        return "* Coordinates are pixels of the screenshot, from its top-left corner."
    return f"* The screen's resolution is {screen_size[0]}x{screen_size[1]}; coordinates are pixels."


def _schema_params(tool: str, actions: dict[str, str]) -> dict[str, Any]:
    point = {"type": "array", "description": "(x, y): the point, see the coordinate rule above."}
    props: dict[str, Any] = {
        "action": {"description": "The action to perform:\n" + "\n".join(
            f"* `{name}`: {text}" for name, text in actions.items()), "enum": list(actions), "type": "string"},
        "coordinate": {**point, "description": point["description"] + " Required by click-like actions."},
        "text": {"type": "string", "description": "Required only by action=type, action=key, action=answer."},
        "time": {"type": "number", "description": "Seconds. Required only by action=long_press and action=wait."},
        "status": {"type": "string", "enum": ["success", "failure"],
                   "description": "The status of the task. Required only by action=terminate."},
    }
    if tool == "mobile_use":
        props["coordinate2"] = {**point, "description": "(x2, y2): the end point. Required only by action=swipe."}
        props["button"] = {"type": "string", "enum": list(_SYSTEM_BUTTONS.values()),
                           "description": "Back returns to the previous screen, Home to the desktop, Menu "
                                          "opens the app menu, Enter presses enter. Required only by "
                                          "action=system_button."}
    else:
        props["text"]["description"] = "Required only by action=type and action=answer."
        props["keys"] = {"type": "array", "description": "Key names. Required only by action=key."}
        props["start_coordinate"] = {**point, "description": "(x, y): where a drag starts. "
                                     "Required only by action=left_click_drag."}
        props["pixels"] = {"type": "number", "description": "Scroll amount. Required by action=scroll/hscroll."}
    return {"properties": props, "required": ["action"], "type": "object"}


def compact_tool_schema(tool: str, coord_mode: str, screen_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The same tool in ~60 tokens: the action names and the coordinate rule, no per-field prose.

    For small models trained from scratch (the tiny/small builtins), where the full description is
    ~800 tokens of every prompt and teaches nothing; a real Qwen3-VL should get `tool_schema`.
    """
    _check_tool(tool)
    _check_mode(coord_mode)
    actions = _MOBILE_ACTIONS if tool == "mobile_use" else _COMPUTER_ACTIONS
    return {"type": "function", "function": {"name": tool, "description": _coordinate_text(coord_mode, screen_size),
                                             "parameters": {"properties": {"action": {"enum": list(actions)}}}}}


def tool_schema(tool: str, coord_mode: str, screen_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The JSON function description of `tool` for the system prompt's <tools> block (Qwen's style).

    It lists only the actions `parse_action` accepts, so the model is never told about one we reject.
    """
    _check_tool(tool)
    _check_mode(coord_mode)
    device = "a mobile device" if tool == "mobile_use" else "a computer"
    description = "\n".join([
        f"Use {'a touchscreen' if tool == 'mobile_use' else 'a mouse and keyboard'} to interact with {device}, "
        "and take screenshots.",
        "* Some applications take time to start or process actions: wait and look at the next screenshot.",
        _coordinate_text(coord_mode, screen_size),
        "* Click buttons, links and icons in the center of the element, not on its edges.",
    ])
    actions = _MOBILE_ACTIONS if tool == "mobile_use" else _COMPUTER_ACTIONS
    return {"type": "function",
            "function": {"name": tool, "description": description, "parameters": _schema_params(tool, actions)}}


# ---------------------------------------------------------------------------------------------
# A random policy: the floor every trained agent must beat (benchmarks, tests, sanity checks)
# ---------------------------------------------------------------------------------------------

_RANDOM_WORDS = ("hello", "ok", "test", "blue", "42", "yes", "send")


def random_action(rng: random.Random, screen_size: tuple[int, int]) -> Action:
    """A uniformly random mobile action: mostly taps anywhere, sometimes typing, keys, swipes, waits."""
    width, height = screen_size
    roll = rng.random()
    x, y = rng.randrange(width), rng.randrange(height)
    if roll < 0.70:
        return Action("click", x=x, y=y)
    if roll < 0.80:
        return Action("type", text=rng.choice(_RANDOM_WORDS))
    if roll < 0.88:
        return Action("key", text=rng.choice(("back", "home", "enter")))
    if roll < 0.94:
        return Action("swipe", x=x, y=y, x2=rng.randrange(width), y2=rng.randrange(height))
    if roll < 0.97:
        return Action("long_press", x=x, y=y, duration=1.0)
    return Action("wait", duration=1.0)
