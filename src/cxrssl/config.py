"""Configuration: the JSON schema is the one place where settings, defaults and their meaning live.

* :func:`load_config` reads a YAML file, fills defaults and validates it (clear messages naming the
  key and what is wrong) — the same check ``rules/common.smk`` runs before any job. Besides the
  schema, :func:`validate_config` refuses NaN and infinity anywhere, and runs ``CROSS_CHECKS``:
  settings of different sections that must agree (each message names both keys).
* :func:`add_section_args` turns one schema section (e.g. ``"pretrain"`` or ``"vindr.fusion"``) into
  documented argparse flags, so every script runs standalone with ``--help``.
* :func:`section_to_cli` turns a config section back into those flags, which is how rules call
  scripts (and, through ``params:``, how a changed setting triggers a rerun).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_RESOURCE = "schemas/config.schema.yaml"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML 1.2 forbids it; PyYAML
    silently keeps the last, so a block written twice would lose its first copy without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            # the mapping's own keys only: a key that overrides one merged in by `<<: *anchor` is YAML's
            # merge, not a duplicate (SafeLoader's flatten_mapping, called next, puts the merged ones first)
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def strict_yaml_load(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (:class:`_StrictLoader`)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass: plain data only


def schema_path() -> Path:
    """Filesystem path of the config schema shipped inside the package."""
    return Path(str(resources.files("cxrssl").joinpath(SCHEMA_RESOURCE)))


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return strict_yaml_load(schema_path().read_text())


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


def _non_finite(node: Any, key: str = "") -> Iterator[str]:
    """Dotted keys of NaN / infinite numbers (JSON schema bounds let them through: NaN < 0 is false)."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite(value, f"{key}.{i}")
    elif isinstance(node, float) and not math.isfinite(node):
        yield key or "(top level)"


# --- cross-checks: settings in different sections that must agree -----------------------------

def pretraining_methods() -> list[str]:
    """Names of the registered pretraining methods: the ``pretrain.<method>`` blocks of the schema."""
    props = load_schema()["properties"]["pretrain"]["properties"]
    return [name for name, prop in props.items() if prop.get("type") == "object"]


#: Pretraining methods with a schema block but their own data, loop and rules instead of the shared
#: NIH loop of :mod:`cxrssl.ssl.registry`: multimodal trains on (report, image) pairs
#: (:mod:`cxrssl.multimodal`, rules/multimodal.smk). Their backbone.pth is an init all the same.
OWN_RULE_METHODS = ("multimodal",)


def registry_methods() -> list[str]:
    """The schema's methods trained by the shared loop (scripts/pretrain.py, rule pretrain)."""
    return [m for m in pretraining_methods() if m not in OWN_RULE_METHODS]


def pretrained_arch(config: dict, method: str) -> tuple[str, str]:
    """``(key, arch)`` of the backbone that pretraining ``method`` trains (what its init loads)."""
    return f"pretrain.{method}.arch", config["pretrain"][method]["arch"]


def _crops_fit_the_cache(config: dict) -> list[str]:
    cache = config["nih"]["cache_size"]
    return [f"{section}.image_size ({config[section]['image_size']}) is larger than nih.cache_size ({cache}): "
            f"its crops are cut from the NIH cache; lower {section}.image_size or raise nih.cache_size"
            for section in ("pretrain", "linear_eval") if config[section]["image_size"] > cache]


def _resolutions_fit_the_conversion(config: dict) -> list[str]:
    size = config["vindr"]["convert"]["size"]
    too_big = [r for r in config["detection"]["resolutions"] if r > size]
    return [f"detection.resolutions {too_big} exceed vindr.convert.size ({size}): detection would upsample the "
            "converted PNGs; lower the resolutions or raise vindr.convert.size"] if too_big else []


