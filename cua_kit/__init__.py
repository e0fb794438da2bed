"""cua-kit: train computer-use agents (Qwen3-VL + LoRA) with GRPO over multi-turn GUI episodes.

The package is a set of components that follow the path of the data:
task -> env.reset -> agent prompt -> policy.generate -> actions.parse -> env.step -> reward
-> group advantages -> GRPO update -> new policy version.
"""

__version__ = "0.1.0"
