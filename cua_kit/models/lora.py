"""LoRA target groups resolved per architecture to exact module sets, with full-match regexes.

Plain names hit the wrong modules (platform-facts): `proj` also hits the Conv3d `patch_embed.proj`,
`linear_fc1` hits every vision block MLP, and Qwen2.5-VL's merger (`mlp.0/2`) is missed. peft applies
a string `target_modules` with `re.fullmatch`, so each group is a full-match regex per architecture.
The groups are the original system's three: vision attention, the vision->language merger
("cross-modal"), and the language model's `*_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

LORA_GROUPS: dict[str, dict[str, str]] = {
    "vision_attention": {
        "qwen3_vl": r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
        "qwen2_5_vl": r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
    },
    "merger": {
        "qwen3_vl": r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc(1|2)",
        "qwen2_5_vl": r"model\.visual\.merger\.mlp\.(0|2)",
    },
    "language": {
        "qwen3_vl": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "qwen2_5_vl": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    },
}


@dataclass
class ResolvedTargets:
    """What the groups matched: the regex for peft and the exact module names per group."""

    regex: str
    modules: dict[str, list[str]]
    dropped: list[str]  # groups that matched nothing (reported, never a silent no-op)


def model_arch(model: torch.nn.Module) -> str:
    """qwen3_vl or qwen2_5_vl, from the config's model_type (Hub ids and tiny folders alike)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    arch = {"qwen3_vl": "qwen3_vl", "qwen2_5_vl": "qwen2_5_vl"}.get(model_type)
    if arch is None:
        raise ValueError(f"unsupported model_type {model_type!r}: cua-kit supports qwen3_vl and qwen2_5_vl")
    return arch


def resolve_targets(model: torch.nn.Module, groups: list[str]) -> ResolvedTargets:
    """Match each group's regex against the model's Linear modules; drop (and report) empty groups."""
    arch = model_arch(model)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    modules: dict[str, list[str]] = {}
    dropped: list[str] = []
    for group in groups:
        if group not in LORA_GROUPS:
            raise ValueError(f"unknown LoRA group {group!r}; choose from {list(LORA_GROUPS)}")
        pattern = re.compile(LORA_GROUPS[group][arch])
        hits = [n for n in linear_names if pattern.fullmatch(n)]
        if hits:
            modules[group] = hits
        else:
            dropped.append(group)
    if not modules:
        raise ValueError(f"no LoRA group matched any module of this {arch} model (groups: {groups})")
    regex = "|".join(f"(?:{LORA_GROUPS[g][arch]})" for g in modules)
    return ResolvedTargets(regex=regex, modules=modules, dropped=dropped)
