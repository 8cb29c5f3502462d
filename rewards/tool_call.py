"""The tool-call reward: parse the calls a completion makes and grade them against BFCL-style ground truth.

Parsing (``parse_tool_calls``, reused by chat checks and multi-turn rollouts): Granite/Hermes blocks
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (several per completion; a last block left open
at the end of the text counts), or, when there is no such block, the whole completion (or a fenced code
block) as bare JSON: one call object or a list of them. ``arguments`` may also be spelled ``parameters`` or
given as a JSON string; OpenAI's ``{"type": "function", "function": {...}}`` wrapping is accepted.

Grading follows the rules of BFCL's AST checker (written here from its documented behaviour): ground truth is
a list of ``{function_name: {param: [allowed values]}}`` where ``""`` among the allowed values marks the
parameter optional; tool schemas are JSON-schema-like with BFCL's type names (``"dict"`` is an object). A call
matches an expected call when the function name is right, every parameter the schema requires is present, no
parameter is unknown to the schema or absent from the ground truth, every value has the schema's type (an int
is accepted for a float; a value of the ground truth's own type is accepted as BFCL's "variable" case), every
value is among the allowed ones after BFCL's string normalisation (spaces and ``,./-_*^`` removed, lowercase,
``'`` as ``"``; element-wise in lists, per key in dicts), and every ground-truth parameter not given allows
``""``. Parallel calls match in any order (a maximum bipartite matching, so the result never depends on the
order in which calls are tried). ``binary`` mode scores 1 only when every call matches and there are no extra
or malformed calls; ``partial`` scores matched / max(expected, given). Missing ground truth gives ``None``.
This module must never execute a call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from posttrain.rewards.base import NamedReward, RewardConfigError, completion_text

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)
_NORMALISED_AWAY = re.compile(r"[ ,./\-_*^]")

# BFCL's Python type names (plus the JSON-schema spellings) -> the Python type a JSON value decodes to.
TYPE_MAP: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "object": dict,
    "any": str,
}
_ITEM_CHECKED = {"array", "tuple"}


@dataclass
class ParsedToolCalls:
    """The calls found in a text, each ``{"name": str, "arguments": dict}``, and blocks that did not parse."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The well-formed tool calls in ``text``, in order, as ``{"name": str, "arguments": dict}``."""
    return find_tool_calls(text).calls


def find_tool_calls(text: str) -> ParsedToolCalls:
    """Like :func:`parse_tool_calls`, also returning the raw text of blocks that are not valid calls."""
    found = ParsedToolCalls()
    if "<tool_call>" in text:
        for match in _BLOCK.finditer(text):
            raw = match.group(1).strip()
            _add_json(found, raw, _load_json(raw))
        return found
    raw = text.strip()
    fenced = _FENCE.match(raw)
    if fenced:
        raw = fenced.group(1).strip()
    if raw[:1] in ("{", "["):
        data = _load_json(raw)
        if data is not None and (isinstance(data, list) or (isinstance(data, dict) and _looks_like_call(data))):
            _add_json(found, raw, data)
    return found


def _load_json(raw: str) -> Any:
    fenced = _FENCE.match(raw)
    if fenced:
        raw = fenced.group(1).strip()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None


def _looks_like_call(data: dict[str, Any]) -> bool:
    return "name" in data or isinstance(data.get("function"), dict)


def _add_json(found: ParsedToolCalls, raw: str, data: Any) -> None:
    items = data if isinstance(data, list) else [data]
    if data is None or not items:
        found.malformed.append(raw)
        return
    for item in items:
        call = _as_call(item)
        if call is None:
            found.malformed.append(raw if len(items) == 1 else json.dumps(item))
        else:
            found.calls.append(call)


def _as_call(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict) and "name" not in item:
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


# ---------------------------------------------------------------------------------------------- grading


