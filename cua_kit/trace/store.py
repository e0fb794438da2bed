"""The trace store: one SQLite file per run (outputs/<experiment>/<trial>/trace.db), written off the hot path.

`TraceWriter` owns a background thread with its own connection. `add_turn`, `add_episode`, ... check the row
in the caller (a wrong key fails at once, with the known columns) and queue it; the thread drains the queue in
batches, one transaction per batch. The file is in WAL mode so readers (the dashboard, a notebook, datasette,
`cua_kit.trace.queries`) never block the writer and never see a half-written batch.

Every column of every table is documented in docs/trace-schema.md (a test keeps the two in step).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import socket
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import sqlite_utils

# table -> {column: python type}; the first columns listed in PRIMARY_KEYS[table] form the key.
SCHEMA: dict[str, dict[str, type]] = {
    "runs": {
        "run_id": str, "experiment": str, "trial": str, "config_json": str, "started_at": float,
        "finished_at": float, "status": str, "pid": int, "host": str, "message": str,
    },
    "steps": {
        "run_id": str, "step": int, "version": int, "epoch": float, "reward_mean": float,
        "success_rate": float, "pg_loss": float, "kl": float, "entropy": float, "lr": float,
        "grad_norm": float, "staleness_mean": float, "staleness_max": int, "episodes_per_hour": float,
        "n_groups": int, "n_dropped_stale": int, "n_zero_variance": int, "n_env_errors": int,
        "time": float, "extra_json": str,
    },
    "groups": {
        "group_id": str, "run_id": str, "step": int, "task_id": str, "n_samples": int,
        "reward_mean": float, "reward_std": float, "zero_variance": int, "rewards_json": str,
        "advantages_json": str, "created_at": float,
    },
    "episodes": {
        "episode_id": str, "run_id": str, "group_id": str, "sample_idx": int, "task_id": str, "env": str,
        "reward": float, "advantage": float, "success": int, "status": str, "n_turns": int,
        "min_version": int, "max_version": int, "error": str, "started_at": float, "finished_at": float,
    },
    "turns": {
        "episode_id": str, "turn_idx": int, "run_id": str, "screenshot_path": str, "completion_text": str,
        "action_json": str, "parse_error": str, "version": int, "staleness": int, "n_prompt_tokens": int,
        "n_completion_tokens": int, "logprob_sum": float, "latency_s": float, "time": float,
    },
}
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "steps": ("run_id", "step"),
    "groups": ("group_id",),
    "episodes": ("episode_id",),
    "turns": ("episode_id", "turn_idx"),
}
# The dashboard's lookups: a step's groups, a group's episodes, a run's episodes, an episode's turns.
INDEXES: list[tuple[str, tuple[str, ...]]] = [
    ("groups", ("run_id", "step")),
    ("episodes", ("group_id",)),
    ("episodes", ("run_id",)),
    ("turns", ("episode_id",)),
]
# A row's time column, filled with time.time() when the caller leaves it out.
TIME_COLUMNS = {"steps": "time", "groups": "created_at", "turns": "time"}
RUN_STATUSES = ("running", "finished", "failed", "stopped")
BUSY_TIMEOUT_MS = 30_000


class TraceError(RuntimeError):
    """The writer thread failed (disk full, a corrupt file ...): raised on the next call of the writer."""


def connect(db_path: str | Path) -> sqlite_utils.Database:
    """A read-write connection with the run's pragmas (WAL, busy timeout); creates the schema if missing."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_MS / 1000)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    # NORMAL is durable across process crashes in WAL mode (only an OS crash can lose the last commits).
    db.execute("PRAGMA synchronous=NORMAL")
    create_schema(db)
    return db


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the five tables and the dashboard's indexes if they don't exist yet; add columns a file written by
    an older cua-kit lacks (a resumed run may be older than the code)."""
    for table, columns in SCHEMA.items():
        pk = PRIMARY_KEYS[table]
        db[table].create(columns, pk=pk[0] if len(pk) == 1 else pk, if_not_exists=True)
        have = db[table].columns_dict
        for name, kind in columns.items():
            if name not in have:
                db[table].add_column(name, kind)
    for table, columns in INDEXES:
        db[table].create_index(columns, if_not_exists=True)


def to_row(table: str, row: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Check one row against SCHEMA and make it storable; bad input raises here, in the caller.

    `*_json` columns take a dict/list (stored as JSON) or a JSON string; numpy/torch scalars become numbers;
    `run_id` is filled in; the table's time column defaults to now.
    """
    columns = SCHEMA[table]
    unknown = sorted(set(row) - set(columns))
    if unknown:
        raise ValueError(f"trace table {table!r} has no column(s) {unknown}; known columns: {list(columns)} "
                         "(put anything else in a *_json column)")
    out = {name: storable(table, name, value) for name, value in row.items()}
    if "run_id" in columns:
        out["run_id"] = run_id
    if table in TIME_COLUMNS:
        out.setdefault(TIME_COLUMNS[table], time.time())
    missing = [k for k in PRIMARY_KEYS[table] if out.get(k) is None]
    if missing:
        raise ValueError(f"trace table {table!r}: a row needs its key column(s) {missing}")
    return out


