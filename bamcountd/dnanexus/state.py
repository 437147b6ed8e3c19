"""dx-watch's local ledger: one SQLite row per source BAM, so a BAM is processed once.

The platform holds the same facts as properties on the BAM (``bamcountd_job``,
``bamcountd_result``, ``bamcountd_failed``); this ledger saves API calls and keeps the
history (attempts, reasons) across restarts.  SQLite in WAL mode with a busy timeout lets a
second runner on the same state folder wait instead of failing.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHED = "launched"
DONE = "done"
FAILED = "failed"
RETRY = "retry"  # a local count failed for a reason a retry can fix; the next poll tries again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bams (
    file_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('launched', 'done', 'failed', 'retry')),
    job_id TEXT,
    result_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Entry:
    file_id: str
    project: str
    name: str
    status: str
    job_id: str | None
    result_id: str | None
    attempts: int
    reason: str | None


class Ledger:
    """What this runner (or another on the same folder) has done with each BAM."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, file_id: str) -> Entry | None:
        row = self._db.execute(
            "SELECT file_id, project, name, status, job_id, result_id, attempts, reason FROM bams WHERE file_id = ?",
            (file_id,),
        ).fetchone()
        return Entry(*row) if row else None

    def launched(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT file_id, project, name, status, job_id, result_id, attempts, reason FROM bams "
            "WHERE status = ? ORDER BY updated",
            (LAUNCHED,),
        ).fetchall()
        return [Entry(*row) for row in rows]

    def all(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT file_id, project, name, status, job_id, result_id, attempts, reason FROM bams ORDER BY name"
        ).fetchall()
        return [Entry(*row) for row in rows]

    def record_launch(self, *, file_id: str, project: str, name: str, job_id: str, attempt: int) -> None:
        self._db.execute(
            "INSERT INTO bams (file_id, project, name, status, job_id, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO UPDATE SET status = excluded.status, job_id = excluded.job_id, "
            "attempts = excluded.attempts, reason = NULL, updated = excluded.updated",
            (file_id, project, name, LAUNCHED, job_id, attempt, time.time()),
        )

    def record_done(self, *, file_id: str, project: str, name: str, result_id: str) -> None:
        self._db.execute(
            "INSERT INTO bams (file_id, project, name, status, result_id, updated) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO UPDATE SET status = excluded.status, result_id = excluded.result_id, "
            "reason = NULL, updated = excluded.updated",
            (file_id, project, name, DONE, result_id, time.time()),
        )

    def record_failed(self, *, file_id: str, project: str, name: str, reason: str, attempts: int) -> None:
        self._db.execute(
            "INSERT INTO bams (file_id, project, name, status, reason, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO UPDATE SET status = excluded.status, reason = excluded.reason, "
            "attempts = excluded.attempts, updated = excluded.updated",
            (file_id, project, name, FAILED, reason, attempts, time.time()),
        )

    def record_retry(self, *, file_id: str, project: str, name: str, reason: str, attempts: int) -> None:
        self._db.execute(
            "INSERT INTO bams (file_id, project, name, status, reason, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO UPDATE SET status = excluded.status, reason = excluded.reason, "
            "attempts = excluded.attempts, updated = excluded.updated",
            (file_id, project, name, RETRY, reason, attempts, time.time()),
        )
