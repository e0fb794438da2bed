"""The scoring forward: log-probs (and entropy) of recorded completions under the current weights.

Rows are prompt ids + completion ids exactly as generated, left-padded by `collate`, so every
completion ends at the right edge; `logits_to_keep` then builds vocab logits only for the last
Tc + 1 positions instead of every image token (platform-facts #4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cua_kit.grpo.losses import entropy_from_logits, token_logprobs
from cua_kit.models.inputs import Row, collate, vision_special_ids

if TYPE_CHECKING:  # xgrammar is imported only where a run constrains its actions
    from cua_kit.inference.grammar import ActionGrammar


@dataclass
class Scored:
    logprobs: torch.Tensor  # [B, Tc] log-probs of the completion tokens (right-aligned)
    mask: torch.Tensor  # [B, Tc] 1 on real completion tokens
    entropy: torch.Tensor | None  # [B, Tc] per-token entropy (no grad), when asked for


def completion_targets(completions: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned [B, Tc] target ids and mask."""
    width = max(len(c) for c in completions)
    ids = torch.zeros((len(completions), width), dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, c in enumerate(completions):
        if c:
            ids[i, width - len(c):] = torch.tensor(list(c), dtype=torch.long)
            mask[i, width - len(c):] = 1.0
    return ids.to(device), mask.to(device)


def score(model: Any, processor: Any, rows: Sequence[tuple[list[int], list[int], list[Any]]],
          temperature: float, device: torch.device, with_entropy: bool = False,
          grammar: ActionGrammar | None = None) -> Scored:
    """rows: (prompt_ids, completion_ids, images). Grad flows unless the caller is under no_grad.

    The policy is the model's distribution with the vision special tokens banned, as at sampling
    (`vision_special_ids`): without the same ban here, ratios at a fresh sample would not be 1. For the
    same reason a policy sampled under an action grammar is scored under it (`grammar`).
    """
    batch = collate(processor, [Row(p + c, imgs) for p, c, imgs in rows], device)
    targets, mask = completion_targets([c for _, c, _ in rows], device)
    width = targets.shape[1]
    logits = model(**batch, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    logits = logits[:, -width:].clone()
    logits[..., vision_special_ids(processor.tokenizer)] = float("-inf")
    if grammar is not None:
        logits = logits.masked_fill(~grammar.allowed([c for _, c, _ in rows], width, device), float("-inf"))
    logprobs = token_logprobs(logits, targets, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach().float() / temperature)
    return Scored(logprobs * mask, mask, entropy)
