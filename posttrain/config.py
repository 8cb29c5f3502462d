"""Configs for every command: nested dataclasses loaded from YAML, with dotted command-line overrides.

A recipe is a YAML mapping whose top-level keys are the groups of a config dataclass (``model``, ``data``,
``optim``, ...), each a small dataclass whose fields are documented where they are declared. ``load_config`` reads
the file, applies the overrides, converts and checks every value against its declared type, and raises
``ConfigError`` naming the file and the dotted field for a wrong name or value (non-finite numbers included), before
any work starts. ``describe_config(cls)`` writes every field's dotted name, type, default and doc for ``--help``,
read from the classes themselves (``field_docs``), so the help is never a second copy. This module knows no
particular command.

What a recipe may hold, beyond plain fields:
- a group left empty (``optim:`` and nothing under it) keeps its defaults;
- ``dict[K, V]`` fields: every key converted to ``K`` (a key written as text, as in an override, is read as YAML
  first, so ``fractions.2=0.5`` addresses the key ``2`` of a ``dict[int, float]``) and every value to ``V``;
- a list field declared with ``field(metadata=choose_by_name({"length": LengthRule, ...}, kind="filter"))``: each
  item is a mapping ``{name, id, ...options}`` whose ``name`` picks the options' dataclass, whose ``id`` (default: the
  name, unique in the list) is what the item is reported and addressed under, and whose other keys are the options;
  it becomes the list's item class built as ``Item(name=..., id=..., options=<dataclass>)``;
- renamed fields: a config dataclass may declare ``RENAMED: ClassVar[dict[str, str]] = {"old": "new"}``, both names
  dotted relative to that class (a top-level config may say ``{"run.save_every": "checkpoint.every_steps"}``, so a
  group shared by several commands need not know one command's old names); an old name in a recipe or override is
  an error naming its new name, raised before any other error of that mapping.

Overrides are ``--group.field VALUE``, ``--group.field=VALUE`` or ``group.field=VALUE``; the value is read as YAML
(an empty one is the empty string). A mapping's key may be written with ``-`` for ``_`` (``--optim.warmup-steps``);
a list's item is addressed by its index or by its ``id`` (else its ``name``): ``rules.0.min_chars=3``,
``rules.length.max_chars=99``. Overrides apply in order, on the recipe as read, before any conversion.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used: a recipe or override naming an unknown field or giving a value of the
    wrong type, a model configuration whose fields are missing or inconsistent, a filter configuration. The message
    names the file or the field. The one configuration error of every command."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """The recipe at ``path`` (or the defaults, named ``defaults`` in errors) with ``overrides`` applied, as ``cls``."""
    data = _read_recipe(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    for key, raw in _parse_overrides(overrides or []):
        _set_dotted(data, key, _override_value(key, raw))
    return build_config(cls, data, source)


def choose_by_name(choices: Mapping[str, type], kind: str = "item") -> dict[str, Any]:
    """The ``field(metadata=...)`` of a list field whose items pick their options' dataclass by their ``name`` key
    among ``choices`` (see the module doc); ``kind`` is what errors call a name (``unknown filter 'lenght'``)."""
    return {_CHOICES: _Choices(dict(choices), kind)}


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (what a manifest records and a resumed run compares)."""
    return dataclasses.asdict(config)


def config_yaml(config: Any) -> str:
    """The config as YAML, groups in declaration order (a run's ``config.yaml``, ``--print-config``)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


_CHOICES = "posttrain.config.choose_by_name"


class _Choices(NamedTuple):
    types: dict[str, type]
    kind: str


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config groups, got {type(loaded).__name__}")
    return loaded


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--optim.lr 1e-5``, ``--optim.lr=1e-5`` or ``optim.lr=1e-5``: (dotted key, raw value) pairs, in order."""
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
        out.append((key, value))
        i += 1
    return out