def _pretrained_arch_matches_detection(config: dict) -> list[str]:
    """A ResNet method's backbone must be detection.arch (the inits are compared on one arch, and
    mmdet builds detection.arch); a ViT method's is built from its backbone.json by the torchvision
    engine (ViTDet, issue 12): then mmdet must not be among the engines."""
    detection = config["detection"]
    detection_arch = detection["arch"]
    engines = {detection["engine"], *detection.get("engines", [])}
    messages = []
    for method in pretraining_methods():
        if method not in detection["inits"]:
            continue
        key, arch = pretrained_arch(config, method)
        if arch.startswith("vit"):
            if "mmdet" in engines:
                messages.append(f"{key} ({arch}) is a ViT and detection.inits uses the {method} backbone, but "
                                "detection.engine / detection.engines include mmdet, which builds ResNets only "
                                "(detection.arch): detect ViTs with the torchvision engine or drop "
                                f"{method} from detection.inits")
            continue
        if arch != detection_arch:
            messages.append(f"{key} ({arch}) differs from detection.arch ({detection_arch}), but detection.inits uses "
                            f"the {method} backbone: set both to the same architecture or drop {method} from "
                            "detection.inits")
    return messages


def _multimodal_init_is_a_listed_resnet_method(config: dict) -> list[str]:
    """``pretrain.multimodal.init`` naming a pretraining method (its backbone.pth, a dependency in the
    DAG): the method must run (pretrain.methods), not be multimodal itself, and train the same ResNet."""
    pretrain = config["pretrain"]
    init = pretrain["multimodal"]["init"]
    if init not in pretraining_methods():
        return []
    key = "pretrain.multimodal.init"
    if init == "multimodal":
        return [f"{key} is multimodal itself: name another pretraining method, random, imagenet or a path"]
    if "multimodal" not in pretrain["methods"]:
        return []
    if init not in pretrain["methods"]:
        return [f"{key} is {init}, which pretrain.methods does not run: add {init} to pretrain.methods"]
    arch_key, arch = pretrained_arch(config, init)
    if arch != pretrain["multimodal"]["arch"]:
        return [f"{key} is {init}, whose {arch_key} ({arch}) differs from pretrain.multimodal.arch "
                f"({pretrain['multimodal']['arch']}): the image encoder loads that backbone's weights"]
    return []


def _private_dir_outside_results(config: dict) -> list[str]:
    privacy = config["privacy"]
    if not privacy["pseudonymize_ids"]:
        return []
    private = os.path.abspath(privacy["private_dir"])
    results = os.path.abspath(config["results_dir"])
    if os.path.commonpath([private, results]) in (private, results):
        return [f"privacy.private_dir ({privacy['private_dir']}) and results_dir ({config['results_dir']}) overlap: "
                "the id mapping must live outside the results"]
    return []


#: (name, check): each check returns messages naming every key involved (empty when all agree).
CROSS_CHECKS: list[tuple[str, Callable[[dict], list[str]]]] = [
    ("NIH crops fit the cache", _crops_fit_the_cache),
    ("detection input sizes fit the converted images", _resolutions_fit_the_conversion),
    ("pretrained backbone arch matches detection.arch", _pretrained_arch_matches_detection),
    ("private folder outside results_dir", _private_dir_outside_results),
    ("multimodal init from another method", _multimodal_init_is_a_listed_resnet_method),
]


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated deep copy of ``config`` with every default filled in.

    Schema errors, non-finite numbers and failed cross-checks are reported together, one line
    per key, in a :class:`ConfigError` that names ``source``.
    """
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"{source} is not valid: expected a mapping of settings, got {type(config).__name__}")
    config = copy.deepcopy(config) if config is not None else {}
    errors = sorted(_DefaultFillingValidator(load_schema()).iter_errors(config), key=lambda e: list(e.path))
    lines = []
    for err in errors:
        key = ".".join(str(p) for p in err.path) or "(top level)"
        lines.append(f"  {key}: {err.message}")
    lines += [f"  {key}: not a finite number (NaN or infinity)" for key in _non_finite(config)]
    if not lines:  # cross-checks read typed values: only once the schema holds
        lines += [f"  {message} [check: {name}]" for name, check in CROSS_CHECKS for message in check(config)]
    if lines:
        raise ConfigError(f"{source} is not valid:\n" + "\n".join(lines))
    return config


def read_config_file(path: str | Path) -> dict:
    """The settings of one YAML config file; an unreadable, malformed, empty or non-mapping file is a
    ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config file as UTF-8") from None
    try:
        data = strict_yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (expected a mapping of settings)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config, merge ``overrides`` (nested dicts), fill defaults and validate."""
    data = read_config_file(path)
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
