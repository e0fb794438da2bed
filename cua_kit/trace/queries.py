"""Read-only queries on trace.db files: everything the dashboard and notebooks read goes through here.

Connections are opened read-only (`mode=ro`), so a reader can never take the write lock and stall the
trainer's `TraceWriter`; with the file in WAL mode a reader sees the last committed batch. Rows come back
as plain dicts with the columns of docs/trace-schema.md (`*_json` columns stay JSON strings).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

from cua_kit.trace.store import BUSY_TIMEOUT_MS

TRACE_FILE = "trace.db"


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open a trace.db read-only. A missing file is an error (opening would otherwise create it)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRACE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no trace database at {path}: pass a run folder or its {TRACE_FILE}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)  # the dashboard may read from a worker thread
    return sqlite_utils.Database(conn)


def rows(db: sqlite_utils.Database, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """All rows of a query; a trace.db the writer has not created tables in yet reads as empty."""
    try:
        return list(db.query(sql, params or []))
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under `runs_dir` (any depth): its runs row plus db_path and n_steps, newest first."""
    found = []
    for db_path in sorted(Path(runs_dir).rglob(TRACE_FILE)):
        db = open_db(db_path)
        try:
            info = run_info(db)
            n_steps = rows(db, "SELECT count(*) AS n FROM steps")
        finally:
            db.close()
        if info is not None:
            found.append(info | {"db_path": str(db_path), "n_steps": n_steps[0]["n"] if n_steps else 0})
    return sorted(found, key=lambda r: r["started_at"] or 0.0, reverse=True)


def run_info(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The runs row of this file (the latest started, if several), or None before start_run is committed."""
    found = rows(db, "SELECT * FROM runs ORDER BY started_at DESC LIMIT 1")
    return found[0] if found else None


def steps(db: sqlite_utils.Database, run_id: str) -> list[dict[str, Any]]:
    """The run's training steps, in step order."""
    return rows(db, "SELECT * FROM steps WHERE run_id = ? ORDER BY step", [run_id])


def step_numbers(db: sqlite_utils.Database, run_id: str) -> list[int]:
    return [r["step"] for r in rows(db, "SELECT step FROM steps WHERE run_id = ? ORDER BY step", [run_id])]


def groups_at_step(db: sqlite_utils.Database, run_id: str, step: int | None) -> list[dict[str, Any]]:
    """The groups that training step `step` consumed; step=None gives the groups not consumed yet."""
    return rows(db, "SELECT * FROM groups WHERE run_id = ? AND step IS ? ORDER BY created_at, group_id",
                [run_id, step])


def episodes_of_group(db: sqlite_utils.Database, group_id: str) -> list[dict[str, Any]]:
    return rows(db, "SELECT * FROM episodes WHERE group_id = ? ORDER BY sample_idx, episode_id", [group_id])


def episode(db: sqlite_utils.Database, episode_id: str) -> dict[str, Any] | None:
    found = rows(db, "SELECT * FROM episodes WHERE episode_id = ?", [episode_id])
    return found[0] if found else None


def turns(db: sqlite_utils.Database, episode_id: str) -> list[dict[str, Any]]:
    """An episode's turns in order; screenshot_path is relative to the folder holding trace.db."""
    return rows(db, "SELECT * FROM turns WHERE episode_id = ? ORDER BY turn_idx", [episode_id])


def latest_step(db: sqlite_utils.Database, run_id: str) -> dict[str, Any] | None:
    """The run's last steps row (None before the first optimizer step)."""
    found = rows(db, "SELECT * FROM steps WHERE run_id = ? ORDER BY step DESC LIMIT 1", [run_id])
    return found[0] if found else None


def group(db: sqlite_utils.Database, group_id: str) -> dict[str, Any] | None:
    found = rows(db, "SELECT * FROM groups WHERE group_id = ?", [group_id])
    return found[0] if found else None


def episodes_of_run(db: sqlite_utils.Database, run_id: str, limit: int = 2000) -> list[dict[str, Any]]:
    """The run's newest episodes (newest first), each with `step`: the step that consumed its group (or NULL)."""
    return rows(db, "SELECT e.*, g.step AS step FROM episodes e LEFT JOIN groups g ON g.group_id = e.group_id "
                    "WHERE e.run_id = ? ORDER BY e.started_at DESC, e.episode_id LIMIT ?", [run_id, limit])