def storable(table: str, column: str, value: Any) -> Any:
    """`value` as SQLite stores it: None, int, float or str."""
    if column.endswith("_json") and not (value is None or isinstance(value, str)):
        return json.dumps(value, default=json_default)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, (int, float, str)):
        return value
    raise TypeError(f"trace {table}.{column}: can't store a {type(value).__name__} ({value!r:.60}); "
                    "pass a number or a string")


def json_default(value: Any) -> Any:
    """numpy arrays / torch tensors (and their scalars) as plain lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"can't store a {type(value).__name__} as JSON; convert it to lists/numbers/strings")


class TraceWriter:
    """Writes one run's trace from a background thread. Every method returns at once except flush/close.

    Adding a row whose key exists updates only the columns given (upsert): an episode can be written when it
    ends and get its `advantage` later, when its group is complete. Use as a context manager, or call close().
    """

    def __init__(self, db_path: str | Path, run_id: str) -> None:
        self.db_path = Path(db_path)
        self.run_id = run_id
        connect(self.db_path).close()  # a bad path fails here, in the caller, not in the thread
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"trace-writer-{run_id}", daemon=True)
        self._thread.start()
        _OPEN_WRITERS.add(self)

    # ---- rows -------------------------------------------------------------------------------------
    def start_run(self, experiment: str, trial: str, config: dict[str, Any], pid: int | None = None) -> None:
        """Record the run as running. On resume (same run_id) it keeps started_at and clears finished_at and message."""
        row = to_row("runs", {"experiment": experiment, "trial": trial,
                              "config_json": json.dumps(config, default=str), "status": "running",
                              "pid": os.getpid() if pid is None else pid, "host": socket.gethostname(),
                              "started_at": time.time()}, self.run_id)
        self._put("start_run", row)

    def finish_run(self, status: str = "finished", message: str | None = None) -> None:
        """Record how the run ended; `message` says why (a failure's reason), and clears a waiting message."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {RUN_STATUSES}")
        self._put("upsert", ("runs", {"run_id": self.run_id, "status": status, "finished_at": time.time(),
                                      "message": message}))

    def set_message(self, message: str | None) -> None:
        """What the run is doing when no step comes (the dashboard shows it); None clears it."""
        self._put("upsert", ("runs", {"run_id": self.run_id, "message": message}))

    def add_turn(self, row: dict[str, Any]) -> None:
        self._put("upsert", ("turns", to_row("turns", row, self.run_id)))

    def add_episode(self, row: dict[str, Any]) -> None:
        self._put("upsert", ("episodes", to_row("episodes", row, self.run_id)))

    def add_group(self, row: dict[str, Any]) -> None:
        self._put("upsert", ("groups", to_row("groups", row, self.run_id)))

    def add_step(self, row: dict[str, Any]) -> None:
        self._put("upsert", ("steps", to_row("steps", row, self.run_id)))

    def mark_groups_consumed(self, group_ids: list[str], step: int) -> None:
        """Set `step` on these groups: the training step that used them."""
        self._put("consumed", (list(group_ids), int(step)))

    def delete_steps_after(self, step: int, drop_unconsumed: bool = True) -> None:
        """Resume reconciliation: forget what happened after the checkpoint at `step`.

        Deletes steps > `step` and the groups consumed after it (with their episodes and turns): the resumed
        run trains those steps again on new groups, so each step number appears once. With `drop_unconsumed`,
        groups never consumed and episodes of groups never completed (the dead process's buffer, which the
        checkpoint does not hold) go too. Call it before the resumed run starts new rollouts.
        """
        self._put("delete_after", (int(step), drop_unconsumed))

    # ---- control ----------------------------------------------------------------------------------
    def flush(self, timeout: float | None = 60.0) -> None:
        """Block until everything queued so far is committed (readers then see it)."""
        if self._closed:
            self._raise_if_failed()
            return
        done = threading.Event()
        self._put("flush", done)
        if not done.wait(timeout):
            raise TimeoutError(f"trace writer did not commit within {timeout} s ({self.db_path})")
        self._raise_if_failed()

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._thread.join()
        _OPEN_WRITERS.discard(self)
        self._raise_if_failed()

    async def aflush(self) -> None:
        """flush() for async code: waits in a worker thread, not on the event loop."""
        await asyncio.to_thread(self.flush)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, op: str, payload: Any) -> None:
        self._raise_if_failed()
        if self._closed:
            raise TraceError(f"trace writer for {self.db_path} is closed")
        self._queue.put((op, payload))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TraceError(f"trace writer for {self.db_path} failed: {self._error!r}") from self._error

    # ---- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            db = connect(self.db_path)
        except BaseException as error:  # noqa: BLE001 - keep answering flush/close, report the error
            self._error, db = error, None
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < 5000:  # drain what piled up: one transaction for all of it
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = self._write_batch(db, batch)
        if db is not None:
            db.close()

    def _write_batch(self, db: sqlite_utils.Database | None, batch: list[tuple[str, Any]]) -> bool:
        """Apply a batch in order, in one transaction; True on 'stop'. Errors are kept for the caller."""
        events = [payload for op, payload in batch if op == "flush"]
        try:
            if self._error is None and db is not None:
                with db.atomic():  # one transaction: readers see the whole batch or none of it
                    for op, payload in batch:
                        apply_op(db, self.run_id, op, payload)
        except BaseException as error:  # noqa: BLE001 - reported to the caller on its next call
            self._error = error
        for done in events:
            done.set()
        return any(op == "stop" for op, _ in batch)


