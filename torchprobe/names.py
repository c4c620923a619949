"""Module names as in ``named_modules()``, call keys, shared-module aliases, include/exclude filters.

A row key names one tensor leaf of one module call: ``blocks.0.attn#1:0`` is leaf ``0`` of the
second call of ``blocks.0.attn``; the first call has no ``#0`` and a lone tensor no ``:leaf``.

    >>> key = RowKey.parse("blocks.0.attn#1:0")
    >>> key.call, key.leaf, str(key.call), str(RowKey(CallKey("head"), "logits"))
    (CallKey(name='blocks.0.attn', index=1), '0', 'blocks.0.attn#1', 'head:logits')
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import nn

from .errors import InvalidArgument

ROOT = "(root)"

Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class CallKey:
    """One call of one module: ``name`` for the first call, ``name#k`` for call ``k``."""

    name: str
    index: int = 0

    def __str__(self) -> str:
        return self.name if self.index == 0 else f"{self.name}#{self.index}"

    @classmethod
    def parse(cls, text: str) -> "CallKey":
        name, sep, index = text.rpartition("#")
        if sep and index.isdigit():
            return cls(name, int(index))
        return cls(text, 0)


@dataclass(frozen=True)
class RowKey:
    """One tensor leaf of one module call: ``call`` alone for a lone tensor, else ``call:leaf``."""

    call: CallKey
    leaf: str = ""

    def __str__(self) -> str:
        return f"{self.call}:{self.leaf}" if self.leaf else str(self.call)

    @classmethod
    def parse(cls, text: str) -> "RowKey":
        call, _, leaf = text.partition(":")
        return cls(CallKey.parse(call), leaf)


def call_key_of(row_key: str) -> str:
    """The call part of a row key string: ``blocks.0#1:out`` -> ``blocks.0#1``."""
    return str(RowKey.parse(row_key).call)


@dataclass(frozen=True)
class ModuleName:
    """The canonical dotted name of a module and any other names it is registered under."""

    name: str
    aliases: tuple[str, ...] = ()


def module_names(model: nn.Module) -> dict[nn.Module, ModuleName]:
    """Canonical name of every module (first registration wins, root is ``(root)``) with aliases."""
    seen: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen.setdefault(module, []).append(name or ROOT)
    return {m: ModuleName(names[0], tuple(names[1:])) for m, names in seen.items()}


def _as_patterns(value: Patterns, argument: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    patterns = tuple(value)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise InvalidArgument(f"{argument}= takes glob strings such as 'encoder.*'; got {bad[0]!r}")
    return patterns


def name_filter(include: Patterns = None, exclude: Patterns = None) -> Callable[[str], bool]:
    """One predicate from include/exclude globs over qualified names (fnmatch syntax).

    A name passes when it matches any include glob (or no include is given) and no exclude glob.
    """
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")

    def keep(name: str) -> bool:
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exc)

    return keep


def is_within(name: str, ancestor: str) -> bool:
    """True when module ``name`` is ``ancestor`` or lies inside it (the root contains all)."""
    return ancestor == ROOT or name == ancestor or name.startswith(ancestor + ".")


def has_forward(module: nn.Module) -> bool:
    """False for pure containers (ModuleList, ModuleDict) that are never called themselves."""
    return type(module).forward is not nn.Module.forward


def outermost(names: Iterable[str]) -> list[str]:
    """The names not inside another of the names, sorted (the root contains every module)."""
    names = set(names)
    return sorted(n for n in names if not any(o != n and is_within(n, o) for o in names))


def innermost(names: Iterable[str]) -> list[str]:
    """The names with no other of the names inside them (the smallest modules), in given order."""
    names = list(dict.fromkeys(names))
    return [n for n in names if not any(o != n and is_within(o, n) for o in names)]


def leaf_names(model: nn.Module) -> list[str]:
    return [n.name for m, n in module_names(model).items() if not any(True for _ in m.children())]


def submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == ROOT else model.get_submodule(name)
