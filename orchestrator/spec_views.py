"""The spec's `views` section: global and local (multi-crop) view sets and the augmentation preset.

Split from `orchestrator.spec` (which imports these into `Spec`); turned into the workers' ViewPlan by
`orchestrator.runner.spec_view_plan`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _AugmentSpec(_Strict):
    """Augmentation settings of a view set; None takes the value the preset gives each view."""

    flip_p: float | None = Field(None, ge=0, le=1, description="horizontal flip probability (preset: 0.5)")
    jitter_p: float | None = Field(None, ge=0, le=1, description="colour jitter probability (preset: 0.8)")
    brightness: float | None = Field(None, ge=0, description="jitter brightness strength (preset: 0.4)")
    contrast: float | None = Field(None, ge=0, description="jitter contrast strength (preset: 0.4)")
    saturation: float | None = Field(None, ge=0, description="jitter saturation strength (preset: 0.2)")
    hue: float | None = Field(None, ge=0, le=0.5, description="jitter hue strength, in turns (preset: 0.1)")
    gray_p: float | None = Field(None, ge=0, le=1, description="grayscale probability (preset: 0.2)")
    blur_p: float | None = Field(None, ge=0, le=1, description="gaussian blur probability (symmetric: 0.5; byol: "
                                                                 "1.0 and 0.1)")
    solarize_p: float | None = Field(None, ge=0, le=1, description="solarize probability (symmetric: 0.2; byol: "
                                                                     "0.0 and 0.2)")

    @field_validator("scale", check_fields=False)
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(value)}")
        return value

    def augment_options(self) -> dict[str, Any]:
        return self.model_dump(include=set(_AugmentSpec.model_fields), exclude_none=True)


class ViewSpec(_AugmentSpec):
    count: int = Field(2, ge=1, le=16, description="global views per image")
    size: int | None = Field(None, ge=8, description="output side; default data.image_size")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop area range")


class LocalViewSpec(_AugmentSpec):
    count: int = Field(0, ge=0, le=16, description="local (multi-crop) views per image; SwAV and DINO need some")
    size: int | None = Field(None, ge=8, description="output side; default 3/7 of the global size (96 at 224)")
    scale: tuple[float, float] = Field((0.05, 0.14), description="random resized crop area range")
    methods: list[str] | None = Field(
        None, description="the methods whose lines get the local views (default: every line); lets one spec train "
                          "multi-crop methods (SwAV, DINO) beside two-view ones",
    )


class ViewsSpec(_Strict):
    preset: Literal["symmetric", "byol"] = Field(
        "symmetric", description="augmentation preset: symmetric (every view alike: crop, flip 0.5, jitter 0.8, "
                                 "gray 0.2, blur 0.5, solarize 0.2) or byol (BYOL's asymmetric pair)",
    )
    global_: ViewSpec = Field(default_factory=ViewSpec, alias="global", description="global views (all methods)")
    local: LocalViewSpec = Field(default_factory=LocalViewSpec, description="local multi-crop views")


__all__ = ["LocalViewSpec", "ViewSpec", "ViewsSpec"]
