"""The JSON schema of the constrained-decoding figure, and the checks that
the server really applied it.

A server that does not know the request's `json_schema` field (an older
build) would answer unconstrained and look as fast as ever; so the figure is
kept only when the answer is JSON: a complete answer must parse and match the
schema, and an answer cut by max_tokens must be the beginning of a JSON value.
"""

import json
import re

# A triage note: a few string, integer and enum fields, then a long list of
# findings, so that 128 tokens end inside the list rather than at the end.
# Bounded lengths and values, so that a random model's answer moves through
# every field rather than spending its tokens on the digits of one number.
SCHEMA = {
    "type": "object",
    "properties": {
        "patient_id": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "triage": {"enum": ["red", "orange", "yellow", "green", "blue"]},
        "ward": {"type": "string", "maxLength": 24},
        "findings": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64},
    },
    "required": ["patient_id", "age", "triage", "ward", "findings"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)


def check_answer(text, finish_reason):
    """None when `text` is what the constraint allows, else why not."""
    if finish_reason == "stop":
        try:
            value = json.loads(text)
        except ValueError as error:
            return f"the complete answer is not JSON ({error})"
        return schema_error(value, SCHEMA)
    if not text.lstrip().startswith("{"):
        return "the answer does not start a JSON object"
    return None if is_json_prefix(text) else "the answer is not the beginning of a JSON value"


def schema_error(value, schema, where="$"):
    """Checks the keywords SCHEMA uses; None when `value` matches."""
    if "enum" in schema:
        return None if value in schema["enum"] else f"{where}: {value!r} not in the enum"
    kind = schema["type"]
    if kind == "string":
        if not isinstance(value, str) or len(value) > schema.get("maxLength", len(value)):
            return f"{where}: not a string of at most {schema.get('maxLength')} characters"
    elif kind == "integer":
        low, high = schema.get("minimum", value), schema.get("maximum", value)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{where}: not an integer from {schema.get('minimum')} to {schema.get('maximum')}"
    elif kind == "array":
        if not isinstance(value, list) or len(value) < schema.get("minItems", 0):
            return f"{where}: not an array of at least {schema.get('minItems')} items"
        for index, item in enumerate(value):
            error = schema_error(item, schema["items"], f"{where}[{index}]")
            if error:
                return error
    elif kind == "object":
        if not isinstance(value, dict):
            return f"{where}: not an object"
        missing = set(schema["required"]) - set(value)
        extra = set(value) - set(schema["properties"])
        if missing or extra:
            return f"{where}: missing {sorted(missing)}, unexpected {sorted(extra)}"
        for key, item in value.items():
            error = schema_error(item, schema["properties"][key], f"{where}.{key}")
            if error:
                return error
    return None


NUMBER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?")
LITERALS = ("true", "false", "null")


def is_json_prefix(text):
    """Whether some text can follow `text` to make one JSON value."""
    stack = []            # "{" or "[" of the open containers
    expect = "value"      # value, value_or_end, key, key_or_end, colon, comma_or_end, done
    index = 0
    while index < len(text):
        char = text[index]
        if char in " \t\r\n":
            index += 1
            continue
        if expect in ("value", "value_or_end"):
            if char == "]" and expect == "value_or_end":
                stack.pop()
                expect, index = after_value(stack), index + 1
                continue
            if char in "{[":
                stack.append(char)
                expect, index = ("key_or_end" if char == "{" else "value_or_end"), index + 1
                continue
            end = scan_scalar(text, index)
            if end is None:
                return False
            if end == len(text):
                return True  # cut inside a string, number or literal
            expect, index = after_value(stack), end
            continue
        if expect in ("key", "key_or_end"):
            if char == "}" and expect == "key_or_end":
                stack.pop()
                expect, index = after_value(stack), index + 1
                continue
            if char != '"':
                return False
            end = scan_string(text, index)
            if end is None:
                return False
            if end == len(text):
                return True
            expect, index = "colon", end
            continue
        if expect == "colon":
            if char != ":":
                return False
            expect, index = "value", index + 1
            continue
        if expect == "comma_or_end":
            if char == ",":
                expect = "key" if stack[-1] == "{" else "value"
            elif char == ("}" if stack[-1] == "{" else "]"):
                stack.pop()
                expect = after_value(stack)
            else:
                return False
            index += 1
            continue
        return False  # something after a complete value
    return True


def after_value(stack):
    return "comma_or_end" if stack else "done"


def scan_scalar(text, start):
    """End of the string, number or literal at `start` (len(text) if cut off), or None."""
    char = text[start]
    if char == '"':
        return scan_string(text, start)
    if char == "-" or char.isdigit():
        end = NUMBER_PREFIX.match(text, start).end()
        return end if end > start else None
    for literal in LITERALS:
        piece = text[start:start + len(literal)]
        if piece and literal.startswith(piece):
            return start + len(piece)
    return None


def scan_string(text, start):
    """End (after the closing quote) of the string at `start`, len(text) if cut off, or None."""
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        if ord(char) < 0x20:
            return None
        index += 1
    return len(text)
