"""Typed configs from nested dataclasses: values from YAML files (keys located by file:line) and
``--section.key=value`` command-line overrides, each checked against its field's type; unknown
keys get a "did you mean". ``visioncoach.config`` declares the sections; this is the machinery.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = ["ConfigError", "set_value", "load_yaml", "apply_yaml", "parse_args", "all_keys"]


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and its source."""



_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Value converted to ``tp``; raises TypeError/ValueError with a short reason."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_cli and str(value).lower() in ("null", "none"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, from_cli)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}")
    if dataclasses.is_dataclass(tp):
        # A list entry that is itself a small section (e.g. data.sources' {match, media, ...}).
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} (known: {sorted(known)})")
        hints = typing.get_type_hints(tp)
        return tp(**{k: _coerce(v, hints[k], from_cli) for k, v in value.items()})
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else (
                [v.strip() for v in text.split(",")] if text else [])
            if not isinstance(value, list):
                raise TypeError(f"expected {_type_name(tp)}")
            from_items_cli = not text.startswith("[")
        else:
            from_items_cli = False
        if not isinstance(value, list):
            raise TypeError(f"expected {_type_name(tp)}")
        return [_coerce(v, item, from_items_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise TypeError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError("expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads 1e-6 (no dot) as a string; accept plain numbers written that way.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise TypeError("expected a number")
        # No setting means anything by inf or nan; they would only fail later, mid-run.
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("expected a string (quote it in YAML)")
    raise TypeError(f"unsupported field type {tp!r}")


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def all_keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for name in _fields(obj):
        value = getattr(obj, name)
        key = prefix + name
        out.append(key)
        if dataclasses.is_dataclass(value):
            out += all_keys(value, key + ".")
    return out


def _unknown(cfg: Any, key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(cfg), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


def set_value(cfg: Any, key: str, value: Any, where: str, from_cli: bool = False) -> None:
    """Assign ``value`` to the dotted ``key`` of ``cfg`` after checking key and type."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            raise _unknown(cfg, key, where)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    name = parts[-1]
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} ({where}) is a section; give its keys "
                              f"({', '.join(_fields(current))}), not a value")
        for sub, sub_value in value.items():
            set_value(cfg, f"{key}.{sub}", sub_value, where, from_cli)
        return
    tp = _hints(obj)[name]
    try:
        setattr(obj, name, _coerce(value, tp, from_cli))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r} ({where}): {exc}, got {value!r} "
                          f"(type {_type_name(tp)})") from None


def _yaml_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _yaml_lines(v, key + ".", out)


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Mapping from a YAML config file and the line of each (dotted) key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    dup = _duplicate_key(root)
    if dup is not None:
        key, first, again = dup
        raise ConfigError(f"config file {path}:{again}: key {key!r} is given twice (first at line "
                          f"{first}); YAML would silently keep the last one")
    lines: dict[str, int] = {}
    _yaml_lines(root, "", lines)
    return data, lines


def _duplicate_key(node: yaml.Node, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, first line, repeated line) of the first key given twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key, line = f"{prefix}{k.value}", k.start_mark.line + 1
            if key in seen:
                return key, seen[key], line
            seen[key] = line
            found = _duplicate_key(v, key + ".")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix[:-1]}[{i}]." if prefix else f"[{i}].")
            if found:
                return found
    return None


def apply_yaml(cfg: Any, path: str | Path) -> None:
    data, lines = load_yaml(path)

    def walk(mapping: dict, prefix: str) -> None:
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            where = f"{path}:{lines.get(key, '?')}"
            parts = key.split(".")
            obj = cfg
            for part in parts[:-1]:
                obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj) or str(k) not in _fields(obj):
                raise _unknown(cfg, key, where)
            if dataclasses.is_dataclass(getattr(obj, str(k))) and isinstance(v, dict):
                walk(v, key + ".")
            else:
                set_value(cfg, key, v, where)

    walk(data, "")



def parse_args(argv: list[str], usage: str = "") -> tuple[Optional[str], list[tuple[str, str, str]], bool]:
    """(config file, [(key, raw value, source)], print_config) from ``--config FILE``,
    ``--key.sub=value`` / ``--key.sub value`` and ``--print-config``; ``-h`` exits with ``usage``.
    Raises ConfigError."""
    config_file = None
    overrides: list[tuple[str, str, str]] = []
    print_config = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(usage)
        if arg == "--print-config":
            print_config = True
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected command-line argument {arg!r} (argument {i + 1}); "
                              "overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            source = f"command-line argument {arg!r}"
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"command-line argument {arg!r} has no value "
                                  f"(use --{body}=VALUE)")
            key, value = body, argv[i + 1]
            source = f"command-line arguments {arg!r} {value!r}"
            i += 1
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value, source))
        i += 1
    return config_file, overrides, print_config
