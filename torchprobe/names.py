"""Module names as in ``named_modules()``, shared-module aliases, include/exclude filters."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import nn

from .errors import InvalidArgument

ROOT = "(root)"

Patterns = str | Sequence[str] | None


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


def leaf_names(model: nn.Module) -> list[str]:
    return [n.name for m, n in module_names(model).items() if not any(True for _ in m.children())]


def unknown_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    known = {alias for n in module_names(model).values() for alias in (n.name, *n.aliases)}
    return [n for n in names if n not in known]


def submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == ROOT else model.get_submodule(name)
