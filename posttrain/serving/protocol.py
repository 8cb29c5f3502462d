"""The OpenAI API's request and response shapes as vLLM serves them, for ``posttrain serve``: validation in, JSON
objects out.

Requests are checked field by field before any work starts; a bad one raises :class:`RequestError`, which the
server answers with HTTP 400 and OpenAI's error object naming the field (``param``). A field this server does not
know or cannot honour is a 400 naming it, never silently ignored. Besides OpenAI's fields, vLLM's extensions are
read (``CHAT_FIELDS``, ``COMPLETION_FIELDS``).

Log-probabilities (``logprobs``/``top_logprobs``, and prompt log-probs with ``echo``) are of the model's raw
distribution unless the server reports the processed one (``logprobs_mode``). ``response_format`` and a required or
named ``tool_choice`` decode under a grammar (``posttrain.rollout.constrained``), as vLLM does: a forced tool call
is generated as JSON (:func:`tool_call_schema`) and returned as ``tool_calls`` with ``content: null``. This module
does no HTTP and no generation.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.rollout.base import MAX_LOGPROBS
from posttrain.serving.generation import TextCompletion
from posttrain.serving.http import RequestError

MAX_N = 64
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")

_SAMPLING = {"model", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "top_k",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias", "user",
             "ignore_eos", "skip_special_tokens", "stop_token_ids", "response_format", "max_tokens"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                           "parallel_tool_calls", "chat_template_kwargs", "continue_final_message",
                           "add_generation_prompt"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "logprobs", "best_of", "suffix"}
# what a chat template call takes from the server itself: chat_template_kwargs must not set these
_TEMPLATE_RESERVED = {"conversation", "messages", "tools", "add_generation_prompt", "continue_final_message",
                      "tokenize", "return_dict", "chat_template"}


@dataclass
class GenerationRequest:
    """A validated request: what to generate and how to answer."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    prompt_texts: list[str]  # for ``echo``
    max_tokens: int
    # SamplingParams fields given as they are (n, seed, temperature, top_p, top_k, ignore_eos, the penalties,
    # min_tokens, logit_bias); what is missing keeps SamplingParams' default
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # None: no log-probs; k: the sampled token's and the top k alternatives
    skip_special_tokens: bool = True
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions rendered into the prompt and parsed back
    # None/"auto": tool calls parsed from the text; "required": at least one, by grammar; else the function's name
    tool_choice: str | None = None
    parallel_tool_calls: bool = True
    # the JSON schema the answer must follow (a forced tool call's too); {} for any JSON object; None: free text
    json_schema: dict[str, Any] | None = None

    @property
    def forced_tool(self) -> bool:
        return self.tools is not None and self.tool_choice not in (None, "auto")

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


# -- field checks ---------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number, got {type(value).__name__}", name)
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
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