def normalise_string(value: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, single quotes as double quotes."""
    return _NORMALISED_AWAY.sub("", value).lower().replace("'", '"')


def _normalised(value: Any) -> Any:
    return normalise_string(value) if isinstance(value, str) else value


def _answer_type(allowed: Sequence[Any]) -> type | None:
    """The type of the first allowed value that is not the optional marker ``""``."""
    for value in allowed:
        if value != "":
            return type(value)
    return None


def tool_schemas(tools: Any) -> dict[str, dict[str, Any]]:
    """Tool schemas by function name, from a list of BFCL/JSON-schema functions (OpenAI wrapping accepted)."""
    if tools is None:
        return {}
    if isinstance(tools, str):
        tools = json.loads(tools)
    if isinstance(tools, dict):
        tools = [tools]
    schemas = {}
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            schemas[tool["name"]] = tool
    return schemas


def check_call(call: dict[str, Any], expected: dict[str, Any], schema: dict[str, Any] | None = None) -> str | None:
    """Why ``call`` does not match the expected call ``{name: {param: [allowed]}}``; ``None`` if it does."""
    ((expected_name, allowed_by_param),) = expected.items()
    if call.get("name") != expected_name:
        return f"wrong function {call.get('name')!r}, expected {expected_name!r}"
    arguments: dict[str, Any] = call.get("arguments") or {}
    parameters = (schema or {}).get("parameters") or {}
    properties: dict[str, Any] | None = parameters.get("properties") if schema is not None else None
    for param in parameters.get("required", []) if schema is not None else []:
        if param not in arguments:
            return f"missing required parameter {param!r}"
    for param, value in arguments.items():
        if (properties is not None and param not in properties) or param not in allowed_by_param:
            return f"unexpected parameter {param!r}"
        allowed = allowed_by_param[param]
        if not isinstance(allowed, list):
            allowed = [allowed]
        spec = properties.get(param, {}) if properties is not None else {}
        problem = _check_value(param, value, allowed, spec)
        if problem is not None:
            return problem
    for param, allowed in allowed_by_param.items():
        if param not in arguments and "" not in (allowed if isinstance(allowed, list) else [allowed]):
            return f'parameter {param!r} is not optional (its allowed values lack "") and was not given'
    return None


def _check_value(param: str, value: Any, allowed: list[Any], spec: dict[str, Any]) -> str | None:
    type_name = spec.get("type")
    expected_type = TYPE_MAP.get(type_name) if isinstance(type_name, str) else None
    answer_type = _answer_type(allowed)
    if expected_type is None:  # no schema (or a type BFCL does not know): the ground truth's type decides
        expected_type = answer_type
    if expected_type is float and type(value) is int:
        value = float(value)
    is_variable = answer_type is not None and expected_type is not None and answer_type is not expected_type
    if expected_type is not None and type(value) is not expected_type:
        if answer_type is not None and type(value) is answer_type:
            is_variable = True
        else:
            return (
                f"parameter {param!r}: expected type {type_name or expected_type.__name__}, got {type(value).__name__}"
            )
    elif expected_type is list and type_name in _ITEM_CHECKED and not is_variable:
        item_type = TYPE_MAP.get((spec.get("items") or {}).get("type", ""))
        if item_type is not None and not _items_typed(value, item_type, allowed):
            return f"parameter {param!r}: list items are not all of type {spec['items']['type']}"
    if is_variable:
        return None if value in allowed else f"parameter {param!r}: value {value!r} not among {allowed!r}"
    if expected_type is dict:
        return _check_dict(param, value, allowed)
    if expected_type is list and value and all(isinstance(v, dict) for v in value):
        return _check_list_of_dicts(param, value, allowed)
    if expected_type is str:
        accepted = {normalise_string(a) for a in allowed if isinstance(a, str)}
        return None if normalise_string(value) in accepted else f"parameter {param!r}: {value!r} not among {allowed!r}"
    if expected_type is list:
        given = [_normalised(v) for v in value]
        accepted_lists = [[_normalised(v) for v in a] for a in allowed if isinstance(a, list)]
        return None if given in accepted_lists else f"parameter {param!r}: {value!r} not among {allowed!r}"
    if value in allowed and (type(value) is not bool or any(a is value for a in allowed)):
        return None
    return f"parameter {param!r}: {value!r} not among {allowed!r}"


def _items_typed(value: list[Any], item_type: type, allowed: list[Any]) -> bool:
    """Every item of the type the schema names (int for float), or of the type of a ground-truth list's items."""
    if any(not isinstance(a, list) for a in allowed):  # BFCL: an optional/non-list allowed entry passes
        return True
    for candidate in allowed:
        candidate_type = _answer_type(candidate)
        if all(
            type(v) is item_type or (item_type is float and type(v) is int) or type(v) is candidate_type for v in value
        ):
            return True
    return False


def _check_dict(param: str, value: dict[str, Any], allowed: list[Any]) -> str | None:
    problem = f"parameter {param!r}: {value!r} matches none of {allowed!r}"
    for candidate in allowed:
        if not isinstance(candidate, dict):
            continue
        if _dict_matches(value, candidate):
            return None
    return problem


def _dict_matches(value: dict[str, Any], candidate: dict[str, Any]) -> bool:
    for key, item in value.items():
        if key not in candidate:
            return False
        options = candidate[key] if isinstance(candidate[key], list) else [candidate[key]]
        if _normalised(item) not in [_normalised(o) for o in options]:
            return False
    return all(key in value or "" in (opts if isinstance(opts, list) else [opts]) for key, opts in candidate.items())


def _check_list_of_dicts(param: str, value: list[dict[str, Any]], allowed: list[Any]) -> str | None:
    for candidate in allowed:
        if not isinstance(candidate, list) or len(candidate) != len(value):
            continue
        if all(isinstance(c, dict) and _dict_matches(v, c) for v, c in zip(value, candidate, strict=True)):
            return None
    return f"parameter {param!r}: list of dicts {value!r} matches none of {allowed!r}"


def _max_matching(compatible: list[list[bool]]) -> int:
    """Size of a maximum matching between expected calls (rows) and given calls (columns): Kuhn's algorithm."""
    owner: dict[int, int] = {}

    def assign(row: int, seen: set[int]) -> bool:
        for col, ok in enumerate(compatible[row]):
            if ok and col not in seen:
                seen.add(col)
                if col not in owner or assign(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return sum(assign(row, set()) for row in range(len(compatible)))


@dataclass
class ToolCallGrade:
    """The score of one completion, how many expected calls matched, and why the unmatched ones failed."""

    score: float
    matched: int
    expected: int
    given: int
    problems: list[str]


def grade_tool_calls(
    text: str, ground_truth: Any, tools: Any = None, mode: Literal["binary", "partial", "arguments"] = "binary"
) -> ToolCallGrade:
    """Grade the calls in ``text`` against ``ground_truth`` (list of ``{name: {param: [allowed]}}``)."""
    expected = _ground_truth(ground_truth)
    schemas = tool_schemas(tools)
    found = find_tool_calls(text)
    calls = found.calls
    compatible = []
    problems = [f"malformed tool call: {raw[:200]!r}" for raw in found.malformed]
    for exp in expected:
        (name,) = exp.keys()
        reasons = [check_call(call, exp, schemas.get(name)) for call in calls]
        compatible.append([r is None for r in reasons])
        if not any(r is None for r in reasons):
            problems.append(f"expected {name!r}: " + ("; ".join(r for r in reasons if r) or "no call given"))
    matched = _max_matching(compatible)
    given = len(calls) + len(found.malformed)
    if len(expected) != given:
        problems.append(f"{given} calls given, {len(expected)} expected")
    if mode == "binary":
        score = float(matched == len(expected) == given)
    elif mode == "partial":
        score = matched / max(len(expected), given) if max(len(expected), given) else 1.0
    else:  # arguments: credit per parameter, for RL shaping
        unused = list(calls)
        credit = 0.0
        for exp in expected:
            (name,) = exp.keys()
            scored = [(argument_credit(call, exp, schemas.get(name)), i) for i, call in enumerate(unused)]
            if scored:
                best, at = max(scored)
                credit += best
                unused.pop(at)
        score = credit / max(len(expected), given) if max(len(expected), given) else 1.0
    return ToolCallGrade(score, matched, len(expected), given, problems)


def argument_credit(call: dict[str, Any], expected: dict[str, Any], schema: dict[str, Any] | None = None) -> float:
    """The share of a call's parameters that are right: 0 for the wrong function, else (expected parameters given
    with an allowed value, or optional and left out) / (expected parameters + parameters nobody expected). A call
    that ``check_call`` accepts scores 1."""
    ((expected_name, allowed_by_param),) = expected.items()
    if call.get("name") != expected_name:
        return 0.0
    arguments = call.get("arguments") or {}
    if not isinstance(arguments, dict):
        return 0.0
    properties = ((schema or {}).get("parameters") or {}).get("properties") or {}
    right = 0
    for param, allowed in allowed_by_param.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if param in arguments:
            right += _check_value(param, arguments[param], allowed, properties.get(param, {})) is None
        else:
            right += "" in allowed
    unexpected = sum(param not in allowed_by_param for param in arguments)
    total = len(allowed_by_param) + unexpected
    return right / total if total else 1.0


def _ground_truth(ground_truth: Any) -> list[dict[str, Any]]:
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    if isinstance(ground_truth, dict):
        ground_truth = [{k: v} for k, v in ground_truth.items()] if len(ground_truth) != 1 else [ground_truth]
    if not isinstance(ground_truth, list) or not all(isinstance(c, dict) and len(c) == 1 for c in ground_truth):
        raise ValueError("ground truth must be a list of {function_name: {param: [allowed values]}}")
    return ground_truth


@dataclass(frozen=True)
class ToolCallReward(NamedReward):
    """Grades tool calls against ground truth (see the module docstring).

    Options (``get("tool_call", ...)``):
        mode: ``binary`` (1 only if all calls match, none extra), ``partial`` (matched / max(expected, given)) or
            ``arguments`` (a denser signal for RL: each expected call gets the ``argument_credit`` of its best
            remaining call, summed and divided by max(expected, given); a fully right answer scores 1, as in binary).
        ground_truth_column: column with ``[{name: {param: [allowed]}}]`` (a JSON string is accepted).
        tools_column: column with the tool schemas (optional; without them only the ground truth is checked).
    """

    reward_name: ClassVar[str] = "tool_call"

    mode: Literal["binary", "partial", "arguments"] = "binary"
    ground_truth_column: str = "ground_truth"
    tools_column: str = "tools"

    def __post_init__(self) -> None:
        if self.mode not in ("binary", "partial", "arguments"):
            raise ValueError(f"tool_call reward: mode must be 'binary', 'partial' or 'arguments', got {self.mode!r}")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        if self.ground_truth_column not in columns:
            raise RewardConfigError(
                f"tool_call reward needs column {self.ground_truth_column!r}; the batch has {sorted(columns)}"
            )
        truths = columns[self.ground_truth_column]
        tools = columns.get(self.tools_column, [None] * len(completions))
        out: list[float | None] = []
        for completion, truth, tool_list in zip(completions, truths, tools, strict=True):
            if truth is None or truth == "":
                out.append(None)
                continue
            out.append(grade_tool_calls(_calls_text(completion), truth, tool_list, self.mode).score)
        return out


def _calls_text(completion: Any) -> str:
    """The completion's text, with the structured ``tool_calls`` of its last assistant message (OpenAI's chat format,
    what SFT data and chat APIs carry) written out as ``<tool_call>`` blocks after the content."""
    text = completion_text(completion)
    messages = [completion] if isinstance(completion, dict) else completion
    if isinstance(messages, str):
        return text
    last = next(
        (m for m in reversed(list(messages)) if isinstance(m, dict) and m.get("role", "assistant") == "assistant"), None
    )
    for call in (last or {}).get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI sends the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # left as it is: the grader reports the call as malformed
        text += "<tool_call>" + json.dumps({"name": function.get("name"), "arguments": arguments}) + "</tool_call>"
    return text
