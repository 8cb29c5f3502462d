"""Reading JSON-lines files: the rows of a data file with their line numbers, and clear errors naming the file and
line for a line that is not UTF-8, not JSON or not an object. Every reader of user data files goes through here.
This module knows no particular data format.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_rows(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows (JSON objects) of a JSONL file (gzip-compressed when its name ends in ``.gz``) with their line numbers
    (from 1), blank lines skipped. Invalid UTF-8 (never a bare ``UnicodeDecodeError``: the byte is named), invalid
    JSON or a row that is not an object raise ``error`` naming the file and line."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.end]
                raise error(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line, {bad!r}: {e.reason}); "
                            "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
            yield lineno, row
