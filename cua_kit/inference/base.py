"""The policy protocol: `async generate(requests) -> completions`, suited to in-process and remote backends.

A request carries prompt *token ids* and the images (already resized) that the ids' `<|image_pad|>`
runs stand for, so a remote server (vLLM) can take it as is. A completion carries its token ids, the
behaviour log-prob of each token under the sampling distribution (temperature, top-k, top-p folded in),
its text and the policy version that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 1024


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    images: list[Image.Image]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-probs, one per token id
    text: str
    version: int  # policy version that produced every token of this completion
    finish_reason: str = "stop"  # stop (EOS) or length


class Policy(Protocol):
    """What the rollout needs from a policy backend."""

    @property
    def version(self) -> int: ...

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...
