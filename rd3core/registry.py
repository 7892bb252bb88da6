"""One small registry type, used for every named concept (datasets, models,
synthesis methods, presets, losses). timm-style: ``@REG.register("name")`` fills
it, ``REG.get(name)`` builds from it, ``REG.names()`` feeds the CLI and
parametrised tests."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name that no registry entry (or resolver) knows; the message lists the
    close matches so a typo in a study file is easy to fix."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        # Resolvers handle open-ended families such as "timm/<name>" that cannot
        # be enumerated up front; each returns None when the name is not theirs.
        self._resolvers: list[Callable[[str], T | None]] = []
        # Per-family messages for a name a resolver's family does not know
        # ("timm/<typo>"): the registry's own list would not show the family's names.
        self._hints: list[Callable[[str], str | None]] = []

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = obj

    def add_resolver(self, resolver: Callable[[str], T | None],
                     hint: Callable[[str], str | None] | None = None) -> None:
        self._resolvers.append(resolver)
        if hint is not None:
            self._hints.append(hint)

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        for resolve in self._resolvers:
            found = resolve(name)
            if found is not None:
                return found
        raise UnknownName(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        for hint in self._hints:
            text = hint(str(name))
            if text:
                return f"unknown {self.kind} {name!r}: {text}"
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownName:
            return False
        return True

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
