"""Configs for every command: nested dataclasses loaded from YAML, with dotted command-line overrides.

A recipe is a YAML mapping whose top-level keys are the groups of a config dataclass (``model``, ``data``,
``optim``, ``loss``, ``rollout``, ``rewards``, ``logging``, ...), each a small dataclass whose fields are documented
where they are declared. ``load_config(SftConfig, "recipes/x.yaml", ["--optim.lr", "1e-5"])`` reads the file,
applies the overrides, converts and checks every value against its declared type, and raises ``ConfigError``
naming the file and the dotted field for a wrong name or value, before any work starts. This module knows no
particular command.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that names an unknown field or gives a value of the wrong type."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config groups, got {type(loaded).__name__}")
        data = loaded
    for key, raw in _parse_overrides(overrides or []):
        _set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
    return _build(cls, data, source, prefix="")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (what a manifest records and a resumed run compares)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--optim.lr 1e-5``, ``--optim.lr=1e-5`` or ``optim.lr=1e-5``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args):
                key, value = arg, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override --{arg} has no value")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot read override {arg!r}: use --group.field VALUE or group.field=VALUE")
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a group")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, data: Any, source: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field {prefix}{unknown[0]} (known in "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _convert(tp: Any, value: Any, source: str, name: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, name + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: {name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_convert(item, v, source, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    return value
