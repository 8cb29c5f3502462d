"""The tool-call reward on the real BFCL files: every ground-truth call scores 1.0, each corruption scores 0 in
binary mode (BFCL's checker rules), parallel calls in any order; and the parser."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from posttrain.rewards import get
from posttrain.rewards.tool_call import (
    ToolCallReward,
    check_call,
    find_tool_calls,
    grade_tool_calls,
    normalise_string,
    parse_tool_calls,
)

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple"]


@pytest.fixture(scope="module")
def bfcl(shared_data: Path) -> dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
    out = {}
    for category in CATEGORIES:
        questions = _jsonl(shared_data / "bfcl" / f"{category}.json")
        answers = _jsonl(shared_data / "bfcl" / "possible_answer" / f"{category}.json")
        assert [q["id"] for q in questions] == [a["id"] for a in answers]
        out[category] = [(q, a["ground_truth"]) for q, a in zip(questions, answers, strict=True)]
    assert [len(out[c]) for c in CATEGORIES] == [400, 200, 200, 200]
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first_allowed(allowed: list[Any]) -> Any:
    return _concrete(next(v for v in allowed if v != ""))


def _concrete(value: Any) -> Any:
    """A value from the ground truth's allowed values; dicts (and lists of dicts) hold allowed lists per key."""
    if isinstance(value, dict):
        return {k: _first_allowed(v) for k, v in value.items() if any(x != "" for x in v)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_concrete(v) for v in value]
    return value


def _schemas(question: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in question["function"]}


