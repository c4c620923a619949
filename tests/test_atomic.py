"""Atomic writes: killed writers leave nothing the next write does not remove; SIGTERM cleans up.

The writer processes are real subprocesses blocked mid-write on a pipe (not on a guessed sleep):
they print READY once the temp file holds data, then block reading stdin until signalled.
"""
import doctest
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from torchprobe.io import atomic
from torchprobe.io.atomic import STALE_AFTER_S, TEMP_MARK, atomic_path, remove_stale, temp_name, write_text, write_with
from torchprobe.io.dumps import load_dump, save_dump

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
MIB = 1 << 20

# A writer like safetensors' save_file: data into the path it is given and into a temp file of its
# own beside it, then it blocks until the parent signals it.
WRITER = r"""
import os, signal, sys
from pathlib import Path
from torchprobe.io.atomic import write_with
target, mode = sys.argv[1], sys.argv[2]
if mode == "own-handler":
    def handler(signum, frame):
        raise SystemExit(3)
    signal.signal(signal.SIGTERM, handler)

def writer(tmp):
    chunk = os.urandom(1 << 20)
    with open(tmp, "wb") as f, open(tmp.parent / ".tmpAbC123", "wb") as own:
        for _ in range(16):
            f.write(chunk)
            own.write(chunk)
        f.flush(); own.flush()
        print("READY", flush=True)
        sys.stdin.buffer.read(1)  # blocks until the parent writes a byte or signals us
        f.write(b"child")
    (tmp.parent / ".tmpAbC123").unlink()

write_with(target, writer)
print("DONE", flush=True)
"""

# tp.dump's own path: save_dump with a tensor whose device-to-host copy blocks on stdin.
DUMPER = r"""
import sys, torch
from torchprobe.io.dumps import save_dump

class SlowCopy(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            print("READY", flush=True)
            sys.stdin.buffer.read(1)
        return super().__torch_function__(func, types, args, kwargs or {})

big = {"layers.0": torch.ones(4 << 20), "layers.1": torch.ones(8).as_subclass(SlowCopy)}
save_dump(sys.argv[1], big, target="fp32")
"""


def start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    if line != b"READY\n":
        proc.kill()
        raise AssertionError(f"writer did not start: {line!r} {proc.stderr.read().decode()[-2000:]}")
    return proc


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def temp_folders(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}{TEMP_MARK}"))


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "acts.bin"
    write_text(path, "old")
    return path


def test_sigkill_mid_write_leaves_a_folder_the_next_write_removes(target):
    proc = start(WRITER, str(target), "plain")
    [litter] = temp_folders(target.parent, target.name)
    assert listing(litter) == [".tmpAbC123", target.name]  # the writer's own temp file is inside
    assert (litter / target.name).stat().st_size == 16 * MIB
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert listing(target.parent) == [litter.name, target.name]  # SIGKILL cannot be handled: litter
    assert target.read_text() == "old"
    write_text(target, "new")
    assert listing(target.parent) == [target.name]
    assert target.read_text() == "new"