def _override_value(key: str, raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: {raw!r} is not a YAML value: {e}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at the dotted ``key`` of a recipe, creating the missing groups (see the module doc)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        if isinstance(node, dict):
            step: Any = _mapping_key(node, part)
        elif isinstance(node, list):
            step = _list_item(node, part, key)
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is not a group")
        if depth == len(parts) - 1:
            node[step] = value
        else:
            if isinstance(node, dict) and node.get(step) is None:  # a group not given, or left empty
                node[step] = {}
            node = node[step]


def _mapping_key(node: dict[Any, Any], part: str) -> Any:
    """The key ``part`` names: itself, an existing key that reads as it (the ``2`` of ``{2: 0.2}``), else with
    ``-`` read as ``_``."""
    if part in node:
        return part
    return next((k for k in node if str(k) == part), part.replace("-", "_"))


def _list_item(node: list[Any], part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("id", item.get("name")) == part:
            return i
    raise ConfigError(f"override {key}: no list item {part!r} (an index below {len(node)}, or an item's id or name)")


def build_config(cls: type[T], data: Any, source: str, prefix: str = "", defaults: dict[str, Any] | None = None) -> T:
    """``cls`` built from plain data (a parsed recipe), every value converted and checked; errors name ``source``.
    ``prefix``: the dotted place of a nested group; ``defaults``: values for the fields ``data`` leaves out, where the
    enclosing config declares other defaults for this group than the group's class (``DpoConfig.optim``'s lr)."""
    if data is None:  # a group left empty keeps its defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    _check_renamed(cls, data, source, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown field {prefix}{unknown[0]} (known in "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(fields))})")
    kwargs = {k: v for k, v in (defaults or {}).items() if k not in data}
    for name, value in data.items():
        choices = fields[name].metadata.get(_CHOICES)
        if choices is not None:
            kwargs[name] = _chosen_items(hints[name], choices, value, source, prefix + name)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_config(hints[name], value, source, prefix + name + ".", _group_defaults(fields[name]))
        else:
            kwargs[name] = _convert(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _group_defaults(f: dataclasses.Field) -> dict[str, Any]:
    """The fields where a group's declared default (``field(default_factory=lambda: Group(lr=5e-7))``) differs from
    the group class's own defaults: a recipe that gives the group in part keeps them."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    declared = f.default_factory()
    plain = _instance(type(declared))
    if plain is None:  # a group whose fields must be given together (model.path or model.preset) stands alone
        return {}
    return {g.name: getattr(declared, g.name) for g in dataclasses.fields(declared)
            if g.init and getattr(declared, g.name) != getattr(plain, g.name)}


def _check_renamed(cls: type, data: dict[str, Any], source: str, prefix: str) -> None:
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    for old, new in renamed.items():
        node: Any = data
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"{source}: {prefix}{old} was renamed {prefix}{new}")


def _chosen_items(tp: Any, choices: _Choices, value: Any, source: str, name: str) -> list[Any]:
    """A ``choose_by_name`` list: each ``{name, id, ...options}`` as ``Item(name=, id=, options=<its dataclass>)``."""
    if value is None:
        return []
    known = ", ".join(choices.types)
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {name} must be a list of mappings, each with a name (one of {known}), "
                          f"got {value!r}")
    item_cls = typing.get_args(tp)[0]
    items: list[Any] = []
    seen: set[str] = set()
    for i, raw in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"{source}: {at} must be a mapping with a name (one of {known}), got {raw!r}")
        options = dict(raw)
        chosen = options.pop("name")
        item_id = options.pop("id", chosen)
        if not isinstance(chosen, str) or chosen not in choices.types:
            raise ConfigError(f"{source}: {at}.name: unknown {choices.kind} {chosen!r} (known: {known})")
        if not isinstance(item_id, str) or item_id in seen:
            raise ConfigError(f"{source}: {at}.id: {item_id!r} must be a unique string; "
                              f"give repeated {choices.kind}s distinct ids")
        seen.add(item_id)
        items.append(item_cls(name=chosen, id=item_id,
                              options=build_config(choices.types[chosen], options, source, at + ".")))
    return items


def _convert(tp: Any, value: Any, source: str, name: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, source, name + ".")
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
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        converted = {}
        for k, v in value.items():
            key = _convert(key_tp, _dict_key(key_tp, k), source, f"{name} key {k!r}")
            converted[key] = _convert(value_tp, v, source, f"{name}.{k}")
        return converted
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
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):  # text that is not a number
                number = float(value)
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


def _dict_key(tp: Any, key: Any) -> Any:
    """A mapping's key as written: read as YAML when it is text and the declared key type is not text."""
    if not isinstance(key, str) or tp in (str, Any):
        return key
    try:
        return yaml.safe_load(key)
    except yaml.YAMLError:
        return key


# -- describing a config for --help ---------------------------------------------------------------------------------

_DOC_ENTRY = re.compile(r"(?:^|(?<=\n)|(?<=  ))[ \t]*((?:[a-z_][a-z0-9_]*, )*[a-z_][a-z0-9_]*): ")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc as written in ``cls`` or, for a field it does not document (one it inherits), in the nearest
    base class that does: in each class, the field's ``name: doc`` entry in the class docstring (several names may
    share one: ``lr, eps: ...``), else the comment at the end of its line, else the comment lines right above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        text = _written_doc(klass)
        matches = [m for m in _DOC_ENTRY.finditer(text) if set(m.group(1).split(", ")) <= names]
        for m, nxt in zip(matches, [*matches[1:], None][: len(matches)], strict=True):
            doc = " ".join(text[m.end(): nxt.start() if nxt else len(text)].split())
            for name in m.group(1).split(", "):
                docs.setdefault(name, doc)
        for name, comment in _field_comments(klass).items():
            if name in names and comment:
                docs.setdefault(name, comment)
    return docs


def _written_doc(cls: type) -> str:
    """The class's own docstring, cleaned; empty when it has none but the one ``dataclass`` generates."""
    if cls.__doc__ is None or cls.__doc__.startswith(cls.__name__ + "("):
        return ""
    return inspect.cleandoc(cls.__doc__)


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
    first = _written_doc(cls).split("\n\n")[0]
    if not first:
        return ""
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