def apply_op(db: sqlite_utils.Database, run_id: str, op: str, payload: Any) -> None:
    """One queued operation as SQL, inside the batch's transaction."""
    if op == "upsert":
        table, row = payload
        upsert(db, table, row)
    elif op == "start_run":
        # A resumed run keeps its first started_at: insert it only if the row is new.
        db.execute("INSERT OR IGNORE INTO runs (run_id, started_at) VALUES (?, ?)",
                   [run_id, payload["started_at"]])
        upsert(db, "runs", {k: v for k, v in payload.items() if k != "started_at"} | {"finished_at": None,
                                                                                      "message": None})
    elif op == "consumed":
        group_ids, step = payload
        db.conn.executemany("UPDATE groups SET step = ? WHERE group_id = ?", [(step, g) for g in group_ids])
    elif op == "delete_after":
        delete_after(db, run_id, *payload)


def upsert(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    """INSERT, or UPDATE only the given columns when the key exists."""
    names = list(row)
    keys = PRIMARY_KEYS[table]
    updates = [n for n in names if n not in keys]
    action = "DO UPDATE SET " + ", ".join(f"{n} = excluded.{n}" for n in updates) if updates else "DO NOTHING"
    sql = (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
           f"ON CONFLICT ({', '.join(keys)}) {action}")
    db.execute(sql, [row[n] for n in names])


def delete_after(db: sqlite_utils.Database, run_id: str, step: int, drop_unconsumed: bool) -> None:
    dropped = "step > ?" + (" OR step IS NULL" if drop_unconsumed else "")
    gone = f"SELECT group_id FROM groups WHERE run_id = ? AND ({dropped})"
    args = [run_id, step]
    gone_episodes = f"SELECT episode_id FROM episodes WHERE group_id IN ({gone})"
    db.execute(f"DELETE FROM turns WHERE episode_id IN ({gone_episodes})", args)
    db.execute(f"DELETE FROM episodes WHERE group_id IN ({gone})", args)
    db.execute(f"DELETE FROM groups WHERE run_id = ? AND ({dropped})", args)
    if drop_unconsumed:  # episodes whose group never completed have no group row
        orphans = ("SELECT episode_id FROM episodes "
                   "WHERE run_id = ? AND group_id NOT IN (SELECT group_id FROM groups)")
        db.execute(f"DELETE FROM turns WHERE episode_id IN ({orphans})", [run_id])
        db.execute(f"DELETE FROM episodes WHERE episode_id IN ({orphans})", [run_id])
    db.execute("DELETE FROM steps WHERE run_id = ? AND step > ?", [run_id, step])


# Writers still open at interpreter exit get their queue committed (a forgotten close() loses nothing).
_OPEN_WRITERS: weakref.WeakSet[TraceWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except TraceError:
            pass
