"""Offline tiny Qwen-VL models of the real architecture (no model hub needed).

`make_tiny_model(out_dir, arch, size)` builds a real `Qwen3VLForConditionalGeneration` (or Qwen2.5-VL)
from a config with random weights, trains a byte-level BPE tokenizer locally with Qwen's special
tokens in their real order, adds a Qwen-style chat template (images + `<tool_call>`) and the real
image processor, and `save_pretrained`s everything in the Hub layout. The folder then loads through
the ordinary `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained` path, the same code that
loads `Qwen/Qwen3-VL-8B-Instruct` on a user's machine.

Sizes: `tiny` (~0.5M params, unit tests and the CPU quickstart), `mini` (~1.7M, a CPU step up: measured on
synth L0 in docs/BENCHMARKS.md) and `small` (~14M params, can learn GUI tasks on one GPU).
head_dim is 32/64 (>= 32 so vLLM's CPU attention can serve them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

Arch = Literal["qwen3_vl", "qwen2_5_vl"]
ARCHS: tuple[str, ...] = ("qwen3_vl", "qwen2_5_vl")
# Bumped whenever the builder's output changes (tokenizer corpus, sizes, rope): builtin caches are per version.
BUILDER_VERSION = 4
Size = Literal["tiny", "mini", "small"]

# Qwen2/2.5/3's special tokens, in their real order (ids follow the BPE vocab here, not 151643+).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]
# Qwen2's pre-tokenizer split (digits one by one, letters with one leading non-letter, ...).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Qwen3-VL-style chat template: tools in the system turn, images as vision_start/image_pad/vision_end,
# assistant tool calls inside <tool_call> tags, tool results as <tool_response> in a user turn.
# No whitespace-control dashes: the pieces are concatenated with no stray whitespace, and a dash
# after a literal newline would eat it.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item.type == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item.type == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ render(messages[0].content) + '\n\n' }}{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ render(messages[0].content) }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ render(message.content) }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ render(message.content) }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "<tool_call>\n{\"name\": \"{{ fn.name }}\", \"arguments\": "
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    # text: hidden, layers, heads, kv heads, head_dim, mlp; vision: depth, hidden, heads, mlp; vocab
    "tiny": dict(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp=128,
                 v_depth=2, v_hidden=32, v_heads=2, v_mlp=64, vocab=1024),
    "mini": dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, mlp=384,
                 v_depth=2, v_hidden=64, v_heads=2, v_mlp=128, vocab=1024),
    "small": dict(hidden=384, layers=6, heads=6, kv_heads=2, head_dim=64, mlp=1024,
                  v_depth=4, v_hidden=192, v_heads=3, v_mlp=768, vocab=4096),
}


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer learns merges from: tool calls, GUI instructions, JSON, numbers."""
    rng = random.Random(seed)
    words = ("tap click the button open app settings toggle wifi bluetooth type text into field submit "
             "send cancel ok yes no search login user password enter select option tab link dialog "
             "checkbox swipe scroll up down left right back home menu wait finish success fail answer "
             "mobile_use computer_use coordinate action status arguments name screen task instruction "
             "previous turns you are a computer use agent screenshot phone web page").split()
    actions = ["click", "long_press", "swipe", "type", "system_button", "wait", "terminate", "left_click",
               "double_click", "key", "scroll", "answer"]
    lines = _prompt_texts()
    for _ in range(n_lines):
        args = {"action": rng.choice(actions), "coordinate": [rng.randint(0, 999), rng.randint(0, 999)]}
        lines.append('<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
                     % (rng.choice(["mobile_use", "computer_use"]), json.dumps(args)))
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + ".")
    return lines


def _prompt_texts() -> list[str]:
    """The kit's own system prompt and tool descriptions, so they tokenize compactly (as English does
    with a real Qwen tokenizer): a short prompt keeps CPU runs of the tiny models fast."""
    from cua_kit.actions import compact_tool_schema, tool_schema
    from cua_kit.agent import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT]
    for tool in ("mobile_use", "computer_use"):
        for mode in ("relative", "absolute"):
            for schema in (tool_schema, compact_tool_schema):
                texts.append(json.dumps(schema(tool, mode, (360, 640) if mode == "absolute" else None)))
    return texts * 50