def test_sigterm_mid_write_removes_the_temp_files_and_ends_the_process(target):
    proc = start(WRITER, str(target), "plain")
    assert len(temp_folders(target.parent, target.name)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # still ended by SIGTERM, as without torchprobe
    assert proc.stdout.read() == b""  # the write never completed
    assert listing(target.parent) == [target.name]
    assert target.read_text() == "old"


def test_sigterm_with_the_applications_own_handler_runs_that_handler(target):
    proc = start(WRITER, str(target), "own-handler")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3  # the application's handler decided (SystemExit(3))
    assert listing(target.parent) == [target.name]  # and the SystemExit unwound the write
    assert target.read_text() == "old"


def test_killed_dump_is_cleaned_by_the_next_dump(tmp_path):
    path = tmp_path / "fp32.safetensors"
    proc = start(DUMPER, str(path))
    assert len(temp_folders(tmp_path, path.name)) == 1
    proc.kill()
    proc.wait(timeout=30)
    save_dump(path, {"layers.0": torch.arange(4.0)}, target="fp32")
    assert listing(tmp_path) == [path.name]
    assert torch.equal(load_dump(path)["layers.0"], torch.arange(4.0))


def test_a_live_concurrent_writer_is_left_alone_and_its_rename_wins(target):
    proc = start(WRITER, str(target), "plain")
    [theirs] = temp_folders(target.parent, target.name)
    write_text(target, "mine")  # runs the stale sweep: the blocked writer is alive
    assert theirs.is_dir() and target.read_text() == "mine"
    proc.stdin.write(b"x")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0 and proc.stdout.read() == b"DONE\n"
    assert listing(target.parent) == [target.name]
    assert target.read_bytes().endswith(b"child") and target.stat().st_size == 16 * MIB + 5


def _fake_folder(parent: Path, name: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    folder = parent / f".{name}{TEMP_MARK}{host}-{pid}-0badf00d"
    folder.mkdir()
    (folder / name).write_bytes(b"partial")
    when = time.time() - age_s
    for p in (folder / name, folder):
        os.utime(p, (when, when))
    return folder


def test_stale_rules_dead_pid_age_foreign_host_and_this_process(target):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its PID names no process now
    here, parent = atomic._HOST, target.parent
    foreign = "ffffffff" if here != "ffffffff" else "eeeeeeee"  # another machine on a shared disk
    dead = _fake_folder(parent, target.name, here, ended.pid)
    restarted = _fake_folder(parent, target.name, here, os.getpid())  # our PID, not our folder
    foreign_new = _fake_folder(parent, target.name, foreign, 1)
    foreign_old = _fake_folder(parent, target.name, foreign, 2, age_s=STALE_AFTER_S + 60)
    alive_old = _fake_folder(parent, target.name, here, os.getppid(), age_s=STALE_AFTER_S + 60)
    other_target = _fake_folder(parent, "other.bin", here, ended.pid)
    removed = remove_stale(target)
    assert sorted(removed) == sorted([dead, restarted, foreign_old, alive_old])
    assert foreign_new.is_dir() and other_target.is_dir()  # unknown writer, recent; another target's
    with atomic_path(target) as tmp:  # a folder this process has open is its own, never stale
        assert remove_stale(target) == [] and tmp.parent.is_dir()
        tmp.write_text("x")


def test_signal_handler_is_restored_and_only_installed_in_the_main_thread(target):
    before = signal.getsignal(signal.SIGTERM)
    assert before is signal.SIG_DFL
    with atomic_path(target) as tmp:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        tmp.write_text("a")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target):
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert listing(target.parent) == [target.name] and target.read_text() == "a"
    seen = []

    def in_thread():
        with atomic_path(target) as tmp:
            seen.append(signal.getsignal(signal.SIGTERM))
            tmp.write_text("b")

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [signal.SIG_DFL] and target.read_text() == "b"
    own = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGTERM, own)
    try:
        with atomic_path(target) as tmp:
            assert signal.getsignal(signal.SIGTERM) is own  # the application's handler is left alone
            tmp.write_text("c")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_names_mode_and_long_names(tmp_path):
    name = "x" * 250
    assert len(temp_name(name)) < 255 and TEMP_MARK in temp_name("a.bin")
    path = write_with(tmp_path / name, lambda p: p.write_bytes(b"z"))
    assert path.read_bytes() == b"z" and listing(tmp_path) == [name]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # as open(path, "w") makes it, not 0o600
    path.chmod(0o640)
    write_text(path, "again")
    assert (path.stat().st_mode & 0o777) == 0o640  # a replaced file keeps its mode


def test_docstring_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert doctest.testmod(atomic).failed == 0
    assert (tmp_path / "notes.txt").read_text().startswith("kept in FP32")
