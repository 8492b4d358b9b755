"""One trainer per output folder, and no trainer outliving its launcher.

``RunLock``: ``<output_dir>/run.lock`` names its owner (pid, host, start time, command) and is
held with ``flock`` for the owner's lifetime, so the kernel releases it the moment the owner
dies, however it dies. A second run finds it held and is refused; a lock file that nobody
holds is stale (a process killed before it could remove it) and is taken over with a warning,
unless it names a process that is still alive on this host (a file system where ``flock`` is
not shared: the pid decides) or one on another host (whose pid cannot be checked from here:
refused, saying which file to remove). Released (deleted) when the run ends.

``exit_with_launcher``: torchrun starts each worker in a session of its own, so a SIGKILL of
torchrun's process group leaves the workers running, still writing into the run folder. A
daemon thread polls the worker's parent pid once a second and ends the process when the
launcher is gone. A thread rather than ``prctl(PR_SET_PDEATHSIG)``: the death signal follows
the parent *thread* that forked the worker, not the parent process, and works on Linux only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["LockHeld", "RunLock", "pid_alive", "process_start", "exit_with_launcher", "host_tag"]

LOCK_NAME = "run.lock"


class LockHeld(RuntimeError):
    """The output folder belongs to another live run (the message names it)."""


def host_tag() -> str:
    """This host's name, reduced to characters safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None: with the
    pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` (on this host) is running; with ``start``, only if it is still
    the process that started then. Zombies count as dead (they run nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                          # alive, another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True                   # no /proc (not Linux): kill(0) is all we know
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


class RunLock:
    """``<folder>/run.lock``, held (``flock``) while the run lives. ``acquire`` raises
    ``LockHeld`` when another live run holds the folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None   # the stale owner replaced, if any

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(self._held_message(self._read_owner())) from None
            except OSError as exc:   # no flock on this file system: the pid check alone decides
                log.warning("%s: flock unavailable (%s); relying on the owner's pid", self.path, exc)
            # The file may have been deleted (released) between our open and our flock: then
            # we hold a lock on a file nobody else can see; start over on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise LockHeld(f"{self.path}: could not take the lock (it keeps being replaced)")
        try:
            previous = self._read_fd(fd)
            if previous:
                self._check_stale(previous)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": process_start(os.getpid()),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me, indent=1) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        # Forked children (DataLoader workers) would share the lock and keep it held for a
        # moment after this process is killed: they drop their copy of the descriptor.
        os.register_at_fork(after_in_child=self._forget)
        if previous:
            self.took_over = previous
            log.warning("%s: took over a stale lock of pid %s on %s (started %s): that process is "
                        "gone", self.path, previous.get("pid"), previous.get("host"), previous.get("started"))

    def _check_stale(self, previous: dict) -> None:
        """Raise unless ``previous`` (the unheld lock's owner) is certainly dead."""
        pid, host = previous.get("pid"), previous.get("host")
        if host != socket.gethostname():
            raise LockHeld(f"{self.path} names pid {pid} on host {host} (started "
                           f"{previous.get('started')}), which cannot be checked from here; if that "
                           "run is over, delete the lock file")
        if isinstance(pid, int) and pid_alive(pid, previous.get("proc_start")):
            raise LockHeld(self._held_message(previous))

    def _held_message(self, owner: dict | None) -> str:
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
               f"{owner.get('command')}" if owner else "a process that has not written its name yet")
        return (f"output folder {self.path.parent} is in use by another training run ({who}); "
                "wait for it, stop it, or pick another output_dir")

    def _read_owner(self) -> dict | None:
        for _ in range(5):           # the owner writes its name just after taking the lock
            owner = self.owner()
            if owner:
                return owner
            time.sleep(0.05)
        return None

    @staticmethod
    def _read_fd(fd: int) -> dict | None:
        try:
            return json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
        except ValueError:
            return {"pid": None, "host": socket.gethostname(), "started": "?"}   # half-written: its writer died

    def _forget(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Delete the lock file (while still holding it) and let go."""
        if self.fd is None:
            return
        try:
            if (self.owner() or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def exit_with_launcher(interval_s: float = 1.0, parent: int | None = None) -> threading.Thread:
    """End this process (exit code 1) once its parent, the launcher, has exited: a daemon
    thread compares ``os.getppid()`` with the parent at the start every ``interval_s``."""
    parent = os.getppid() if parent is None else parent

    def watch():
        while True:
            if os.getppid() != parent:
                # Not through logging: the main thread may hold a handler's lock right now.
                sys.stderr.write(f"the launcher (pid {parent}) is gone: stopping this worker "
                                 f"(pid {os.getpid()})\n")
                sys.stderr.flush()
                os._exit(1)
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread
