"""``config/README.md``, generated from the config schema: every setting with its type, default and
description (``make config-docs`` or ``cxrssl config-docs``; a test fails when the file is stale).

The schema (``src/cxrssl/schemas/config.schema.yaml``) stays the one place where settings are
defined; this page is its rendering for readers of the Snakemake workflow catalog.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from cxrssl.config import load_schema

HEADER = """\
# Configuration

<!-- Generated from src/cxrssl/schemas/config.schema.yaml by `make config-docs`
     (cxrssl.config_docs); do not edit by hand. -->

The workflow reads `config.yaml` (the demo: small sizes on synthetic data) at the top of the
repository; `config/full.yaml` is the full reproduction and `config/paper.yaml` the original
study's protocol. Pass another file with `snakemake --configfile config/full.yaml`. Every setting
below has a default (the paper's); a config file only names what it changes. The file is checked
against the schema before any job runs, and an unknown or mistyped key is an error that names it.

"""


def _type(prop: dict) -> str:
    kind = prop.get("type", "object" if "properties" in prop else "any")
    kinds = kind if isinstance(kind, list) else [kind]
    text = " or ".join(str(k) for k in kinds)
    if "items" in prop and isinstance(prop["items"], dict) and "type" in prop["items"]:
        text = f"{text} of {prop['items']['type']}"
    return text


def _constraints(prop: dict) -> str:
    parts = []
    if "enum" in prop:
        parts.append("one of " + ", ".join(f"`{v}`" for v in prop["enum"]))
    items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
    if "enum" in items:
        parts.append("items among " + ", ".join(f"`{v}`" for v in items["enum"]))
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
                      ("minItems", "items >="), ("maxItems", "items <="), ("minLength", "length >=")):
        if key in prop:
            parts.append(f"{sign} {prop[key]}")
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if key in items:
            parts.append(f"each {sign} {items[key]}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(prop: dict) -> str:
    if "default" not in prop:
        return "(required)"
    value = prop["default"]
    if isinstance(value, dict) and value == {} and "properties" in prop:
        return "(the settings below)"
    return f"`{json.dumps(value)}`"


def _settings(props: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    for name, prop in props.items():
        key = f"{prefix}{name}"
        yield key, prop
        if isinstance(prop, dict) and "properties" in prop:
            yield from _settings(prop["properties"], key + ".")


def render(schema: dict | None = None) -> str:
    """The Markdown page: one section per top-level block, one table row per setting."""
    schema = schema or load_schema()
    lines = [HEADER.rstrip("\n"), "", _cell(schema.get("description", "")), ""]
    top = schema["properties"]
    plain = {k: v for k, v in top.items() if "properties" not in v}
    blocks = {k: v for k, v in top.items() if "properties" in v}
    table = ["| setting | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]

    def rows(items) -> list[str]:
        return [f"| `{key}` | {_type(p)} | {_cell(_default(p))} | {_cell(_constraints(p))} | "
                f"{_cell(p.get('description', ''))} |" for key, p in items]

    lines += ["## Top-level settings", "", *table, *rows(plain.items()), ""]
    for name, block in blocks.items():
        lines += [f"## `{name}`", "", _cell(block.get("description", f"The `{name}` settings.")), "", *table,
                  *rows(list(_settings(block["properties"], name + "."))), ""]
    return "\n".join(lines)


def undocumented(schema: dict | None = None) -> list[str]:
    """Settings (leaves: not blocks of settings) of the schema without a description (there must be none)."""
    schema = schema or load_schema()
    return [key for key, prop in _settings(schema["properties"])
            if "properties" not in prop and not prop.get("description")]


def default_path() -> Path:
    """``config/README.md`` of the source checkout."""
    return Path(__file__).resolve().parents[2] / "config" / "README.md"


def main(argv: list[str] | None = None) -> int:
    from cxrssl.io import atomic_write_text

    parser = argparse.ArgumentParser(prog="cxrssl config-docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_path()), help="Page to write (default: config/README.md).")
    parser.add_argument("--check", action="store_true", help="Only check that the page is up to date (exit 1 if not).")
    args = parser.parse_args(argv)
    text, out = render(), Path(args.out)
    if args.check:
        current = out.read_text() if out.is_file() else ""
        if current != text:
            print(f"{out} is out of date with the config schema: run `make config-docs`")
            return 1
        return 0
    atomic_write_text(text, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
