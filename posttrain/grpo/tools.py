"""Tools for multi-turn RL: plain Python functions with JSON-schema signatures, and the environment that runs them.

:class:`ToolEnvironment` parses the calls of the last assistant message exactly as the ``tool_call`` reward parses
them (``posttrain.rewards.tool_call.find_tool_calls``), validates each call's arguments against the tool's JSON
schema, runs it and answers with one ``tool`` message per call. A failing call (unknown tool, malformed block,
arguments that break the schema, an exception, a time-out) is answered with an error message the model can read;
it never stops the rollout. Built-in tools: ``calculator`` (arithmetic through Python's ``ast``, never
``eval``) and ``python`` (runs the model's code in ``posttrain.rewards.sandbox``, never in this process).
This module never touches a model.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.rewards.tool_call import find_tool_calls


class ToolError(ValueError):
    """A tool definition that cannot be used (bad schema, unknown name), naming which."""


@dataclass
class Tool:
    """name: what the model calls.  fn: ``fn(**arguments) -> str | number | dict``.  parameters: the JSON schema
    of the arguments (an ``object``).  description: shown to the model."""

    name: str
    fn: Callable[..., Any]
    parameters: dict[str, Any]
    description: str = ""

    def __post_init__(self) -> None:
        import jsonschema

        if not self.name or not isinstance(self.name, str):
            raise ToolError(f"a tool needs a name, got {self.name!r}")
        try:
            jsonschema.Draft202012Validator.check_schema(self.parameters)
        except jsonschema.SchemaError as e:
            raise ToolError(f"tool {self.name!r}: its parameters are not a valid JSON schema: {e.message}") from None
        if self.parameters.get("type") != "object":
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        self._validator = jsonschema.Draft202012Validator(self.parameters)

    @property
    def schema(self) -> dict[str, Any]:
        """The entry for ``apply_chat_template(tools=[...])`` and for OpenAI-style requests."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: dict[str, Any]) -> str:
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "arguments"
            return f"error: {self.name}: {where}: {errors[0].message}"
        try:
            result = self.fn(**arguments)
        except Exception as e:  # noqa: BLE001 - the model sees what went wrong and may try again
            return f"error: {self.name}: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)


@dataclass
class ToolEnvironment:
    """Runs the tool calls of the last assistant message of a conversation; see the module docstring.

    max_output_chars: a tool's answer is cut to this many characters (the context is finite)."""

    tools: Sequence[Tool]
    max_output_chars: int = 2000
    by_name: dict[str, Tool] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {}
        for t in self.tools:
            if t.name in self.by_name:
                raise ToolError(f"two tools are named {t.name!r}")
            self.by_name[t.name] = t

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools]

    def step(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``tool`` messages answering the last assistant message's calls ([] when it made none: an answer)."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("ToolEnvironment.step: the conversation must end with an assistant message")
        found = find_tool_calls(messages[-1].get("content") or "")
        out = []
        for call in found.calls:
            tool = self.by_name.get(call["name"])
            if tool is None:
                content = f"error: no tool named {call['name']!r} (tools: {sorted(self.by_name)})"
            else:
                content = tool(call["arguments"])
            out.append({"role": "tool", "name": call["name"], "content": content[: self.max_output_chars]})
        for raw in found.malformed:
            out.append({"role": "tool", "name": "",
                        "content": f"error: not a valid tool call: {raw[:200]!r}"[: self.max_output_chars]})
        return out


# -- built-in tools ----------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (+ - * / // % ** and parentheses on numbers); integers stay exact."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent larger than 64")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    result = value(tree.body)
    if isinstance(result, float):
        if not math.isfinite(result):
            raise ValueError("the result is not finite")
        if result.is_integer():
            result = int(result)
    return str(result)


def calculator_tool() -> Tool:
    return Tool("calculator", calculate, {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "arithmetic, e.g. 12*(3+4)"}},
        "required": ["expression"], "additionalProperties": False,
    }, "Evaluate an arithmetic expression exactly.")


def python_tool(limits=None) -> Tool:
    """Runs the model's program in the code sandbox and returns what it printed (stdout)."""
    from posttrain.rewards.sandbox import Sandbox

    sandbox = Sandbox(limits)

    def run_python(code: str) -> str:
        result = sandbox.run_io(code, [("", "")])
        if result.timed_out:
            return "error: python: the program ran past its time limit"
        if not result.token_ok:
            return f"error: python: the sandbox did not run the program ({result.output[-300:]})"
        return result.outputs[0] if result.outputs else ""

    return Tool("python", run_python, {
        "type": "object", "properties": {"code": {"type": "string", "description": "a Python program"}},
        "required": ["code"], "additionalProperties": False,
    }, "Run a Python program in a sandbox and return what it prints.")


def final_answer_reward(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when a trajectory's last assistant message makes no tool call and its text equals ``answer`` (after
    stripping; numbers compared as numbers), else 0.0; ``None`` without an answer. The reward of the tool-use recipe:
    it sees the whole trajectory (the assistant and tool messages), and an unfinished one scores 0."""
    answers = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for completion, expected in zip(completions, answers, strict=True):
        if expected is None:
            out.append(None)
            continue
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        last = messages[-1] if messages else {}
        text = str(last.get("content") or "").strip() if last.get("role") == "assistant" else ""
        if not text or find_tool_calls(text).calls or "<tool_call>" in text:
            out.append(0.0)
            continue
        out.append(1.0 if _same_number(text, str(expected).strip()) else 0.0)
    return out


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return a == b


BUILTIN_TOOLS: dict[str, Callable[[], Tool]] = {"calculator": calculator_tool, "python": python_tool}


def load_tool(spec: str) -> Tool:
    """A built-in tool by name, or ``module:attribute`` naming a :class:`Tool` or a function returning one."""
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]()
    if ":" not in spec:
        raise ToolError(f"unknown tool {spec!r}: a built-in ({sorted(BUILTIN_TOOLS)}) or module:attribute")
    module_name, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ToolError(f"tool {spec!r} cannot be imported: {e}") from None
    tool = obj if isinstance(obj, Tool) else obj()
    if not isinstance(tool, Tool):
        raise ToolError(f"tool {spec!r} is not a posttrain.grpo.tools.Tool (got {type(tool).__name__})")
    return tool
