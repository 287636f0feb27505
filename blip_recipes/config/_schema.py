"""Reflection over the config dataclasses: field types, help texts, value parsing.

Everything here is generic over dataclasses whose fields are ``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``Optional[X]``, ``list[X]`` or a nested dataclass (or a list of them).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the file, key and expectation."""


_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each field in the class body (its help text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _optional_inner(tp: Any) -> Any | None:
    """X for Optional[X], else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def list_item_type(tp: Any) -> Any | None:
    """X for list[X], else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def describe(tp: Any) -> str:
    """Human name of a field type, e.g. ``int``, ``one of 'step', 'cosine'``, ``list of float``."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{describe(inner)} or none"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    item = list_item_type(tp)
    if item is not None:
        return f"list of {describe(item)}"
    if is_dataclass_type(tp):
        return f"table [{tp.__name__}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value (already typed) against a field type; ints widen to floats.

    Raises:
        ConfigError: naming ``where`` and the expected type when the value does not fit.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else coerce(value, inner, where)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: got {value!r}, expected {describe(tp)}")
        return value
    item = list_item_type(tp)
    if item is not None:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: got {value!r}, expected {describe(tp)}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def parse_text(text: str, tp: Any, where: str) -> Any:
    """Parse a command-line string into a field type (``none`` for optional fields)."""
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in _NONE_WORDS:
            return None
        return parse_text(text, inner, where)
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(f"{where}: got {text!r}, expected true or false")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: got {text!r}, expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: got {text!r}, expected a number") from None
    if tp is str:
        return text
    if typing.get_origin(tp) is Literal:
        return coerce(text, tp, where)
    item = list_item_type(tp)
    if item is not None:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                value = tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{where}: cannot parse {text!r} as a list ({e})") from None
            return coerce(value, tp, where)
        parts = [p.strip() for p in stripped.split(",")] if stripped else []
        return [parse_text(p, item, f"{where}[{i}]") for i, p in enumerate(parts)]
    raise ConfigError(f"{where}: cannot be set from the command line (type {describe(tp)})")
