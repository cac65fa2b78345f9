"""The base of every component's `Config`: the typed options a method, backbone or strategy accepts.

A component declares its options once, as a pydantic model next to its code; its constructor takes its defaults
from that model and validates through it, and the spec validates the YAML against the same model (see
`trainers.registry`), so the defaults, the bounds and the error messages cannot drift apart.

    class SimCLRConfig(ComponentConfig):
        temperature: float = Field(0.1, gt=0, allow_inf_nan=False, description="NT-Xent temperature")

    cfg = SimCLRConfig.parse("SimCLR", temperature=0.2)    # ValueError naming the option on bad input

Options are strict: a string where a number is expected is an error (never coerced); an int where a float is
expected is accepted and stored as a float; a bool is never taken for a number.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError


class ComponentConfig(BaseModel):
    """Frozen, strict, no unknown options."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def parse(cls, owner: str, **options: Any) -> Self:
        """Validate `options` (defaults filled in); a `ValueError` naming each bad option and `owner` otherwise."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise ValueError(f"{owner}: {describe_errors(exc, cls)}") from None


def describe_errors(exc: ValidationError, config: type[BaseModel]) -> str:
    """One line per error: `option: message (got value)`; unknown options list the allowed names."""
    allowed = ", ".join(config.model_fields)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown option; allowed: {allowed}")
        elif err["loc"]:
            parts.append(f"{where}: {err['msg']} (got {err['input']!r})")
        else:  # a check across options (a model validator): its own message says which
            parts.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


__all__ = ["ComponentConfig", "describe_errors"]
