"""Tests of the Qwen3-VL tool-call parser/formatter (cua_kit.actions) and of draw_action (cua_kit.draw)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from cua_kit.actions import (
    GRID_MAX, Action, InvalidAction, format_action, parse_action, to_model_coords, to_pixels, tool_schema,
)
from cua_kit.draw import draw_action

PHONE = (360, 640)
DESKTOP = (1920, 1080)


def call(tool: str, **args) -> str:
    return "<tool_call>\n" + json.dumps({"name": tool, "arguments": args}) + "\n</tool_call>"


# -- coordinates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [2, 3, 160, 360, 640, 999, 1000])
def test_every_pixel_round_trips_on_screens_up_to_1000(side):
    size = (side, side)
    for p in range(side):
        m = to_model_coords(p, p, size, "relative")
        assert 0 <= m[0] <= GRID_MAX
        assert to_pixels(*m, size, "relative") == (p, p)


@pytest.mark.parametrize("side", [1001, 1080, 1920, 3840])
def test_every_grid_value_round_trips_on_larger_screens(side):
    size = (side, side)
    for m in range(GRID_MAX + 1):
        p = to_pixels(m, m, size, "relative")
        assert to_model_coords(*p, size, "relative") == (m, m)


def test_grid_corners_map_to_screen_corners():
    assert to_pixels(0, 0, PHONE, "relative") == (0, 0)
    assert to_pixels(999, 999, PHONE, "relative") == (359, 639)
    assert to_pixels(5, 7, PHONE, "absolute") == (5, 7)


# -- parsing: examples -----------------------------------------------------------------------------

def test_parse_click_with_thought_before_and_text_after():
    text = "Thought: the Send button is at the bottom.\n" + call("mobile_use", action="click",
                                                                 coordinate=[500, 999]) + "\ntrailing"
    assert parse_action(text, PHONE) == Action("click", x=180, y=639)


def test_first_tool_call_wins_and_bare_json_is_accepted():
    text = call("mobile_use", action="type", text="a") + call("mobile_use", action="type", text="b")
    assert parse_action(text, PHONE) == Action("type", text="a")
    assert parse_action('{"action": "system_button", "button": "Home"}', PHONE) == Action("key", text="home")
    bare_call = json.dumps({"name": "mobile_use", "arguments": {"action": "wait", "time": 2}})
    assert parse_action(bare_call, PHONE) == Action("wait", duration=2.0)


@pytest.mark.parametrize("args, expected", [
    ({"action": "long_press", "coordinate": [0, 0], "time": 2}, Action("long_press", x=0, y=0, duration=2.0)),
    ({"action": "swipe", "coordinate": [0, 0], "coordinate2": [999, 999]}, Action("swipe", x=0, y=0, x2=359, y2=639)),
    ({"action": "system_button", "button": "Back"}, Action("key", text="back")),
    ({"action": "key", "text": "volume_up"}, Action("key", text="volume_up")),
    ({"action": "terminate", "status": "success"}, Action("finish", status="success")),
    ({"action": "terminate", "status": "failure"}, Action("finish", status="fail")),
    ({"action": "answer", "text": "42"}, Action("finish", status="success", answer="42")),
])
def test_parse_mobile_use(args, expected):
    assert parse_action(call("mobile_use", **args), PHONE) == expected


@pytest.mark.parametrize("args, expected", [
    ({"action": "left_click", "coordinate": [10, 20]}, Action("click", x=10, y=20)),
    ({"action": "double_click", "coordinate": [10, 20]}, Action("double_click", x=10, y=20)),
    ({"action": "left_click_drag", "start_coordinate": [1, 2], "coordinate": [3, 4]},
     Action("swipe", x=1, y=2, x2=3, y2=4)),
    ({"action": "scroll", "pixels": -5}, Action("scroll", direction="down")),
    ({"action": "scroll", "pixels": 300, "coordinate": [5, 6]}, Action("scroll", x=5, y=6, direction="up")),
    ({"action": "hscroll", "pixels": 3}, Action("scroll", direction="right")),
    ({"action": "key", "keys": ["ctrl", "c"]}, Action("key", text="ctrl+c")),
])
def test_parse_computer_use_absolute(args, expected):
    assert parse_action(call("computer_use", **args), DESKTOP, "absolute", "computer_use") == expected


@pytest.mark.parametrize("text, reason_part", [
    ("I will click the button", "no JSON"),
    ("<tool_call>not json</tool_call>", "JSON object"),
    (call("mobile_use", action="click", coordinate=[1000, 5]), "outside"),
    (call("mobile_use", action="click", coordinate=[-1, 5]), "outside"),
    (call("mobile_use", action="click"), "coordinate"),
    (call("mobile_use", action="click", coordinate=["a", 5]), "coordinate"),
    (call("mobile_use", action="click", coordinate=[True, 5]), "coordinate"),
    (call("mobile_use", action="fly"), "unknown action"),
    (call("mobile_use", action="type"), "text"),
    (call("mobile_use", action="wait"), "time"),
    (call("mobile_use", action="wait", time=-1), "time"),
    (call("mobile_use", action="terminate", status="done"), "status"),
    (call("mobile_use", action="system_button", button="Power"), "button"),
    (call("computer_use", action="click", coordinate=[1, 1]), "unknown tool"),
    ('<tool_call>{"name": "mobile_use", "arguments": [1]}</tool_call>', "arguments"),
    ('{"action": 5}', "action"),
    ("[" * 100_000, "no JSON"),
    ('{"a":' * 100_000, "JSON"),
])
def test_bad_completions_become_invalid_actions(text, reason_part):
    result = parse_action(text, PHONE)
    assert isinstance(result, InvalidAction)
    assert reason_part in result.reason
    assert result.raw == text


HUGE = int("9" * 400)  # math.isfinite(HUGE) raises OverflowError: the parser must not ask it


@pytest.mark.parametrize("tool, args, reason_part", [
    ("mobile_use", {"action": "click", "coordinate": [HUGE, 5]}, "off any screen"),
    ("mobile_use", {"action": "long_press", "coordinate": [5, 5], "time": HUGE}, "'time' must be in [0, 100]"),
    ("mobile_use", {"action": "wait", "time": 100.5}, "'time' must be in [0, 100]"),
    ("computer_use", {"action": "scroll", "pixels": -HUGE}, "'pixels' must be in [-99999, 99999]"),
    ("computer_use", {"action": "scroll", "pixels": 1e300}, "'pixels'"),
    ("mobile_use", {"action": "type", "text": "x" * 1001}, "longer than 1000 characters"),
    ("computer_use", {"action": "key", "keys": ["a"] * 9}, "1 to 8 key names"),
])
def test_huge_numbers_and_long_texts_are_invalid_not_errors(tool, args, reason_part):
    text = "<tool_call>\n" + json.dumps({"name": tool, "arguments": args}) + "\n</tool_call>"
    result = parse_action(text, DESKTOP, tool=tool)
    assert isinstance(result, InvalidAction) and reason_part in result.reason
    assert len(result.reason) < 200  # a 400-digit number is not pasted into the reason


def test_lone_surrogates_become_replacement_characters():
    """JSON may escape half a surrogate pair; such a str can't be UTF-8 encoded, which crashed the tokenizer of
    the next turn (the action is echoed in its prompt)."""
    text = ('<tool_call>{"name": "mobile_use", "arguments": {"action": "type", '
            '"text": "a\\ud800b\\ud83d\\ude00"}}</tool_call>')
    action = parse_action(text, PHONE)
    assert action == Action("type", text="a\ufffdb\U0001F600")
    action.text.encode("utf-8")
    keys = parse_action(call("computer_use", action="key", keys=["ctrl", "\udfff"]), DESKTOP, tool="computer_use")
    assert keys == Action("key", text="ctrl+\ufffd")


def test_absolute_mode_rejects_points_off_screen():
    assert isinstance(parse_action(call("mobile_use", action="click", coordinate=[360, 5]), PHONE, "absolute"),
                      InvalidAction)
    assert parse_action(call("mobile_use", action="click", coordinate=[359, 639]), PHONE, "absolute") == \
        Action("click", x=359, y=639)


@pytest.mark.parametrize("name", ["mouse_move", "right_click", "middle_click", "triple_click"])
def test_computer_actions_we_cannot_run_are_invalid_with_advice(name):
    result = parse_action(call("computer_use", action=name, coordinate=[1, 1]), DESKTOP, tool="computer_use")
    assert isinstance(result, InvalidAction) and "not supported" in result.reason


def test_drag_without_start_is_invalid():
    result = parse_action(call("computer_use", action="left_click_drag", coordinate=[1, 1]), DESKTOP,
                          tool="computer_use")
    assert isinstance(result, InvalidAction) and "start_coordinate" in result.reason


def test_allowed_filters_by_our_kind_or_the_tool_name():
    text = call("mobile_use", action="system_button", button="Back")
    assert parse_action(text, PHONE, allowed={"key"}) == Action("key", text="back")
    assert parse_action(text, PHONE, allowed={"system_button"}) == Action("key", text="back")
    refused = parse_action(text, PHONE, allowed={"click", "finish"})
    assert isinstance(refused, InvalidAction) and "not allowed" in refused.reason


def test_caller_bugs_raise_value_error():
    with pytest.raises(ValueError, match="coord_mode"):
        parse_action("{}", PHONE, coord_mode="percent")
    with pytest.raises(ValueError, match="tool"):
        parse_action("{}", PHONE, tool="desktop")
    with pytest.raises(ValueError, match="cannot express"):
        format_action(Action("scroll", direction="up"), PHONE)


# -- properties ------------------------------------------------------------------------------------

def _actions(size: tuple[int, int], tool: str) -> st.SearchStrategy[Action]:
    xs, ys = st.integers(0, size[0] - 1), st.integers(0, size[1] - 1)
    text = st.text(max_size=30)
    seconds = st.floats(0, 60, allow_nan=False)
    common = [
        st.builds(Action, st.just("type"), text=text),
        st.builds(Action, st.just("wait"), duration=seconds),
        st.builds(Action, st.just("finish"), status=st.sampled_from(["success", "fail"])),
        st.builds(Action, st.just("finish"), status=st.just("success"), answer=text),
    ]
    if tool == "mobile_use":
        return st.one_of(*common,
            st.builds(Action, st.just("click"), x=xs, y=ys),
            st.builds(Action, st.just("long_press"), x=xs, y=ys, duration=seconds),
            st.builds(Action, st.just("swipe"), x=xs, y=ys, x2=xs, y2=ys),
            st.builds(Action, st.just("key"), text=st.sampled_from(["back", "home", "menu", "enter", "volume_up"])))
    key_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=8)
    return st.one_of(*common,
        st.builds(Action, st.sampled_from(["click", "double_click"]), x=xs, y=ys),
        st.builds(Action, st.just("swipe"), x=xs, y=ys, x2=xs, y2=ys),
        st.builds(Action, st.just("scroll"), direction=st.sampled_from(["up", "down", "left", "right"])),
        st.builds(Action, st.just("scroll"), x=xs, y=ys, direction=st.sampled_from(["up", "down", "left", "right"])),
        st.builds(Action, st.just("key"), text=st.lists(key_name, min_size=1, max_size=3).map("+".join)))


@pytest.mark.parametrize("tool, size, mode", [
    ("mobile_use", PHONE, "relative"), ("mobile_use", PHONE, "absolute"),
    ("computer_use", (1000, 700), "relative"), ("computer_use", DESKTOP, "absolute"),
])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_parse_inverts_format(tool, size, mode, data):
    action = data.draw(_actions(size, tool))
    text = format_action(action, size, mode, tool)
    assert parse_action(text, size, mode, tool) == action
    assert format_action(parse_action(text, size, mode, tool), size, mode, tool) == text


_grid = st.lists(st.integers(0, GRID_MAX), min_size=2, max_size=2)


@settings(max_examples=200, deadline=None)
@given(args=st.one_of(  # key order as a canonical text has it: action first
    st.builds(lambda a, c: {"action": a, "coordinate": c}, st.sampled_from(["left_click", "double_click"]), _grid),
    st.builds(lambda s, c: {"action": "left_click_drag", "start_coordinate": s, "coordinate": c}, _grid, _grid),
    st.builds(lambda a, p, c: {"action": a, "pixels": p, "coordinate": c},
              st.sampled_from(["scroll", "hscroll"]), st.sampled_from([300, -300]), _grid),
    st.builds(lambda s: {"action": "terminate", "status": s}, st.sampled_from(["success", "failure"])),
))
def test_format_inverts_parse_for_any_grid_text_on_a_desktop(args):
    """On screens larger than the grid every grid value is canonical: text -> action -> same text."""
    text = call("computer_use", **args)
    assert format_action(parse_action(text, DESKTOP, tool="computer_use"), DESKTOP, tool="computer_use") == text


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    _json.map(json.dumps),
    st.dictionaries(st.sampled_from(["action", "coordinate", "coordinate2", "text", "time", "button", "status",
                                     "keys", "pixels", "start_coordinate"]),
                    st.one_of(_json, st.sampled_from(["click", "swipe", "type", "wait", "terminate", "answer",
                                                      "long_press", "system_button", "key", "scroll",
                                                      "left_click_drag", "hscroll"]))).map(
        lambda args: call("mobile_use", **args)),
), tool=st.sampled_from(["mobile_use", "computer_use"]), mode=st.sampled_from(["relative", "absolute"]))
def test_parse_never_raises(text, tool, mode):
    result = parse_action(text, PHONE, mode, tool)
    assert isinstance(result, (Action, InvalidAction))
    if isinstance(result, Action) and result.x is not None:
        assert 0 <= result.x < PHONE[0] and 0 <= result.y < PHONE[1]


@pytest.mark.parametrize("tool", ["mobile_use", "computer_use"])
def test_schema_lists_exactly_what_the_parser_accepts(tool):
    schema = tool_schema(tool, "relative")
    params = schema["function"]["parameters"]
    assert schema["function"]["name"] == tool and params["required"] == ["action"]
    for name in params["properties"]["action"]["enum"]:
        result = parse_action(call(tool, action=name), PHONE, tool=tool)
        assert not (isinstance(result, InvalidAction) and "unknown action" in result.reason), name
    assert "0-999 grid" in schema["function"]["description"]
    assert "360x640" in tool_schema(tool, "absolute", PHONE)["function"]["description"]


# -- drawing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", [
    Action("click", x=100, y=200), Action("double_click", x=10, y=10), Action("long_press", x=50, y=60, duration=1),
    Action("swipe", x=10, y=600, x2=300, y2=50), Action("scroll", direction="down"),
    Action("scroll", x=5, y=5, direction="left"), Action("type", text="hello"), Action("key", text="back"),
    Action("wait", duration=1.0), Action("finish", status="success", answer="42"), Action("finish", status="fail"),
    InvalidAction("no JSON tool call found", "blah"), None,
])
def test_draw_action_returns_a_changed_copy_of_the_same_size(action):
    image = Image.new("RGB", PHONE, (246, 246, 248))
    before = image.tobytes()
    drawn = draw_action(image, action, label="step 3")
    assert drawn.size == image.size and drawn is not image
    assert image.tobytes() == before  # the input is untouched
    assert ImageChops.difference(drawn, image).getbbox() is not None


def test_draw_action_without_label_still_marks_the_action():
    image = Image.new("RGBA", (200, 300), (0, 0, 0, 255))
    drawn = draw_action(image, Action("click", x=100, y=150))
    assert drawn.mode == "RGB" and drawn.getpixel((100, 150 - max(6, 200 // 30))) != (0, 0, 0)
