"""Policy backends behind one async protocol (`base.Policy`): HF in-process now, a vLLM server later."""

from cua_kit.inference.base import Completion, GenerationRequest, Policy, SamplingParams

__all__ = ["Completion", "GenerationRequest", "Policy", "SamplingParams"]
