"""The OpenAI API's request and response shapes for ``posttrain serve``: validation in, JSON objects out.

Requests are checked field by field before any work starts; a bad one raises :class:`RequestError`, which the
server answers with HTTP 400 and OpenAI's error object naming the field (``param``). Options the server cannot
honour (penalties, logit bias, log-probabilities, JSON mode, forced tool choice) are refused with a 400 rather
than silently ignored. Extensions from vLLM's server: ``top_k`` and ``ignore_eos``. This module does no HTTP and
no generation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.serving.generation import TextCompletion

MAX_N = 64
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A validated request: what to generate and how to answer."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    prompt_texts: list[str]  # for ``echo``
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions rendered into the prompt and parsed back


# -- field checks ---------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number, got {type(value).__name__}", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high if high is not None else 'inf'}], got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be a boolean, got {type(value).__name__}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(value) > MAX_STOP:
        raise RequestError(f"'stop' takes at most {MAX_STOP} strings, got {len(value)}", "stop")
    if any(s == "" for s in value):
        raise RequestError("'stop' strings must not be empty", "stop")
    return list(value)


def _refuse_unsupported(body: dict) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"'{name}' is not supported by posttrain serve (leave it out or 0)", name)
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported by posttrain serve", "logit_bias")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise RequestError("'logprobs' is not supported by posttrain serve", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("'response_format' other than {'type': 'text'} is not supported", "response_format")
    if body.get("suffix") is not None:
        raise RequestError("'suffix' is not supported by posttrain serve", "suffix")


def _common(body: dict, served_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    if model not in (None, served_name):
        raise RequestError(f"the model '{model}' does not exist; this server serves '{served_name}'", "model",
                           status=404, code="model_not_found")
    _refuse_unsupported(body)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise RequestError("'best_of' different from 'n' is not supported", "best_of")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("'stream_options' must be an object, and is only allowed with 'stream': true",
                           "stream_options")
    include_usage = bool(options and _boolean(options, "include_usage"))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    return {
        "n": n,
        "temperature": temperature,
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": max(0, _integer(body, "top_k", 0, -1)),  # vLLM's -1 and 0 both mean no top-k
        "seed": _integer(body, "seed", None, -(2**63), 2**63 - 1),
        "stop": _stop(body),
        "ignore_eos": _boolean(body, "ignore_eos"),
        "stream": stream,
        "include_usage": include_usage,
    }


def _max_tokens(body: dict, names: tuple[str, ...], prompts: list[list[int]], default: int,
                max_context: int | None) -> int:
    given = [name for name in names if body.get(name) is not None]
    name = given[0] if given else names[0]
    value = _integer(body, name, None, 1)
    longest = max(len(p) for p in prompts)
    room = None if max_context is None else max_context - longest
    if room is not None and room < 1:
        raise RequestError(f"the prompt has {longest} tokens; the model's context is {max_context}",
                           "messages" if "max_completion_tokens" in names else "prompt")
    if value is None:
        return default if room is None else min(default, room)
    if room is not None and value > room:
        raise RequestError(f"'{name}' = {value} plus the prompt's {longest} tokens exceeds the model's context of "
                           f"{max_context} tokens", name)
    return value


# -- chat -----------------------------------------------------------------------------------------------------
def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{where}[{i}]' must be a text part {{'type': 'text', 'text': ...}}; "
                                   "this model reads text only", f"{where}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"'{where}' must be a string or a list of text parts", where)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        clean: dict[str, Any] = {"role": "system" if role == "developer" else role}
        calls = message.get("tool_calls")
        if role == "assistant" and calls is not None:
            clean["tool_calls"] = _assistant_tool_calls(calls, f"{where}.tool_calls")
        content = message.get("content")
        if content is None and not (role == "assistant" and clean.get("tool_calls")):
            raise RequestError(f"'{where}.content' is required", f"{where}.content")
        clean["content"] = "" if content is None else _content(content, f"{where}.content")
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                clean[key] = message[key]
        out.append(clean)
    return out


def _assistant_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise RequestError(f"'{where}' must be a list", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"'{where}[{i}].function.name' is required", f"{where}[{i}].function.name")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"'{where}' must be an object with 'type': 'function'", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise RequestError(f"'{where}.function' must be an object", f"{where}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"'{where}.function.name' must be a non-empty string", f"{where}.function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(f"'{where}.function.parameters' must be a JSON-schema object",
                               f"{where}.function.parameters")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"'{where}.function.description' must be a string", f"{where}.function.description")
    if choice in ("required",) or isinstance(choice, dict):
        raise RequestError("'tool_choice' other than 'auto' or 'none' is not supported by posttrain serve",
                           "tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError(f"'tool_choice' must be 'auto' or 'none', got {choice!r}", "tool_choice")
    if choice == "none" or not tools:
        return None
    return [{"type": "function", "function": tool["function"]} for tool in tools]


def parse_chat_request(body: Any, served_name: str, generator: Any, default_max_tokens: int) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body and render its prompt with the chat template."""
    common = _common(body, served_name)
    messages = _messages(body.get("messages"))
    tools = _tools(body)
    try:
        prompt = generator.encode_chat(messages, tools)
    except ValueError as exc:
        raise RequestError(str(exc), "messages") from exc
    except Exception as exc:  # the chat template raised (jinja): the messages do not fit it
        raise RequestError(f"the chat template could not render 'messages': {exc}", "messages") from exc
    if not prompt:
        raise RequestError("'messages' rendered to an empty prompt", "messages")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), [prompt], default_max_tokens,
                             generator.max_context)
    return GenerationRequest("chat", [prompt], [""], max_tokens, tools=tools, **common)


