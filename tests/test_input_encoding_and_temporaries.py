"""Invalid UTF-8 in a JSONL input is an error naming the file and the line, in the filter and in SFT, DPO and GRPO
data loading; the temporary files of a filter run that was killed are removed by the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from posttrain.cli import main as cli

GOOD = json.dumps({"prompt": "What is 2+2?", "completion": "4", "chosen": "4", "rejected": "5", "answer": "4"})


def write_with_bad_line(path, bad_line: int, bad: bytes = b"caf\xe9") -> None:
    """A JSONL file whose line ``bad_line`` holds a Latin-1 byte inside a string (invalid UTF-8)."""
    lines = [GOOD.encode()] * 4
    lines[bad_line - 1] = b'{"prompt": "' + bad + b'", "completion": "x", "chosen": "a", "rejected": "b"}'
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_filter_names_the_file_and_line_of_invalid_utf8(tmp_path, capsys):
    data = tmp_path / "samples.jsonl"
    write_with_bad_line(data, 3)
    assert cli(["filter", "--input", str(data), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:line 3: not valid UTF-8 (byte 16 of the line, b'\\xe9'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # nothing touched before the input is read


def test_sft_and_dpo_data_name_the_file_and_line_of_invalid_utf8(tmp_path):
    from posttrain.dpo.data import load_pairs
    from posttrain.train.data import DataError, read_rows

    data = tmp_path / "train.jsonl"
    write_with_bad_line(data, 2, bad=b"\xff\xfe")
    with pytest.raises(DataError, match=rf"^{data}:2: not valid UTF-8 \(byte 13 of the line, b'\\xff'"):
        read_rows([data])
    with pytest.raises(DataError, match=rf"^{data}:2: not valid UTF-8"):
        load_pairs([data], tokenizer=None, max_length=64)
    write_with_bad_line(data, 4, bad=b"\xe2\x82")  # a character cut short at the end of a string
    with pytest.raises(DataError, match=rf"^{data}:4: not valid UTF-8"):
        read_rows([data])


def test_grpo_prompts_name_the_file_and_line_of_invalid_utf8(tmp_path):
    from posttrain.grpo.data import PromptDataError, load_prompt_rows

    data = tmp_path / "prompts.jsonl"
    write_with_bad_line(data, 3)
    with pytest.raises(PromptDataError, match=rf"^{data}:3: not valid UTF-8"):
        load_prompt_rows(data)


def test_valid_utf8_and_windows_line_ends_still_read(tmp_path):
    from posttrain.grpo.data import load_prompt_rows
    from posttrain.train.data import read_rows

    data = tmp_path / "rows.jsonl"
    data.write_bytes('{"prompt": "déjà vu ✓", "completion": "ok"}\r\n\r\n{"prompt": "b", "completion": "c"}\r\n'
                     .encode())
    rows = read_rows([data])
    assert [r.data["prompt"] for r in rows] == ["déjà vu ✓", "b"] and rows[1].source == f"{data}:3"
    assert [r["_where"] for r in load_prompt_rows(data)] == [f"{data}:1", f"{data}:3"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_filter_runs_temporary_files_are_removed_by_the_next_run(tmp_path):
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    # a filter run killed (SIGKILL) after writing its kept rows to the temporary name, before the rename
    killer = textwrap.dedent(f"""
        import os, signal
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        from posttrain.judges.config import config_from_dict
        from posttrain.judges.pipeline import run_filter
        run_filter(config_from_dict({{}}), {str(data)!r}, {str(out)!r}, show_progress=False)
    """)
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert len(left) == 1 and left[0].startswith(".kept.jsonl.tmp-"), left
    assert not (out / "kept.jsonl").exists()

    gone = dead_pid()
    (out / f".manifest.json.tmp-{gone}").write_text("{")
    (out / f".prefs.old-{gone}").mkdir()  # a folder output set aside whose replacement never came: put back
    (out / f".prefs.old-{gone}" / "data.arrow").write_bytes(b"rows")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f".rejected.jsonl.tmp-{sleeper.pid}").write_text("")  # a run still going: not ours to remove
        (out / ".notes.tmp-x").write_text("a user's file")
        assert cli(["filter", "--input", str(data), "--output", str(out), "--no-progress"]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted([
            ".notes.tmp-x", f".rejected.jsonl.tmp-{sleeper.pid}", "kept.jsonl", "manifest.json", "prefs",
            "rejected.jsonl", "report.png"])
        assert (out / "prefs" / "data.arrow").read_bytes() == b"rows"
        assert len((out / "kept.jsonl").read_text().splitlines()) == 5
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.path.exists(out / f".rejected.jsonl.tmp-{sleeper.pid}")
