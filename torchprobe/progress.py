"""Progress bars for torchprobe's long loops, shown only when a person is watching.

``progress(iterable)`` wraps a loop in a tqdm bar when tqdm is installed, stderr is a terminal and
progress is not silenced; otherwise it yields the same items silently and logs each step at DEBUG
on this module's logger. tqdm is imported here and nowhere else.

Silencing is a context-managed setting, not a global flag left set forever: ``with quiet(): ...``
holds for the code (and the threads/tasks started with a copy of the context) inside the block,
and is undone on exit, errors included. ``torchprobe <command> --quiet`` runs the command inside it.

    >>> from torchprobe.progress import progress, quiet
    >>> for target in progress(targets, desc="propagated passes"):
    ...     run(target)
    >>> with quiet():                       # no bars in here, whatever the terminal
    ...     tp.bisect(model, x, target="strict:fp16")
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "quiet", "is_quiet"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("torchprobe_progress_quiet", default=False)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence (``enabled=True``) or re-allow (``False``) progress bars inside the block.

    Nests: the previous setting comes back when the block exits, however it exits.
    """
    token = _QUIET.set(bool(enabled))
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet() -> bool:
    """True inside ``quiet()``."""
    return _QUIET.get()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "torchprobe",
    enabled: bool | None = None,
) -> Iterator[T]:
    """Yield the items of ``iterable``, with a progress bar on stderr when one is wanted.

    ``enabled=None`` (the default) shows a bar when tqdm is installed, stderr is a TTY and no
    ``quiet()`` block is active; ``True`` shows one whenever tqdm is installed (``quiet()`` still
    wins); ``False`` never does. ``total`` defaults to ``len(iterable)`` where that exists.
    Without a bar each step is logged at DEBUG as ``desc: i/total``.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar_class = _tqdm() if _wants_bar(enabled) else None
    if bar_class is None:
        return _silent(iterable, total, desc)
    return _with_bar(bar_class, iterable, total, desc)


def _wants_bar(enabled: bool | None) -> bool:
    if enabled is False or is_quiet():
        return False
    if enabled is True:
        return True
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _tqdm() -> type | None:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.debug("tqdm is not installed; progress is logged at DEBUG only (pip install tqdm)")
        return None
    return tqdm


def _silent(iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    of = f"/{total}" if total is not None else ""
    debug = log.isEnabledFor(logging.DEBUG)
    for i, item in enumerate(iterable, 1):
        if debug:
            log.debug("%s: %d%s", desc, i, of)
        yield item


def _with_bar(bar_class: type, iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    bar = bar_class(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield from bar
    finally:  # a loop left early (break, exception) still clears its bar
        bar.close()
