"""Reading a config file with errors that name the file, the line and the column (`e1 check-config`; the
Snakefile checks config.yaml this way before Snakemake reads it). No torch import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def load_config_file(path: str | Path) -> Any:
    """The YAML (or JSON) content of `path`; a ValueError names the file, line and column of the fault."""
    import yaml  # snakemake's own dependency

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"config file {p}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"config file {p}: not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {col}; "
                         "save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ValueError(f"config file {p}: not valid YAML at {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p}: not valid YAML: {e}") from None


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _allows(schema: dict[str, Any], kind: str, root: dict[str, Any]) -> bool:
    schema = _resolve(schema, root)
    if kind == "integer" and isinstance(schema.get("const"), int):
        return True
    t = schema.get("type")
    return t == kind or (isinstance(t, list) and kind in t) or any(_allows(s, kind, root) for s in schema.get("oneOf", []))


def _coerce(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    schema = _resolve(schema, root)
    if isinstance(value, str):
        if _allows(schema, "integer", root) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            return int(value)
        if _allows(schema, "null", root) and value.strip().lower() in ("null", "none", "~"):
            return None
        return value
    if isinstance(value, list):
        items = [s["items"] for s in (schema, *schema.get("oneOf", [])) if "items" in s]
        return [_coerce(v, items[0], root) for v in value] if items else value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            value[k] = _coerce(v, props.get(k, extra if isinstance(extra, dict) else {}), root)
    return value


def coerce_strings(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Turn the strings `snakemake --config` gives list items and nulls (e.g. decode_tokens=[16] -> ['16'])
    into the integers and nulls the schema asks for, in place; other values are left for validation."""
    return _coerce(config, schema, schema)
