"""Recipes: YAML files mapped onto typed dataclasses, with `key.sub=value` command-line overrides.

Every key must be a field of the recipe's config dataclass; an unknown key is an error
that names it and suggests the nearest valid key. YAML is read with `safe_load` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _RecipeLoader(yaml.SafeLoader):
    """safe_load without YAML 1.1's base-60 numbers: `seeds=6:10` must stay the string "6:10"
    (PyYAML reads it as the integer 370). Exponents without a dot (1e-4) are floats. A key given
    twice in one mapping is an error (PyYAML keeps the last, silently dropping the first's settings)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden; that is what merging is for
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = key in first_line
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first_line[key]})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(  # also 1e-4 (YAML 1.1 wants 1.0e-4 and reads 1e-4 as a string)
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def safe_load(text: str):
    """yaml.safe_load, minus base-60 numbers (see _RecipeLoader)."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass: no tags are run)


class RecipeError(ValueError):
    """A recipe or override that does not fit its config; the message names the key."""


def _hint(key: str, valid) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # .inf / .nan in YAML would train to a NaN model and still exit 0.
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        if annotation is int and float(value) != int(value):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return annotation(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys raise RecipeError naming them."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise RecipeError(f"unknown key {path!r}{_hint(key, types_)}")
        kwargs[key] = _coerce(value, types_[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where or cls.__name__}: {exc}") from None


def require(config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
            unit: tuple[str, ...] = (), open_unit: tuple[str, ...] = ()) -> None:
    """Range checks for a config's numeric fields (called from __post_init__); errors name the field.
    `unit`: in [0, 1]; `open_unit`: in (0, 1] (e.g. top_p: 0 keeps no token). Every listed field must also be
    finite. None values are skipped."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (unit, lambda v: 0 <= v <= 1, "in [0, 1]"), (open_unit, lambda v: 0 < v <= 1, "in (0, 1]")):
        for name in names:
            value = getattr(config, name)
            if value is None:
                continue
            if not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name}={value!r} must be finite and {what}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise RecipeError(f"override {dotted!r}: value {raw!r} is not valid YAML ({problem})") from None
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def to_dict(config) -> dict:
    """A dataclass as plain data (tuples become lists), fit for YAML/JSON."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return clean(dataclasses.asdict(config))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what is wrong and where (its own str() spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None or mark is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem} at line {mark.line + 1}, column {mark.column + 1}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a recipe YAML (safe_load) and apply overrides; returns the raw dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          f"save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return apply_overrides(data, overrides or [])
