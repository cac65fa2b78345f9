"""What every spec section shares: unknown keys are errors, a validated section is frozen."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def none_is_empty(value: Any) -> Any:
    """`methods: {simclr: }` in YAML means "simclr with its defaults"."""
    return {} if value is None else value