def token_ids(value: Any, name: str, vocab_size: int) -> list[int]:
    """``value`` checked as a list of token ids of a vocabulary of ``vocab_size`` (the field is ``name``)."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{name}' must be a list of token ids", name)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"'{name}' has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}", name)
    return list(value)


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise RequestError(f"'logit_bias' token id {token} is outside the vocabulary (size {vocab_size})",
                               "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias[{key}]' must be a number in [-100, 100], got {bias!r}", "logit_bias")
        out[token] = float(bias)
    return out or None


def _response_format(body: dict) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks for ({} for any JSON object), or None for free text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError("'response_format.json_schema' must be an object with a 'schema' object",
                               "response_format.json_schema")
        schema = spec.get("schema")
        return {"type": "object"} if schema is None else schema
    raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")


def check_model(model: Any, served_name: str) -> None:
    """Refuse a request for a model other than ``served_name`` (404, OpenAI's ``model_not_found``); ``None`` (no
    ``model`` given) is the served one."""
    if model not in (None, served_name):
        raise RequestError(f"the model '{model}' does not exist; this server serves '{served_name}'", "model",
                           status=404, code="model_not_found")


def refuse_unknown(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown or unsupported field '{unknown[0]}'"
                           + (f" (and {', '.join(unknown[1:])})" if len(unknown) > 1 else ""), unknown[0])


def _common(body: Any, served_name: str, known: set[str], vocab_size: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    refuse_unknown(body, known)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    check_model(model, served_name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", "user")
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("'stream_options' must be an object, and is only allowed with 'stream': true",
                           "stream_options")
    if options and set(options) - {"include_usage", "continuous_usage_stats"}:
        extra = min(set(options) - {"include_usage", "continuous_usage_stats"})
        raise RequestError(f"unknown field 'stream_options.{extra}'", f"stream_options.{extra}")
    if options and options.get("continuous_usage_stats"):
        raise RequestError("'stream_options.continuous_usage_stats' is not supported", "stream_options")
    stop_token_ids = body.get("stop_token_ids")
    return {
        "sampling": {
            "n": n,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "top_k": max(0, _integer(body, "top_k", 0, -1)),  # vLLM's -1 and 0 both mean no top-k
            "seed": _integer(body, "seed", None, -(2**63), 2**63 - 1),
            "ignore_eos": _boolean(body, "ignore_eos"),
            "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
            "min_tokens": _integer(body, "min_tokens", 0, 0),
            "logit_bias": _logit_bias(body, vocab_size),
        },
        "stop": _stop(body),
        "stop_token_ids": [] if stop_token_ids is None else token_ids(stop_token_ids, "stop_token_ids", vocab_size),
        "stream": stream,
        "include_usage": bool(options and _boolean(options, "include_usage")),
        "skip_special_tokens": _boolean(body, "skip_special_tokens", True),
        "json_schema": _response_format(body),
    }


def _max_tokens(body: dict, names: tuple[str, ...], prompts: list[list[int]], default: int,
                max_context: int | None, common: dict[str, Any], max_request_tokens: int | None) -> int:
    n, min_tokens = common["sampling"]["n"], common["sampling"]["min_tokens"]
    given = [name for name in names if body.get(name) is not None]
    name = given[0] if given else names[0]
    value = _integer(body, name, None, 1)
    longest = max(len(p) for p in prompts)
    room = None if max_context is None else max_context - longest
    if room is not None and room < 1:
        raise RequestError(f"the prompt has {longest} tokens; the model's context is {max_context}",
                           "messages" if "max_completion_tokens" in names else "prompt")
    if value is None:
        value = default if room is None else min(default, room)
    elif room is not None and value > room:
        raise RequestError(f"'{name}' = {value} plus the prompt's {longest} tokens exceeds the model's context of "
                           f"{max_context} tokens", name)
    if max_request_tokens is not None and len(prompts) * n * value > max_request_tokens:
        raise RequestError(f"the request asks for {len(prompts)} prompt(s) x n={n} x {name}={value} = "
                           f"{len(prompts) * n * value} tokens; this server's per-request cap "
                           f"(--max-request-tokens) is {max_request_tokens}", name)
    if min_tokens > value:
        raise RequestError(f"'min_tokens' = {min_tokens} is more than the maximum of {value} tokens", "min_tokens")
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


def messages(value: Any) -> list[dict[str, Any]]:
    """The ``messages`` field checked and normalised for the chat template (``developer`` read as ``system``, text
    parts joined, assistant tool calls in OpenAI's shape)."""
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


def tools(body: dict) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools rendered into the prompt (None: none) and the tool choice: None (auto), "required" or a name."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
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
        for key, kind, words in (("parameters", dict, "a JSON-schema object"), ("description", str, "a string")):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise RequestError(f"'{where}.function.{key}' must be {words}", f"{where}.function.{key}")
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError("'tool_choice' as an object must be {'type': 'function', 'function': {'name': ...}}",
                               "tool_choice")
        if fn["name"] not in names:
            raise RequestError(f"'tool_choice' names the function '{fn['name']}', which is not in 'tools' "
                               f"({', '.join(names)})", "tool_choice")
        choice = fn["name"]
    elif choice == "required":
        if not tools:
            raise RequestError("'tool_choice': 'required' needs at least one tool", "tool_choice")
    elif choice not in (None, "auto", "none"):
        raise RequestError(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r}",
                           "tool_choice")
    if choice == "none" or not tools:
        return None, None
    return [{"type": "function", "function": tool["function"]} for tool in tools], (
        None if choice in (None, "auto") else choice)


