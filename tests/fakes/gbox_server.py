"""FakeGboxServer: a local *fake* of the GBox cloud API, for tests only.

The GBox cloud is unreachable from every machine of this project, so the GBox backend is tested with the
official `gbox-sdk` (0.1.0a41) over real HTTP against this fake. It speaks the contract that SDK release
sends and expects: paths under `/api/v1`, camelCase JSON, Bearer auth, list filters as query strings
(`labels[k]=v`, comma lists), data-URI screenshots, uiautomator XML screen layouts.

Each box is a `FakePhone`: a small Android-like simulator (home screen, a Settings app with toggles, a
Notes app and a Messages app with text fields, a few plain apps) rendered with Pillow. Shell commands
(`settings get/put`, `dumpsys window`, `cat`, `pm list packages`, `content query`, `| grep`) are answered
from the phone state, so validators run exactly as they would on a device.

Fault injection: `server.inject(endpoint, status, times, delay_s, execute)` queues faults per endpoint.
`execute=True` runs the request *then* fails it, the dangerous case where a client cannot know whether an
action happened. `server.executed_actions` records every action the fake really executed.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import quoteattr

from PIL import Image, ImageDraw, ImageFont

LAUNCHER = "com.google.android.apps.nexuslauncher"
SETTINGS = "com.android.settings"
NOTES = "com.example.notes"
MESSAGES = "com.google.android.apps.messaging"

# label -> package, icon colour. The home screen shows them in this order, 4 per row.
APPS: dict[str, tuple[str, str]] = {
    "Settings": (SETTINGS, "#607d8b"),
    "Notes": (NOTES, "#f9a825"),
    "Messages": (MESSAGES, "#1e88e5"),
    "Clock": ("com.google.android.deskclock", "#5e35b1"),
    "Calculator": ("com.google.android.calculator", "#00897b"),
    "Camera": ("com.android.camera2", "#e53935"),
    "Chrome": ("com.android.chrome", "#43a047"),
    "Contacts": ("com.google.android.contacts", "#8d6e63"),
}
PACKAGE_LABEL = {pkg: label for label, (pkg, _) in APPS.items()}

# Settings rows: label -> (namespace, key, value when on, value when off), as real Android stores them.
TOGGLES: dict[str, tuple[str, str, str, str]] = {
    "Wi-Fi": ("global", "wifi_on", "1", "0"),
    "Bluetooth": ("global", "bluetooth_on", "1", "0"),
    "Airplane mode": ("global", "airplane_mode_on", "1", "0"),
    "Mobile data": ("global", "mobile_data", "1", "0"),
    "Location": ("secure", "location_mode", "3", "0"),
    "Dark theme": ("secure", "ui_night_mode", "2", "1"),
    "Auto-rotate": ("system", "accelerometer_rotation", "1", "0"),
    "Do Not Disturb": ("global", "zen_mode", "1", "0"),
    "Battery Saver": ("global", "low_power", "1", "0"),
}
DEFAULT_SETTINGS = {
    ("global", "wifi_on"): "1", ("global", "bluetooth_on"): "0", ("global", "airplane_mode_on"): "0",
    ("global", "mobile_data"): "1", ("secure", "location_mode"): "3", ("secure", "ui_night_mode"): "1",
    ("system", "accelerometer_rotation"): "0", ("global", "zen_mode"): "0", ("global", "low_power"): "0",
}
NOTES_FILE = "/sdcard/Documents/notes.txt"
ACTIONS = ("click", "tap", "long-press", "swipe", "scroll", "drag", "type", "press-key", "press-button")


@dataclass
class Widget:
    """One on-screen element: drawn, hit-tested and dumped as a uiautomator node from the same data."""

    cls: str
    bounds: tuple[int, int, int, int]
    text: str = ""
    resource_id: str = ""
    desc: str = ""
    on_tap: Callable[[], None] | None = None
    checkable: bool = False
    checked: bool = False
    focused: bool = False
    fill: str | None = None


@dataclass
class FakePhone:
    """The state of one fake Android box, and how taps, keys and shell commands change it."""

    width: int = 540
    height: int = 960
    foreground: str = LAUNCHER
    settings: dict[tuple[str, str], str] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    files: dict[str, str] = field(default_factory=dict)
    draft: dict[str, str] = field(default_factory=lambda: {NOTES: "", MESSAGES: ""})
    focused_field: str | None = None
    sent_messages: list[str] = field(default_factory=list)
    notes_saved: bool = False

    # ---- screens -------------------------------------------------------------------------------------
    def widgets(self) -> list[Widget]:
        """What is on screen now, top to bottom."""
        screen = {LAUNCHER: self._home, SETTINGS: self._settings_app, NOTES: self._notes_app,
                  MESSAGES: self._messages_app}.get(self.foreground, self._plain_app)
        return [Widget("android.widget.TextView", (0, 0, self.width, 40), text="12:00",
                       resource_id="com.android.systemui:id/clock")] + screen()

    def _home(self) -> list[Widget]:
        out = []
        for i, (label, (pkg, colour)) in enumerate(APPS.items()):
            x0, y0 = 30 + (i % 4) * 125, 120 + (i // 4) * 170
            out.append(Widget("android.widget.TextView", (x0, y0, x0 + 105, y0 + 140), text=label,
                              desc=label, fill=colour, on_tap=lambda p=pkg: self.open(p)))
        return out

    def _title(self, text: str) -> Widget:
        return Widget("android.widget.TextView", (0, 40, self.width, 120), text=text,
                      resource_id="android:id/title", fill="#eceff1")

    def _settings_app(self) -> list[Widget]:
        out = [self._title("Settings")]
        for i, (label, (ns, key, on, _off)) in enumerate(TOGGLES.items()):
            y0 = 130 + i * 90
            checked = self.settings.get((ns, key)) == on
            out.append(Widget("android.widget.TextView", (20, y0, 400, y0 + 80), text=label,
                              resource_id="android:id/title"))
            out.append(Widget("android.widget.Switch", (420, y0 + 15, 520, y0 + 65), desc=label,
                              resource_id="android:id/switch_widget", checkable=True, checked=checked,
                              on_tap=lambda lb=label: self.flip(lb)))
        return out

    def _field(self, pkg: str, bounds: tuple[int, int, int, int], hint: str) -> Widget:
        return Widget("android.widget.EditText", bounds, text=self.draft[pkg], desc=hint,
                      resource_id=f"{pkg}:id/input", focused=self.focused_field == pkg,
                      on_tap=lambda: setattr(self, "focused_field", pkg))

    def _notes_app(self) -> list[Widget]:
        out = [self._title("Notes"), self._field(NOTES, (30, 160, 510, 400), "Write a note"),
               Widget("android.widget.Button", (380, 420, 510, 490), text="Save",
                      resource_id=f"{NOTES}:id/save", fill="#f9a825", on_tap=self.save_note)]
        if self.notes_saved:
            out.append(Widget("android.widget.TextView", (30, 420, 360, 490), text="Saved",
                              resource_id=f"{NOTES}:id/status"))
        return out

    def _messages_app(self) -> list[Widget]:
        out = [self._title("Messages")]
        for i, body in enumerate(self.sent_messages[-6:]):
            y0 = 140 + i * 90
            out.append(Widget("android.widget.TextView", (160, y0, 520, y0 + 70), text=body,
                              resource_id=f"{MESSAGES}:id/message_text", fill="#bbdefb"))
        out.append(self._field(MESSAGES, (20, 820, 400, 900), "Text message"))
        out.append(Widget("android.widget.Button", (410, 820, 520, 900), text="Send",
                          resource_id=f"{MESSAGES}:id/send", fill="#1e88e5", on_tap=self.send_message))
        return out

    def _plain_app(self) -> list[Widget]:
        label = PACKAGE_LABEL.get(self.foreground, self.foreground)
        return [self._title(label), Widget("android.widget.TextView", (40, 400, 500, 500), text=label)]

    # ---- state changes -------------------------------------------------------------------------------
    def open(self, package: str) -> None:
        if package not in PACKAGE_LABEL:
            raise KeyError(package)
        self.foreground, self.focused_field = package, None
        self.notes_saved = False

    def go_home(self) -> None:
        self.foreground, self.focused_field = LAUNCHER, None

    def flip(self, label: str) -> None:
        ns, key, on, off = TOGGLES[label]
        self.settings[(ns, key)] = off if self.settings.get((ns, key)) == on else on

    def save_note(self) -> None:
        self.files[NOTES_FILE] = self.draft[NOTES]
        self.notes_saved = True

    def send_message(self) -> None:
        if self.draft[MESSAGES]:
            self.sent_messages.append(self.draft[MESSAGES])
            self.draft[MESSAGES] = ""

    def tap(self, x: float, y: float) -> str:
        for w in reversed(self.widgets()):
            x0, y0, x1, y1 = w.bounds
            if w.on_tap and x0 <= x < x1 and y0 <= y < y1:
                w.on_tap()
                return f"tapped {w.text or w.desc}"
        return "tapped nothing"

    def type_text(self, text: str, mode: str = "append") -> str:
        if self.focused_field is None:
            return "no focused input"
        old = self.draft[self.focused_field] if mode == "append" else ""
        self.draft[self.focused_field] = old + text
        self.notes_saved = False
        return "typed"

    def press(self, name: str) -> str:
        if name in ("home", "back", "escape"):
            self.go_home()
        elif name == "enter" and self.focused_field == MESSAGES:
            self.send_message()
        elif name == "backspace" and self.focused_field:
            self.draft[self.focused_field] = self.draft[self.focused_field][:-1]
        return f"pressed {name}"

    def clear_app(self, package: str) -> None:
        """`pm clear`: drop an app's data (what pooled boxes use between episodes)."""
        if package == NOTES:
            self.files.pop(NOTES_FILE, None)
        if package == MESSAGES:
            self.sent_messages.clear()
        if package in self.draft:
            self.draft[package] = ""
        if self.foreground == package:
            self.go_home()

    # ---- outputs ---------------------------------------------------------------------------------------
    def render(self, scale: float = 1.0) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), "#121212" if self.dark else "#fafafa")
        draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=22)
        ink = "#eeeeee" if self.dark else "#212121"
        for w in self.widgets():
            self._draw_widget(draw, font, w, ink)
        if scale != 1.0:
            img = img.resize((round(self.width * scale), round(self.height * scale)))
        return img

    @property
    def dark(self) -> bool:
        return self.settings.get(("secure", "ui_night_mode")) == "2"

    @staticmethod
    def _draw_widget(draw: ImageDraw.ImageDraw, font: Any, w: Widget, ink: str) -> None:
        x0, y0, x1, y1 = w.bounds
        if w.cls == "android.widget.Switch":
            draw.rounded_rectangle(w.bounds, radius=25, fill="#43a047" if w.checked else "#9e9e9e")
            knob_x = x1 - 50 if w.checked else x0
            draw.ellipse((knob_x + 5, y0 + 5, knob_x + 45, y1 - 5), fill="white")
            return
        if w.cls == "android.widget.EditText":
            outline, width = ("#1e88e5", 4) if w.focused else ("#9e9e9e", 2)
            draw.rectangle(w.bounds, outline=outline, width=width)
            draw.text((x0 + 12, y0 + 12), w.text or w.desc, fill=ink if w.text else "#9e9e9e", font=font)
            return
        if w.fill:
            draw.rounded_rectangle(w.bounds, radius=14, fill=w.fill)
        text_y = y1 - 30 if w.cls == "android.widget.TextView" and w.desc else y0 + 12
        colour = "white" if w.cls == "android.widget.Button" else "#212121" if w.fill else ink
        draw.text((x0 + 12, text_y), w.text, fill=colour, font=font)

    def layout_xml(self) -> str:
        """The screen as `uiautomator dump` writes it."""
        nodes = []
        for i, w in enumerate(self.widgets()):
            b = "[{},{}][{},{}]".format(*w.bounds)
            attrs = {"index": str(i), "text": w.text, "resource-id": w.resource_id, "class": w.cls,
                     "package": self.foreground if i else "com.android.systemui", "content-desc": w.desc,
                     "checkable": str(w.checkable).lower(), "checked": str(w.checked).lower(),
                     "clickable": str(w.on_tap is not None).lower(), "enabled": "true",
                     "focused": str(w.focused).lower(), "bounds": b}
            nodes.append("    <node " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + " />")
        root = (f'  <node index="0" text="" resource-id="" class="android.widget.FrameLayout" '
                f'package="{self.foreground}" bounds="[0,0][{self.width},{self.height}]">')
        head = ["<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>", '<hierarchy rotation="0">', root]
        return "\n".join([*head, *nodes, "  </node>", "</hierarchy>"])

    # ---- shell -----------------------------------------------------------------------------------------
    def shell(self, command: str) -> tuple[int, str, str]:
        """Run a command the way `/boxes/{id}/commands` does: -> (exitCode, stdout, stderr)."""
        argv = shlex.split(command)
        if argv[:2] == ["sh", "-c"] and len(argv) == 3:
            command = argv[2]
        elif "|" in command:
            # The real API does not run a shell: pipes need an explicit `sh -c` (platform-facts).
            return 1, "", "pipes need sh -c"
        code, out, err = 0, "", ""
        for stage in command.split("|"):
            code, out, err = self._run_stage(shlex.split(stage), out)
            if code != 0:
                break
        return code, out, err

    def _run_stage(self, argv: list[str], stdin: str) -> tuple[int, str, str]:
        if not argv:
            return 2, "", "sh: syntax error"
        cmd, args = argv[0], argv[1:]
        if cmd == "grep":
            flags = [a for a in args if a.startswith("-")]
            pattern = [a for a in args if not a.startswith("-")][0]
            hits = [ln for ln in stdin.splitlines()
                    if re.search(pattern, ln, re.IGNORECASE if "-i" in flags else 0)]
            return (0 if hits else 1), ("" if "-q" in flags else "".join(h + "\n" for h in hits)), ""
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            return 127, "", f"sh: {cmd}: not found"
        return handler(args)

    def _cmd_settings(self, args: list[str]) -> tuple[int, str, str]:
        if len(args) >= 3 and args[0] == "get":
            return 0, self.settings.get((args[1], args[2]), "null") + "\n", ""
        if len(args) >= 4 and args[0] == "put":
            self.settings[(args[1], args[2])] = args[3]
            return 0, "", ""
        return 255, "", "usage: settings [get|put] NAMESPACE KEY [VALUE]"

    def _cmd_dumpsys(self, args: list[str]) -> tuple[int, str, str]:
        activity = f"{self.foreground}/.MainActivity"
        if args[:1] == ["window"]:
            return 0, (f"WINDOW MANAGER WINDOWS (dumpsys window windows)\n"
                       f"  mCurrentFocus=Window{{4f1c2d u0 {activity}}}\n"
                       f"  mFocusedApp=ActivityRecord{{91ab u0 {activity} t12}}\n"), ""
        if args[:2] == ["activity", "activities"]:
            return 0, f"  mResumedActivity: ActivityRecord{{91ab u0 {activity} t12}}\n", ""
        return 0, "", ""

    def _cmd_cat(self, args: list[str]) -> tuple[int, str, str]:
        if args and args[0] in self.files:
            return 0, self.files[args[0]], ""
        return 1, "", f"cat: {args[0] if args else ''}: No such file or directory"

    def _cmd_pm(self, args: list[str]) -> tuple[int, str, str]:
        if args[:2] == ["list", "packages"]:
            pkgs = sorted([pkg for pkg, _ in APPS.values()] + [LAUNCHER])
            return 0, "".join(f"package:{p}\n" for p in pkgs), ""
        if args[:1] == ["clear"] and len(args) == 2:
            self.clear_app(args[1])
            return 0, "Success\n", ""
        return 1, "", "Error: unknown pm command"

    def _cmd_am(self, args: list[str]) -> tuple[int, str, str]:
        if args[:1] == ["force-stop"] and len(args) == 2:
            if self.foreground == args[1]:
                self.go_home()
            return 0, "", ""
        if args[:2] == ["start", "-n"] and len(args) == 3:
            try:
                self.open(args[2].split("/")[0])
            except KeyError:
                return 1, "", f"Error: Activity not started, unable to resolve {args[2]}"
            return 0, f"Starting: Intent {{ cmp={args[2]} }}\n", ""
        return 1, "", "Error: unknown am command"

    def _cmd_input(self, args: list[str]) -> tuple[int, str, str]:
        if args[:1] == ["keyevent"] and len(args) == 2:
            keycodes = {"3": "home", "KEYCODE_HOME": "home", "4": "back", "KEYCODE_BACK": "back"}
            self.press(keycodes.get(args[1], ""))
            return 0, "", ""
        return 1, "", "usage: input keyevent KEYCODE"

    def _cmd_content(self, args: list[str]) -> tuple[int, str, str]:
        if "content://sms/sent" in args:
            rows = [f"Row: {i} body={b}\n" for i, b in enumerate(self.sent_messages)]
            return 0, "".join(rows) or "No result found.\n", ""
        return 1, "", "Error: unsupported uri"

    def _cmd_echo(self, args: list[str]) -> tuple[int, str, str]:
        return 0, " ".join(args) + "\n", ""