def parse_completion_request(body: Any, served_name: str, generator: Any,
                             default_max_tokens: int) -> GenerationRequest:
    """Validate a ``/v1/completions`` body: ``prompt`` is a string, strings, token ids or lists of token ids."""
    common = _common(body, served_name)
    value = body.get("prompt")
    if isinstance(value, str) or isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                           "of token ids", "prompt")
    prompts, texts = [], []
    for i, item in enumerate(value):
        if isinstance(item, str):
            ids = generator.encode_text(item)
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            bad = [t for t in item if not 0 <= t < generator.vocab_size]
            if bad:
                raise RequestError(f"'prompt[{i}]' has token ids outside the vocabulary (size "
                                   f"{generator.vocab_size}): {bad[:5]}", f"prompt[{i}]")
            ids = list(item)
            texts.append(generator.decode(ids))
        else:
            raise RequestError(f"'prompt[{i}]' must be a string or a list of token ids", f"prompt[{i}]")
        if not ids:
            raise RequestError(f"'prompt[{i}]' is empty", f"prompt[{i}]")
        prompts.append(ids)
    max_tokens = _max_tokens(body, ("max_tokens",), prompts, default_max_tokens, generator.max_context)
    return GenerationRequest("completion", prompts, texts, max_tokens, echo=_boolean(body, "echo"), **common)


# -- responses ------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(request: GenerationRequest, completions: list[TextCompletion]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(c.num_generated for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(request: GenerationRequest, completion: TextCompletion) -> tuple[dict[str, Any], str]:
    """The assistant message of one choice and its finish reason; tool calls parsed when tools were given."""
    text = completion.text
    calls = parse_tool_calls(text) if request.tools else []
    if not calls:
        return {"role": "assistant", "content": text}, completion.finish_reason
    cut = text.find("<tool_call>")
    content = text[:cut] if cut > 0 and text[:cut].strip() else ""  # as streamed: whitespace alone is no content
    tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                   "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}, "tool_calls"


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    from posttrain.rewards.tool_call import parse_tool_calls as parse

    return parse(text)


def response(request: GenerationRequest, completions: list[TextCompletion], model: str) -> dict[str, Any]:
    """The non-streaming response object for ``completions`` (prompt-major, ``n`` per prompt)."""
    created = int(time.time())
    if request.kind == "chat":
        choices = []
        for i, c in enumerate(completions):
            message, reason = chat_message(request, c)
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": (request.prompt_texts[c.prompt_index] if request.echo else "") + c.text,
                    "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(completions)]
        obj = "text_completion"
    return {"id": new_id(request.kind), "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(request, completions)}


class StreamEvents:
    """The chunks of one streamed response (each sent as an SSE ``data:`` event), built as the text arrives."""

    def __init__(self, request: GenerationRequest, model: str):
        self.request = request
        self.model = model
        self.id, self.created = new_id(request.kind), int(time.time())
        self.chat = request.kind == "chat"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        event = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.request.include_usage:
            event["usage"] = None
        return event

    def _delta(self, index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            return self._chunk([{"index": index, "delta": delta, "finish_reason": reason}])
        return self._chunk([{"index": index, "text": delta.get("content", ""), "finish_reason": reason,
                             "logprobs": None}])

    def opening(self) -> list[dict[str, Any]]:
        """Before any text: the assistant role of each chat choice, the echoed prompt of each completion choice."""
        request = self.request
        choices = range(len(request.prompts) * request.n)
        if self.chat:
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                    for i in choices]
        if request.echo:
            return [self._delta(i, {"content": request.prompt_texts[i // request.n]}) for i in choices]
        return []

    def text(self, index: int, piece: str) -> dict[str, Any]:
        return self._delta(index, {"content": piece})

    def closing(self, index: int, completion: TextCompletion, rest: Callable[[str], str]) -> list[dict[str, Any]]:
        """The end of choice ``index``: the text not yet sent (``rest(final text)`` says what it is), its tool
        calls, and its finish reason."""
        events = []
        if self.chat:
            message, reason = chat_message(self.request, completion)
            piece = rest(message["content"] or "")
            if piece:
                events.append(self.text(index, piece))
            if "tool_calls" in message:
                calls = [dict(call, index=j) for j, call in enumerate(message["tool_calls"])]
                events.append(self._delta(index, {"tool_calls": calls}))
            events.append(self._delta(index, {}, reason))
        else:
            piece = rest(completion.text)
            if piece:
                events.append(self.text(index, piece))
            events.append(self._delta(index, {}, completion.finish_reason))
        return events

    def usage(self, completions: list[TextCompletion]) -> list[dict[str, Any]]:
        """The usage chunk, if the request asked for one."""
        if not self.request.include_usage:
            return []
        final = self._chunk([])
        final["usage"] = usage(self.request, completions)
        return [final]

    def error(self, error: RequestError) -> dict[str, Any]:
        """An error after the stream began (the status line is already sent): OpenAI's error object as an event."""
        return error.body()
