"""Typed configs: strict dict -> dataclass loading, dotted overrides, flattening.

Every config is a tree of dataclasses. :func:`from_dict` builds one from plain
data (YAML, JSON) and raises :class:`ConfigError` naming the dotted key for an
unknown key, a value of the wrong type or outside its ``Literal``, a non-finite float
(NaN, ±inf) or a negative int (unless the field's metadata has ``signed: True``, see
:data:`SIGNED`); :func:`apply_overrides` applies
``--set a.b.c=value`` strings (values parsed as YAML scalars); :func:`flatten`
gives the dotted ``{key: value}`` view logged as MLflow params.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


# Field metadata of an int key whose negative values mean something (e.g. -1 = unlimited):
# ``x: int = field(default=0, metadata=SIGNED)``. Every other int key is a count, size or seed: >= 0.
SIGNED = {"signed": True}


def _check_scalar(value: Any, tp: Any, key: str, signed: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_scalar(value, a, key, signed)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_check_scalar(v, inner, f"{key}[{i}]", signed) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if value < 0 and not signed:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown config key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_scalar(value, hints[name], key, bool(fields[name].metadata.get("signed")))
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted ``{"a.b": value}`` view of nested dicts/dataclasses."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = data
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> ``(["a", "b"], 3)``; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict, path: list[str], value: Any, cls: type | None = None) -> None:
    """Set ``data[path...] = value`` creating nested dicts; with ``cls`` reject unknown keys early."""
    node = data
    tp: Any = cls
    for i, part in enumerate(path):
        if tp is not None and dataclasses.is_dataclass(tp):
            names = {f.name for f in dataclasses.fields(tp)}
            if part not in names:
                raise ConfigError(f"{'.'.join(path[: i + 1])}: unknown config key (known: {', '.join(sorted(names))})")
            tp = typing.get_type_hints(tp)[part]
        else:
            tp = None
        if i == len(path) - 1:
            node[part] = value
        else:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = to_dict(nxt) if dataclasses.is_dataclass(nxt) else {}
                node[part] = nxt
            node = nxt


def apply_overrides(data: dict, overrides: list, cls: type | None = None) -> dict:
    """Apply overrides to a plain config dict (in place) and return it: ``--set`` strings (``"a.b=3"``, the value
    parsed as YAML) or typed ``("a.b", value)`` pairs (a space's values, set as they are)."""
    for item in overrides:
        path, value = (item[0].split("."), item[1]) if isinstance(item, tuple) else parse_override(item)
        set_path(data, path, value, cls)
    return data


def load_yaml(path: str | Path) -> dict:
    """Load a YAML mapping; a missing file or bad YAML is one clear line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}{where}: not valid YAML ({what})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
