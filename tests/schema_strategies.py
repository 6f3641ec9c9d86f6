"""Hypothesis strategies generated from a JSON Schema: the subset the service's OpenAPI document
uses (object, array, string with lengths and pattern, integer with bounds, enum, null, anyOf,
const). Written here because hypothesis-jsonschema relies on Hypothesis internals that its
current releases no longer have. A schema outside the subset raises, so a new field type is never
silently skipped."""

from hypothesis import strategies as st

_KEYS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
         "minLength", "maxLength", "pattern", "minimum", "maximum", "enum", "anyOf", "const", "default",
         "title", "description", "examples"}


def from_schema(schema: dict) -> st.SearchStrategy:
    unknown = set(schema) - _KEYS
    if unknown:
        raise NotImplementedError(f"schema keywords not covered: {sorted(unknown)}")
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if "pattern" in schema:
            base = st.from_regex(schema["pattern"], fullmatch=True)
            return base.filter(lambda s: len(s) >= lo and (hi is None or len(s) <= hi))
        return st.text(min_size=lo, max_size=hi)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems"))
    if kind == "object":
        if schema.get("additionalProperties", True) is not False:
            raise NotImplementedError("objects with additional properties")
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v) for k, v in props.items() if k not in required})
    raise NotImplementedError(f"schema type {kind!r}")
