"""Tests of the trace store on real SQLite files: writes, upserts, resume clean-up, concurrent readers,
and the schema against docs/trace-schema.md."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from cua_kit.trace import TraceError, TraceWriter, queries
from cua_kit.trace.store import INDEXES, connect

DOC = Path(__file__).resolve().parents[1] / "docs" / "trace-schema.md"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "exp" / "trial0" / "trace.db"


def write_group(writer: TraceWriter, group_id: str, rewards: list[float], turns_each: int = 2) -> None:
    """A complete group: its episodes, their turns, then the group row."""
    for i, reward in enumerate(rewards):
        episode_id = f"{group_id}-e{i}"
        for t in range(turns_each):
            writer.add_turn({"episode_id": episode_id, "turn_idx": t, "completion_text": f"turn {t}",
                             "action_json": {"kind": "click", "x": 3, "y": 4}, "version": 0})
        writer.add_episode({"episode_id": episode_id, "group_id": group_id, "sample_idx": i, "task_id": "t1",
                            "env": "synth", "reward": reward, "success": reward > 0, "status": "finished",
                            "n_turns": turns_each})
    writer.add_group({"group_id": group_id, "task_id": "t1", "n_samples": len(rewards),
                      "rewards_json": rewards, "reward_mean": sum(rewards) / len(rewards)})


def parse_doc_tables(text: str) -> dict[str, dict]:
    """{table: {"pk": [...], "columns": [(name, type), ...]}} from the markdown of docs/trace-schema.md."""
    tables: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^## Table `(\w+)`", line):
            current = tables.setdefault(m[1], {"pk": [], "columns": []})
        elif current is not None and (m := re.match(r"^Primary key: \((.*)\)", line)):
            current["pk"] = [c.strip() for c in m[1].split(",")]
        elif current is not None and (m := re.match(r"^\| (\w+) \| (\w+) \|", line)) and m[1] != "column":
            current["columns"].append((m[1], m[2]))
    return tables


def test_schema_matches_the_doc(db_path: Path) -> None:
    db = connect(db_path)
    documented = parse_doc_tables(DOC.read_text())
    assert set(documented) == set(db.table_names()) == {"runs", "steps", "groups", "episodes", "turns"}
    for table, doc in documented.items():
        info = list(db.query(f"PRAGMA table_info({table})"))
        assert [(c["name"], c["type"]) for c in info] == doc["columns"], table
        pk = [c["name"] for c in sorted(info, key=lambda c: c["pk"]) if c["pk"]]
        assert pk == doc["pk"], table
    indexed = {(t, tuple(ix.columns)) for t in db.table_names() for ix in db[t].indexes}
    assert set(INDEXES) <= indexed
    assert db.journal_mode == "wal"
    db.close()


def test_rows_round_trip_with_upserts(db_path: Path) -> None:
    with TraceWriter(db_path, "run-a") as writer:
        writer.start_run("exp", "trial0", {"lr": 1e-5}, pid=123)
        write_group(writer, "g1", [0.0, 1.0])
        writer.add_episode({"episode_id": "g1-e1", "advantage": 0.7})  # later: only this column changes
        writer.mark_groups_consumed(["g1"], step=1)
        write_group(writer, "g2", [1.0, 1.0])  # not consumed yet
        writer.add_step({"step": 1, "version": 1, "reward_mean": torch.tensor(0.5),
                         "extra_json": {"note": "x"}})
        writer.flush()
        db = queries.open_db(db_path)
        assert queries.run_info(db)["status"] == "running"
        assert json.loads(queries.run_info(db)["config_json"]) == {"lr": 1e-5}
        assert queries.step_numbers(db, "run-a") == [1]
        assert json.loads(queries.steps(db, "run-a")[0]["extra_json"]) == {"note": "x"}
        assert queries.steps(db, "run-a")[0]["reward_mean"] == 0.5  # a torch scalar is stored as a number
        assert [g["group_id"] for g in queries.groups_at_step(db, "run-a", 1)] == ["g1"]
        assert [g["group_id"] for g in queries.groups_at_step(db, "run-a", None)] == ["g2"]
        assert json.loads(queries.groups_at_step(db, "run-a", 1)[0]["rewards_json"]) == [0.0, 1.0]
        episode = queries.episode(db, "g1-e1")
        assert (episode["advantage"], episode["reward"], episode["success"]) == (0.7, 1.0, 1)
        assert episode["run_id"] == "run-a"
        assert [e["sample_idx"] for e in queries.episodes_of_group(db, "g1")] == [0, 1]
        turns = queries.turns(db, "g1-e0")
        assert [t["turn_idx"] for t in turns] == [0, 1]
        assert json.loads(turns[0]["action_json"]) == {"kind": "click", "x": 3, "y": 4}
        assert turns[0]["time"] > 0  # filled in by the writer
        writer.finish_run("finished")
    info = queries.run_info(db)
    assert info["status"] == "finished" and info["finished_at"] >= info["started_at"]
    db.close()


def test_resume_keeps_started_at_and_clears_finished_at(db_path: Path) -> None:
    with TraceWriter(db_path, "run-a") as writer:
        writer.start_run("exp", "trial0", {}, pid=1)
        writer.finish_run("stopped")
    reader = queries.open_db(db_path)
    first = queries.run_info(reader)
    with TraceWriter(db_path, "run-a") as writer:
        writer.start_run("exp", "trial0", {}, pid=2)
    again = queries.run_info(reader)
    reader.close()
    assert (again["started_at"], again["pid"], again["status"], again["finished_at"]) == (
        first["started_at"], 2, "running", None)


def test_delete_steps_after_then_rewrite_gives_unique_steps(db_path: Path) -> None:
    with TraceWriter(db_path, "run-a") as writer:
        for step in range(1, 6):
            write_group(writer, f"old{step}", [0.0, 1.0])
            writer.mark_groups_consumed([f"old{step}"], step)
            writer.add_step({"step": step, "reward_mean": 0.5})
        write_group(writer, "pending", [1.0, 0.0])  # in the dead process's buffer
        writer.add_episode({"episode_id": "half", "group_id": "never-completed", "reward": 1.0})
    # the resumed process: checkpoint at step 3
    with TraceWriter(db_path, "run-a") as writer:
        writer.delete_steps_after(3)
        writer.flush()
        reader = queries.open_db(db_path)
        assert queries.step_numbers(reader, "run-a") == [1, 2, 3]
        reader.close()
        for step in range(4, 7):
            write_group(writer, f"new{step}", [1.0, 0.0])
            writer.mark_groups_consumed([f"new{step}"], step)
            writer.add_step({"step": step, "reward_mean": 0.5})
    db = queries.open_db(db_path)
    assert queries.step_numbers(db, "run-a") == [1, 2, 3, 4, 5, 6]
    assert [g["group_id"] for g in queries.groups_at_step(db, "run-a", 3)] == ["old3"]
    assert [g["group_id"] for g in queries.groups_at_step(db, "run-a", 4)] == ["new4"]
    assert queries.groups_at_step(db, "run-a", None) == []
    for gone in ("old4-e0", "old5-e1", "pending-e0", "half"):
        assert queries.episode(db, gone) is None
        assert queries.turns(db, gone) == []
    assert len(queries.turns(db, "old3-e0")) == 2
    db.close()


def test_an_open_read_transaction_does_not_stall_commits(db_path: Path) -> None:
    """WAL: a reader in the middle of a read keeps its snapshot while the writer commits."""
    with TraceWriter(db_path, "run-a") as writer:
        writer.add_step({"step": 1})
        writer.flush()
        reader = queries.open_db(db_path)
        reader.conn.execute("BEGIN")
        assert reader.conn.execute("SELECT count(*) FROM steps").fetchone()[0] == 1
        writer.add_step({"step": 2})
        writer.flush(timeout=5)  # with a rollback journal this waits for the reader and times out
        assert reader.conn.execute("SELECT count(*) FROM steps").fetchone()[0] == 1  # its snapshot
        reader.conn.execute("COMMIT")
        assert queries.step_numbers(reader, "run-a") == [1, 2]
        reader.close()


def test_readers_never_block_the_writer(db_path: Path) -> None:
    """A reader thread queries (and even holds a read transaction open) while the writer commits batches."""
    writer = TraceWriter(db_path, "run-a")
    writer.start_run("exp", "trial0", {}, pid=1)
    writer.flush()
    stop = threading.Event()
    seen: dict[int, list[int]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def read_loop(reader_idx: int) -> None:
        db = queries.open_db(db_path)
        try:
            while not stop.is_set():
                db.conn.execute("BEGIN")  # a long read transaction: WAL lets commits go on meanwhile
                seen[reader_idx].append(db.conn.execute("SELECT count(*) FROM turns").fetchone()[0])
                queries.turns(db, "e0")
                time.sleep(0.002)
                db.conn.execute("COMMIT")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            db.close()

    readers = [threading.Thread(target=read_loop, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    n_turns = 0
    for _batch in range(40):
        for _ in range(100):
            writer.add_turn({"episode_id": f"e{n_turns // 10}", "turn_idx": n_turns % 10,
                             "completion_text": "x"})
            n_turns += 1
        writer.flush(timeout=10)  # a blocked writer would time out here
    stop.set()
    for reader in readers:
        reader.join()
    writer.close()
    assert errors == []
    for counts in seen.values():  # each reader saw the table grow, commit after commit
        assert counts == sorted(counts) and len(counts) > 10 and counts[-1] > 0
    db = queries.open_db(db_path)
    assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == n_turns
    db.close()


def test_add_returns_at_once_inside_an_event_loop(db_path: Path) -> None:
    async def rollout_like() -> float:
        writer = TraceWriter(db_path, "run-a")
        start = time.perf_counter()
        for i in range(2000):
            writer.add_turn({"episode_id": f"e{i}", "turn_idx": 0, "completion_text": "y" * 500})
        enqueue_s = time.perf_counter() - start
        await writer.aflush()
        await writer.aclose()
        return enqueue_s

    enqueue_s = asyncio.run(rollout_like())
    assert enqueue_s < 2.0  # generous: the point is that no call waits for SQLite
    db = queries.open_db(db_path)
    assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == 2000
    db.close()


def test_bad_rows_fail_in_the_caller_with_the_known_columns(db_path: Path) -> None:
    with TraceWriter(db_path, "run-a") as writer:
        with pytest.raises(ValueError, match=r"no column\(s\) \['reward_men'\].*known columns"):
            writer.add_step({"step": 1, "reward_men": 0.5})
        with pytest.raises(ValueError, match="needs its key"):
            writer.add_turn({"episode_id": "e0"})
        with pytest.raises(TypeError, match="can't store a object"):
            writer.add_episode({"episode_id": "e0", "reward": object()})
        with pytest.raises(ValueError, match="not one of"):
            writer.finish_run("done")
    with pytest.raises(TraceError, match="closed"):
        writer.add_step({"step": 1})


def test_a_failed_write_is_reported_and_the_thread_ends(db_path: Path) -> None:
    writer = TraceWriter(db_path, "run-a")
    writer.add_step({"step": 1, "n_groups": 2**70})  # SQLite integers are 64-bit: fails in the writer thread
    with pytest.raises(TraceError, match="too large"):
        writer.flush()
    with pytest.raises(TraceError):
        writer.close()
    assert not writer._thread.is_alive()


def test_list_runs_and_open_db_errors(tmp_path: Path) -> None:
    for trial in ("t0", "t1"):
        with TraceWriter(tmp_path / "exp" / trial / "trace.db", f"run-{trial}") as writer:
            writer.start_run("exp", trial, {}, pid=1)
            writer.add_step({"step": 1})
    runs = queries.list_runs(tmp_path)
    assert sorted(r["trial"] for r in runs) == ["t0", "t1"]
    assert all(r["n_steps"] == 1 and Path(r["db_path"]).exists() for r in runs)
    with pytest.raises(FileNotFoundError, match="no trace database"):
        queries.open_db(tmp_path / "missing")
    db = queries.open_db(tmp_path / "exp" / "t0")  # a run folder works too
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM steps")
    db.close()


def test_a_group_with_an_env_error_keeps_rewards_and_advantages_aligned(db_path: Path) -> None:
    """The group rows of the loop (`trace.rows.write_group`) list one reward and one advantage per episode in
    sample order, null for the episode that got no reward; the dashboard's group table shows them side by side."""
    from app.data import groups_html
    from cua_kit.envs.base import Task
    from cua_kit.rollout.controller import Group
    from cua_kit.rollout.episode import Episode
    from cua_kit.trace.rows import write_group as write_loop_group

    task = Task("t1", "synth")
    episodes = [Episode("e0", task, 0, status="finished", reward=0.0),
                Episode("e1", task, 1, status="env_error", error="browser died"),
                Episode("e2", task, 2, status="finished", reward=1.0)]
    with TraceWriter(db_path, "run-a") as writer:
        writer.start_run("exp", "trial0", {}, pid=123)
        write_loop_group(writer, Group("g1", task, 0, episodes, advantages=[-0.7, 0.7]), "synth")
        writer.flush()
        db = queries.open_db(db_path)
        (row,) = queries.groups_at_step(db, "run-a", None)
        db.close()
    assert json.loads(row["rewards_json"]) == [0.0, None, 1.0]
    assert json.loads(row["advantages_json"]) == [-0.7, None, 0.7]
    cells = re.findall(r'data-reward="([^"]*)" data-advantage="([^"]*)"', groups_html([row]))
    assert cells == [("0.0", "-0.7"), ("None", "None"), ("1.0", "0.7")]
