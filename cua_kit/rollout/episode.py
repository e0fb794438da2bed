"""One multi-turn episode, token-in-token-out.

Each turn: the agent renders the history into a prompt, the policy samples a completion (ids,
behaviour log-probs, version), the parser turns it into an action, the env executes it. The training
sample of a turn is exactly the prompt ids and completion ids used at generation: text is never
re-tokenized. An episode ends on `finish`, on the env saying done, on `max_turns`, or on an env error.
Env errors and generation-backend errors (`PolicyError`, e.g. a vLLM server that died mid-turn) are
infrastructure failures: the episode gets no reward and never counts against the policy. Any other exception
(a full disk under screens/, a bug) ends the episode the same way, with status `error`; whether the run goes
on is decided by `rollout.health`, never by an exception escaping into the rollout loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cua_kit.actions import Action, InvalidAction
from cua_kit.agent import Agent, History
from cua_kit.envs.base import Env, EnvError, Task
from cua_kit.inference.base import GenerationRequest, Policy, PolicyError, SamplingParams


@dataclass
class TurnSample:
    """What the trainer needs from one turn."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-probs of completion_ids
    images: list[Image.Image]
    version: int  # the oldest version that produced a token (staleness is counted from it)
    token_versions: list[int] | None = None  # per token, when a turn spans versions (None: all `version`)


@dataclass
class Turn:
    idx: int
    sample: TurnSample
    text: str
    action: Action | InvalidAction
    screenshot_path: str  # relative to the run folder
    latency_s: float
    finish_reason: str
    action_line: str  # how this action appears in later turns' prompts


@dataclass
class Episode:
    episode_id: str
    task: Task
    sample_idx: int = 0
    turns: list[Turn] = field(default_factory=list)
    status: str = "running"  # finished | env_done | max_turns | env_error | policy_error | error
    reward: float | None = None  # None for env errors: never scored for the policy
    env_score: float | None = None  # the env's own score, before rollout.format_penalty shapes it into `reward`
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # what ended it, for health
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def versions(self) -> list[int]:
        return [t.sample.version for t in self.turns]

    @property
    def n_invalid(self) -> int:
        return sum(isinstance(t.action, InvalidAction) for t in self.turns)

    @property
    def success(self) -> bool:
        """The env's verdict: a format penalty shapes the reward, never whether the task was done."""
        score = self.env_score if self.env_score is not None else self.reward
        return self.reward is not None and score is not None and score > 0.5


@dataclass
class EpisodeSettings:
    sampling: SamplingParams
    max_turns: int = 15
    format_penalty: float = 0.0


async def run_episode(env: Env, task: Task, agent: Agent, policy: Policy, settings: EpisodeSettings,
                      episode_id: str, run_dir: Path | None = None, sample_idx: int = 0) -> Episode:
    """Play one episode of `task` on `env`; screenshots go to run_dir/screens/<episode_id>/<turn>.png."""
    episode = Episode(episode_id, task, sample_idx)
    try:
        obs = await env.reset(task)
        history = History(obs.instruction or task.instruction)
        episode.status = "max_turns"
        for idx in range(settings.max_turns):
            history.screens.append(obs.screenshot)
            turn = await _play_turn(agent, policy, settings, history, obs.screenshot, idx, episode_id, run_dir)
            episode.turns.append(turn)
            history.action_lines.append(turn.action_line)
            if isinstance(turn.action, InvalidAction):
                continue  # the screen is unchanged; the model sees its mistake in the history
            if turn.action.kind == "finish":
                episode.status = "finished"
                break
            result = await env.step(turn.action)
            obs = result.observation
            if result.done:
                episode.status = "env_done"
                break
        episode.env_score = await env.evaluate()
        episode.reward = episode.env_score - settings.format_penalty * episode.n_invalid
    except EnvError as exc:
        episode.status, episode.reward, episode.error = "env_error", None, str(exc)[:500]
    except PolicyError as exc:
        episode.status, episode.reward, episode.error = "policy_error", None, str(exc)[:500]
    except Exception as exc:  # noqa: BLE001 - ends this episode; rollout.health decides whether it ends the run
        episode.status, episode.reward, episode.error = "error", None, f"{type(exc).__name__}: {exc}"[:500]
        episode.exception = exc
    episode.finished_at = time.time()
    return episode


async def _play_turn(agent: Agent, policy: Policy, settings: EpisodeSettings, history: History,
                     screenshot: Image.Image, idx: int, episode_id: str, run_dir: Path | None) -> Turn:
    start = time.perf_counter()
    prompt = agent.build(history)
    completion = (await policy.generate([GenerationRequest(prompt.ids, prompt.images, settings.sampling)]))[0]
    action = agent.parse(completion.text, screenshot.size, prompt)
    path = f"screens/{episode_id}/{idx:02d}.png"
    if run_dir is not None:
        await asyncio.to_thread(_save_png, screenshot, run_dir / path)
    sample = TurnSample(prompt.ids, completion.token_ids, completion.logprobs, prompt.images, completion.version,
                        completion.token_versions)
    line = agent.action_line(action, screenshot.size, prompt)
    return Turn(idx, sample, completion.text, action, path, time.perf_counter() - start, completion.finish_reason, line)


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)  # fast: screenshots are written on the hot path
