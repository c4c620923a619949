"""Atomic file writes: a temp file beside the target, fsync, then rename over the target.

Every write goes through a private temp *folder* next to the target, named with one pattern::

    .<name>.torchprobe-tmp-<host>-<pid>-<random>/<name>

The writer gets ``<folder>/<name>`` to write; on success it is renamed over the target and the
folder removed. Writers that make temp files of their own beside the path they are given
(safetensors' ``save_file`` writes a ``.tmpXXXXXX`` there, then renames it) keep them inside the
folder, so nothing else is ever left next to the target.

- An interrupted or failed write (KeyboardInterrupt included) removes the folder and leaves any
  existing file at the path as it was.
- SIGTERM is handled like SIGINT while a write runs in the main thread and SIGTERM has its
  default action: the folder is removed, the previous handler restored, and the signal raised
  again, so the process still ends as SIGTERM ends it. An application's own SIGTERM handler (or
  ``SIG_IGN``) is left alone; a write in another thread cannot install one.
- A killed writer (SIGKILL, power loss) leaves its folder; the next write of the same target
  removes it once its writer is provably dead (same host, process gone) or the folder has not
  changed for :data:`STALE_AFTER_S` seconds. Folders of live writers, including concurrent
  writes of the same target, are never touched; the last rename wins.
- The new file gets the mode a plain ``open(path, "w")`` would give it (a temp file would be
  0o600), or the mode of the file it replaces.

>>> from torchprobe.io.atomic import write_text
>>> write_text("notes.txt", "kept in FP32: encoder.layers.1.norm2\\n")
PosixPath('notes.txt')
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

TEMP_MARK = ".torchprobe-tmp-"
STALE_AFTER_S = 24 * 3600.0  # a temp folder of a writer not provably dead is stale after a day unchanged
_MAX_NAME = 200  # bytes of the target's name kept in the temp folder's name (a name is at most 255)

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
_ours: set[str] = set()  # temp folders this process has open (a restarted container reuses its PID)
_ours_lock = threading.Lock()


class _Terminated(BaseException):
    """Raised by the SIGTERM handler inside a write, so the write cleans up like on Ctrl-C."""


def _stem(name: str) -> str:
    if len(name.encode("utf-8", "surrogateescape")) <= _MAX_NAME:
        return name
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(_stem(name))}{re.escape(TEMP_MARK)}(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]+")


def temp_name(name: str) -> str:
    """A fresh temp folder name for target file ``name`` (``.<name>.torchprobe-tmp-<host>-<pid>-<hex>``)."""
    return f".{_stem(name)}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:  # best effort: not every platform can open a directory
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove temporary folder %s: %s", path, e)


def _writer_alive(folder: str, host: str, pid: int) -> bool:
    """False only when the writer of ``folder`` is provably gone: this host, and its process
    does not exist, is a zombie, or is this process without having made the folder."""
    if host != _HOST or os.name != "posix":  # another machine on a shared disk; no safe probe on Windows
        return True
    if pid == os.getpid():
        with _ours_lock:
            return folder in _ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists under another user
        return True
    try:  # a zombie has ended but is not yet reaped by its parent
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _last_change(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale(path: str | Path, *, now: float | None = None) -> list[Path]:
    """Remove stale temp folders of target ``path`` left by killed writes; returns those removed.

    Stale: the writer is provably dead (same host, process gone) or nothing in the folder changed
    for :data:`STALE_AFTER_S` seconds. Runs before every write; errors are logged, not raised.
    """
    path = Path(path)
    pattern = _temp_pattern(path.name)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError as e:
        log.debug("cannot list %s for stale temporary folders: %s", path.parent, e)
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        try:
            alive = _writer_alive(entry.name, match["host"], int(match["pid"]))
            if alive and now - _last_change(folder) < STALE_AFTER_S:
                continue
        except FileNotFoundError:  # another writer removed it first
            continue
        except OSError as e:
            log.debug("cannot inspect %s: %s", folder, e)
            continue
        _remove_tree(folder)
        if not folder.exists():
            log.info("removed %s, left by an interrupted write of %s", folder, path)
            removed.append(folder)
    return removed


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[bool]:
    """While the block runs, SIGTERM raises _Terminated, if it had its default action and this is
    the main thread; yields whether the handler was installed here."""
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.getsignal(sigterm)
    if previous is not signal.SIG_DFL:  # SIG_IGN, the application's handler, or an outer write's
        yield False
        return
    signal.signal(sigterm, _raise_terminated)
    try:
        yield True
    finally:
        signal.signal(sigterm, previous)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temp path is ``<folder>/<name>`` in a fresh temp folder (see the module docstring); an
    empty file is already there. Stale folders of earlier killed writes of ``path`` are removed
    first.
    """
    path = Path(path)
    directory = path.parent
    remove_stale(path)
    while True:
        folder = directory / temp_name(path.name)
        try:
            os.mkdir(folder, 0o700)
            break
        except FileExistsError:
            continue
    with _ours_lock:
        _ours.add(folder.name)
    tmp_path = folder / path.name
    installed = False
    try:
        with _sigterm_raises() as installed:
            tmp_path.touch()
            yield tmp_path
            os.chmod(tmp_path, _new_file_mode(path))
            _fsync(tmp_path)
            os.replace(tmp_path, path)
    except _Terminated:
        _remove_tree(folder)
        if installed:  # end the process as SIGTERM with its default action would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (restored already, unless it came mid-restore)
            signal.raise_signal(signal.SIGTERM)
        raise
    except BaseException:
        _remove_tree(folder)
        raise
    finally:
        with _ours_lock:
            _ours.discard(folder.name)
    _remove_tree(folder)  # empty now, or holding what the writer left beside its file
    _fsync(directory, directory=True)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` to write a temp path, then put it at ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))
