"""Constrained action decoding (`rollout.constrain_actions`): the grammar accepts exactly the canonical tool
calls, a random tiny Qwen3-VL sampled under it writes only valid actions, and the scoring forward applies
the same mask, so the ratio at a fresh sample is 1."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cua_kit.actions import Action, InvalidAction, format_action, parse_action
from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.grpo.scoring import score
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.grammar import ActionGrammar, unpack_bitmask
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_model
from tests.test_actions import _actions

PHONE = (360, 640)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"), LoraConfig(r=4, alpha=8))


def _vocab(loaded) -> int:
    return loaded.model.get_output_embeddings().weight.shape[0]


@pytest.fixture(scope="module")
def grammars(loaded):
    return {(tool, mode): ActionGrammar(loaded.tokenizer, tool, mode, _vocab(loaded))
            for tool in ("mobile_use", "computer_use") for mode in ("relative", "absolute")}


def _accepts(grammar: ActionGrammar, tokenizer, text: str) -> bool:
    """True when every token of `text` and then <|im_end|> is allowed, and the grammar then ends."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    allowed = grammar.allowed([ids], len(ids), torch.device("cpu"))[0]
    return all(bool(allowed[t, token]) for t, token in enumerate(ids)) and bool(allowed[-1].sum() == 1)


@pytest.mark.parametrize("tool, mode", [("mobile_use", "relative"), ("mobile_use", "absolute"),
                                        ("computer_use", "relative"), ("computer_use", "absolute")])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_grammar_accepts_every_canonical_call(grammars, loaded, tool, mode, data):
    action = data.draw(_actions(PHONE, tool))
    assert _accepts(grammars[tool, mode], loaded.tokenizer, format_action(action, PHONE, mode, tool))


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [7oo1, 608]}}\n</tool_call>',
    '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [1000, 608]}}\n</tool_call>',
    '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [48]}}\n</tool_call>',
    '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "scroll", "coordinate": [48, 60]}}\n</tool_call>',
    '<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [4, 6]}}\n</tool_call>',
    'I will tap OK. <tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [4, 6]}}\n'
    '</tool_call>',
])
def test_grammar_rejects_what_the_parser_would_not_run(grammars, loaded, text):
    assert not _accepts(grammars["mobile_use", "relative"], loaded.tokenizer, text)


def _computer_call(**args) -> str:
    body = json.dumps(args, ensure_ascii=False)
    return '<tool_call>\n{"name": "computer_use", "arguments": ' + body + "}\n</tool_call>"


@pytest.mark.parametrize("text, ok", [
    (_computer_call(action="scroll", pixels=-99999), True),
    (_computer_call(action="scroll", pixels=100000), False),
    (_computer_call(action="scroll", pixels=10 ** 400), False),
    (_computer_call(action="wait", time=1e-05), True),
    (_computer_call(action="wait", time=99.99999999999999), True),
    (_computer_call(action="wait", time=100.0), True),
    (_computer_call(action="wait", time=100.5), False),
    (_computer_call(action="wait", time=1e16), False),
    (_computer_call(action="type", text="é" * 1000), True),
    (_computer_call(action="type", text="x" * 1001), False),
    (_computer_call(action="key", keys=["a"] * 8), True),
    (_computer_call(action="key", keys=["a"] * 9), False),
    (_computer_call(action="key", keys=[""]), False),  # found by the chaos suite's grammar fuzz
    (_computer_call(action="key", keys=["+0"]), False),  # "+0" joined with "+" reads back as ["", "0"]
    (_computer_call(action="key", keys=["ctrl", "+"]), True),
])
def test_grammar_and_parser_share_the_bounds(grammars, loaded, text, ok):
    """What constrained decoding can write, the parser accepts (and past the bounds neither does)."""
    assert _accepts(grammars["computer_use", "absolute"], loaded.tokenizer, text) == ok
    assert isinstance(parse_action(text, (1920, 1080), "absolute", "computer_use"), Action) == ok


def test_an_escaped_lone_surrogate_the_grammar_allows_parses_to_valid_unicode(grammars, loaded):
    text = _computer_call(action="type", text="a").replace('"a"', '"a\\ud800"')
    assert _accepts(grammars["computer_use", "relative"], loaded.tokenizer, text)
    action = parse_action(text, (1920, 1080), "relative", "computer_use")
    assert action == Action("type", text="a\ufffd")


def _screen_prompt(loaded):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap OK"}]}]
    text = loaded.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (128, 128), "white")
    ids = loaded.processor(text=[text], images=[image], do_resize=False, return_tensors="pt")["input_ids"][0].tolist()
    return ids, image


def _sample(loaded, grammar, n=6, temperature=1.0, max_new_tokens=64):
    loaded.action_grammar = grammar
    try:
        ids, image = _screen_prompt(loaded)
        torch.manual_seed(0)
        reqs = [GenerationRequest(ids, [image], SamplingParams(temperature, 1.0, 0, max_new_tokens)) for _ in range(n)]
        return ids, image, HFPolicy(loaded).generate_sync(reqs)
    finally:
        loaded.action_grammar = None


def test_random_model_writes_only_valid_actions_under_the_grammar(loaded, grammars):
    grammar = grammars["mobile_use", "relative"]
    _, _, free = _sample(loaded, None)
    assert all(isinstance(parse_action(c.text, PHONE), InvalidAction) for c in free)  # random weights: garbage
    _, _, constrained = _sample(loaded, grammar, n=12, max_new_tokens=200)
    finished = [c for c in constrained if c.finish_reason == "stop"]
    # a random model can ramble inside a "text" string until max_new_tokens; every call it ends is valid
    assert len(finished) >= len(constrained) // 2
    assert all(isinstance(parse_action(c.text, PHONE), Action) for c in finished), [c.text for c in finished]


def test_scoring_under_the_grammar_reproduces_behaviour_logprobs(loaded, grammars):
    grammar = grammars["mobile_use", "relative"]
    ids, image, completions = _sample(loaded, grammar)
    rows = [(ids, c.token_ids, [image]) for c in completions]
    behaviour = [torch.tensor(c.logprobs) for c in completions]
    with torch.no_grad():
        masked = score(loaded.model, loaded.processor, rows, 1.0, torch.device("cpu"), grammar=grammar)
        free = score(loaded.model, loaded.processor, rows, 1.0, torch.device("cpu"))
    for i, b in enumerate(behaviour):
        got = masked.logprobs[i, -len(b):]
        assert torch.allclose(got, b, atol=1e-4)
        assert (free.logprobs[i, -len(b):] < got - 1e-3).any()  # without the mask: a different distribution


def test_a_completion_the_grammar_rejects_stays_finite(loaded, grammars):
    grammar = grammars["mobile_use", "relative"]
    ids, image = _screen_prompt(loaded)
    garbage = loaded.tokenizer.encode("<tool_call>\n{oops", add_special_tokens=False)
    with torch.no_grad():
        scored = score(loaded.model, loaded.processor, [(ids, garbage, [image])], 1.0, torch.device("cpu"),
                       grammar=grammar)
    assert torch.isfinite(scored.logprobs).all()


def test_unpack_bitmask_matches_xgrammar_bit_order():
    bitmask = torch.tensor([[0b101, -2**31]], dtype=torch.int32)  # tokens 0, 2 and 63
    allowed = unpack_bitmask(bitmask, 70)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63]
