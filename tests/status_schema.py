"""A small JSON Schema checker for the keywords labvm's status schema uses.

Driven by labvm/schema/status.schema.json itself, so the tests hold the documented schema to
the output. A keyword it does not know is an error, never silently skipped: a schema using one
would otherwise look enforced when it is not.
"""

from __future__ import annotations

import re

ANNOTATIONS = {"$schema", "$id", "title", "description"}
CHECKED = {"$ref", "type", "const", "enum", "required", "properties", "additionalProperties", "items", "minimum", "pattern",
           "oneOf", "$defs"}

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


class SchemaError(AssertionError):
    pass


def validate(document, schema: dict) -> None:
    """Raise SchemaError naming the first place where document breaks schema."""
    errors = list(_errors(document, schema, schema, "$"))
    if errors:
        raise SchemaError("; ".join(errors[:5]))


def _resolve(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $refs are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _errors(value, schema: dict, root: dict, where: str):
    unknown = set(schema) - ANNOTATIONS - CHECKED
    if unknown:
        raise SchemaError(f"schema keyword(s) {sorted(unknown)} at {where} are not supported by this checker")
    if "$ref" in schema:
        yield from _errors(value, _resolve(root, schema["$ref"]), root, where)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not list(_errors(value, s, root, where))]
        if len(matching) != 1:
            yield f"{where}: matches {len(matching)} of the oneOf schemas, not exactly one"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[t](value) for t in types):
            yield f"{where}: {value!r:.60} is not of type {'/'.join(types)}"
            return
    if "const" in schema and value != schema["const"]:
        yield f"{where}: {value!r:.60} is not {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r:.60} is not one of {schema['enum']}"
    if "minimum" in schema and TYPES["number"](value) and value < schema["minimum"]:
        yield f"{where}: {value} is below {schema['minimum']}"
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        yield f"{where}: {value!r:.60} does not match {schema['pattern']!r}"
    if isinstance(value, dict):
        yield from _object_errors(value, schema, root, where)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _errors(item, schema["items"], root, f"{where}[{i}]")


def _object_errors(value: dict, schema: dict, root: dict, where: str):
    for key in schema.get("required", []):
        if key not in value:
            yield f"{where}: missing {key!r}"
    properties = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        for key in value:
            if key not in properties:
                yield f"{where}: unexpected {key!r}"
    for key, sub in properties.items():
        if key in value:
            yield from _errors(value[key], sub, root, f"{where}.{key}")
