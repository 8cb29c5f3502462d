"""Finding a reward by name: built-ins, ``module:function`` paths and plugins' entry points.

``get(name_or_path, **options)`` is the one way to turn a name from a config into a reward callable:

- a built-in name (``math``, ``code``, ``tool_call``, ``format``, ``overlong``), resolved lazily through its
  dotted path so that importing the registry imports neither sympy nor the sandbox;
- a ``package.module:attribute`` path;
- the name of an entry point in group ``posttrain.rewards`` declared by any installed distribution (a plugin).

What a name resolves to decides what ``options`` mean: a class is instantiated with them (the built-ins are
frozen dataclasses whose fields are their options, validated on construction); a function gets them bound as
keyword arguments (each must be a named parameter of the function); an instance takes none. This module must
never call a reward, nor import a built-in reward module before ``get`` asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
from typing import Any

from posttrain.rewards.base import RewardError, RewardFn

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "posttrain.rewards"

BUILTIN_REWARDS: dict[str, str] = {
    "math": "posttrain.rewards.math:MathReward",
    "code": "posttrain.rewards.code:code_reward",
    "tool_call": "posttrain.rewards.tool_call:ToolCallReward",
    "format": "posttrain.rewards.format:FormatReward",
    "overlong": "posttrain.rewards.format:OverlongReward",
}


class UnknownRewardError(RewardError, LookupError):
    """No built-in, importable path or installed plugin answers to the name."""


class RewardOptionError(RewardError, TypeError):
    """Options given to ``get`` do not fit the reward they were given to."""


def plugin_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed entry points in group ``posttrain.rewards``, by name (re-read on every call)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> dict[str, str]:
    """Every name ``get`` accepts besides ``module:function`` paths, with what it points at."""
    names = dict(BUILTIN_REWARDS)
    for name, ep in plugin_entry_points().items():
        if name in BUILTIN_REWARDS:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        names[name] = f"{ep.value} (plugin from {dist})"
    return names


def get(name_or_path: str, **options: Any) -> RewardFn:
    """The reward callable a config names, configured with ``options``.

    Raises :class:`UnknownRewardError` (listing what exists) for a name nothing answers to, and
    :class:`RewardOptionError` for options the reward does not take.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownRewardError(f"a reward is named by a non-empty string, got {name_or_path!r}")
    name = name_or_path.strip()
    target = _resolve(name)
    return _configure(name, target, options)


def _resolve(name: str) -> Any:
    if name in BUILTIN_REWARDS:
        plugins = plugin_entry_points()
        if name in plugins:
            logger.warning("plugin entry point %r (%s) is shadowed by the built-in reward", name, plugins[name].value)
        return load_path(BUILTIN_REWARDS[name], what=f"built-in reward {name!r}")
    if ":" in name:
        return load_path(name, what=f"reward path {name!r}")
    plugins = plugin_entry_points()
    if name in plugins:
        try:
            return plugins[name].load()
        except Exception as exc:
            raise UnknownRewardError(
                f"plugin reward {name!r} ({plugins[name].value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
    known = ", ".join(sorted(available()))
    raise UnknownRewardError(
        f"unknown reward {name!r}. Known names: {known}. Give a 'package.module:function' path for anything "
        f"else, or install a plugin declaring an entry point in group {ENTRY_POINT_GROUP!r}."
    )


def load_path(path: str, what: str = "object") -> Any:
    """Import ``package.module:attr.sub`` and return the attribute, with an error naming the part that failed."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise UnknownRewardError(f"{what}: {path!r} is not of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownRewardError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UnknownRewardError(f"{what}: module {module_name!r} has no attribute {attr_path!r}") from exc
    return obj


def _configure(name: str, target: Any, options: dict[str, Any]) -> RewardFn:
    if inspect.isclass(target):
        try:
            return target(**options)
        except TypeError as exc:
            raise RewardOptionError(f"reward {name!r}: {exc}. It takes: {_option_names(target)}") from exc
    if not callable(target):
        raise UnknownRewardError(f"reward {name!r} resolves to a {type(target).__name__}, which is not callable")
    if not options:
        return target
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        raise RewardOptionError(f"reward {name!r} is a ready-made callable and takes no options; got {sorted(options)}")
    params = inspect.signature(target).parameters
    named = {p.name for p in params.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    named -= {"prompts", "completions"}
    unknown = sorted(set(options) - named)
    if unknown:
        raise RewardOptionError(
            f"reward {name!r} has no option(s) {unknown}; its keyword parameters are {sorted(named) or 'none'}"
        )
    return functools.partial(target, **options)


def _option_names(cls: type) -> str:
    if dataclasses.is_dataclass(cls):
        return ", ".join(f.name for f in dataclasses.fields(cls) if f.init) or "no options"
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind != p.VAR_KEYWORD]
    return ", ".join(p.name for p in params) or "no options"
