"""Load a run configuration: defaults < TOML file < command-line overrides, then validate.

Overrides come in the TorchTune form ``section.key=value`` and the TorchTitan forms
``--section.key value`` and ``--section.key=value``, applied in the order given. List-of-table
sections are addressed by index: ``data.sources.0.kind=json`` (index ``len`` appends a table).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from blip_recipes.config._schema import (
    ConfigError,
    coerce,
    describe,
    field_types,
    is_dataclass_type,
    list_item_type,
    parse_text,
    tomllib,
)
from blip_recipes.config.sections import Config

logger = logging.getLogger(__name__)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a user can set, e.g. ``training.steps``, ``data.sources.0.kind``."""
    keys = []
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        item = list_item_type(tp)
        if is_dataclass_type(tp):
            keys += all_keys(tp, key + ".")
        elif item is not None and is_dataclass_type(item):
            keys += all_keys(item, key + ".0.")
        else:
            keys.append(key)
    return keys


def _unknown(key: str, where: str) -> ConfigError:
    generic = {k.replace(".0.", ".N.") for k in all_keys()}
    generic |= {k.rsplit(".", 1)[0] for k in generic if "." in k}  # sections and tables
    generic = sorted(generic)
    probe = ".".join("N" if part.isdigit() else part for part in key.split("."))
    close = difflib.get_close_matches(probe, generic, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint} (see `blip run --help` for all keys)")


DEPRECATED_KEYS: dict[str, tuple[str, Any, Callable[[Any], tuple[str, Any]]]] = {
    "parallel.fsdp": (
        "parallel.data_parallel = 'fsdp' | 'hsdp' | 'ddp'",
        bool,
        lambda on: ("data_parallel", "fsdp" if on else "ddp"),
    ),
}
"""Old keys still read: dotted key -> (what replaces it, its old type, old value -> (new field,
new value))."""


MOVED_KEYS: dict[str, str] = {
    "model.queue_size": "momentum.queue_size",
    "model.momentum": "momentum.decay",
    "model.momentum_train_mode": "momentum.train_mode",
    "training.alpha": "momentum.alpha",
    "training.alpha_ramp_epochs": "momentum.alpha_ramp_epochs",
}
"""Keys moved to another section, still read: old dotted key -> new dotted key."""


def _moved(dotted: str, where: str) -> str | None:
    """The new dotted key of a moved key, with a one-line warning; None if not one."""
    new = MOVED_KEYS.get(dotted)
    if new is not None:
        logger.warning("%s: '%s' is deprecated, use '%s'", where, dotted, new)
    return new


def _move_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A TOML document with its moved keys (`MOVED_KEYS`) put where they now live."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old in MOVED_KEYS:
        section, key = old.split(".")
        table = data.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        new = _moved(old, where)
        assert new is not None
        new_section, new_key = new.split(".")
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # from_dict says that it must be a table
        if new_key in target:
            raise ConfigError(f"{where}: '{old}' and '{new}' are both set; keep only '{new}'")
        target[new_key] = table.pop(key)
    return data


def _deprecated(dotted: str, value: Any, where: str) -> tuple[str, Any] | None:
    """The replacement (field, value) of a deprecated key, with a warning; None if not one."""
    if dotted not in DEPRECATED_KEYS:
        return None
    replacement, old_type, translate = DEPRECATED_KEYS[dotted]
    context = f"{where}: '{dotted}'"
    old = parse_text(value, old_type, context) if isinstance(value, str) else coerce(
        value, old_type, context)  # fmt: skip
    field, new_value = translate(old)
    logger.warning(
        "%s: '%s' is deprecated, use %s (read as %s = %r)",
        where, dotted, replacement, field, new_value,
    )  # fmt: skip
    return field, new_value


def from_dict(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a table, got {data!r}")
    types_ = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        renamed = _deprecated(dotted, value, where)
        if renamed is not None:
            key, value = renamed
        if key not in types_:
            raise _unknown(dotted, where)
        tp = types_[key]
        item = list_item_type(tp)
        if is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value, where, dotted + ".")
        elif item is not None and is_dataclass_type(item):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: '{dotted}' must be an array of tables ([[{dotted}]])")
            kwargs[key] = [from_dict(item, v, where, f"{dotted}.{i}.") for i, v in enumerate(value)]
        else:
            kwargs[key] = coerce(value, tp, f"{where}: '{dotted}'")
    return cls(**kwargs)


