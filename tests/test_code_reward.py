"""The ``code`` reward on the real HumanEval: every canonical solution passes, every ``return None`` fails.

Also: code extraction from fenced and raw completions, chat completions, stdin/stdout cases with fraction and
binary scoring, ``None`` for samples without tests, and cheating candidates scoring 0 through the reward.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from posttrain.rewards.code import build_program, code_reward, extract_code


@pytest.fixture(scope="module")
def humaneval(shared_data: Path) -> list[dict]:
    path = shared_data / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 164, f"{path}: expected 164 problems, found {len(rows)}"
    return rows


def _score(rows: list[dict], completions: list, **options) -> list[float | None]:
    return code_reward(
        [r["prompt"] for r in rows],
        completions,
        test=[r["test"] for r in rows],
        entry_point=[r["entry_point"] for r in rows],
        workers=4,
        **options,
    )


def test_all_canonical_solutions_pass(humaneval: list[dict]) -> None:
    rewards = _score(humaneval, [r["canonical_solution"] for r in humaneval])
    failed = [r["task_id"] for r, v in zip(humaneval, rewards, strict=True) if v != 1.0]
    assert failed == []


def test_every_body_replaced_by_return_none_fails(humaneval: list[dict]) -> None:
    rewards = _score(humaneval, ["    return None\n"] * len(humaneval), binary=True)
    passed = [r["task_id"] for r, v in zip(humaneval, rewards, strict=True) if v != 0.0]
    assert passed == []


def test_fenced_chat_answers_with_full_functions(humaneval: list[dict]) -> None:
    """A chat model answers with the whole function in a fence; the prompt (imports, helpers) comes first."""
    rows = humaneval[:12]
    completions = []
    for r in rows:
        header = r["prompt"][r["prompt"].index(f"def {r['entry_point']}") :]
        function = header + r["canonical_solution"]
        text = f"Here is a draft:\n```python\ndef {r['entry_point']}(*a):\n    pass\n```\nFinal:\n```python\n{function}```\n"
        completions.append([{"role": "assistant", "content": text}])
    assert _score(rows, completions) == [1.0] * len(rows)


def test_extract_code() -> None:
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == ("b = 2\n", True)
    assert extract_code("```\nc = 3\n```") == ("c = 3\n", True)
    assert extract_code("```bash\nls\n```\n```\nd = 4\n```") == ("d = 4\n", True)
    assert extract_code("```python\ne = 5\n") == ("e = 5\n", True)  # cut off by the length limit
    assert extract_code("    return x\n") == ("    return x\n", False)
    prompt = 'from typing import List\n\n\ndef f(x: List[int]) -> int:\n    """doc"""\n'
    assert build_program(prompt, "    return 1\n", "f") == prompt + "    return 1\n"
    fenced = build_program(prompt, "```python\ndef f(x):\n    return 2\n```", "f")
    assert fenced == prompt + "\ndef f(x):\n    return 2\n"
    body_only = build_program(prompt, "```python\n    return 4\n```", "f")
    assert body_only == prompt + "\n    return 4\n"
    assert build_program("Write f.", "def f(x):\n    return 3\n", "f") == "def f(x):\n    return 3\n"


def test_stdin_stdout_cases_fraction_and_binary() -> None:
    cases = [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10"}, {"input": "0\n", "output": "1\n"}]
    good = "```python\nn = int(input())\nprint(n * 2)\n```"
    exits = "print(int(input()) * 2 if input is not None else 0)\nraise SystemExit(0)"
    prompts = ["Double the number."] * 2
    rewards = code_reward(prompts, [good, exits], tests=[cases, {"inputs": ["3"], "outputs": ["6"]}])
    assert rewards[0] == pytest.approx(2 / 3) and rewards[1] == 1.0
    assert code_reward(prompts[:1], [good], tests=[cases], binary=True) == [0.0]


def test_none_when_there_is_nothing_to_test() -> None:
    assert code_reward(["p"], ["x = 1"]) == [None]
    mixed = code_reward(["p", "q", "r"], ["x = 1", "x = 1", "x = 2"], tests=[None, ["assert x == 1"], []])
    assert mixed == [None, 1.0, None]


def test_bad_tests_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=re.escape("tests[1]")):
        code_reward(["p", "q"], ["x = 1", "x = 1"], tests=["assert x", [{"stdin": "1"}]])
    with pytest.raises(ValueError, match="completions"):
        code_reward(["p"], ["x = 1", "x = 2"], tests=["assert x"])


def test_cheating_candidates_score_zero(humaneval: list[dict]) -> None:
    row = next(r for r in humaneval if r["entry_point"] == "has_close_elements")
    cheats = [
        "    exit(0)\n",
        "    raise SystemExit(0)\n",
        "    import os\n    print('All tests passed!', flush=True)\n    os._exit(0)\n",
        "    import builtins\n    builtins.abs = lambda x: 0\n    return None\n",
        "```python\nimport sys\nsys.exit(0)\n```",
    ]
    rewards = _score([row] * len(cheats), cheats)
    assert rewards == [0.0] * len(cheats)
    assert _score([row], [row["canonical_solution"]]) == [1.0]
