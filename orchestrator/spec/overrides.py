"""`--set key=value` overrides of a spec's plain data (before validation): `apply_overrides(raw, ["optim.lr=0.1"])`."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from orchestrator.errors import SpecError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.1' -> (['optim', 'lr'], 0.1); the value is read as YAML so lists and numbers work."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected key=value, e.g. optim.lr=0.1")
    key, raw_value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise SpecError(f"--set {text!r}: {key!r} is not a dotted field path")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out