def load_toml(path: str | Path) -> Config:
    """Read a TOML file into a :class:`Config` (defaults for what it leaves out)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(Config, _move_keys(data, str(path)), str(path))


def split_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """Pair up override arguments: ``a.b=v``, ``--a.b=v`` and ``--a.b v``."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif arg.startswith("--") and i + 1 < len(args):
            key, value = body, args[i + 1]
            i += 2
        else:
            raise ConfigError(
                f"override '{arg}': expected section.key=value or --section.key value"
            )
        pairs.append((key.replace("-", "_"), value))
    return pairs


def apply_override(cfg: Config, key: str, text: str) -> None:
    """Set one dotted key from its command-line text, parsed to the field's type."""
    key = _moved(key, "command line") or key
    where = f"command line: '{key}'"
    renamed = _deprecated(key, text, "command line")
    if renamed is not None:
        field, value = renamed
        key, text = f"{key.rsplit('.', 1)[0]}.{field}", str(value)
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        types_ = field_types(type(obj))
        if part not in types_:
            raise _unknown(key, "command line")
        tp = types_[part]
        last = i == len(parts) - 1
        item = list_item_type(tp)
        if is_dataclass_type(tp) and not last:
            obj = getattr(obj, part)
            continue
        if item is not None and is_dataclass_type(item) and not last:
            items = getattr(obj, part)
            index = parts[i + 1]
            if not index.isdigit() or int(index) > len(items) or i + 2 >= len(parts):
                raise ConfigError(
                    f"{where}: address a table of '{'.'.join(parts[: i + 1])}' by index "
                    f"0..{len(items)}, e.g. '{'.'.join(parts[: i + 1])}.0.kind'"
                )
            if int(index) == len(items):
                items.append(item())
            rest = ".".join(parts[i + 2 :])
            sub = items[int(index)]
            if rest.split(".")[0] not in field_types(item):
                raise _unknown(key, "command line")
            _set_leaf(sub, rest, text, where)
            return
        if not last or is_dataclass_type(tp) or (item is not None and is_dataclass_type(item)):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is a table, not a value")
        setattr(obj, part, parse_text(text, tp, where))
        return


def _set_leaf(obj: Any, key: str, text: str, where: str) -> None:
    if "." in key:
        raise ConfigError(f"{where}: nested tables inside list items are not supported")
    setattr(obj, key, parse_text(text, field_types(type(obj))[key], where))


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then overrides in order; not yet validated."""
    cfg = load_toml(path) if path is not None else Config()
    for key, value in split_overrides(overrides):
        apply_override(cfg, key, value)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)  # pragma: no cover


def _table_lines(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or (
            isinstance(value, list) and value and dataclasses.is_dataclass(value[0])
        ):
            continue
        if value is None:
            lines.append(f"# {f.name} = (none)")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that :func:`load_toml` reads back to an equal Config."""
    out: list[str] = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        out += [f"[{section.name}]", *_table_lines(obj), ""]
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                for item in value:
                    out += [f"[[{section.name}.{f.name}]]", *_table_lines(item), ""]
    return "\n".join(out)


def help_text(cls: type = Config, prefix: str = "") -> str:
    """Every key with its type, default and documentation, for ``--help``."""
    from blip_recipes.config._schema import field_docs

    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        item = list_item_type(tp)
        key = f"{prefix}{f.name}"
        if is_dataclass_type(tp):
            lines += [f"[{key}]", help_text(tp, key + "."), ""]
        elif item is not None and is_dataclass_type(item):
            lines += [f"  {key}: array of tables [[{key}]]  {field_docs(cls).get(f.name, '')}"]
            lines += [help_text(item, key + ".N.")]
        else:
            default = getattr(defaults, f.name)
            lines.append(
                f"  {key} ({describe(tp)}, default {default!r})\n"
                f"      {field_docs(cls).get(f.name, '')}"
            )
    return "\n".join(lines)


def exit_on_config_error(errors: Iterable[str]) -> None:
    """Print config errors and exit with status 2 (no traceback)."""
    for e in errors:
        print(f"config error: {e}", file=sys.stderr)
    raise SystemExit(2)
