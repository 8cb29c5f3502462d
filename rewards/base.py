"""The reward-function contract shared by every reward, the registry and the worker pool.

A reward is a plain callable called by keyword, as TRL's ``GRPOTrainer`` calls it:
``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **columns)
-> list[float | None]``. ``completions`` are strings (standard data) or chat message lists (conversational data,
tool turns included), extra dataset columns arrive as keyword lists, and ``None`` means "does not apply / cannot
judge". A function that declares fewer keywords (no ``**kwargs``) gets only those it names; one that names a keyword
the caller cannot give is a configuration error (:class:`RewardConfigError`). This module holds the helpers that turn
a completion into text, call a reward (sync or ``async def``) and check what it returned. It must never import a
concrete reward, the sandbox or the pool: everything else depends on it, not the other way round.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

Completion = str | Sequence[dict[str, Any]]
RewardFn = Callable[..., Sequence[float | int | bool | None]]


class RewardError(Exception):
    """Base class of the errors the rewards package raises for a misconfigured or misbehaving reward."""


class RewardCountError(RewardError):
    """A reward returned a list whose length differs from the number of completions it was given."""

    def __init__(self, reward: str, expected: int, got: int) -> None:
        super().__init__(
            f"reward {reward!r} returned {got} values for {expected} completions; a reward must return exactly "
            "one value (float or None) per completion"
        )
        self.reward, self.expected, self.got = reward, expected, got


class RewardConfigError(RewardError):
    """Raised by a reward for a problem with its configuration or the batch's columns (a missing column).

    Unlike any other exception from a reward, which costs only the sample it was raised on, this stops the
    run with its message: the same mistake would otherwise turn every sample into ``None``.
    """


class RewardValueError(RewardError):
    """A reward returned something that is neither a finite number nor ``None`` for one sample."""


class NamedReward:
    """Mixin for rewards written as classes: instances answer ``__name__`` like functions do.

    TRL and loggers read ``reward_func.__name__``; a configured class instance has none of its own.
    """

    reward_name: ClassVar[str] = "reward"

    @property
    def __name__(self) -> str:
        return self.reward_name


def completion_text(completion: Completion) -> str:
    """The text a reward should judge: the string itself, or the last assistant message's content.

    Chat completions are lists of ``{"role", "content"}`` messages (TRL's conversational format). Content given
    as a list of typed parts (``[{"type": "text", "text": ...}]``) is joined. A conversation with no assistant
    message gives ``""``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):  # a single message rather than a list of them
        completion = [completion]
    for message in reversed(list(completion)):
        if not isinstance(message, dict):
            raise TypeError(f"a chat completion must be a list of message dicts, got an item of type {type(message)}")
        if message.get("role", "assistant") == "assistant":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def reward_name(fn: Any) -> str:
    """A readable name for a reward callable: its function name, a partial's function name, or its class name."""
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    return type(fn).__name__


def run_maybe_async(value: Any) -> Any:
    """Await ``value`` if a reward returned an awaitable (an ``async def`` reward); otherwise return it as is.

    Works whether or not the calling thread already runs an event loop: inside one, the coroutine runs to
    completion on a private loop in a helper thread, so a reward is never left un-awaited.
    """
    if not inspect.isawaitable(value):
        return value
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(value))
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(_await(value))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=runner, name="posttrain-async-reward")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _await(awaitable: Any) -> Any:
    return await awaitable


def check_value(reward: str, value: Any) -> float | None:
    """One returned value as ``float | None``; bools count as 0/1; NaN, infinities and other types are errors."""
    if value is None:
        return None
    if isinstance(value, bool | int | float) or _is_numpy_or_torch_scalar(value):
        number = float(value)
        if not math.isfinite(number):
            raise RewardValueError(f"reward {reward!r} returned a non-finite value {number!r}; return None instead")
        return number
    raise RewardValueError(
        f"reward {reward!r} returned a {type(value).__name__} ({value!r:.80}); expected float or None"
    )


