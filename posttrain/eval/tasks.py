"""The evaluation tasks: GSM8K, HumanEval and the BFCL categories, read from local files, with their prompts,
reward and gold completions.

The files are those of ``../shared/data`` (its README gives the formats): ``gsm8k/<split>.jsonl``,
``humaneval/HumanEval.jsonl.gz``, ``bfcl/<category>.json`` with ``bfcl/possible_answer/<category>.json``.
Each item carries a prompt in two formats, ``plain`` (text the model continues, for base models) and ``chat``
(messages, and tools for BFCL, for the tokenizer's chat template), the reward that scores it
(``posttrain.rewards.get``: ``math``, ``code``, ``tool_call``) with the columns that reward reads, and a gold
completion (the data set's own answer, written as a model would) that must score 1: what checks the scoring
path. This module reads files and never generates or scores.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.jsonl import jsonl_rows

BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple")
HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
GSM8K_STOP = ["\nQuestion:", "\n\n\n"]
BFCL_STOP = ["\nQuestion:"]
GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
HUMANEVAL_INSTRUCTION = "Complete this Python function. Answer with the whole function in a ```python code block."


class DataError(ValueError):
    """A data file is missing or a row lacks what the task needs; the message names the file, line and field."""


@dataclass
class EvalItem:
    task: str
    id: str
    plain_prompt: str  # text a base model continues
    messages: list[dict[str, Any]]  # the same request as chat turns
    tools: list[dict[str, Any]] | None  # OpenAI-style tool definitions for the chat template (BFCL)
    reward_prompt: Any  # what the reward receives as the prompt
    columns: dict[str, Any]  # the reward's columns for this item (one value each)
    gold: str  # a completion that must score 1
    stop: list[str] = field(default_factory=list)  # stop strings for the plain format


@dataclass(frozen=True)
class Task:
    reward: str  # a name for posttrain.rewards.get
    reward_options: dict[str, Any]
    load: Callable[[Path, str, int | None], list[EvalItem]]  # (data_dir, split, limit) -> items


def _rows(path: Path, limit: int | None, *fields: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The first ``limit`` rows of a JSONL file (all read, so a bad line anywhere is an error) with their line
    numbers, each checked for ``fields`` as it comes."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    for line_no, row in list(jsonl_rows(path, DataError))[:limit]:
        for name in fields:
            if name not in row:
                raise DataError(f"{path}:{line_no}: missing field {name!r}")
        yield line_no, row


# -- GSM8K ----------------------------------------------------------------------------------------------------
def load_gsm8k(data_dir: Path, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    path = data_dir / "gsm8k" / f"{split}.jsonl"
    items = []
    for line_no, row in _rows(path, limit, "question", "answer"):
        question, answer = str(row["question"]), str(row["answer"])
        if "####" not in answer:
            raise DataError(f"{path}:{line_no}: field 'answer' has no '#### <final answer>' line")
        items.append(EvalItem(
            task="gsm8k", id=f"{split}/{line_no - 1}", plain_prompt=f"Question: {question}\nAnswer:",
            messages=[{"role": "user", "content": f"{question}\n{GSM8K_INSTRUCTION}"}], tools=None,
            reward_prompt=question, columns={"answer": answer}, gold=" " + answer, stop=list(GSM8K_STOP)))
    return items


# -- HumanEval ------------------------------------------------------------------------------------------------
def load_humaneval(data_dir: Path, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    items = []
    for line_no, row in _rows(path, limit, "task_id", "prompt", "canonical_solution", "test", "entry_point"):
        prompt = row["prompt"]
        items.append(EvalItem(
            task="humaneval", id=str(row["task_id"]), plain_prompt=prompt,
            messages=[{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt}```"}],
            tools=None, reward_prompt=prompt, columns={"test": row["test"], "entry_point": row["entry_point"]},
            gold=row["canonical_solution"], stop=list(HUMANEVAL_STOP)))
    return items


# -- BFCL -----------------------------------------------------------------------------------------------------
_JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def openai_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function spec as an OpenAI tool definition, BFCL's type names mapped to JSON schema's."""

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items()}
            if isinstance(out.get("type"), str):
                out["type"] = _JSON_SCHEMA_TYPES.get(out["type"], out["type"])
            return out
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    spec = copy.deepcopy(function)
    if "parameters" in spec:
        spec["parameters"] = convert(spec["parameters"])
    return {"type": "function", "function": spec}


