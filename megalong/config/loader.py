"""Build configuration dataclasses from YAML recipes and ``key.sub=value`` overrides.

One generic loader serves every config class: nested dataclasses are filled from nested
mappings, values are checked against the field types, and an unknown key is an error
that names the key path and the file it came from (a typo in a recipe must never be
silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration schema."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(json.dumps(a) if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp`` and convert the harmless cases."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    if tp is Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        # The first alternative that takes the value (e.g. a RopeScaling mapping, or false).
        errors = {}
        for alternative in typing.get_args(tp):
            if alternative is type(None):
                continue
            try:
                return _coerce(value, alternative, where)
            except ConfigError as err:
                errors[alternative] = err
        mapping_error = next((e for a, e in errors.items() if _is_dataclass_type(a)), None)
        if isinstance(value, Mapping) and mapping_error is not None:
            raise mapping_error  # a mapping meant that section: say what is wrong inside it
        raise ConfigError(f"{where}: {value!r} is none of: {'; '.join(_type_name(a) for a in errors)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.List, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, typing.Tuple) else items
    if origin in (dict, typing.Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        # 0 == False in Python: a boolean literal takes only a boolean.
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is float:
        # YAML reads 1e-5 without a dot as a string; accept ints and numeric strings.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys for {cls.__name__}: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def from_dict(cls: Type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from a nested mapping; errors name ``source`` and the key path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _build(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=1e-5"`` -> (["optimizer", "lr"], 1e-05); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().lstrip("-").split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``data`` with every ``key.sub=value`` override set."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return data or {}


def load_given(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """The values a recipe (optional) and its overrides give, before any default is filled in."""
    return apply_overrides(load_yaml(path) if path is not None else {}, overrides)


def load(cls: Type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML recipe (optional) plus command-line overrides."""
    overrides = list(overrides)
    data = load_given(path, overrides)
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " + overrides"
    return from_dict(cls, data, source)


def to_dict(obj) -> dict:
    """A plain nested dict of a config dataclass (for printing and saving)."""
    return dataclasses.asdict(obj)


def dump_yaml(obj, given: Mapping[str, Any] | None = None, notes: Mapping[str, str] | None = None) -> str:
    """YAML of a config dataclass; loading it gives ``obj`` back.

    With ``given`` (the mapping ``obj`` was built from, see :func:`load_given`), every value
    that is not in it, so came from a dataclass default, ends with ``# default``; ``notes``
    replaces that word for some keys, by dotted path (``{"model.num_layers": "from preset"}``).
    """
    if given is None:
        return yaml.safe_dump(to_dict(obj), sort_keys=False)
    return "".join(line + "\n" for line in _marked_lines(obj, given, notes or {}, ""))


_NOT_GIVEN = object()


def _plain(value):
    """``value`` with dataclasses turned into dicts and tuples into lists, for yaml.safe_dump."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _entry_lines(key: str, value) -> list[str]:
    """``key: value`` as YAML lines whose first line can end with a comment."""
    if isinstance(value, str) and not value.isprintable():
        return [f"{key}: {json.dumps(value)}"]  # one line: a JSON string is a YAML scalar
    text = yaml.safe_dump({key: _plain(value)}, sort_keys=False, width=float("inf"))
    return text.splitlines()


def _marked_lines(obj, given, notes: Mapping[str, str], prefix: str) -> list[str]:
    """YAML lines of dataclass ``obj``; ``given`` is the mapping it was built from (or None)."""
    lines = []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        sub = given.get(f.name, _NOT_GIVEN) if isinstance(given, Mapping) else _NOT_GIVEN
        path = prefix + f.name
        if dataclasses.is_dataclass(value) and dataclasses.fields(value):
            lines.append(f"{f.name}:")
            lines += ["  " + line for line in _marked_lines(value, sub, notes, path + ".")]
        elif (isinstance(value, (list, tuple)) and value
              and all(dataclasses.is_dataclass(v) and dataclasses.fields(v) for v in value)):
            lines.append(f"{f.name}:")
            items = sub if isinstance(sub, (list, tuple)) and len(sub) == len(value) else [None] * len(value)
            for i, (item, item_given) in enumerate(zip(value, items)):
                first, *rest = _marked_lines(item, item_given, notes, f"{path}[{i}].")
                lines += ["- " + first] + ["  " + line for line in rest]
        else:
            entry = _entry_lines(f.name, value)
            if path in notes:
                entry[0] += f"  # {notes[path]}"
            elif sub is _NOT_GIVEN:
                entry[0] += "  # default"
            lines += entry
    return lines
