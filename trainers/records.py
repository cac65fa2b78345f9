"""`Record` and `Registry`: the types the component registries are made of, without torch.

`trainers.registry` fills them with every method, backbone and strategy, and so imports every model. Code that only
needs the types (the stream plan's registry, which Ray Data's split coordinator and read tasks unpickle with every
chunk's dataset) imports them from here: importing torch and torchvision there cost ~5 s a chunk on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from trainers.config import ComponentConfig


@dataclass(frozen=True)
class Record:
    """A component: `build(**options)` (methods: `build(backbone, **options)`) with options from `config`.

    Attributes:
        name: the name the spec uses.
        build: the class or builder function.
        config: the `ComponentConfig` subclass listing every option.
        needs_labels: trains on labels (the supervised baseline, replay with labels); the data must have them.
        needs_local_views: consumes the small multi-crop views besides the global ones (SwAV, DINO).
        weights_local_views: weighs its local-view terms by `ViewSet.local_weight` (`views.local.loss_weight`).
        min_global_views: global views per image the component needs in every batch.
        summary: one line for listings and help.
        slimmable: a backbone that runs at any width in [0.25, 1.0] (`trainers.backbones.slimmable`); a method
            that needs one (US3L). `check_backbone_for_method` refuses a slimmable method on another backbone.
    """

    name: str
    build: Callable[..., Any]
    config: type[ComponentConfig]
    needs_labels: bool = False
    needs_local_views: bool = False
    weights_local_views: bool = False
    min_global_views: int = 1
    summary: str = ""
    slimmable: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.config, type) and issubclass(self.config, ComponentConfig)):
            raise TypeError(f"record {self.name!r}: config must be a ComponentConfig subclass, got {self.config!r}")

    def defaults(self) -> dict[str, Any]:
        """Every option at its default, as plain data."""
        return self.config().model_dump()

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`given` validated by `config`, defaults filled in, as plain keyword arguments for `build`."""
        return self.config.parse(self.name, **dict(given or {})).model_dump()

    def option_names(self) -> tuple[str, ...]:
        return self.config.option_names()


class Registry(Mapping[str, Record]):
    """Records of one kind of component by name, in declaration order; read-only."""

    def __init__(self, kind: str, records: Iterable[Record]) -> None:
        self.kind = kind
        self._records: dict[str, Record] = {}
        for record in records:
            if record.name in self._records:
                raise ValueError(f"duplicate {kind} record {record.name!r}")
            self._records[record.name] = record

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._records)

    def __getitem__(self, name: str) -> Record:
        try:
            return self._records[name]
        except (KeyError, TypeError):
            raise KeyError(self.unknown(name)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._records)})"

    def unknown(self, name: Any) -> str:
        """The message for a name that has no record."""
        return f"unknown {self.kind} {name!r}; known: {', '.join(self._records)}"

    def require(self, name: str) -> Record:
        """The record `name`, or a ValueError listing the known names."""
        if not isinstance(name, str) or name not in self._records:
            raise ValueError(self.unknown(name))
        return self._records[name]

    def builders(self) -> Mapping[str, Callable[..., Any]]:
        """name -> class or builder, read-only (what `METHODS` and friends used to be)."""
        return MappingProxyType({name: record.build for name, record in self._records.items()})
