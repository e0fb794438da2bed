"""Trace rows from rollout objects: what a finished group writes to the `groups`, `episodes`, `turns` tables."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cua_kit.actions import InvalidAction
from cua_kit.trace.store import TraceWriter


def write_group(trace: TraceWriter, group: Any, env_name: str) -> None:
    """Queue the rows of one finished group (rollout.controller.Group): kept or not, for the dashboard."""
    rewards = group.rewards
    advantages = dict(zip([e.episode_id for e in group.valid], group.advantages))
    trace.add_group({
        "group_id": group.group_id, "task_id": group.task.id, "n_samples": len(group.episodes),
        "reward_mean": float(np.mean(rewards)) if rewards else None,
        "reward_std": float(np.std(rewards)) if rewards else None,
        "zero_variance": int(group.zero_variance),
        # per episode in sample order, like the advantages: None for an episode that got no reward (an env error)
        "rewards_json": [e.reward for e in group.episodes],
        "advantages_json": [advantages.get(e.episode_id) for e in group.episodes], "created_at": group.created_at,
    })
    for episode in group.episodes:
        trace.add_episode(episode_row(episode, group.group_id, env_name, advantages.get(episode.episode_id)))
        for turn in episode.turns:
            trace.add_turn(turn_row(episode.episode_id, turn))


def episode_row(episode: Any, group_id: str, env_name: str, advantage: float | None) -> dict[str, Any]:
    versions = episode.versions
    return {
        "episode_id": episode.episode_id, "group_id": group_id, "sample_idx": episode.sample_idx,
        "task_id": episode.task.id, "env": env_name, "reward": episode.reward, "advantage": advantage,
        "success": int(episode.success), "status": episode.status, "n_turns": len(episode.turns),
        "min_version": min(versions) if versions else None, "max_version": max(versions) if versions else None,
        "error": episode.error, "started_at": episode.started_at, "finished_at": episode.finished_at,
    }


def turn_row(episode_id: str, turn: Any) -> dict[str, Any]:
    invalid = isinstance(turn.action, InvalidAction)
    return {
        "episode_id": episode_id, "turn_idx": turn.idx, "screenshot_path": turn.screenshot_path,
        "completion_text": turn.text, "action_json": None if invalid else json.dumps(turn.action.to_dict()),
        "parse_error": turn.action.reason if invalid else None, "version": turn.sample.version,
        "n_prompt_tokens": len(turn.sample.prompt_ids), "n_completion_tokens": len(turn.sample.completion_ids),
        "logprob_sum": float(sum(turn.sample.logprobs)), "latency_s": turn.latency_s,
    }


def mark_consumed(trace: TraceWriter, groups: list[Any], step: int, version: int) -> None:
    """Record which step consumed the groups, and each turn's staleness at that moment."""
    trace.mark_groups_consumed([g.group_id for g in groups], step)
    for group in groups:
        for episode in group.valid:
            for turn in episode.turns:
                trace.add_turn({"episode_id": episode.episode_id, "turn_idx": turn.idx,
                                "staleness": version - turn.sample.version})
