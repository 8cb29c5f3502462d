"""Configs for every command: nested dataclasses loaded from YAML, with dotted command-line overrides.

A recipe is a YAML mapping whose top-level keys are the groups of a config dataclass (``model``, ``data``,
``optim``, ``loss``, ``rollout``, ``rewards``, ``logging``, ...), each a small dataclass whose fields are documented
where they are declared. ``load_config(SftConfig, "recipes/x.yaml", ["--optim.lr", "1e-5"])`` reads the file,
applies the overrides, converts and checks every value against its declared type, and raises ``ConfigError``
naming the file and the dotted field for a wrong name or value (non-finite numbers included), before any work
starts. ``describe_config(cls)`` writes every field's dotted name, type, default and doc for ``--help``, read from
the classes themselves (the doc is the ``name: ...`` entry of the class docstring or the comment on or above the
field), so the help is never a second copy. This module knows no particular command.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used: a recipe or override naming an unknown field or giving a value of the
    wrong type, a model configuration whose fields are missing or inconsistent, a filter configuration. The message
    names the file or the field. The one configuration error of every command."""


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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    return value


# -- describing a config for --help ---------------------------------------------------------------------------------

_DOC_ENTRY = re.compile(r"(?:^|(?<=\n)|(?<=  ))[ \t]*((?:[a-z_][a-z0-9_]*, )*[a-z_][a-z0-9_]*): ")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc as written in ``cls``: its ``name: doc`` entry in the class docstring (several names may
    share one: ``lr, eps: ...``), else the comment at the end of its line, else the comment lines right above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    text = inspect.getdoc(cls) or ""
    if cls.__doc__ is not None and not cls.__doc__.startswith(cls.__name__ + "("):  # not dataclass' generated one
        matches = [m for m in _DOC_ENTRY.finditer(text) if set(m.group(1).split(", ")) <= names]
        for m, nxt in zip(matches, [*matches[1:], None][: len(matches)], strict=True):
            doc = " ".join(text[m.end(): nxt.start() if nxt else len(text)].split())
            for name in m.group(1).split(", "):
                docs.setdefault(name, doc)
    for name, comment in _field_comments(cls).items():
        if name in names and comment:
            docs.setdefault(name, comment)
    return docs


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        above: list[str] = []
        n = node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        out[node.target.id] = " ".join(trailing or above)
    return out


def type_name(tp: Any) -> str:
    """A field's type as a user writes its value: ``float``, ``str | None``, ``one of a|b``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return dataclasses.MISSING


def _yaml_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [dataclasses.asdict(v) for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def describe_config(cls: type, width: int = 100) -> str:
    """Every field of a config class, by group: ``--group.field TYPE (default: V)`` and its doc, for ``--help``."""
    lines: list[str] = []
    indent = " " * 6

    def wrap(text: str) -> list[str]:
        return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent) if text else []

    def leaf_lines(klass: type, prefix: str, defaults: Any, fields: list[dataclasses.Field]) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        for i, f in enumerate(fields):
            tp = hints[f.name]
            default = getattr(defaults, f.name) if defaults is not None else _default(f)
            lines.append(f"  --{prefix}{f.name} {type_name(tp)}  (default: {_yaml_value(default)})")
            shared_with_next = i + 1 < len(fields) and docs.get(fields[i + 1].name) == docs.get(f.name)
            if not shared_with_next:  # fields documented together (``top_p, top_k: ...``) show their doc once
                lines.extend(wrap(docs.get(f.name, "")))
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
            if dataclasses.is_dataclass(item):  # a list of records: each item's keys
                item_docs = field_docs(item)
                item_hints = typing.get_type_hints(item)
                for g in dataclasses.fields(item):
                    lines.append(f"{indent}- {g.name} {type_name(item_hints[g.name])}  "
                                 f"(default: {_yaml_value(_default(g))})")
                    lines.extend(wrap("  " + item_docs[g.name]) if g.name in item_docs else [])

    def walk(klass: type, prefix: str, defaults: Any) -> None:
        hints = typing.get_type_hints(klass)
        fields = [f for f in dataclasses.fields(klass) if f.init]
        leaves = [f for f in fields if not dataclasses.is_dataclass(hints[f.name])]
        groups = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
        if prefix:
            leaf_lines(klass, prefix, defaults, leaves)
        for f in groups:
            group = hints[f.name]
            lines.append("")
            lines.append(f"{prefix}{f.name}:" + (f" {_intro(group)}" if _intro(group) else ""))
            walk(group, f"{prefix}{f.name}.", getattr(defaults, f.name) if defaults is not None else _instance(group))
        if not prefix and leaves:  # the top level's own fields, after its groups
            lines.append("")
            lines.append("top level:")
            leaf_lines(klass, prefix, defaults, leaves)

    walk(cls, "", _instance(cls))
    return "\n".join(lines).strip("\n")


def _intro(cls: type) -> str:
    """The first paragraph of a group's docstring when it is prose, not already a field's entry."""
    if cls.__doc__ is None or cls.__doc__.startswith(cls.__name__ + "("):
        return ""
    first = (inspect.getdoc(cls) or "").split("\n\n")[0]
    m = _DOC_ENTRY.match(first)
    if m and set(m.group(1).split(", ")) <= {f.name for f in dataclasses.fields(cls)}:
        return ""
    return " ".join(first.split())


def _instance(cls: type) -> Any:
    """``cls()`` when every field has a default (its groups' defaults can differ from their classes'), else None."""
    try:
        return cls()
    except (TypeError, ValueError):
        return None
