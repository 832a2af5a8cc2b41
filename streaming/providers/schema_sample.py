"""A value that satisfies a JSON Schema, made deterministically: the demo model's tool arguments.

Covers what function tools use: `type` (string, number, integer, boolean, array, object, null,
or a list of them), `enum`, `const`, `anyOf`/`oneOf`/`allOf` (the first branch; allOf merged),
`properties` and `required` (nested), `items`, `minItems`, string lengths and a few `format`s,
number bounds and `multipleOf`, and local `$ref`s (`#/$defs/...`). Every declared property is
filled, required or not; a schema it cannot satisfy otherwise gets its best guess.
"""

from __future__ import annotations

import math

FORMATS = {"date": "2026-01-01", "date-time": "2026-01-01T00:00:00Z", "time": "00:00:00Z",
           "email": "demo@example.com", "uri": "https://example.com/", "uuid": "00000000-0000-4000-8000-000000000000"}


def sample(schema: object, name: str = "value", root: dict | None = None) -> object:
    """A value of `schema` (a property's `name` makes its strings readable)."""
    if not isinstance(schema, dict):
        return None
    root = root if root is not None else schema
    if isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        target: object = root
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return sample(target, name, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return sample(schema[key][0], name, root)
    if schema.get("allOf"):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged = {**merged, **part, "properties": {**merged.get("properties", {}), **part.get("properties", {})},
                      "required": [*merged.get("required", []), *part.get("required", [])]}
        return sample(merged, name, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return SAMPLERS.get(kind, lambda s, n, r: None)(schema, name, root)


def _object(schema: dict, name: str, root: dict) -> dict:
    properties = schema.get("properties") or {}
    value = {key: sample(sub, key, root) for key, sub in properties.items()}
    for key in schema.get("required") or ():
        value.setdefault(key, "sample")  # required but undeclared: any value does
    return value


def _array(schema: dict, name: str, root: dict) -> list:
    count = max(1, schema.get("minItems", 1))
    if "maxItems" in schema:
        count = min(count, schema["maxItems"])
    items = schema.get("items")
    if isinstance(schema.get("prefixItems"), list):
        return [sample(item, name, root) for item in schema["prefixItems"]]
    value = [sample(items, name, root) for _ in range(count)] if isinstance(items, dict) else ["sample"] * count
    if schema.get("uniqueItems") and len(value) > 1:
        value = value[:1]
    return value


def _string(schema: dict, name: str, root: dict) -> str:
    value = FORMATS.get(schema.get("format"), f"sample {name}")
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if len(value) < low:
        value += "x" * (low - len(value))
    return value if high is None else value[:high]


def _number(schema: dict, name: str, root: dict, integer: bool = False) -> int | float:
    """1 (1.5 for a number), or else the first multiple of `multipleOf` (or of 1 for an integer)
    within the bounds, or for a number the middle of them."""
    step = schema.get("multipleOf") or (1 if integer else None)
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    above, below = schema.get("exclusiveMinimum", -math.inf), schema.get("exclusiveMaximum", math.inf)
    if isinstance(above, bool):  # draft 4: a flag on `minimum` and `maximum`
        above, low = (low, -math.inf) if above else (-math.inf, low)
    if isinstance(below, bool):
        below, high = (high, math.inf) if below else (math.inf, high)
    bottom, top = max(low, above), min(high, below)

    def fits(v: float) -> bool:
        return low <= v <= high and above < v < below

    value = step or 1.5
    if not fits(value) and step:
        value = (math.ceil(bottom / step) * step if bottom > -math.inf else math.floor(top / step) * step)
        value += step if value <= above else -step if value >= below else 0
    elif not fits(value):
        value = (bottom + top) / 2 if math.isfinite(bottom + top) else bottom + 1 if bottom > -math.inf else top - 1
    return int(value) if integer else float(value)


SAMPLERS = {
    "object": _object,
    "array": _array,
    "string": _string,
    "number": _number,
    "integer": lambda schema, name, root: _number(schema, name, root, integer=True),
    "boolean": lambda schema, name, root: True,
    "null": lambda schema, name, root: None,
}
