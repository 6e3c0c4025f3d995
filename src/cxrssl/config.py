"""Configuration: the JSON schema is the one place where settings, defaults and their meaning live.

* :func:`load_config` reads a YAML file, fills defaults and validates it (clear messages naming the
  key and what is wrong) — the same check ``rules/common.smk`` runs before any job.
* :func:`add_section_args` turns one schema section (e.g. ``"pretrain"`` or ``"vindr.fusion"``) into
  documented argparse flags, so every script runs standalone with ``--help``.
* :func:`section_to_cli` turns a config section back into those flags, which is how rules call
  scripts (and, through ``params:``, how a changed setting triggers a rerun).
"""

from __future__ import annotations

import argparse
import copy
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_RESOURCE = "schemas/config.schema.yaml"


def schema_path() -> Path:
    """Filesystem path of the config schema shipped inside the package."""
    return Path(str(resources.files("cxrssl").joinpath(SCHEMA_RESOURCE)))


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return yaml.safe_load(schema_path().read_text())


def _with_defaults(validator_class):
    """A validator that also fills in ``default`` values (recursively, objects included)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _with_defaults(Draft202012Validator)


class ConfigError(ValueError):
    """A config value that does not match the schema; the message names the key."""


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated deep copy of ``config`` with every default filled in."""
    config = copy.deepcopy(config) if config is not None else {}
    errors = sorted(_DefaultFillingValidator(load_schema()).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.path) or "(top level)"
            lines.append(f"  {key}: {err.message}")
        raise ConfigError(f"{source} is not valid:\n" + "\n".join(lines))
    return config


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config, merge ``overrides`` (nested dicts), fill defaults and validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if overrides:
        data = deep_merge(data, overrides)
    return validate_config(data, source=str(path))


def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; values in ``update`` win."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def section_schema(section: str) -> dict:
    """Schema of a dotted section such as ``"pretrain"`` or ``"vindr.fusion"``."""
    node = load_schema()
    for part in section.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"no config section {section!r} in the schema") from None
    return node


def section_defaults(section: str) -> dict:
    """Default values of a section (validated, so nested defaults are filled too)."""
    full = validate_config({})
    node: Any = full
    for part in section.split("."):
        node = node[part]
    return node


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(prop: dict):
    types = prop.get("type")
    types = types if isinstance(types, list) else [types]
    if "integer" in types:
        return int
    if "number" in types:
        return float
    return str


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_section_args(parser: argparse.ArgumentParser, section: str, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per scalar/list setting of ``section`` with the schema's default and description.

    Nested objects are skipped (give them their own section). Booleans take ``true``/``false``.
    """
    group = parser.add_argument_group(f"{section} settings (config.yaml section '{section}')")
    defaults = section_defaults(section)
    for name, prop in section_schema(section).get("properties", {}).items():
        if name in exclude or prop.get("type") == "object":
            continue
        help_text = (prop.get("description", "") + f" (default: {defaults.get(name)!r})").strip()
        if "enum" in prop:
            help_text += f" Choices: {', '.join(map(str, prop['enum']))}."
        # argparse treats "%" in help as a format code
        kwargs: dict[str, Any] = {"dest": name, "default": defaults.get(name), "help": help_text.replace("%", "%%")}
        if prop.get("type") == "boolean":
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif prop.get("type") == "array":
            kwargs.update(type=_arg_type(prop.get("items", {})), nargs="*")
        else:
            kwargs["type"] = _arg_type(prop)
            if "enum" in prop and prop.get("type") == "string":
                kwargs["choices"] = prop["enum"]
        group.add_argument(_flag(name), **kwargs)


def section_args(args: argparse.Namespace, section: str, exclude: tuple[str, ...] = ()) -> dict:
    """Collect the parsed values of ``section``'s flags back into a dict."""
    names = [n for n, p in section_schema(section).get("properties", {}).items()
             if n not in exclude and p.get("type") != "object"]
    return {name: getattr(args, name) for name in names}


def section_to_cli(section: str, values: dict, exclude: tuple[str, ...] = ()) -> list[str]:
    """Render a config section as the flags :func:`add_section_args` understands."""
    out: list[str] = []
    for name, prop in section_schema(section).get("properties", {}).items():
        if name in exclude or prop.get("type") == "object" or name not in values:
            continue
        value = values[name]
        if value is None:
            continue
        out.append(_flag(name))
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, list):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out
