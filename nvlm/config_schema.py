"""Config dataclasses: read from plain mappings, checked against their types and bounds, changed by dotted keys.

Every configuration (the model's ``nvlm.config.NVLMConfig``, a run's ``nvlm.training.config.RunConfig``) is a
tree of dataclasses. A field's bounds are written beside it, ``max_tiles: int = bounded(6, ge=1, le=40)``, so
renaming a field carries its bound along. One walker, `check`, judges every field's type (Literal, Optional,
lists, mappings, nested dataclasses) and bounds and names the dotted key; relations between fields (min <= max,
a batch divisible by another) stay in each config's own ``validate``. One parser, `with_overrides`, sets dotted
keys for both configs, the command line's ``key=value`` strings and ``nvlm.build(..., tags__style=...)`` alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, TypeVar, cast

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key and the fix."""


@dataclass(frozen=True)
class Bounds:
    """What a field's value must be beyond its type: at least `ge`, more than `gt`, at most `le`, one of
    `one_of`; the values in `also` are allowed besides (e.g. -1 = "derive it"). `note` says why, in the error."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    one_of: tuple[Any, ...] = ()
    also: tuple[Any, ...] = ()
    note: str = ""

    def admits(self, value: Any) -> bool:
        if value in self.also:
            return True
        if self.one_of:
            return value in self.one_of
        low = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        return low and (self.le is None or value <= self.le)

    def describe(self) -> str:
        if self.one_of:
            rule = "one of " + ", ".join(map(str, self.one_of))
        elif self.ge is not None and self.le is not None:
            rule = f"between {self.ge} and {self.le}"
        else:
            parts = [(">=", self.ge), (">", self.gt), ("<=", self.le)]
            rule = " and ".join(f"{op} {v}" for op, v in parts if v is not None)
        rule += "".join(f" or {a}" for a in self.also)
        return rule + (f" ({self.note})" if self.note else "")


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    one_of: Iterable[Any] = (),
    also: Iterable[Any] = (),
    note: str = "",
) -> Any:
    """A dataclass field with a default and `Bounds` (kept in the field's metadata, where `check` reads them)."""
    bounds = Bounds(ge, gt, le, tuple(one_of), tuple(also), note)
    return field(default=default, metadata={"bounds": bounds})


# ---- reading and checking ----------------------------------------------------------------------------------
def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Dataclass `cls` from a mapping, recursing into nested dataclasses; unknown or missing keys are errors.
    Values are taken as given (`check` judges them), lists turned into tuples where the field is a tuple."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    needed = [n for n, f in fields.items() if n not in data and f.default is MISSING and f.default_factory is MISSING]
    if needed:
        raise ConfigError(f"{where} needs the key(s) {needed}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if _is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = tuple(value) if isinstance(value, list) and _is_tuple(hint) else value
    return cls(**kwargs)


def check(obj: T, prefix: str = "") -> T:
    """`obj` when every field of dataclass `obj`, and of the dataclasses inside it, has its type and bounds;
    else a ConfigError naming the dotted key, what it must be and (for a wrong type) an example."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(cast(Any, obj)):
        key, value, hint = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if _is_dataclass(hint) and isinstance(value, hint):
            check(value, f"{key}.")
            continue
        if not _matches(value, hint):
            example = f"; e.g. {key}={_yaml(f.default)}" if isinstance(f.default, (bool, int, float, str)) else ""
            raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__}){example}")
        bounds = f.metadata.get("bounds")
        if bounds is not None and value is not None and not bounds.admits(value):
            raise ConfigError(f"{key} must be {bounds.describe()}, got {value!r}")
    return obj


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a field's type hint (an int is a float; a bool is not a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args:  # tuple[int, str]: fixed length
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)  # list[int], tuple[float, ...]
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(v, args[1]) for v in value.values()))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    if origin is dict or _is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _yaml(value: Any) -> str:
    """`value` as it is written after ``key=`` (true, null, 1e-05, 2d_grid)."""
    return value if isinstance(value, str) else json.dumps(value)


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return typing.get_origin(hint) is tuple


def _free(hint: Any) -> bool:
    """Whether a field is a free-form mapping (an HF config, NVLMConfig overrides), whose keys nobody checks."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_free(a) for a in typing.get_args(hint))
    return hint is Any or typing.get_origin(hint) is dict or hint is dict


# ---- dotted-key overrides ----------------------------------------------------------------------------------
def with_overrides(cfg: Any, overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Config dataclass `cfg` as a dict with dotted keys set, from a mapping ``{"tags.style": "2d_grid"}``
    (values as given) or ``key=value`` strings (values read as YAML: numbers, booleans, lists, mappings).

    Keys must exist, except inside free-form mappings (``dict`` or ``Any`` fields: HF configs, NVLMConfig
    overrides), where mappings are made on the way. A mapping set on a section sets its keys one by one, so the
    section's other keys keep their values.
    """
    data = dataclasses.asdict(cfg)
    if isinstance(overrides, str):
        overrides = [overrides]
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_item, overrides)
    for dotted, value in items:
        _set(type(cfg), data, "", dotted.split("."), value, dotted)
    return data


def parse_item(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 0.0001)``: the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=20")
    try:
        return key.strip(), yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"override {item!r}: the value is not valid YAML; quote strings, e.g. {key}='...'") from None


def _set(cls: type, node: dict[str, Any], prefix: str, parts: list[str], value: Any, dotted: str) -> None:
    """Set the key path `parts` below `node`, the dict of a dataclass `cls`; ConfigError for a key it lacks."""
    part, rest = parts[0], parts[1:]
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    if part not in names:
        close = difflib.get_close_matches(part, names, n=1)
        fix = f"did you mean {prefix + close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {dotted!r}; {fix}")
    hint = typing.get_type_hints(cls)[part]
    if _is_dataclass(hint) and rest:
        _set(hint, node[part], f"{prefix}{part}.", rest, value, dotted)
    elif _is_dataclass(hint) and isinstance(value, Mapping):  # a section given as a mapping: key by key
        for sub, v in value.items():
            _set(hint, node[part], f"{prefix}{part}.", str(sub).split("."), v, f"{dotted}.{sub}")
    elif rest and _free(hint):  # any keys inside, mappings made on the way
        for key in [part, *rest[:-1]]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[rest[-1]] = value
    elif rest:
        raise ConfigError(f"unknown config key {dotted!r}: {prefix}{part} is {_describe(hint)}, with no keys inside")
    else:
        node[part] = value
