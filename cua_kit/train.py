"""The GRPO training recipe: controller + trainer + checkpoints + logs, wired from a Config.

    cfg = load_config("configs/quickstart.yaml", ["trainer.max_steps=5"])
    summary = train(cfg)

The loop, one step: next batch of groups -> `trainer.update` (in a worker thread; a backend that shares the
trainer's weights is paused meanwhile) -> `policy.update_weights(version, adapter)` (a server gets the new
LoRA adapter) -> the controller is notified, and the next turn of every episode uses the new version.
The parts are built by `cua_kit.build`. Outputs go to outputs/<experiment>/<trial>/: config.yaml, trace.db,
screens/, checkpoints/, tb/ (and adapters/ for a server backend).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cua_kit.build import episode_settings, make_agent, make_model, make_policy, make_pool, resume_checkpoint, tasks_for
from cua_kit.checkpoint import load_checkpoint, save_checkpoint
from cua_kit.config import Config, ConfigError, save_config
from cua_kit.distributed import Channel, Ranks, ShardedTrainer, generation_policy, launched
from cua_kit.distributed import train as train_ranks
from cua_kit.envs.pool import EnvPool
from cua_kit.evaluate import curve_path, reconcile_evals
from cua_kit.grpo.trainer import GRPOTrainer, Sample
from cua_kit.inference.base import writing_weights
from cua_kit.logs import MetricsLogger, group_line, step_line
from cua_kit.models.loader import LoadedModel
from cua_kit.rollout.controller import ControllerSettings, Group, RolloutController, TaskSampler
from cua_kit.rollout.health import RunFailure, wait_for_batch
from cua_kit.run_folder import claim_run_folder, make_run_dir
from cua_kit.trace.rows import mark_consumed, write_group
from cua_kit.trace.store import SCHEMA, TraceError, TraceWriter

log = logging.getLogger(__name__)


@dataclass
class RunState:
    step: int = 0
    started: float = 0.0


# ----------------------------------------------------------------------------- the loop
class TrainingRun:
    """One `cua-kit train` run; `await run.main()` trains until max_steps or a stop signal."""

    def __init__(self, cfg: Config, ranks: Ranks | None = None, channel: Channel | None = None):
        """`ranks`/`channel`: rank 0 of an FSDP run (`cua_kit.distributed`); None: one process."""
        _refuse_an_unplaced_layout(cfg, ranks)
        self.cfg = cfg
        self.run_dir = make_run_dir(cfg)
        self.resume_from = resume_checkpoint(cfg)
        self.run_id = claim_run_folder(cfg, self.resume_from)  # one run per folder: an older one is archived
        save_config(cfg, self.run_dir)
        self.train_tasks = tasks_for(cfg, cfg.env.train_split)  # a bad task file fails before the model loads
        self.loaded, self.trainer = trainer_parts(cfg, self.resume_from, ranks, channel)
        self.policy = make_policy(cfg, self.loaded) if ranks is None else generation_policy(cfg, self.loaded)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_tasks) / cfg.trainer.batch_size))
        self.trace = TraceWriter(self.run_dir / "trace.db", self.run_id)
        self.state = RunState()
        self.stop_requested = asyncio.Event()
        self._last_counts: dict[str, int] = {}
        self._last_gen: dict[str, float] = {}
        self._signals: list[int] = []  # the signals whose handlers this run installed
        self._signalled_at = 0.0
        self._waiting_shown = False  # a waiting line is in the trace: cleared when the batch comes

    def _controller(self, pool: EnvPool) -> RolloutController:
        c = self.cfg
        settings = ControllerSettings(c.rollout.n_samples, c.trainer.batch_size, c.rollout.max_concurrent_rollouts,
                                      c.rollout.max_staleness, c.rollout.filter_zero_variance, c.grpo.adv_mode,
                                      c.rollout.max_errors_in_a_row, c.grpo.step_advantage_weight,
                                      c.grpo.step_gamma)
        return RolloutController(self.policy, pool, make_agent(c, self.loaded.processor),
                                 TaskSampler(self.train_tasks, c.trainer.seed), settings, episode_settings(c),
                                 self.run_dir, on_group=lambda g: write_group(self.trace, g, c.env.name),
                                 run_id=self.run_id)

    def _restore(self, controller: RolloutController) -> None:
        if self.resume_from is None:
            return
        state = load_checkpoint(self.resume_from, self.trainer)
        controller.load_state_dict(state["controller"])
        self.state.step = state["step"]
        print(f"Resumed from {self.resume_from} at step {self.state.step} (version {self.trainer.version})", flush=True)

    async def main(self) -> dict[str, Any]:
        cfg = self.cfg
        pool = make_pool(cfg)
        controller = self._controller(pool)
        self._restore(controller)
        # rows written after the checkpoint by a killed run are dropped: the resumed run writes them again
        self.trace.delete_steps_after(self.state.step)
        reconcile_evals(self.run_dir, self.state.step, resumed=self.resume_from is not None)  # the same for eval/
        self.trace.start_run(cfg.experiment_name, cfg.trial_name, cfg.to_dict(), os.getpid())
        metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.wandb_project,
                                self.run_id, cfg.to_dict(), resume_id=self.run_id)
        self._install_signals()
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "status": "running"}
        try:
            # after _restore: the policy serves the trainer's (resumed) version from turn one (a resumed run, an
            # unsharded copy beside FSDP ranks, a server backend); a server backend starts here, and one that can't
            # start fails the run with its own error (the run row says failed)
            await self._sync_weights()
            if cfg.trainer.eval_episodes and self.state.step == 0:
                summary["eval_before"] = await self._evaluate(pool, "before")
                metrics.log(0, {"success_rate": summary["eval_before"]["success_rate"]}, prefix="eval/")
            await controller.start()
            status = await self._loop(controller, metrics)
            await controller.stop()
            if status == "finished" and cfg.trainer.eval_episodes:
                summary["eval_after"] = await self._evaluate(pool, "after")
                metrics.log(self.state.step, {"success_rate": summary["eval_after"]["success_rate"]}, prefix="eval/")
            summary["status"] = status
        except RunFailure as failure:  # systemic (rollout.health): one line, status failed, the last step saved
            summary.update(status="failed", reason=str(failure))
            await controller.stop()
            self._save_after_failure(controller)
        except BaseException as exc:
            summary.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._remove_signals()
            await controller.stop()
            await self.policy.close()
            await pool.close()
            metrics.close()
            _close_trace(self.trace, summary["status"], summary.get("reason"))
        summary.update(step=self.state.step, rollout=controller.stats.as_dict())
        return summary

    def _save_after_failure(self, controller: RolloutController) -> None:
        """A checkpoint of the last completed step, so a resume after the fix loses nothing (best effort: the
        failure may be a full disk; the checkpoint before stays whole either way)."""
        if self.state.step == 0 or (self.run_dir / "checkpoints" / f"checkpoint-{self.state.step}").exists():
            return
        try:
            self._save(controller)
        except (OSError, RuntimeError) as exc:
            log.error("no checkpoint of step %d (%s); the previous one stays", self.state.step, exc)

    async def _loop(self, controller: RolloutController, metrics: MetricsLogger) -> str:
        cfg = self.cfg
        self.state.started = time.time()
        episodes_at_start = controller.stats.episodes
        last_saved = self.state.step
        while self.state.step < cfg.trainer.max_steps:
            batch = await self._next_batch(controller)
            if batch is None:
                break
            step = self.state.step + 1
            consumed_version = self.trainer.version
            stats, sync_error = await self._update(training_samples(batch))
            controller.consumed(batch)
            await controller.notify_version()
            self.state.step = step
            hours = max(time.time() - self.state.started, 1e-6) / 3600
            row = self._step_metrics(batch, stats, controller, consumed_version,
                                     (controller.stats.episodes - episodes_at_start) / hours)
            self._report(step, batch, row, metrics)
            mark_consumed(self.trace, batch, step, consumed_version)
            if sync_error is not None:  # the step is whole and recorded; main saves it, then the run stops
                raise RunFailure(f"step {step}'s weights could not reach the generation backend: "
                                 f"{type(sync_error).__name__}: {sync_error}") from sync_error
            every = cfg.trainer.eval_every
            if every and cfg.trainer.eval_episodes and step % every == 0 and step < cfg.trainer.max_steps:
                result = await self._evaluate(controller.pool, f"step{step}")
                metrics.log(step, {"success_rate": result["success_rate"]}, prefix="eval/")
            if self._should_save(step):
                self._save(controller)
                last_saved = step
        if self.state.step != last_saved:
            self._save(controller)
        return "stopped" if self.stop_requested.is_set() and self.state.step < cfg.trainer.max_steps else "finished"

    async def _update(self, samples: list[Sample]) -> tuple[dict[str, float], Exception | None]:
        """update -> policy.update_weights (a backend generating with these very weights pauses meanwhile). Returns
        the update's stats, and the error of a weight sync that failed after it (a server that died and could not
        restart, a disk that filled under adapters/): the trained step is then recorded and saved before the run
        stops, not lost."""
        async with writing_weights(self.policy):
            stats = await in_thread(self.trainer.update, samples)
            try:
                await self._sync_weights()
            except Exception as exc:  # noqa: BLE001 - reported by the loop as a RunFailure once the step is recorded
                return stats, exc
        return stats, None

    async def _sync_weights(self) -> None:
        """Tell the policy about the trainer's version; a backend with its own copy gets the adapter's files."""
        version, adapter = self.trainer.version, None
        if not self.policy.shares_weights:
            adapter = await in_thread(self.trainer.export, self.run_dir / "adapters")
        await self.policy.update_weights(version, adapter)

    async def _next_batch(self, controller: RolloutController) -> list[Group] | None:
        """The next batch, or None when a stop was requested first; RunFailure on a systemic fault, a stall, or a
        backend broken for good (a vLLM server that could not be restarted). While none comes, a line a minute
        says why (printed, and in the trace for the dashboard)."""
        def waiting(line: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] waiting for step {self.state.step + 1}: {line}", flush=True)
            self.trace.set_message(line)
            self._waiting_shown = True

        ahead = ReferenceAhead(self.trainer, controller) if self._scores_reference_ahead() else None
        try:
            batch = await wait_for_batch(controller.get_batch(), self.stop_requested, controller.health,
                                         self.cfg.trainer.stall_timeout_s, controller.waiting_line, waiting,
                                         broken=self.policy.failed())
        finally:
            if ahead is not None:
                await ahead.stop()
        if batch is not None and self._waiting_shown:
            self.trace.set_message(None)
            self._waiting_shown = False
        return batch

    def _scores_reference_ahead(self) -> bool:
        """While the loop waits for a batch, the trainer's model is idle when generation has its own copy of the
        weights (a vLLM server) and one process trains: it scores the KL reference of the groups that came."""
        return not self.policy.shares_weights and self.trainer.keeps_reference and self.cfg.grpo.kl_ctl > 0

    def _step_metrics(self, batch: list[Group], stats: dict[str, float], controller: RolloutController,
                      version: int, episodes_per_hour: float) -> dict[str, float]:
        rewards = [r for g in batch for r in g.rewards]
        stale = [version - v for g in batch for e in g.valid for v in e.versions]
        now = controller.stats.as_dict()
        delta = {k: now[k] - self._last_counts.get(k, 0) for k in now}  # counts since the previous step
        self._last_counts = now
        return {
            "version": self.trainer.version, "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
            "success_rate": float(np.mean([e.success for g in batch for e in g.valid])) if rewards else 0.0,
            "pg_loss": stats.get("pg_loss", 0.0), "kl": stats.get("kl", 0.0), "entropy": stats.get("entropy", 0.0),
            "lr": stats["lr"], "grad_norm": stats["grad_norm"], "clip_frac": stats.get("clip_frac", 0.0),
            "staleness_mean": float(np.mean(stale)) if stale else 0.0, "staleness_max": max(stale, default=0),
            "episodes_per_hour": episodes_per_hour, "n_groups": len(batch),
            "n_dropped_stale": delta["groups_dropped_stale"], "n_zero_variance": sum(g.zero_variance for g in batch),
            "n_filtered": delta["groups_filtered"],
            "rollout_success_rate": delta["episodes_succeeded"] / max(1, delta["episodes_scored"]),
            "n_env_errors": delta["env_errors"],
            "n_samples": stats["n_samples"], "update_s": stats["update_s"], "n_ref_ahead": stats["n_ref_ahead"],
            "turns_per_episode": float(np.mean([len(e.turns) for g in batch for e in g.valid])) if rewards else 0.0,
            # the generation engine's log-probs against the trainer's on fresh samples (when a step was taken)
            **{k: v for k, v in stats.items() if k.startswith("logprob_gap_")},
            **self._generation_stats(),
        }

    def _generation_stats(self) -> dict[str, float]:
        """How well turns were batched and how busy generation was, since the previous step."""
        now = self.policy.stats()
        delta = {k: v - self._last_gen.get(k, 0.0) for k, v in now.items()}
        self._last_gen = now
        calls = delta.get("gen_calls", 0.0)
        return {**delta, "gen_batch_mean": delta.get("gen_requests", 0.0) / calls if calls else 0.0}

    def _report(self, step: int, batch: list[Group], row: dict[str, float], metrics: MetricsLogger) -> None:
        epoch = (step - 1) // self.steps_per_epoch + 1
        epoch_step = (step - 1) % self.steps_per_epoch + 1
        print(step_line(step, self.cfg.trainer.max_steps, epoch, epoch_step, self.steps_per_epoch, row), flush=True)
        if self.cfg.logging.verbose:
            for i, group in enumerate(batch):
                print(group_line(i, group.rewards), flush=True)
        metrics.log(step, row)
        known = set(SCHEMA["steps"])  # columns of the steps table; everything else goes to extra_json
        self.trace.add_step({"step": step, "epoch": epoch, **{k: v for k, v in row.items() if k in known},
                             "extra_json": {k: v for k, v in row.items() if k not in known}})

    def _should_save(self, step: int) -> bool:
        s = self.cfg.saver
        epoch_end = step % self.steps_per_epoch == 0 and s.freq_epochs > 0 and (step // self.steps_per_epoch) % s.freq_epochs == 0
        return (s.freq_steps > 0 and step % s.freq_steps == 0) or epoch_end

    def _save(self, controller: RolloutController) -> None:
        self.trace.flush()  # the steps rows a checkpoint vouches for are on disk before it exists
        # the loop calls this between updates: the weights are not being written
        path = save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.trainer,
                               {"run_id": self.run_id, "version": self.trainer.version,
                                "controller": controller.state_dict()},
                               self.cfg.saver.keep_last)
        log.info("saved %s", path)

    async def _evaluate(self, pool: EnvPool, label: str) -> dict[str, float]:
        # evaluate imports build, not train: no cycle, but a lighter import
        from cua_kit.evaluate import per_task_table, run_eval

        agent, episodes = make_agent(self.cfg, self.loaded.processor), self.cfg.trainer.eval_episodes
        result = await run_eval(self.cfg, self.policy, pool, agent, episodes, self.run_dir, label)
        point = {"label": label, "step": self.state.step, "time": time.time(),
                 "success_rate": result["success_rate"], "episodes": result["episodes"]}
        sampled = ""
        if self.cfg.trainer.eval_sampled:
            temperature = self.cfg.rollout.temperature
            extra = await run_eval(self.cfg, self.policy, pool, agent, episodes, self.run_dir, f"{label}-sampled",
                                   temperature)
            point["success_rate_sampled"] = extra["success_rate"]
            sampled = f" | sampled at T={temperature:g}: {100 * extra['success_rate']:.1f}%"
        if "per_task" in result:  # envs with a task_key (MiniWoB++): the mean over tasks and each task's rate
            point["task_mean_success_rate"] = result["task_mean_success_rate"]
            point["per_task"] = {name: row["success_rate"] for name, row in result["per_task"].items()}
            print(f"[Eval {label}] per task:\n{per_task_table(result)}", flush=True)
        print(f"[Eval {label}] held-out success: {100 * result['success_rate']:.1f}% "
              f"over {result['episodes']} episodes{sampled}", flush=True)
        with open(curve_path(self.run_dir), "a") as f:  # the learning curve, one line per eval
            f.write(json.dumps(point) + "\n")
        return result

    def _install_signals(self) -> None:
        """SIGTERM/Ctrl-C: finish the step, checkpoint, stop. Only the main thread can own signals."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals.append(sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        now = time.monotonic()
        # a second Ctrl-C stops now; the same signal again within a second is a launcher passing on the first one
        # (torchrun forwards the SIGTERM its process group already got), not a second request
        if self.stop_requested.is_set() and now - self._signalled_at > 1.0:
            raise KeyboardInterrupt
        if not self.stop_requested.is_set():
            print(f"Received {signal.Signals(sig).name}: saving a checkpoint and stopping after this step", flush=True)
            self._signalled_at = now
        self.stop_requested.set()


