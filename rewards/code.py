"""The ``code`` reward: run a completion's code against the sample's tests in the sandbox.

``code_reward(prompts, completions, **columns)`` has TRL's reward signature. Per sample it reads:

- ``tests`` (or HumanEval's own column name ``test``): Python test code (a string, or a list of strings, each
  one test), or stdin/stdout cases (a list of ``{"input": ..., "output": ...}`` dicts, or a dict of parallel
  ``inputs``/``outputs`` lists);
- ``entry_point`` (optional): the function under test; each Python test then defines ``check(candidate)`` and
  is called as ``check(entry_point)``, HumanEval's convention. Without it, a Python test passes when it runs
  to the end (plain ``assert`` statements).

The code is the last fenced ```` ```python ```` block of the completion (else the last unlabelled fence, else
the whole completion). When the prompt is a string that defines the entry point (HumanEval's prompts are
code: imports, helpers, the signature and docstring), the program is the prompt followed by the code: an
unfenced completion continues the prompt (a base model writing the body), a fenced one follows it (a whole
function redefines the docstring-only one; a bare indented body still continues it). Otherwise the program is
the code alone.

The candidate's program and the tests run in separate sandboxed processes (see
:mod:`posttrain.rewards.sandbox`): a test's calls to the entry point cross between them as plain data only, and
when the prompt is code, it is also the tests' trusted prelude, so helpers the tests use (HumanEval's ``poly``,
``encode_cyclic``) are the prompt's, never the candidate's redefinitions.

The reward is the fraction of tests passed, or 1/0 with ``binary=True``; ``None`` when the sample has no
tests, or when the sandbox itself failed for that sample (logged), never a silent 0.

This module must never run a completion outside :mod:`posttrain.rewards.sandbox`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from posttrain.rewards.base import completion_text
from posttrain.rewards.sandbox import Backend, SandboxError, SandboxLimits, SandboxUnavailableError, default_sandbox

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(text: str) -> tuple[str, bool]:
    """The code in a completion and whether it came from a fence.

    The last block tagged python/py/python3 wins, else the last untagged block, else the whole text. An
    unclosed fence (a generation cut off by the length limit) runs to the end of the text.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    tagged = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    if tagged:
        return tagged[-1], True
    untagged = [code for tag, code in blocks if not tag]
    if untagged:
        return untagged[-1], True
    return text, False


def prompt_is_code(prompt: Any, entry_point: str | None) -> bool:
    """Whether the prompt is code that defines the entry point (HumanEval's: imports, helpers, the signature)."""
    return (
        isinstance(prompt, str)
        and bool(entry_point)
        and re.search(rf"\bdef\s+{re.escape(entry_point or '')}\s*\(", prompt) is not None
    )


def build_program(prompt: Any, completion: Any, entry_point: str | None) -> str:
    """The program to test: the extracted code, after the prompt when the prompt is code (see the module doc)."""
    code, fenced = extract_code(completion_text(completion))
    if prompt_is_code(prompt, entry_point):
        return prompt + ("\n" if fenced else "") + code
    return code


def _parse_tests(value: Any, index: int) -> tuple[str, list[Any]] | None:
    """("python", [test, ...]) or ("io", [(stdin, stdout), ...]), or None when the sample has nothing to test."""
    if value is None or (isinstance(value, str | list | tuple | dict) and len(value) == 0):
        return None
    if isinstance(value, str):
        return "python", [value]
    if isinstance(value, dict):
        inputs, outputs = value.get("inputs"), value.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            raise ValueError(f"tests[{index}]: a dict of cases needs equal-length lists 'inputs' and 'outputs'")
        return ("io", [(str(i), str(o)) for i, o in zip(inputs, outputs, strict=True)]) if inputs else None
    if isinstance(value, list | tuple):
        if all(isinstance(t, str) for t in value):
            return "python", list(value)
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in value):
            return "io", [(str(t["input"]), str(t["output"])) for t in value]
    raise ValueError(
        f"tests[{index}]: expected Python test code (str or list of str) or stdin/stdout cases (list of "
        f"{{'input', 'output'}} dicts, or {{'inputs': [...], 'outputs': [...]}}), got {type(value).__name__}"
    )


def code_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    binary: bool = False,
    limits: SandboxLimits | None = None,
    backend: Backend = "auto",
    workers: int | None = None,
    **columns: Any,
) -> list[float | None]:
    """Fraction of tests each completion passes in the sandbox (1/0 with ``binary``); None without tests.

    ``limits`` and ``backend`` configure the sandbox (see :class:`~posttrain.rewards.sandbox.SandboxLimits`;
    its ``wall_time_s`` must stay below the reward pool's ``timeout_s``, or a hanging candidate scores None);
    ``workers`` is how many candidates run at once (default: the CPU count). Raises
    :class:`~posttrain.rewards.sandbox.SandboxUnavailableError` when no sandbox works on this machine.
    """
    n = len(completions)
    tests_column = columns.get("tests", columns.get("test"))
    if tests_column is None:
        return [None] * n
    entry_points = columns.get("entry_point") or [None] * n
    if len(tests_column) != n or len(entry_points) != n or len(prompts) != n:
        raise ValueError(
            f"code_reward: {n} completions but {len(prompts)} prompts, {len(tests_column)} tests and "
            f"{len(entry_points)} entry_point values"
        )
    jobs = []
    for i in range(n):
        parsed = _parse_tests(tests_column[i], i)
        if parsed is not None:
            entry_point = entry_points[i] if parsed[0] == "python" else None
            program = build_program(prompts[i], completions[i], entry_point)
            prelude = prompts[i] if prompt_is_code(prompts[i], entry_point) else None
            jobs.append((i, parsed[0], parsed[1], program, entry_points[i], prelude))
    rewards: list[float | None] = [None] * n
    if not jobs:
        return rewards
    sandbox = default_sandbox(limits, backend)
    _ = sandbox.info  # probe now, in this thread: an unusable sandbox is one clear error, not n logged ones

    def score(job: tuple[int, str, list[Any], str, str | None, str | None]) -> float | None:
        i, kind, tests, program, entry_point, prelude = job
        try:
            if kind == "python":
                result = sandbox.run_tests(program, tests, entry_point, prelude=prelude)
            else:
                result = sandbox.run_io(program, tests)
        except SandboxUnavailableError:
            raise
        except SandboxError as exc:
            logger.error("code reward: sample %d could not be judged: %s", i, exc)
            return None
        if binary:
            return 1.0 if result.all_passed else 0.0
        return result.fraction

    with ThreadPoolExecutor(max_workers=min(len(jobs), workers or os.cpu_count() or 1)) as pool:
        for (i, *_), value in zip(jobs, pool.map(score, jobs), strict=True):
            rewards[i] = value
    return rewards
