"""Reading and writing filter samples: JSONL, Parquet, or a saved ``datasets`` folder, in TRL's row formats.

A row is either conversational (``messages``: a list of ``{role, content}`` turns, assistant turns may carry
``tool_calls``) or prompt/completion (``prompt`` and ``completion``, each a string or a list of turns), or, for
pairwise judging, a prompt with two candidate columns. Bad input is a ``SampleError`` naming file, line and field.
Outputs are written to a temporary name and renamed, so nothing already written is lost. This module never
filters or judges anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import orjson

Format = Literal["jsonl", "parquet", "datasets"]


class SampleError(ValueError):
    """Input that cannot be read as samples: the message names file, line (or row) and field."""


@dataclass
class Sample:
    """One input row with where it came from and the texts the filters read."""

    index: int  # position in the input, 0-based
    where: str  # "file:line N" or "file:row N", for messages
    row: dict[str, Any]
    prompt: str  # the text before the answer: every turn but the final assistant one
    completion: str  # the answer: the final assistant turn, or the completion column

    @cached_property
    def text(self) -> str:
        """All turns: the prompt, a newline, the completion (the completion alone when there is no prompt)."""
        return f"{self.prompt}\n{self.completion}" if self.prompt else self.completion


def detect_format(path: Path) -> Format:
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise SampleError(f"{path}: cannot tell the format (use .jsonl, .parquet, or a saved datasets folder)")


# ---------------------------------------------------------------------------------------------------- reading


_LONG_NUMBER = re.compile(r"\d{19}")  # may be an integer beyond 64 bits, which orjson would turn into a float


def parse_json_line(line: str) -> tuple[Any, bool]:
    """(value, whether Python's json parsed it): orjson where it gives the same value as json, else json."""
    if _LONG_NUMBER.search(line) is None:
        try:
            return orjson.loads(line), False
        except orjson.JSONDecodeError:
            pass  # NaN, Infinity, lone surrogates, or malformed: json accepts the first three and explains the last
    return json.loads(line), True


def iter_rows(path: Path, fmt: Format, split: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """All rows of a file with their location strings (JSONL rows that needed Python's json parser are
    ``StdlibJsonRow``s)."""
    if not path.exists():
        raise SampleError(f"{path}: no such file or folder")
    if fmt == "jsonl":
        rows = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise SampleError(f"{path}:line {lineno}: not valid UTF-8 (byte {exc.start + 1} of the line, "
                                      f"{raw[exc.start:exc.end]!r}: {exc.reason}); save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row, stdlib = parse_json_line(line)
                except json.JSONDecodeError as exc:
                    raise SampleError(f"{path}:line {lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
                if not isinstance(row, dict):
                    raise SampleError(f"{path}:line {lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append((f"{path}:line {lineno}", StdlibJsonRow(row) if stdlib else row))
        return rows
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise SampleError(f"{path}: not a readable Parquet file: {exc}") from exc
        return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist())]
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SampleError(f"{path}: not a saved datasets folder: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise SampleError(f"{path}: a DatasetDict with splits {list(ds)}; choose one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise SampleError(f"{path}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    return [(f"{path}:row {i}", row) for i, row in enumerate(ds.to_list())]


class StdlibJsonRow(dict):
    """A row that needed Python's json parser (NaN, Infinity, integers beyond 64 bits, lone surrogates), to be
    written back with it so that its values come out as they went in."""


def _content_text(content: Any, where: str, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: keep the text parts
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise SampleError(f"{where}: field {field}[{j}]: expected a text part")
        return "".join(parts)
    raise SampleError(f"{where}: field {field}: expected a string, got {type(content).__name__}")


def _check_turns(turns: Any, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise SampleError(f"{where}: field {field!r}: expected a list of turns, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError(f"{where}: field {field}[{i}]: expected an object with role and content")
        if not isinstance(turn.get("role"), str):
            raise SampleError(f"{where}: field {field}[{i}].role: missing or not a string")
        if "content" not in turn and not turn.get("tool_calls"):
            raise SampleError(f"{where}: field {field}[{i}].content: missing")
        _content_text(turn.get("content"), where, f"{field}[{i}].content")
    return turns


def _turns_text(turns: list[dict[str, Any]]) -> str:
    return "\n".join(_content_text(t.get("content"), "", "") for t in turns)


def to_sample(index: int, where: str, row: dict[str, Any], need: tuple[str, ...] = ()) -> Sample:
    """Check a row's fields and extract its prompt and completion texts."""
    for name in need:
        if name not in row:
            raise SampleError(f"{where}: field {name!r} missing (row has: {', '.join(sorted(row)) or 'nothing'})")
    if "messages" in row:
        turns = _check_turns(row["messages"], where, "messages")
        last = len(turns) - 1
        while last >= 0 and turns[last]["role"] != "assistant":
            last -= 1
        if last < 0:
            return Sample(index, where, row, _turns_text(turns), "")
        return Sample(index, where, row, _turns_text(turns[:last]), _turns_text(turns[last : last + 1]))
    if "prompt" in row:
        prompt = row["prompt"]
        prompt_text = (
            _turns_text(_check_turns(prompt, where, "prompt")) if isinstance(prompt, list)
            else _content_text(prompt, where, "prompt")
        )
        completion = row.get("completion")
        if completion is None and not need:
            raise SampleError(f"{where}: field 'completion' missing (a prompt/completion row needs both)")
        completion_text = (
            _turns_text(_check_turns(completion, where, "completion")) if isinstance(completion, list)
            else _content_text(completion, where, "completion")
        )
        return Sample(index, where, row, prompt_text, completion_text)
    raise SampleError(
        f"{where}: field 'messages' missing, and no 'prompt'/'completion' either "
        f"(row has: {', '.join(sorted(row)) or 'nothing'})"
    )


def read_samples(path: Path, fmt: Format | None = None, split: str | None = None,
                 need: tuple[str, ...] = ()) -> tuple[list[Sample], Format]:
    """Read and check every row before any work starts."""
    fmt = fmt or detect_format(path)
    rows = iter_rows(path, fmt, split)
    return [to_sample(i, where, row, need) for i, (where, row) in enumerate(rows)], fmt


# ---------------------------------------------------------------------------------------------------- writing


def output_name(stem: str, fmt: Format) -> str:
    return {"jsonl": f"{stem}.jsonl", "parquet": f"{stem}.parquet", "datasets": stem}[fmt]


def write_rows(rows: list[dict[str, Any]], path: Path, fmt: Format, stdlib_json: Sequence[bool] | None = None) -> None:
    """Write rows to ``path`` through a temporary sibling, then rename (a folder is swapped whole).

    JSONL lines are written by orjson, except the rows flagged in ``stdlib_json`` and those orjson cannot write
    (integers beyond 64 bits), which Python's json writes (orjson would turn NaN into null).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if fmt == "jsonl":
        flags = stdlib_json if stdlib_json is not None else [False] * len(rows)
        with open(tmp, "wb") as fh:
            fh.writelines(_json_line(row, stdlib) for row, stdlib in zip(rows, flags, strict=True))
            fh.flush()
            os.fsync(fh.fileno())
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    if path.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _json_line(row: dict[str, Any], stdlib: bool) -> bytes:
    if not stdlib:
        try:
            return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, or a type JSON has no form for
            pass
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form; written as the \u escape it was read from
        return (json.dumps(row) + "\n").encode("ascii")


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files a killed run left in ``folder`` (``.NAME.tmp-PID``, ``.NAME.old-PID`` of a
    process that no longer runs); returns what was removed. A previous output folder set aside (``.old-``) whose
    replacement never arrived is put back under its name instead, so nothing already written is lost."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        found = _TEMPORARY.match(entry.name)
        if found is None or int(found["pid"]) == os.getpid() or _process_alive(int(found["pid"])):
            continue
        final = entry.with_name(found["name"])
        if found["kind"] == "old" and not final.exists():
            entry.rename(final)
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry)
    return removed