@dataclass
class Fault:
    """One injected failure: answer `status` after `delay_s`; with `execute`, run the request first."""

    status: int | None
    delay_s: float = 0.0
    execute: bool = False


@dataclass
class FakeBox:
    id: str
    type: str
    labels: dict[str, str]
    created_at: datetime
    expires_at: datetime
    status: str = "running"
    phone: FakePhone = field(default_factory=FakePhone)

    def to_json(self) -> dict[str, Any]:
        stamp = self.created_at.isoformat().replace("+00:00", "Z")
        os_version = "13" if self.type == "android" else "ubuntu-22.04"
        config = {"cpu": 2, "envs": {}, "labels": self.labels, "memory": 4096, "storage": 16,
                  "os": {"version": os_version}, "workingDir": "/root" if self.type == "linux" else "/sdcard"}
        if self.type == "android":
            config["deviceType"] = "virtual"
        return {"id": self.id, "type": self.type, "status": self.status, "config": config,
                "createdAt": stamp, "updatedAt": stamp,
                "expiresAt": self.expires_at.isoformat().replace("+00:00", "Z")}


def parse_duration(text: str) -> timedelta:
    """GBox durations: '500ms', '30s', '5m', '1h'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text or "")
    if not match:
        raise ValueError(f"bad duration {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]
    return timedelta(seconds=float(match[1]) * unit)


class FakeGboxServer:
    """A fake GBox API on 127.0.0.1 (ephemeral port) in a background thread. Use as a context manager.

    `base_url` is what `GBOX_CLIENT_BASE_URL` should be set to. Every request is appended to
    `requests` (endpoint, box id, status); every action really executed to `executed_actions`.
    """

    def __init__(self, api_key: str = "fake-key", screenshot_scale: float = 1.0,
                 display: tuple[int, int] = (540, 960)) -> None:
        self.api_key = api_key
        self.screenshot_scale = screenshot_scale
        self.display = display
        self.boxes: dict[str, FakeBox] = {}
        self.requests: list[dict[str, Any]] = []
        self.executed_actions: list[dict[str, Any]] = []
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "FakeGboxServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),  # fast shutdown
                                        name="fake-gbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start the fake first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/api/v1"

    # ---- test controls -----------------------------------------------------------------------------
    def inject(self, endpoint: str, status: int | None, times: int = 1, delay_s: float = 0.0,
               execute: bool = False) -> None:
        """Queue `times` faults for `endpoint` ('create', 'list', 'retrieve', 'terminate', 'display',
        'commands', 'screenshot', 'screen-layout', 'open', an action name such as 'click', or 'action'
        for any action). status None = only a delay."""
        with self._lock:
            self._faults[endpoint].extend(Fault(status, delay_s, execute) for _ in range(times))

    def live_boxes(self) -> list[FakeBox]:
        with self._lock:
            return [b for b in self.boxes.values() if b.status == "running"]

    def add_box(self, labels: dict[str, str], box_type: str = "android") -> str:
        """Create a box directly (as another process would): for sweep tests."""
        return self._create_box(box_type, {"config": {"labels": labels}})["id"]

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for key in (endpoint, "action" if endpoint in ACTIONS else None):
                if key and self._faults[key]:
                    return self._faults[key].popleft()
        return None

    # ---- API ---------------------------------------------------------------------------------------
    def _create_box(self, box_type: str, body: dict[str, Any]) -> dict[str, Any]:
        config = body.get("config") or {}
        now = datetime.now(timezone.utc)
        box = FakeBox(id=str(uuid.uuid4()), type=box_type, labels=dict(config.get("labels") or {}),
                      created_at=now, expires_at=now + parse_duration(config.get("expiresIn", "60m")),
                      phone=FakePhone(width=self.display[0], height=self.display[1]))
        with self._lock:
            self.boxes[box.id] = box
        return box.to_json()

    def _list_boxes(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        params = dict(query)
        labels = {m[1]: v for k, v in query if (m := re.fullmatch(r"labels\[(.+)\]", k))}
        statuses = set(params.get("status", "all").split(","))
        types = set(params.get("type", "all").split(","))
        page, size = int(params.get("page", 1)), int(params.get("pageSize", 10))
        with self._lock:
            hits = [b for b in self.boxes.values()
                    if ("all" in statuses or b.status in statuses) and ("all" in types or b.type in types)
                    and all(b.labels.get(k) == v for k, v in labels.items())]
        data = [b.to_json() for b in hits[(page - 1) * size: page * size]]
        return {"data": data, "page": page, "pageSize": size, "total": len(hits)}

    def _box(self, box_id: str) -> FakeBox:
        box = self.boxes.get(box_id)
        if box is not None and box.status == "running" and datetime.now(timezone.utc) > box.expires_at:
            box.status = "terminated"
        if box is None or box.status != "running":
            raise _HttpError(404, f"box {box_id} not found or not running")
        return box

    def _action(self, box: FakeBox, name: str, body: dict[str, Any]) -> dict[str, Any]:
        phone = box.phone
        if name in ("click", "tap", "long-press"):
            message = phone.tap(float(body["x"]), float(body["y"]))
        elif name == "type":
            message = phone.type_text(str(body["text"]), body.get("mode", "append"))
            if body.get("pressEnter"):
                phone.press("enter")
        elif name == "press-button":
            message = ", ".join(phone.press(b) for b in body["buttons"])
        elif name == "press-key":
            message = ", ".join(phone.press(k) for k in body["keys"])
        else:  # swipe, scroll, drag: nothing on these screens scrolls
            message = f"{name} done"
        self.executed_actions.append({"box_id": box.id, "action": name, "body": body})
        return {"actionId": str(uuid.uuid4()), "message": message}

    def handle(self, method: str, path: str, query: list[tuple[str, str]], body: dict[str, Any]
               ) -> tuple[int, Any, str]:
        """Route one request -> (status, JSON body or None, endpoint name)."""
        path = path.removeprefix("/api/v1")
        if method == "POST" and (m := re.fullmatch(r"/boxes/(android|linux)", path)):
            return 200, self._create_box(m[1], body), "create"
        if method == "GET" and path == "/boxes":
            return 200, self._list_boxes(query), "list"
        m = re.fullmatch(r"/boxes/([^/]+)(/.*)?", path)
        if not m:
            raise _HttpError(404, f"no route {method} {path}")
        box_id, rest = m[1], m[2] or ""
        with self._lock:
            box = self._box(box_id)
            if method == "GET" and rest == "":
                return 200, box.to_json(), "retrieve"
            if method == "POST" and rest == "/terminate":
                box.status = "terminated"
                return 204, None, "terminate"
            if method == "GET" and rest == "/display":
                res = {"width": box.phone.width, "height": box.phone.height}
                return 200, {"orientation": "portrait", "resolution": res}, "display"
            if method == "POST" and rest == "/commands":
                code, out, err = box.phone.shell(str(body.get("command", "")))
                return 200, {"exitCode": code, "stdout": out, "stderr": err}, "commands"
            if method == "POST" and rest == "/actions/screenshot":
                png = io.BytesIO()
                box.phone.render(self.screenshot_scale).save(png, format="PNG")
                return 200, {"uri": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}, \
                    "screenshot"
            if method == "GET" and rest == "/actions/screen-layout":
                return 200, {"content": box.phone.layout_xml()}, "screen-layout"
            if method == "POST" and (a := re.fullmatch(r"/actions/([a-z-]+)", rest)) and a[1] in ACTIONS:
                return 200, self._action(box, a[1], body), a[1]
            if method == "POST" and (p := re.fullmatch(r"/android/packages/([^/]+)/open", rest)):
                try:
                    box.phone.open(p[1])
                except KeyError:
                    raise _HttpError(404, f"package {p[1]} is not installed") from None
                return 204, None, "open"
        raise _HttpError(404, f"no route {method} {path}")


def endpoint_of(method: str, path: str) -> str:
    """The fault-injection name of a request, decided before it runs."""
    path = path.removeprefix("/api/v1")
    if re.fullmatch(r"/boxes/(android|linux)", path):
        return "create"
    if path == "/boxes":
        return "list"
    rest = re.sub(r"^/boxes/[^/]+", "", path)
    if rest == "":
        return "retrieve"
    if rest.endswith("/open"):
        return "open"
    return rest.rsplit("/", 1)[-1]


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: avoid the 40 ms delayed-ACK stall
    fake: FakeGboxServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        endpoint = endpoint_of(method, url.path)
        record = {"method": method, "endpoint": endpoint, "path": url.path,
                  "retry_count": self.headers.get("x-stainless-retry-count")}
        status, payload = self._answer(method, url, raw, endpoint)
        record["status"] = status
        with self.fake._lock:
            self.fake.requests.append(record)
        self._send(status, payload)

    def _answer(self, method: str, url: Any, raw: bytes, endpoint: str) -> tuple[int, Any]:
        if self.headers.get("Authorization") != f"Bearer {self.fake.api_key}":
            return 401, {"message": "Unauthorized: invalid API key"}
        fault = self.fake._take_fault(endpoint)
        if fault and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault and fault.status and not fault.execute:
            return fault.status, {"message": f"injected {fault.status}"}
        try:
            body = json.loads(raw) if raw else {}
            status, payload, _ = self.fake.handle(method, url.path, parse_qsl(url.query), body)
        except _HttpError as err:
            return err.status, {"message": err.message}
        except (KeyError, ValueError, TypeError) as err:
            return 400, {"message": f"bad request: {err}"}
        if fault and fault.status:  # executed, then failed: the client cannot tell it happened
            return fault.status, {"message": f"injected {fault.status} after executing"}
        return status, payload

    def _send(self, status: int, payload: Any) -> None:
        self.send_response(status)
        if status == 204:
            self.end_headers()
            return
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
