"""On-disk cache of judge answers, so a rerun or a run resumed after a kill sends no request twice.

Keyed by sha256 of (model, messages, sampling parameters, attempt). Each answer is committed to SQLite (WAL,
synchronous=FULL) the moment it arrives, so a SIGKILL loses at most the requests that were still in flight. The
cache stores what the judge said; it never decides anything.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from posttrain.provenance import bytes_digest


def request_key(model: str, messages: list[dict[str, Any]], sampling: dict[str, Any], attempt: int = 0) -> str:
    payload = json.dumps(
        {"model": model, "messages": messages, "sampling": sampling, "attempt": attempt},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return bytes_digest(payload)


class JudgeCache:
    """A key -> answer store in one SQLite file; safe to share between the event loop's callbacks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, request TEXT, answer TEXT, created REAL)"
        )

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, answer in self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk):
                    found[key] = answer
        return found

    def put(self, key: str, model: str, request: dict[str, Any], answer: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                (key, model, json.dumps(request, ensure_ascii=False), answer, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
