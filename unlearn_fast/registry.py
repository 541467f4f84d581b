"""A named table of callables with documented defaults.

The method registry, the metric registry, the dataset table and the model zoo are each one
instance of :class:`Registry`, so that lookup, listing and the error for an unknown name
behave the same everywhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered callable, its defaults and a one-line description."""

    name: str
    fn: F
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    check: Callable[[dict[str, Any]], None] | None = None  # raises on bad option values (all resolved)


def summary_line(doc: str) -> str:
    """A docstring's first paragraph as one line, without reST literal markup: the description that
    listings show, never cut mid-sentence."""
    paragraph = doc.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split()).replace("``", "")


class Registry(Generic[F]):
    """Name → callable table. ``kind`` names what it holds, for error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, *, description: str = "", check: Callable[[dict[str, Any]], None] | None = None,
                 **defaults: Any) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name`` with keyword ``defaults``; ``check(options)``, if
        given, validates the values of a full set of options (defaults updated by the caller's) and raises."""

        def decorate(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = description or summary_line(inspect.getdoc(fn) or "")
            self._entries[name] = Entry(name, fn, dict(defaults), doc, check)
            return fn

        return decorate

    def get(self, name: str) -> Entry[F]:
        """The entry for ``name``; a ValueError listing the valid names otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def resolve_hyper(self, name: str, hyper: dict[str, Any]) -> dict[str, Any]:
        """Defaults of ``name`` updated by ``hyper``; unknown keys raise, naming the valid ones, and so
        do bad values where the entry has a ``check``."""
        entry = self.get(name)
        unknown = sorted(set(hyper) - set(entry.defaults))
        if unknown:
            valid = ", ".join(sorted(entry.defaults)) or "(none)"
            raise ValueError(f"{self.kind} {name!r} got unknown option(s) {unknown}; valid options: {valid}")
        resolved = {**entry.defaults, **hyper}
        if entry.check is not None:
            entry.check(resolved)
        return resolved

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
