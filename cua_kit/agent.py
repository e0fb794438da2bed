"""The agent prompt: an episode's history -> the messages and token ids the policy sees.

A real Qwen3-VL-Instruct sees the format it was trained on: the tool (`mobile_use` / `computer_use`)
described in the chat template's `<tools>` block of the system turn, the task instruction, the actions
taken so far as text lines, and the last `history_images` screenshots as images (current one last).
Each image is resized once (`resize_for_model`, capped at `max_pixels`), and the completion is parsed
back with the same coordinate convention (relative 0-999 grid, or absolute pixels of that resized image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cua_kit.actions import Action, InvalidAction, compact_tool_schema, format_action, parse_action, tool_schema
from cua_kit.models.inputs import resize_for_model

SYSTEM_PROMPT = (
    "You are a GUI agent. You see screenshots of a screen and complete the user's task by calling "
    "the tool once per turn. When the task is done, call terminate with status success."
)


@dataclass
class Prompt:
    """What one turn's generation is conditioned on (token-in-token-out: these ids are trained on)."""

    ids: list[int]
    images: list[Image.Image]  # resized, in the order of their <|image_pad|> runs
    text: str
    model_image_size: tuple[int, int]  # size of the current screenshot as the model sees it


@dataclass
class History:
    """One episode's memory: screenshots seen and a text line per action taken."""

    instruction: str
    screens: list[Image.Image] = field(default_factory=list)
    action_lines: list[str] = field(default_factory=list)


class Agent:
    """Builds prompts and parses completions for one tool and coordinate convention."""

    def __init__(self, processor: Any, tool: str = "mobile_use", coord_mode: str = "relative",
                 history_images: int = 2, max_pixels: int = 401408, system_prompt: str = SYSTEM_PROMPT,
                 tool_description: str = "full"):
        self.processor = processor
        self.tool = tool
        self.coord_mode = coord_mode
        self.history_images = max(1, history_images)
        self.max_pixels = max_pixels
        self.system_prompt = system_prompt
        self.schema = {"full": tool_schema, "compact": compact_tool_schema}[tool_description]

    def messages(self, history: History) -> list[dict[str, Any]]:
        """Chat messages in the Qwen-VL content-list form (images as {"type": "image"})."""
        steps = "\n".join(f"Step {i + 1}: {line}" for i, line in enumerate(history.action_lines)) or "None yet."
        content: list[dict[str, Any]] = [{"type": "text", "text": (
            f"The user query: {history.instruction}\nTask progress (previous actions):\n{steps}\n")}]
        kept = history.screens[-self.history_images:]
        first_step = len(history.screens) - len(kept)
        for i, _ in enumerate(kept):
            label = "Current screenshot:" if i == len(kept) - 1 else f"Screenshot before step {first_step + i + 1}:"
            content += [{"type": "text", "text": f"\n{label}\n"}, {"type": "image"}]
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}]

    def build(self, history: History) -> Prompt:
        images = [resize_for_model(im, self.processor, self.max_pixels) for im in history.screens[-self.history_images:]]
        current = images[-1].size
        tools = [self.schema(self.tool, self.coord_mode, current if self.coord_mode == "absolute" else None)]
        text = self.processor.apply_chat_template(self.messages(history), tools=tools, add_generation_prompt=True,
                                                  tokenize=False)
        return Prompt(self._token_ids(text, images), images, text, current)

    def _token_ids(self, text: str, images: list[Image.Image]) -> list[int]:
        """The processor's ids (each <|image_pad|> expanded to the image's token count) without computing
        pixel values, which `collate` does once per generate batch: this runs on the event loop every turn."""
        ip, pad = self.processor.image_processor, self.processor.image_token
        expanded, rest = [], text
        for image in images:
            before, _, rest = rest.partition(pad)
            n_tokens = (image.width // ip.patch_size) * (image.height // ip.patch_size) // ip.merge_size ** 2
            expanded += [before, pad * n_tokens]
        return self.processor.tokenizer("".join(expanded) + rest, add_special_tokens=False)["input_ids"]

    def parse(self, completion: str, screen_size: tuple[int, int], prompt: Prompt) -> Action | InvalidAction:
        """Completion text -> an Action in the env's screen pixels (never raises)."""
        if self.coord_mode == "relative":
            return parse_action(completion, screen_size, "relative", self.tool)
        action = parse_action(completion, prompt.model_image_size, "absolute", self.tool)
        return action if isinstance(action, InvalidAction) else scale_action(action, prompt.model_image_size, screen_size)

    def target_text(self, action: Action, screen_size: tuple[int, int], prompt: Prompt) -> str:
        """The completion a perfect model would write for `action` (SFT targets from oracle demos)."""
        if self.coord_mode == "relative":
            return format_action(action, screen_size, "relative", self.tool)
        return format_action(scale_action(action, screen_size, prompt.model_image_size),
                             prompt.model_image_size, "absolute", self.tool)

    def action_line(self, action: Action | InvalidAction, screen_size: tuple[int, int], prompt: Prompt) -> str:
        """How a past action appears in later prompts: its tool arguments, in the model's coordinates."""
        if isinstance(action, InvalidAction):
            return f"(invalid action: {action.reason[:80]})"
        try:
            call = json.loads(self.target_text(action, screen_size, prompt).split("\n")[1])
            return json.dumps(call["arguments"], ensure_ascii=False)
        except ValueError:  # an action this tool can't express (an env-made one): say it in our words
            return json.dumps(action.to_dict(), ensure_ascii=False)


def scale_action(action: Action, src: tuple[int, int], dst: tuple[int, int]) -> Action:
    """Map an action's pixel coordinates from a `src`-sized image to a `dst`-sized one."""
    from dataclasses import replace

    def sx(v: int | None) -> int | None:
        return None if v is None else min(dst[0] - 1, round(v * dst[0] / src[0]))

    def sy(v: int | None) -> int | None:
        return None if v is None else min(dst[1] - 1, round(v * dst[1] / src[1]))

    return replace(action, x=sx(action.x), y=sy(action.y), x2=sx(action.x2), y2=sy(action.y2))