def training_samples(groups: list[Group]) -> list[Sample]:
    """Every turn of the groups as a trainer sample, with its advantage and its group."""
    return [Sample(turn, adv, g.group_id) for g in groups for turn, adv in g.samples()]


async def in_thread(function: Any, *args: Any) -> Any:
    """`asyncio.to_thread`, except that a cancelled caller still waits for the thread to end before it goes: the
    thread works on the trainer's model, which whatever runs next (a resumed generation, a save) uses too."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


class ReferenceAhead:
    """Scores the KL reference of the accepted groups (`controller.ready_groups`) while the loop waits for its
    batch, one group at a time, so the update that takes them skips that forward (issue 16: the reference off the
    critical path). `stop` lets the group being scored finish: the model is never in two passes at once."""

    POLL_S = 0.05

    def __init__(self, trainer: GRPOTrainer, controller: RolloutController):
        self.trainer, self.controller = trainer, controller
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seen: set[str] = set()
        while not self._stopping.is_set():
            group = next((g for g in self.controller.ready_groups() if g.group_id not in seen), None)
            if group is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.POLL_S)
                continue
            seen.add(group.group_id)
            try:
                await in_thread(self.trainer.score_reference, training_samples([group]))
            except Exception as exc:  # noqa: BLE001 - the update scores what is missing, and says so if it fails
                log.warning("scoring the reference ahead of the update failed (%s: %s); the update scores it",
                            type(exc).__name__, exc)
                return

    async def stop(self) -> None:
        self._stopping.set()
        await self._task


def trainer_parts(cfg: Config, resume_from: Path | None, ranks: Ranks | None = None,
                  channel: Channel | None = None) -> tuple[LoadedModel, GRPOTrainer]:
    """The model and its trainer, built the same way on every rank: the checkpoint's adapter, else the warm start
    (`model.adapter_path`), else a fresh LoRA; FSDP2-sharded when `ranks` is given (`cua_kit.distributed`)."""
    adapter = str(resume_from / "adapter") if resume_from else (cfg.model.adapter_path or None)
    if adapter and not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"model.adapter_path={adapter} holds no peft adapter: run `cua-kit sft CONFIG` first "
                          "(it writes <run>/sft/adapter), or set model.adapter_path= to start from a fresh LoRA")
    _seed_everything(cfg.trainer.seed)
    # with a warm start, the KL reference is the warm-start policy (frozen), not the bare base model
    reference = cfg.model.adapter_path if (cfg.model.adapter_path and cfg.grpo.kl_ctl > 0) else None
    loaded = make_model(cfg, adapter_path=adapter, reference_adapter=reference)
    sampling = episode_settings(cfg).sampling
    if ranks is None:
        return loaded, GRPOTrainer(loaded, cfg.grpo, cfg.trainer, sampling)
    return loaded, ShardedTrainer(loaded, cfg.grpo, cfg.trainer, sampling, ranks, channel)


def _refuse_an_unplaced_layout(cfg: Config, ranks: Ranks | None) -> None:
    """A layout the launcher has not placed (its processes, GPUs and vLLM server), or a torchrun worker without
    ranks, would train alone in this process while the layout says otherwise: refuse, saying what to run."""
    from cua_kit.launch import needs_launcher

    if needs_launcher(cfg) or (ranks is None and launched()):
        raise ConfigError(f"launch.allocation={cfg.launch.allocation!r} (launch.nnodes={cfg.launch.nnodes}) is a "
                          "layout for the launcher: start it with `cua-kit train CONFIG [overrides]` (or the "
                          "dashboard's Launch), which places its processes; train() runs one process only")


def _close_trace(trace: TraceWriter, status: str, reason: str | None) -> None:
    """Record how the run ended and close the trace; a trace that can't be written (full disk) is reported
    in one line, not as a second traceback over the first."""
    try:
        trace.finish_run(status, reason)
        trace.close()
    except TraceError as exc:
        log.error("the trace could not record status %s: %s", status, exc)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config) -> dict[str, Any]:
    """Run GRPO training to completion (or until SIGTERM); returns a summary dict.

    Inside a running event loop (Jupyter) the run gets its own loop in a worker thread; there, signals stay
    with the kernel (interrupt the kernel to stop), or call `await TrainingRun(cfg).main()` directly.
    """
    if launched():  # one of several torchrun workers: FSDP2 ranks, rank 0 orchestrating
        return train_ranks(cfg)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(TrainingRun(cfg).main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, TrainingRun(cfg).main()).result()


if __name__ == "__main__":  # python -m cua_kit.train CONFIG [overrides]
    from cua_kit.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
