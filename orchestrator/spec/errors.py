"""A spec's validation errors as the user reads them: one line per error, `dotted.path: message`.

pydantic's raw locations carry discriminator tags and its messages name types; these helpers turn them into the
path the user typed, the names allowed where a key is unknown, and the offending value where it is safe to echo
(never under a key that may hold a credential).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from trainers.registry import METHOD_REGISTRY

# Keys whose values are credentials or may carry them; never recorded anywhere.
SECRET_KEY_PATTERN = re.compile(r"(secret|password|token|key|credential|session)", re.IGNORECASE)

# section -> {tag: model}: the sections discriminated on `name` (the backbone).
Tagged = dict[str, dict[str, type[BaseModel]]]


def _user_location(loc: tuple[Any, ...], tagged: Tagged) -> tuple[Any, ...]:
    """Sections discriminated on `name`: pydantic puts the tag in the error location; the user's path has none."""
    if len(loc) >= 2 and loc[0] in tagged and loc[1] in tagged[loc[0]]:
        return (loc[0], *loc[2:])
    return loc


def _format_location(loc: tuple[Any, ...]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(spec)"


def _fields_of(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _unknown_field_message(loc: tuple[Any, ...], root: type[BaseModel], tagged: Tagged) -> str:
    """What to say about an unknown key at `loc` (pydantic's location, tags included): the names allowed there."""
    parent = loc[:-1]
    if parent == ("methods",):
        return f"unknown method; known: {', '.join(METHOD_REGISTRY.names)}"
    if len(parent) == 2 and parent[0] == "methods" and parent[1] in METHOD_REGISTRY:
        return f"unknown option of {parent[1]}; allowed: {', '.join(METHOD_REGISTRY[parent[1]].option_names())}"
    model: Any = root
    if len(parent) >= 2 and parent[0] in tagged and parent[1] in tagged[parent[0]]:
        model, parent = tagged[parent[0]][parent[1]], parent[2:]
    for part in parent:
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        annotation = fields[part].annotation if part in fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            model = None
            break
        model = annotation
    if model is None:
        return "unknown field (check the spelling; see examples/quickstart.yaml)"
    return f"unknown field; allowed: {', '.join(_fields_of(model))} (check the spelling)"


def _shows_input(err: Any) -> bool:
    """Echo the offending value when it is a short scalar and its field cannot hold a credential."""
    value, loc = err.get("input"), err["loc"]
    if not isinstance(value, (str, int, float)) or len(repr(value)) > 60:
        return False
    return not any(SECRET_KEY_PATTERN.search(str(part)) for part in loc)


# "backbone.patch_size: ..." from a model validator: report it at that field rather than at the spec.
_NAMED_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+): (.+)$", re.DOTALL)


def describe_validation_error(exc: ValidationError, root: type[BaseModel], tagged: Tagged) -> list[str]:
    """`path: message` per error of validating `root` (the Spec)."""
    lines = []
    for err in exc.errors():
        loc = _format_location(_user_location(tuple(err["loc"]), tagged))
        msg = err["msg"].removeprefix("Value error, ")
        named = _NAMED_MESSAGE.match(msg) if not err["loc"] else None
        if named:  # a check across sections whose message starts with the field it is about
            loc, msg = named.group(1), named.group(2)
        if err["type"] == "extra_forbidden":
            msg = _unknown_field_message(tuple(err["loc"]), root, tagged)
        elif err["type"] in ("model_type", "dict_type", "model_attributes_type"):
            msg = "expected a mapping of fields (key: value)"
        elif _shows_input(err):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{loc}: {msg}")
    return lines


__all__ = ["SECRET_KEY_PATTERN", "describe_validation_error"]