def tool_call_schema(tools: list[dict[str, Any]], choice: str, parallel: bool) -> dict[str, Any]:
    """The JSON schema of a forced tool call, as vLLM generates it: for "required", a list of
    ``{"name", "parameters"}`` (one item unless ``parallel``); for a named function, its arguments."""
    def parameters(fn: dict[str, Any]) -> dict[str, Any]:
        return fn.get("parameters") or {"type": "object"}

    if choice != "required":
        return parameters(next(t["function"] for t in tools if t["function"]["name"] == choice))
    item = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                                        "parameters": parameters(fn)},
                       "required": ["name", "parameters"], "additionalProperties": False}
                      for fn in (t["function"] for t in tools)]}
    schema = {"type": "array", "minItems": 1, "items": item}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def template_options(body: dict) -> dict[str, Any]:
    """The chat template's options a request sets (``chat_template_kwargs``, ``add_generation_prompt``,
    ``continue_final_message``), as keyword arguments of ``TextGenerator.encode_chat``."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        reserved = sorted(set(kwargs) & _TEMPLATE_RESERVED)
        if reserved:
            raise RequestError(f"'chat_template_kwargs' must not set '{reserved[0]}' (the server sets it; use the "
                               "request's own field where there is one)", "chat_template_kwargs")
    add = _boolean(body, "add_generation_prompt", True)
    cont = _boolean(body, "continue_final_message", False)
    if add and cont:
        raise RequestError("'continue_final_message' needs 'add_generation_prompt': false (as in vLLM)",
                           "continue_final_message")
    return {"template_kwargs": kwargs or {}, "add_generation_prompt": add, "continue_final_message": cont}


def parse_chat_request(body: Any, served_name: str, generator: Any, default_max_tokens: int,
                       max_request_tokens: int | None = None) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body and render its prompt with the chat template."""
    common = _common(body, served_name, CHAT_FIELDS, generator.vocab_size)
    chat = messages(body.get("messages"))
    tool_defs, choice = tools(body)
    parallel = _boolean(body, "parallel_tool_calls", True)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    options = template_options(body)
    if options["continue_final_message"] and chat[-1]["role"] != "assistant":
        raise RequestError("'continue_final_message' needs the last message to be the assistant's",
                           "continue_final_message")
    if choice is not None:
        if common["json_schema"] is not None:
            raise RequestError("'response_format' cannot be combined with a required or named 'tool_choice'",
                               "response_format")
        common["json_schema"] = tool_call_schema(tool_defs, choice, parallel)
    try:
        prompt = generator.encode_chat(chat, tool_defs, **options)
    except ValueError as exc:
        raise RequestError(str(exc), "messages") from exc
    except Exception as exc:  # the chat template raised (jinja): the messages do not fit it
        raise RequestError(f"the chat template could not render 'messages': {exc}", "messages") from exc
    if not prompt:
        raise RequestError("'messages' rendered to an empty prompt", "messages")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), [prompt], default_max_tokens,
                             generator.max_context, common, max_request_tokens)
    return GenerationRequest("chat", [prompt], [""], max_tokens, tools=tool_defs, tool_choice=choice,
                             parallel_tool_calls=parallel, logprobs=(top or 0) if logprobs else None, **common)


def parse_completion_request(body: Any, served_name: str, generator: Any, default_max_tokens: int,
                             max_request_tokens: int | None = None) -> GenerationRequest:
    """Validate a ``/v1/completions`` body: ``prompt`` is a string, strings, token ids or lists of token ids."""
    common = _common(body, served_name, COMPLETION_FIELDS, generator.vocab_size)
    if body.get("suffix") is not None:
        raise RequestError("'suffix' is not supported by this server", "suffix")
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != common["sampling"]["n"]:
        raise RequestError("'best_of' different from 'n' is not supported", "best_of")
    value = body.get("prompt")
    if isinstance(value, str) or isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                           "of token ids", "prompt")
    prompts, texts = [], []
    for i, item in enumerate(value):
        if isinstance(item, str):
            ids = generator.encode_text(item)
            texts.append(item)
        elif isinstance(item, list):
            ids = token_ids(item, f"prompt[{i}]", generator.vocab_size)
            texts.append(generator.decode(ids))
        else:
            raise RequestError(f"'prompt[{i}]' must be a string or a list of token ids", f"prompt[{i}]")
        if not ids:
            raise RequestError(f"'prompt[{i}]' is empty", f"prompt[{i}]")
        prompts.append(ids)
    max_tokens = _max_tokens(body, ("max_tokens",), prompts, default_max_tokens, generator.max_context, common,
                             max_request_tokens)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    return GenerationRequest("completion", prompts, texts, max_tokens, echo=_boolean(body, "echo"),
                             logprobs=logprobs, **common)


