"""A small name -> object registry with helpful errors, used for models, objectives, optimizers, attacks."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from dent.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually factories).

    Lookup is case-insensitive; an unknown name raises :class:`UnknownNameError` listing the valid names
    and the closest matches.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._display: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(item: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = item
            self._display[key] = name
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise UnknownNameError(self.unknown_message(name))
        return self._items[key]

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid names: {', '.join(names)}"

    def canonical(self, name: str) -> str:
        """The name as registered (original case)."""
        self.get(name)
        return self._display[str(name).lower()]

    def names(self) -> list[str]:
        return [self._display[k] for k in self._items]

    def items(self) -> Iterator[tuple[str, T]]:
        for key, item in self._items.items():
            yield self._display[key], item

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __len__(self) -> int:
        return len(self._items)
