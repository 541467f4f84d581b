"""A named table of callables with documented defaults.

The method registry, the metric registry, the dataset table and the model zoo are each one
instance of :class:`Registry`, so that lookup, listing and the error for an unknown name
behave the same everywhere. Facts about an entry that are not options of its call (a metric's
"which value is best", whether it runs by default) live on the entry too, in ``Entry.meta``: a
registry declares which facts its entries carry, with their defaults, so that no side table
elsewhere has to repeat the entries' names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered callable, its defaults, a one-line description and its facts (``meta``)."""

    name: str
    fn: F
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    check: Callable[[dict[str, Any]], None] | None = None  # raises on bad option values (all resolved)
    meta: dict[str, Any] = field(default_factory=dict)  # every fact the registry declares, none missing


def summary_line(doc: str) -> str:
    """A docstring's first paragraph as one line, without reST literal markup: the description that
    listings show, never cut mid-sentence."""
    paragraph = doc.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split()).replace("``", "")


class Registry(Generic[F]):
    """Name → callable table. ``kind`` names what it holds, for error messages.

    ``meta``: the facts each entry carries besides its call options, with their defaults;
    ``check_meta(name, facts)``, if given, raises on a bad value of an entry's full set of facts.
    """

    def __init__(self, kind: str, meta: Mapping[str, Any] | None = None,
                 check_meta: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.kind = kind
        self.meta_defaults = dict(meta or {})
        self._check_meta = check_meta
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, *, description: str = "", check: Callable[[dict[str, Any]], None] | None = None,
                 meta: Mapping[str, Any] | None = None, **defaults: Any) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name`` with keyword ``defaults``; ``check(options)``, if
        given, validates the values of a full set of options (defaults updated by the caller's) and raises.
        ``meta`` sets facts the registry declares (the others keep their defaults); an undeclared one raises."""
        unknown = sorted(set(meta or {}) - set(self.meta_defaults))
        if unknown:
            valid = ", ".join(self.meta_defaults) or "(none)"
            raise ValueError(f"{self.kind} {name!r}: unknown fact(s) {unknown} in meta; valid: {valid}")
        facts = {**self.meta_defaults, **(meta or {})}
        if self._check_meta is not None:
            self._check_meta(name, facts)

        def decorate(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = description or summary_line(inspect.getdoc(fn) or "")
            self._entries[name] = Entry(name, fn, dict(defaults), doc, check, facts)
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
