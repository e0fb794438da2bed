"""The policy protocol: what the rollout and the training loop need from a generation backend, and nothing more.

    generate(requests) -> completions        token ids + images in, token ids + behaviour log-probs out
    pause() / resume()                       no generation on the weights while the trainer changes them
    update_weights(version, adapter_dir)     the trainer made `version`: serve it from now on
    stats() / close()

A request carries prompt *token ids* and the images (already resized) that the ids' `<|image_pad|>` runs
stand for, so a remote server (vLLM) takes it as is and nothing is re-tokenised from text. A completion
carries its token ids, the behaviour log-prob of each token under the sampling distribution (the processed
distribution of `inference.distribution`, not the raw logits), its text, and the policy version that
produced each token (one sequence can span versions when a turn is interrupted by an update and resumed).

Backends: `hf.HFPolicy` (in-process transformers; shares its weights with the trainer) and
`vllm.VLLMPolicy` (a vLLM server with the LoRA adapter hot-loaded per version).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Protocol

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
    version: int  # the oldest policy version that produced a token of this completion
    finish_reason: str = "stop"  # stop (EOS) or length
    token_versions: list[int] | None = None  # per token, when the completion spans versions (None = all `version`)

    def versions(self) -> list[int]:
        """The version that produced each token."""
        return self.token_versions if self.token_versions is not None else [self.version] * len(self.token_ids)


class PolicyError(RuntimeError):
    """The generation backend failed (a server died, a request was lost): infrastructure, not the policy's
    fault. The episode in flight ends without a reward, like an env error, and the run goes on."""


class Policy(Protocol):
    """What the rollout and the training loop use of a generation backend."""

    shares_weights: bool
    """True when the backend generates with the trainer's own weights (in-process): `update_weights` then needs
    no adapter files. False when it holds a copy (a server) that must be sent each new adapter."""

    @property
    def version(self) -> int:
        """The policy version new generations use."""
        ...

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    async def pause(self) -> None:
        """Return once no generation runs on the current weights and none will start until `resume`
        (needed when the trainer writes the very weights generation reads; a no-op for a server's copy)."""
        ...

    async def resume(self) -> None: ...

    async def update_weights(self, version: int, adapter_dir: Path | None) -> None:
        """Serve `version` from now on; `adapter_dir` is its peft adapter (None when `shares_weights`)."""
        ...

    def stats(self) -> dict[str, float]:
        """Cumulative counters since start: gen_calls, gen_requests, gen_busy_s (and backend-specific ones)."""
        ...

    async def failed(self) -> BaseException:
        """Returns (never, for a healthy backend) the error that left the backend unable to generate at all, e.g. a
        server that could not be restarted: the training loop stops the run with it."""
        ...

    async def close(self) -> None: ...


def decode_completion(tokenizer: object, ids: list[int]) -> str:
    """A completion's text (what the action parser reads): its ids decoded, special tokens kept, the end token cut."""
    text = tokenizer.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]
    for eos in ("<|im_end|>", "<|endoftext|>"):
        text = text.removesuffix(eos)
    return text


@contextlib.asynccontextmanager
async def writing_weights(policy: Policy) -> AsyncIterator[None]:
    """Around a change of the trainer's weights: a backend that generates with those very weights is paused
    (no generation sees half-written weights); one with its own copy keeps generating."""
    try:  # pause inside: a pause cut short (a cancelled task) is resumed too, or generation would wait forever
        if policy.shares_weights:
            await policy.pause()
        yield
    finally:
        if policy.shares_weights:
            await policy.resume()