def build_tokenizer(vocab_size: int):
    """Byte-level BPE (round trips any text exactly), Qwen specials appended in their real order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Qwen3-VL-8B: head_dim 128, rope_theta 5e6, interleaved mrope; the width axis's fastest frequency (index 2)
# turns theta ** (-4 / 128) = 0.617 rad per image patch. That is what lets the model tell columns apart.
_REAL_QWEN3_VL_ROPE = (128, 5_000_000.0)


def qwen3_vl_rope_theta(head_dim: int) -> float:
    """The theta that gives a `head_dim` model the real model's angle per patch on the width axis.

    With the real theta (5e6) and head_dim 32, the width axis turned only 0.146 rad per patch (4x less):
    tiny models learned rows but picked the column nearly at random (76% on synth L0 after SFT, every miss
    a wrong column); with this theta (~48 for head_dim 32) the same SFT reaches 100% (docs/BENCHMARKS.md).
    """
    real_dim, real_theta = _REAL_QWEN3_VL_ROPE
    return round(real_theta ** (head_dim / real_dim), 1)


def _qwen3_vl_config(s: dict, tok) -> "object":
    from transformers import Qwen3VLConfig

    half = s["head_dim"] // 2
    mrope = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 128 -> [24,20,20] like the real one
    text = dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": qwen3_vl_rope_theta(s["head_dim"]),
                                 "mrope_section": mrope, "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False)
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], num_heads=s["v_heads"],
                  intermediate_size=s["v_mlp"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=s["hidden"], num_position_embeddings=2304,
                  deepstack_visual_indexes=list(range(s["v_depth"] - 1)))
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_vision_token_ids(tok),
                         tie_word_embeddings=False)


def _qwen2_5_vl_config(s: dict, tok) -> "object":
    from transformers import Qwen2_5_VLConfig

    half = s["head_dim"] // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 64 -> [16,24,24] like the real one
    mrope = sorted(mrope)
    text = dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False)
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], num_heads=s["v_heads"],
                  intermediate_size=s["v_mlp"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=s["hidden"], window_size=112, fullatt_block_indexes=[s["v_depth"] - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_vision_token_ids(tok),
                            tie_word_embeddings=False, bos_token_id=tok.pad_token_id,
                            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))


def _vision_token_ids(tok) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _image_processor(arch: Arch):
    """The real Qwen image processor, with the real normalisation of each architecture."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    if arch == "qwen3_vl":
        return Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                     size={"shortest_edge": 65536, "longest_edge": 16777216})
    return Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                 size={"shortest_edge": 3136, "longest_edge": 12845056})


def _processor(arch: Arch, tok):
    """Real processor class of the architecture; video processor only where torchvision imports."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    cls = Qwen3VLProcessor if arch == "qwen3_vl" else Qwen2_5_VLProcessor
    video = None
    try:
        if arch == "qwen3_vl":
            from transformers import Qwen3VLVideoProcessor as video_cls
        else:
            from transformers import Qwen2VLVideoProcessor as video_cls
        video = video_cls(patch_size=16 if arch == "qwen3_vl" else 14, merge_size=2, temporal_patch_size=2)
    except ImportError:  # torchvision missing: see models.processor for the image-only fallback
        pass
    return cls(image_processor=_image_processor(arch), tokenizer=tok, video_processor=video,
               chat_template=CHAT_TEMPLATE)


def make_tiny_model(out_dir: str | Path, arch: Arch = "qwen3_vl", size: Size = "tiny", seed: int = 0) -> Path:
    """Build, randomly initialise and save a Qwen-VL model + processor in Hub layout. Returns the folder."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(SIZES[size]["vocab"])
    if arch == "qwen3_vl":
        model = Qwen3VLForConditionalGeneration(_qwen3_vl_config(SIZES[size], tok))
    else:
        model = Qwen2_5_VLForConditionalGeneration(_qwen2_5_vl_config(SIZES[size], tok))
    _scale_lm_head(model, SIZES[size]["hidden"])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    _processor(arch, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _scale_lm_head(model, hidden: int) -> None:
    """Give the output head the range a trained model's has. Logits are w . RMSNorm(h), with |RMSNorm(h)| ~
    sqrt(hidden), so with the default init (std 0.02) the largest logit a hidden state can reach is about
    0.02 * hidden: 1.3 for the tiny model, far too small to put most of the mass on one token of ~650, so a
    LoRA (which leaves lm_head frozen) can never learn even a fixed template (NLL stuck near log(vocab)).
    std = 16 / hidden lets a LoRA reach logits of ~16, like a real model's."""
    import torch

    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 16.0 / hidden)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
