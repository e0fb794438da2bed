"""Draw an action on a screenshot, so a person can see what the agent did (env demo, replay, notebooks).

click: red circle with a crosshair; double_click: two rings; long_press: a thick ring; swipe: an arrow
from start to end; scroll: an arrow at the point (or the screen center) in the scroll direction;
type / key / wait: the text in a banner; finish: a green (success) or red (fail) banner; an invalid
action: a red "invalid: reason" banner. `label` (e.g. "step 3") goes in a small tag at the top left.
"""

from __future__ import annotations

import functools
import math

from PIL import Image, ImageDraw, ImageFont

from cua_kit.actions import Action, InvalidAction

RED = (229, 57, 53)
GREEN = (46, 160, 67)
BLUE = (30, 136, 229)
DARK = (20, 20, 20)
WHITE = (255, 255, 255)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _banner(draw: ImageDraw.ImageDraw, size: tuple[int, int], text: str, fill: tuple) -> None:
    """A full-width band at the bottom of the image with `text` in it (cut to fit)."""
    width, height = size
    font_px = max(10, min(width, height) // 22)
    band = font_px * 2
    max_chars = max(4, int(width / (font_px * 0.55)))
    shown = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    draw.rectangle((0, height - band, width, height), fill=fill)
    draw.text((font_px // 2, height - band // 2), shown, font=_font(font_px), fill=WHITE, anchor="lm")


def _arrow(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], width: int) -> None:
    draw.line((start, end), fill=RED, width=width)
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    head = width * 4
    for side in (-0.5, 0.5):  # two strokes of the arrow head, +-~30 degrees
        tip = (end[0] - head * math.cos(angle + side), end[1] - head * math.sin(angle + side))
        draw.line((end, tip), fill=RED, width=width)


def _point_marks(draw: ImageDraw.ImageDraw, action: Action, r: int, line: int) -> None:
    x, y = action.x, action.y
    if action.kind == "click":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=RED, width=line)
        draw.line((x - 2 * r, y, x + 2 * r, y), fill=RED, width=max(1, line // 2))
        draw.line((x, y - 2 * r, x, y + 2 * r), fill=RED, width=max(1, line // 2))
    elif action.kind == "double_click":
        for radius in (r, r * 3 // 2):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=RED, width=line)
    else:  # long_press
        draw.ellipse((x - r, y - r, x + r, y + r), outline=RED, width=line * 3)


_SCROLL_VECTORS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


def draw_action(image: Image.Image, action: Action | InvalidAction | None, label: str | None = None) -> Image.Image:
    """A copy of `image` (RGB) with `action` drawn on it; the input is never changed."""
    canvas = image.convert("RGB")  # always a new image, whatever the input mode
    draw = ImageDraw.Draw(canvas)
    size = canvas.size
    r = max(6, min(size) // 30)
    line = max(2, r // 4)
    if isinstance(action, InvalidAction):
        _banner(draw, size, f"invalid: {action.reason}", RED)
    elif action is None:
        pass
    elif action.kind in ("click", "double_click", "long_press") and action.x is not None:
        _point_marks(draw, action, r, line)
    elif action.kind == "swipe" and None not in (action.x, action.y, action.x2, action.y2):
        draw.ellipse((action.x - r // 2, action.y - r // 2, action.x + r // 2, action.y + r // 2), fill=RED)
        _arrow(draw, (action.x, action.y), (action.x2, action.y2), line)
    elif action.kind == "scroll":
        cx, cy = (action.x, action.y) if action.x is not None else (size[0] // 2, size[1] // 2)
        dx, dy = _SCROLL_VECTORS.get(action.direction or "down", (0, 1))
        _arrow(draw, (cx, cy), (cx + dx * r * 4, cy + dy * r * 4), line)
        _banner(draw, size, f"scroll {action.direction}", BLUE)
    elif action.kind == "finish":
        ok = action.status != "fail"
        text = f"finish: {action.status or 'success'}" + (f" - {action.answer}" if action.answer else "")
        _banner(draw, size, text, GREEN if ok else RED)
    elif action.kind == "type":
        _banner(draw, size, f"type: {action.text!r}", BLUE)
    elif action.kind == "key":
        _banner(draw, size, f"key: {action.text}", BLUE)
    else:
        _banner(draw, size, f"{action.kind}" + (f" {action.duration:g}s" if action.duration else ""), BLUE)
    if label:
        font_px = max(10, min(size) // 24)
        box = draw.textbbox((4, 4), label, font=_font(font_px))
        draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=DARK)
        draw.text((4, 4), label, font=_font(font_px), fill=WHITE)
    return canvas