def gold_tool_calls(ground_truth: list[dict[str, Any]], functions: list[dict[str, Any]] | None = None) -> str:
    """The ground truth as ``<tool_call>`` blocks: each parameter's first allowed value; an optional one (``""``
    among its allowed values) is left out unless the function's schema requires it."""
    required = {f.get("name"): set((f.get("parameters") or {}).get("required") or []) for f in functions or []}

    def first(allowed: Any, needed: bool = False) -> tuple[bool, Any]:
        options = allowed if isinstance(allowed, list) else [allowed]
        given = [v for v in options if v != ""]
        if not given or ("" in options and not needed):
            return False, None
        return True, pick(given[0])

    def pick(value: Any) -> Any:
        if isinstance(value, dict):  # a dict parameter: {key: [allowed...]}
            return {k: v for k, (given, v) in ((k, first(a)) for k, a in value.items()) if given}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [pick(v) for v in value]
        return value

    blocks = []
    for call in ground_truth:
        ((name, params),) = call.items()
        needed = required.get(name, set())
        chosen = ((p, first(a, p in needed)) for p, a in params.items())
        arguments = {p: v for p, (given, v) in chosen if given}
        blocks.append(f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>")
    return "".join(blocks)


def _bfcl_loader(category: str) -> Callable[[Path, str, int | None], list[EvalItem]]:
    def load(data_dir: Path, split: str = "test", limit: int | None = None) -> list[EvalItem]:
        path = data_dir / "bfcl" / f"{category}.json"
        answers_path = data_dir / "bfcl" / "possible_answer" / f"{category}.json"
        answers = {}
        for line_no, row in _rows(answers_path, None, "id", "ground_truth"):
            answers[row["id"]] = row["ground_truth"]
        items = []
        for line_no, row in _rows(path, limit, "id", "question", "function"):
            if row["id"] not in answers:
                raise DataError(f"{path}:{line_no}: id {row['id']!r} has no ground truth in {answers_path}")
            turns = row["question"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], list):
                raise DataError(f"{path}:{line_no}: field 'question' must be a list of turns (lists of messages)")
            messages = [{"role": m["role"], "content": m["content"]} for m in turns[0]]
            functions = row["function"]
            tools = [openai_tool(f) for f in functions]
            question = "\n".join(m["content"] for m in messages if m["role"] == "user")
            listing = "\n".join(json.dumps(t["function"]) for t in tools)
            plain = (f"Tools:\n{listing}\nCall tools as <tool_call>{{\"name\": ..., \"arguments\": {{...}}}}"
                     f"</tool_call>.\nQuestion: {question}\nAnswer:")
            truth = answers[row["id"]]
            items.append(EvalItem(
                task=f"bfcl_{category}", id=str(row["id"]), plain_prompt=plain, messages=messages, tools=tools,
                reward_prompt=question, columns={"ground_truth": truth, "tools": functions},
                gold=gold_tool_calls(truth, functions), stop=list(BFCL_STOP)))
        return items

    return load


TASKS: dict[str, Task] = {
    "gsm8k": Task("math", {}, load_gsm8k),
    "humaneval": Task("code", {"binary": True}, load_humaneval),
    **{f"bfcl_{c}": Task("tool_call", {"mode": "binary"}, _bfcl_loader(c)) for c in BFCL_CATEGORIES},
}
ALIASES = {"bfcl": [f"bfcl_{c}" for c in BFCL_CATEGORIES]}


def resolve_tasks(names: list[str]) -> list[str]:
    """Task names with aliases expanded (``bfcl``: its four categories), in order, without repeats."""
    out: list[str] = []
    for name in names:
        for task in ALIASES.get(name, [name]):
            if task not in TASKS:
                known = ", ".join([*TASKS, *ALIASES])
                raise ValueError(f"unknown task {name!r}; known tasks: {known}")
            if task not in out:
                out.append(task)
    return out