# -- responses ------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(request: GenerationRequest, completions: list[TextCompletion]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(c.num_generated for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(request: GenerationRequest, completion: TextCompletion) -> tuple[dict[str, Any], str]:
    """The assistant message of one choice and its finish reason; tool calls parsed when tools were given (from
    the JSON the grammar made, when the tool choice was forced)."""
    text = completion.text
    if request.forced_tool and completion.finish_reason != "length":
        calls = _forced_calls(request, text)
        if calls is not None:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    from posttrain.rewards.tool_call import parse_tool_calls

    calls = parse_tool_calls(text) if request.tools and not request.forced_tool else []
    if not request.parallel_tool_calls:
        calls = calls[:1]
    if not calls:
        return {"role": "assistant", "content": text}, completion.finish_reason
    cut = text.find("<tool_call>")
    content = text[:cut] if cut > 0 and text[:cut].strip() else ""  # as streamed: whitespace alone is no content
    tool_calls = [_tool_call(c["name"], json.dumps(c["arguments"])) for c in calls]
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}, "tool_calls"


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _forced_calls(request: GenerationRequest, text: str) -> list[dict[str, Any]] | None:
    """The tool calls of a forced choice's JSON (see :func:`tool_call_schema`), or None if it does not parse."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if request.tool_choice != "required":
        return [_tool_call(request.tool_choice, json.dumps(value))]
    if not isinstance(value, list):
        return None
    return [_tool_call(item["name"], json.dumps(item.get("parameters", {}))) for item in value
            if isinstance(item, dict) and isinstance(item.get("name"), str)] or None


# -- log-probabilities ------------------------------------------------------------------------------------------
TokenText = Callable[[int], str]


def chat_logprobs(ids: list[int], logprobs: list[float], tops: list, token_text: TokenText) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object for tokens ``ids``: each token, its log-prob and its top alternatives."""
    content = []
    for token, logprob, top in zip(ids, logprobs, tops):
        text = token_text(token)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := token_text(i)), "logprob": lp, "bytes": list(t.encode())}
                                         for i, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(ids: list[int], logprobs: list, tops: list, token_text: TokenText, start: int = 0
                        ) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for tokens ``ids`` whose text begins at character ``start``:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> log-prob, the chosen token included, as vLLM) and
    ``text_offset``; an entry without a log-prob (an echoed prompt's first token) is None in both lists."""
    tokens, values, top_maps, offsets, position = [], [], [], [], start
    for token, logprob, top in zip(ids, logprobs, tops):
        text = token_text(token)
        tokens.append(text)
        values.append(logprob)
        top_maps.append(None if logprob is None else {**{token_text(i): lp for i, lp in top}, text: logprob})
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top_maps, "text_offset": offsets}


def response(request: GenerationRequest, completions: list[TextCompletion], model: str,
             token_text: TokenText | None = None, prompt_logprobs: list | None = None) -> dict[str, Any]:
    """The non-streaming response object for ``completions`` (prompt-major, ``n`` per prompt); ``token_text``
    decodes one token for the log-probs, ``prompt_logprobs`` (per prompt) are the echoed prompts' log-probs."""
    want, choices = request.logprobs is not None, []
    if request.kind == "chat":
        for i, c in enumerate(completions):
            message, reason = chat_message(request, c)
            logprobs = chat_logprobs(c.logprob_ids, c.logprobs, c.top_logprobs, token_text) if want else None
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs})
        obj = "chat.completion"
    else:
        for i, c in enumerate(completions):
            echo = request.prompt_texts[c.prompt_index] if request.echo else ""
            logprobs = None
            if want:
                ids, values, tops = list(c.logprob_ids), list(c.logprobs), list(c.top_logprobs)
                if request.echo and prompt_logprobs is not None:  # the prompt's tokens first
                    entries = prompt_logprobs[c.prompt_index]  # per token: None, or (log-prob, top)
                    ids = request.prompts[c.prompt_index] + ids
                    values = [None if e is None else e[0] for e in entries] + values
                    tops = [None if e is None else e[1] for e in entries] + tops
                    echo_start = 0
                else:
                    echo_start = len(echo)
                logprobs = completion_logprobs(ids, values, tops, token_text, echo_start)
            choices.append({"index": i, "text": echo + c.text, "finish_reason": c.finish_reason,
                            "logprobs": logprobs})
        obj = "text_completion"
    return {"id": new_id(request.kind), "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(request, completions)}


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

    def text(self, index: int, piece: str, reports: list | None = None, token_text: TokenText | None = None,
             offset: int = 0) -> dict[str, Any]:
        """A piece of choice ``index``'s text; ``reports`` ((token id, log-prob, top) of the tokens it came from)
        add their log-probs, as vLLM streams them, the text beginning at character ``offset`` of the choice."""
        event = self._delta(index, {"content": piece})
        if reports:
            ids, values, tops = (list(column) for column in zip(*reports))
            logprobs = (chat_logprobs(ids, values, tops, token_text) if self.chat
                        else completion_logprobs(ids, values, tops, token_text, offset))
            event["choices"][0]["logprobs"] = logprobs
        return event

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
