"""Named variants in one table each: TTA transforms, view reducers, ensemble rules, CAM methods.

A :class:`Registry` records each variant once, with a one-line description and
whatever the callers need to know about it (a TTA transform's view count). The
command line's choices and ``--help`` texts, the checks that refuse an unknown
name, and the lookups all read that table, so adding a variant is adding one
decorated function. Modules holding a registry import no TensorFlow (``--help``
reads them); their functions import it when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cvtool.errors import UsageError


@dataclass(frozen=True)
class Entry:
    """One registered variant: its name, what it does (one line), the function and extra facts about it."""

    name: str
    func: Callable
    help: str
    info: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A table of named variants of one kind, filled by a decorator (the way timm registers models).

    Args:
        option: the option that chooses among them, for error messages (e.g. ``"--method"``).

    Example::

        METHODS = Registry("--method")

        @METHODS.register("gradcam", help="channel weights: mean gradient")
        def gradcam_weights(acts, grads): ...

        METHODS.get("gradcam")  # the function; an unknown name is a usage error listing the choices
    """

    def __init__(self, option: str):
        self.option = option
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}  # alias -> name

    def register(
        self, name: str, *, help: str, aliases: tuple[str, ...] = (), **info: Any
    ) -> Callable[[Callable], Callable]:
        """Decorator: record the function under ``name`` with its one-line ``help`` and extra ``info``.

        Args:
            name: the name given on the command line.
            help: what the variant does, shown in ``--help``.
            aliases: older names that still select it (shown in ``--help``; the entry keeps ``name``).
            **info: facts callers need (e.g. ``views=`` for TTA transforms).

        Example: ``@RULES.register("mean", help="arithmetic mean")``.
        """

        def add(func: Callable) -> Callable:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.option} {key!r} is registered twice")
            self._entries[name] = Entry(name, func, help, {**info, "aliases": tuple(aliases)})
            self._aliases.update(dict.fromkeys(aliases, name))
            return func

        return add

    def entry(self, name: str) -> Entry:
        """The entry called ``name`` (or an alias of it); an unknown name is a
        :class:`~cvtool.errors.UsageError` listing the choices."""
        try:
            return self._entries[self._aliases.get(name, name)]
        except KeyError:
            raise UsageError(f"unknown {self.option} {name!r}; choose from {', '.join(self._entries)}") from None

    def get(self, name: str) -> Callable:
        """The function registered as ``name`` (see :meth:`entry`)."""
        return self.entry(name).func

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def choices(self) -> str:
        """The names as a sentence: ``"a, b or c"``."""
        names = self.names()
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def described(self) -> str:
        """Each name with its help: ``"a (does x), b (does y)"``, for ``--help``."""
        return ", ".join(_described(e) for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _described(e: Entry) -> str:
    aliases = e.info.get("aliases") or ()
    notes = [*(f"alias {a}" for a in aliases), *([e.help] if e.help else [])]
    return f"{e.name} ({'; '.join(notes)})" if notes else e.name