def _is_numpy_or_torch_scalar(value: Any) -> bool:
    return getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None))


def reward_keywords(name: str, fn: Any, offered: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``offered`` that ``fn`` accepts: all of them when it takes ``**kwargs``, else those it names.

    Raises :class:`RewardConfigError` when ``fn`` needs a keyword (a parameter without a default) that is not offered,
    such as a data column the batch does not have.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a readable signature: offer everything, as TRL does
        return offered
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in named if p.default is p.empty and p.name not in offered]
    if missing:
        raise RewardConfigError(
            f"reward {name!r} needs keyword(s) {missing}, which this batch does not give; it gives "
            f"{sorted(offered)} (every data column besides the prompt arrives under its own name)"
        )
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return offered
    accepted = {p.name for p in named}
    return {k: v for k, v in offered.items() if k in accepted}


def call_reward(
    name: str,
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]],
    **context: Any,
) -> list[float | None]:
    """Call ``fn`` by keyword on a batch, await it if it is async, and check the count and every value.

    ``fn`` is offered ``prompts``, ``completions``, every column (``completion_ids`` among them when the caller has
    token ids) and the ``context`` keywords that are not ``None`` (``trainer_state``, ``log_metric``,
    ``log_extra``); see :func:`reward_keywords`. Raises whatever ``fn`` raises (:class:`RewardConfigError`
    included), :class:`RewardCountError` for a wrong number of values and :class:`RewardValueError` for a value
    that is not a finite number or ``None``.
    """
    offered: dict[str, Any] = {k: list(v) for k, v in columns.items()}
    offered.update({k: v for k, v in context.items() if v is not None})
    offered["prompts"], offered["completions"] = list(prompts), list(completions)
    out = run_maybe_async(fn(**reward_keywords(name, fn, offered)))
    if out is None or isinstance(out, str | bytes) or not hasattr(out, "__len__"):
        raise RewardValueError(f"reward {name!r} returned {type(out).__name__}; expected a list of float | None")
    if len(out) != len(completions):
        raise RewardCountError(name, len(completions), len(out))
    return [check_value(name, v) for v in out]



def score_sample(
    name: str,
    fn: RewardFn,
    prompt: Any,
    completion: Any,
    row: Mapping[str, Any],
    catch: type[BaseException] = Exception,
    **context: Any,
) -> tuple[float | None, str | None, str | None]:
    """:func:`call_reward` on one sample (``row``: its value of each column), returning the sample's own failure
    rather than raising it: ``(value, None, None)``, or ``(None, kind, detail)`` with kind ``invalid_value`` (the
    reward gave something that is not a finite number or ``None``) or ``exception`` (any other exception of class
    ``catch``; detail: its type, message and the end of its traceback). :class:`RewardCountError` and
    :class:`RewardConfigError` still raise: they are the run's fault, not the sample's."""
    try:
        value = call_reward(name, fn, [prompt], [completion], {k: [v] for k, v in row.items()}, **context)[0]
        return value, None, None
    except (RewardCountError, RewardConfigError):
        raise
    except RewardValueError as exc:
        return None, "invalid_value", str(exc)
    except catch as exc:
        return None, "exception", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"

@dataclass(frozen=True)
class RewardTrainerState:
    """What a reward gets as ``trainer_state``: the progress fields of transformers' ``TrainerState`` (TRL passes its
    trainer's), so rewards written against TRL shape themselves on ``global_step``, ``max_steps`` and ``epoch``.

    A plain record: it travels to reward workers without importing transformers there.
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: float | None = None


def reward_trainer_state(global_step: int, max_steps: int, epoch: float | None) -> RewardTrainerState:
    """The ``trainer_state`` of a training step: optimizer steps done, steps planned, epochs of data seen."""
    return RewardTrainerState(global_step=global_step, max_steps=max_steps, epoch=epoch)
