"""Constrained decoding of actions: with `rollout.constrain_actions`, the policy can only write a tool call.

The grammar is the set of canonical texts `format_action` writes for the env's tool and coordinate mode
(`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` then `<|im_end|>`): one EBNF alternative
per action (`action_call_ebnf`), in the formatter's key order and separators, relative coordinates limited
to 0..999. xgrammar compiles it for the model's tokenizer (the engine vLLM and SGLang use for structured output).

Two places use it, and they must agree, or the importance ratio at a fresh sample would not be 1:
- generation: `logits_processor()` (a fresh one per `generate` call) masks each step's logits to the tokens
  the grammar allows, so the behaviour log-probs HF records are those of the constrained distribution;
- scoring: `allowed(completions, width)` replays the same matcher over the recorded tokens and gives the
  mask of every completion position; the scoring forward sets the rest to -inf before its log-softmax.

Why it matters for RL (docs/BENCHMARKS.md, "Learning proof"): a small policy's unparsable completions
score 0 like a wrong tap, so GRPO pushes down the tokens they share with good taps (a leading "7" of
right-column x values) whatever the screen, and the taps collapse into one column. Under the grammar
every sample is a real action and its reward is about where it tapped.

In absolute mode the grammar bounds pixels to NUMBER_DIGITS digits but can't know the screen size (it is compiled
once per run, the screen is known per prompt): a point off the screen is the parser's to refuse, as an invalid action.

A recorded completion the grammar rejects (sampled without it, e.g. before the option was turned on)
is left unconstrained from the rejected token on, so scoring never produces a -inf log-prob.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import transformers
import xgrammar as xgr

from cua_kit.actions import COORD_MODES, KEYS_MAX, NUMBER_DIGITS, SECONDS_MAX, TEXT_MAX_CHARS, TOOLS

# Value rules, as Python writes them (`json.dumps(..., ensure_ascii=False)`), within the parser's bounds
# (cua_kit.actions): grid is 0..999 (GRID_MAX); pixels and scroll amounts have at most NUMBER_DIGITS digits (a
# scroll is never 0); seconds are below 100 (SECONDS_MAX) in the forms Python's float repr takes there (fixed,
# at most 20 decimals, or a negative exponent), or exactly 100.0; strings hold at most TEXT_MAX_CHARS
# characters (an escape counts as one, so the parsed text is never longer); at most KEYS_MAX keys, none empty, none
# holding a "+" but a lone "+" key last (keys are joined with "+"; `\u` escapes could hide one, so keys have none).
assert SECONDS_MAX == 100.0, "the seconds rule below spells 100"
_VALUE_RULES = rf"""
grid ::= "0" | [1-9] [0-9]? [0-9]?
pixel ::= "0" | [1-9] [0-9]{{0,{NUMBER_DIGITS - 1}}}
integer ::= "-"? [1-9] [0-9]{{0,{NUMBER_DIGITS - 1}}}
seconds ::= ("0" | [1-9] [0-9]?) ("." [0-9]{{1,20}})? ([eE] "-" [0-9]{{1,3}})? | "100" ".0"?
string ::= "\"" char{{0,{TEXT_MAX_CHARS}}} "\""
key ::= "\"" keychar{{1,{TEXT_MAX_CHARS}}} "\""
keychar ::= [^"\\\x00-\x1f+] | "\\" ["\\/bfnrt]
char ::= [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
keys ::= "[" (key ", "){{0,{KEYS_MAX - 1}}} (key | "\"+\"") "]"
"""


def _lit(text: str) -> str:
    """An EBNF string literal (JSON escaping is what xgrammar's EBNF reads)."""
    return json.dumps(text)


def _action_args(tool: str) -> dict[str, list[tuple[str, str]]]:
    """action name -> its (key, value rule) pairs after "action", in the order `format_action` writes them."""
    point = "point"  # the rule name; [grid, grid] or [pixel, pixel] by coordinate mode
    common = {"type": [("text", "string")], "wait": [("time", "seconds")], "answer": [("text", "string")],
              "terminate": [("status", "status")]}
    if tool == "mobile_use":
        return {"click": [("coordinate", point)], "long_press": [("coordinate", point), ("time", "seconds")],
                "swipe": [("coordinate", point), ("coordinate2", point)], "system_button": [("button", "button")],
                "key": [("text", "string")], **common}
    return {"left_click": [("coordinate", point)], "double_click": [("coordinate", point)],
            "left_click_drag": [("start_coordinate", point), ("coordinate", point)],
            "scroll": [("pixels", "integer")], "hscroll": [("pixels", "integer")],
            "key": [("keys", "keys")], **common}


def _key(key: str) -> str:
    return _lit(', "' + key + '": ')


def action_call_ebnf(tool: str, coord_mode: str) -> str:
    """The grammar of one canonical tool call of `tool`, in xgrammar's EBNF."""
    if tool not in TOOLS or coord_mode not in COORD_MODES:
        raise ValueError(f"tool must be one of {TOOLS} and coord_mode one of {COORD_MODES}, "
                         f"got {tool!r}, {coord_mode!r}")
    variants = []
    for name, args in _action_args(tool).items():
        body = " ".join(f"{_key(key)} {rule}" for key, rule in args)
        if name in ("scroll", "hscroll"):  # computer_use scrolls may say where
            body += f" ({_key('coordinate')} point)?"
        opening = _lit('{"action": "' + name + '"')
        variants.append(f"({opening} {body} {_lit(chr(125))})")
    head = _lit('<tool_call>\n{"name": "' + tool + '", "arguments": ')
    tail = _lit("}\n</tool_call>")
    number = "grid" if coord_mode == "relative" else "pixel"
    rules = [
        f"root ::= {head} arguments {tail}",
        "arguments ::= " + " | ".join(variants),
        f"point ::= {_lit('[')} {number} {_lit(', ')} {number} {_lit(']')}",
        "status ::= " + " | ".join(_lit(f'"{s}"') for s in ("success", "failure")),
        "button ::= " + " | ".join(_lit(f'"{b}"') for b in ("Back", "Home", "Menu", "Enter")),
    ]
    return "\n".join(rules) + _VALUE_RULES


class ActionGrammar:
    """The compiled action grammar for one tokenizer, tool and coordinate mode."""

    def __init__(self, tokenizer: Any, tool: str, coord_mode: str, vocab_size: int):
        self.vocab_size = vocab_size
        stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[stop])
        self.ebnf = action_call_ebnf(tool, coord_mode)  # also what a vLLM server gets (structured output)
        grammar = xgr.Grammar.from_ebnf(self.ebnf)
        self.compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(grammar)
        # <|endoftext|> (the pad id, which also ends an unconstrained completion) is no part of an action: a call
        # ends with <|im_end|> only, and the token is never text inside one. vLLM's own grammar treats it as a stop
        # token or as text depending on its version (0.32 / 0.26); banned here and by the vLLM backend, both agree.
        pad = tokenizer.pad_token_id
        self.never = [pad] if pad is not None and pad != stop and pad < vocab_size else []

    def fill(self, matcher: xgr.GrammarMatcher, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of `bitmask` := the tokens the grammar allows next, less the `never` ones."""
        matcher.fill_next_token_bitmask(bitmask, row)
        for token in self.never:
            word, bit = divmod(token, 32)
            value = int(bitmask[row, word]) & ~(1 << bit)
            bitmask[row, word] = (value + 2**31) % 2**32 - 2**31  # back to a signed 32-bit word

    def logits_processor(self) -> "ActionLogitsProcessor":
        """A fresh processor for one `generate` call."""
        return ActionLogitsProcessor(self)

    def allowed(self, completions: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
        """[B, width, V] bool: the tokens allowed at each right-aligned completion position (all True on
        padding, and after a token the grammar rejected)."""
        bitmask = xgr.allocate_token_bitmask(len(completions) * width, self.vocab_size)  # all allowed
        for row, tokens in enumerate(completions):
            matcher, first = xgr.GrammarMatcher(self.compiled), row * width + width - len(tokens)
            for t, token in enumerate(tokens):
                self.fill(matcher, bitmask, first + t)
                if not matcher.accept_token(int(token)):
                    bitmask[first + t] = -1  # off the grammar: unconstrained from here on
                    break
        allowed = unpack_bitmask(bitmask, self.vocab_size)
        return allowed.view(len(completions), width, self.vocab_size).to(device)


class ActionLogitsProcessor(transformers.LogitsProcessor):
    """Masks each decoding step to the grammar (one matcher per row; a finished row is left alone)."""

    def __init__(self, grammar: ActionGrammar):
        self.grammar = grammar
        self.matchers: list[xgr.GrammarMatcher] = []
        self.prompt_width = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.matchers:
            self.matchers = [xgr.GrammarMatcher(self.grammar.compiled) for _ in range(input_ids.shape[0])]
            self.prompt_width = input_ids.shape[1]
        bitmask = xgr.allocate_token_bitmask(len(self.matchers), self.grammar.vocab_size)
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] > self.prompt_width and not matcher.is_terminated():
                matcher.accept_token(int(input_ids[row, -1]))  # False only on a finished row's padding
            if matcher.is_terminated():
                bitmask[row] = -1  # all allowed: HF pads finished rows itself
            else:
                self.grammar.fill(matcher, bitmask, row)
        xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device, non_blocking=True))
        return scores


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's int32 bitmask [B, ceil(V/32)] (bit j of word w = token 32w + j) -> bool [B, V]."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
    if allowed.shape[1] < vocab_size:  # logits wider than the grammar's vocab: padding ids stay banned
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    return allowed