def _call_from_truth(expected: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    (name, params) = next(iter(expected.items()))
    properties = schema["parameters"]["properties"]
    arguments = {
        p: _first_allowed(allowed) for p, allowed in params.items() if any(v != "" for v in allowed) and p in properties
    }
    return {"name": name, "arguments": arguments}


def _as_text(calls: list[dict[str, Any]]) -> str:
    return "I will call the tools.\n" + "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


def test_every_bfcl_ground_truth_call_scores_1_in_any_order(bfcl: dict) -> None:
    reward = get("tool_call")
    rng = random.Random(0)
    for category in CATEGORIES:
        completions, truths, tools = [], [], []
        for question, truth in bfcl[category]:
            schemas = _schemas(question)
            calls = [_call_from_truth(t, schemas[next(iter(t))]) for t in truth]
            rng.shuffle(calls)
            completions.append(_as_text(calls))
            truths.append(json.dumps(truth) if len(completions) % 2 else truth)  # JSON strings work too
            tools.append(question["function"])
        scores = reward(["q"] * len(completions), completions, ground_truth=truths, tools=tools)
        assert scores == [1.0] * len(completions), category
        bare = [json.dumps([c for c in parse_tool_calls(text)]) for text in completions[:20]]
        assert reward(["q"] * 20, bare, ground_truth=truths[:20], tools=tools[:20]) == [1.0] * 20


def _corruptions(
    call: dict[str, Any], truth: dict[str, Any], schema: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Every corruption of the issue that applies to this call, as (kind, corrupted call)."""
    (name, allowed_by_param) = next(iter(truth.items()))
    parameters = schema["parameters"]
    properties, required = parameters["properties"], parameters.get("required", [])
    args = call["arguments"]
    out = []

    def variant(kind: str, edit) -> None:
        corrupted = copy.deepcopy(call)
        edit(corrupted)
        out.append((kind, corrupted))

    variant("wrong_name", lambda c: c.update(name=name + "_v2"))
    for param in required:
        if param in args:
            variant("missing_required", lambda c, p=param: c["arguments"].pop(p))
            break
    variant("unknown_param", lambda c: c["arguments"].update(zz_not_a_parameter=1))
    for param in properties:
        if param not in allowed_by_param:
            variant("declared_not_allowed", lambda c, p=param: c["arguments"].update({p: _sample_of(properties[p])}))
            break
    for param, allowed in allowed_by_param.items():
        if param in args and param not in required and "" not in allowed:
            variant("missing_non_optional", lambda c, p=param: c["arguments"].pop(p))
            break
    for param, value in args.items():
        wrong = _wrong_type(properties[param]["type"], value)
        if wrong is not None:
            variant("wrong_type", lambda c, p=param, w=wrong: c["arguments"].update({p: w}))
            break
    for param, value in args.items():
        outside = _outside_value(value, allowed_by_param[param])
        if outside is not None:
            variant("value_not_allowed", lambda c, p=param, o=outside: c["arguments"].update({p: o}))
            break
    return out


def _sample_of(spec: dict[str, Any]) -> Any:
    return {"string": "something", "integer": 3, "float": 1.5, "boolean": True}.get(spec.get("type"), "something")


def _wrong_type(type_name: str, value: Any) -> Any:
    if type_name in ("integer", "float", "boolean", "array", "tuple", "dict"):
        return "not the right type"
    if type_name == "string":
        return 123456789
    return None


def _outside_value(value: Any, allowed: list[Any]) -> Any:
    if isinstance(value, bool):
        flipped = not value
        return flipped if not any(a is flipped for a in allowed) else None
    if isinstance(value, int | float):
        return value + 987654
    if isinstance(value, str):
        return value + " and something else entirely"
    if isinstance(value, list):
        return None if value and isinstance(value[0], dict) else [*value, value[0] if value else "extra"]
    return None


def test_each_corruption_scores_0_in_binary_mode(bfcl: dict) -> None:
    reward = ToolCallReward(mode="binary")
    applied: Counter[str] = Counter()
    for category in CATEGORIES:
        completions, truths, tools, kinds = [], [], [], []
        for question, truth in bfcl[category]:
            schemas = _schemas(question)
            calls = [_call_from_truth(t, schemas[next(iter(t))]) for t in truth]
            for index, (call, expected) in enumerate(zip(calls, truth, strict=True)):
                for kind, corrupted in _corruptions(call, expected, schemas[next(iter(expected))]):
                    completions.append(_as_text([*calls[:index], corrupted, *calls[index + 1 :]]))
                    truths.append(truth)
                    tools.append(question["function"])
                    kinds.append(kind)
        scores = reward(["q"] * len(completions), completions, ground_truth=truths, tools=tools)
        wrong = [(k, c) for k, c, s in zip(kinds, completions, scores, strict=True) if s != 0.0]
        assert wrong == [], f"{category}: {len(wrong)} corrupted completions scored above 0, first: {wrong[:2]}"
        applied.update(kinds)
    # every kind of corruption the issue names was exercised on the real data
    assert set(applied) == {
        "wrong_name",
        "missing_required",
        "unknown_param",
        "declared_not_allowed",
        "missing_non_optional",
        "wrong_type",
        "value_not_allowed",
    }
    assert min(applied.values()) >= 2 and sum(applied.values()) > 5000


def test_extra_missing_and_malformed_calls_and_partial_credit(bfcl: dict) -> None:
    question, truth = next((q, t) for q, t in bfcl["parallel"] if len(t) >= 3)
    schemas = _schemas(question)
    calls = [_call_from_truth(t, schemas[next(iter(t))]) for t in truth]
    n = len(calls)
    binary, partial = ToolCallReward(), ToolCallReward(mode="partial")
    cols = {"ground_truth": [truth], "tools": [question["function"]]}
    assert binary(["q"], [_as_text(calls[:-1])], **cols) == [0.0]
    assert partial(["q"], [_as_text(calls[:-1])], **cols) == [pytest.approx((n - 1) / n)]
    assert binary(["q"], [_as_text([*calls, calls[0]])], **cols) == [0.0]
    assert partial(["q"], [_as_text([*calls, calls[0]])], **cols) == [pytest.approx(n / (n + 1))]
    malformed = _as_text(calls) + '\n<tool_call>{"name": oops</tool_call>'
    assert binary(["q"], [malformed], **cols) == [0.0]
    assert partial(["q"], [malformed], **cols) == [pytest.approx(n / (n + 1))]
    assert partial(["q"], ["I don't know."], **cols) == [0.0]
    assert binary(["q"], [_as_text(calls)], ground_truth=[None], tools=[question["function"]]) == [None]


def test_bfcl_rules_in_detail() -> None:
    schema = {
        "name": "f",
        "parameters": {
            "type": "dict",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "temp": {"type": "float"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "opts": {"type": "dict"},
                "flag": {"type": "boolean"},
            },
            "required": ["city"],
        },
    }
    truth = {
        "f": {
            "city": ["New York, NY", "NYC"],
            "days": [3, ""],
            "temp": [20.0, ""],
            "tags": [["Sunny Day", "wind"], ""],
            "opts": [{"unit": ["celsius", "c"], "detail": ["", "high"]}, ""],
            "flag": ["", False],
        }
    }

    def check(**arguments: Any) -> str | None:
        return check_call({"name": "f", "arguments": arguments}, truth, schema)

    assert check(city="new york ny") is None  # spaces, punctuation and case are normalised away
    assert check(city="nyc", days=3, temp=20) is None  # an int is accepted for a float
    assert check(city="NYC", tags=["sunny-day", "WIND"], opts={"unit": "C"}, flag=False) is None
    assert check(city="NYC", days=3.0) is not None  # a float is not an int
    assert check(city="NYC", flag=0) is not None  # nor an int a bool
    assert check(city="NYC", tags=["wind", "sunny day"]) is not None  # list order matters, as in BFCL
    assert check(city="NYC", opts={"unit": "kelvin"}) is not None
    assert check(city="NYC", opts={"detail": "high"}) is not None  # 'unit' is not optional inside the dict
    assert check(days=3) is not None  # 'city' is required
    assert check(city="Boston") is not None
    assert normalise_string("April 1, 2024") == normalise_string("april 1 2024") == "april12024"
    assert normalise_string("It's") == 'it"s'
    # without schemas the ground truth alone decides (types from its values)
    assert grade_tool_calls('{"name": "f", "arguments": {"city": "NYC"}}', [truth]).score == 1.0
    assert grade_tool_calls('{"name": "f", "arguments": {"city": "NYC", "days": "3"}}', [truth]).score == 0.0


def test_parser_formats() -> None:
    text = (
        'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "parameters": {"y": "z"}}</tool_call>'
        '<tool_call>{"name": "c", "arguments": "{\\"k\\": [1, 2]}"}</tool_call>'
        '<tool_call>[{"name": "d"}, {"type": "function", "function": {"name": "e", "arguments": {}}}]</tool_call>'
        '<tool_call>{"name": "f", "arguments": {}}'  # left open at the end of generation
    )
    assert parse_tool_calls(text) == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": {"y": "z"}},
        {"name": "c", "arguments": {"k": [1, 2]}},
        {"name": "d", "arguments": {}},
        {"name": "e", "arguments": {}},
        {"name": "f", "arguments": {}},
    ]
    assert parse_tool_calls('```json\n[{"name": "a", "arguments": {"x": 1}}]\n```') == [
        {"name": "a", "arguments": {"x": 1}}
    ]
    assert parse_tool_calls('{"name": "a", "arguments": {"x": 1}}') == [{"name": "a", "arguments": {"x": 1}}]
    assert parse_tool_calls('The JSON {"name": "a"} is in prose, not a call.') == []
    assert parse_tool_calls('{"answer": 4}') == []
    found = find_tool_calls('<tool_call>{"name": 3}</tool_call><tool_call>not json</tool_call>')
    assert found.calls == [] and len(found.malformed) == 2


def test_structured_tool_calls_of_chat_completions_are_graded() -> None:
    """A chat completion whose assistant turn carries OpenAI-style ``tool_calls`` (what SFT data and chat APIs hold)
    is graded on those calls, with the arguments as an object or as a JSON string; the content alone is not a call."""
    reward = get("tool_call", tools_column="schema")
    schema = [{"name": "multiply", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"},
                                                                                  "b": {"type": "integer"}},
                                                  "required": ["a", "b"]}}]
    truth = [{"multiply": {"a": [47], "b": [6]}}]

    def turn(arguments: Any, name: str = "multiply") -> list[dict[str, Any]]:
        return [{"role": "user", "content": "47*6="},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": arguments}}]}]

    completions = [turn({"a": 47, "b": 6}), turn(json.dumps({"a": 47, "b": 6})), turn({"a": 46, "b": 6}),
                   turn({"a": 47, "b": 6}, name="add"), turn("{not json"),
                   [{"role": "assistant", "content": "282"}]]
    scores = reward(["p"] * len(completions), completions, ground_truth=[truth] * len(completions),
                    schema=[schema] * len(completions))
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_arguments_mode_credits_each_right_parameter() -> None:
    """``arguments`` mode: 1 for a right call (as binary), the share of right parameters otherwise, 0 for the wrong
    function; parameters nobody expected and extra calls dilute the credit."""
    reward = get("tool_call", mode="arguments")
    binary = get("tool_call")
    truth = [{"multiply": {"a": [47], "b": [6]}}]

    def call(arguments: dict[str, Any], name: str = "multiply") -> str:
        return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"

    texts = [call({"a": 47, "b": 6}), call({"a": 46, "b": 6}), call({"a": 46, "b": 5}),
             call({"a": 47, "b": 6}, name="add"), call({"a": 47, "b": 6, "c": 1}), call({"a": 47}),
             call({"a": 47, "b": 6}) + call({"a": 1, "b": 2}), "no call"]
    scores = reward(["p"] * len(texts), texts, ground_truth=[truth] * len(texts))
    assert scores == [1.0, 0.5, 0.0, 0.0, 2 / 3, 0.5, 0.5, 0.0]
    # where binary gives 1, arguments mode gives 1 too
    assert binary(["p"] * len(texts), texts, ground_truth=[truth] * len(texts)) == [1.0, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="arguments"):
        get("tool_call", mode="args")
