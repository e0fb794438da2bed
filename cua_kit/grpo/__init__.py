"""GRPO: the loss math (`losses`) and, built on it, the trainer."""

from cua_kit.grpo.losses import (
    aggregate,
    clipped_surrogate,
    decoupled_surrogate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_k3,
    step_advantages,
    token_logprobs,
)

__all__ = ["aggregate", "clipped_surrogate", "decoupled_surrogate", "entropy_from_logits", "group_advantages",
           "grpo_loss", "kl_k3", "step_advantages", "token_logprobs"]
