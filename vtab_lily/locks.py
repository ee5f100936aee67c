"""Run locks: an exclusive claim on one run that survives crashes, pid reuse and shared cluster file systems.

A lock file holds one JSON line: host, pid, the pid's start time, a random token and the creation time.
It is created atomically (written to a temporary file, then hard-linked into place, which fails when the
lock exists, on local disks and NFS alike). The holder refreshes the file's mtime every `heartbeat_s`
seconds from a background thread. A lock is stale, and taken over, when
- its holder ran on this host and that process is gone, or its pid now belongs to another process;
- its heartbeat is older than `ttl_s` (a holder on another node that died, or a requeued Slurm job);
- it is unreadable (empty, not JSON, not a dict, a field missing or of the wrong type: `"pid": "abc"`) and
  older than a few seconds; the takeover is said in a warning naming the file.
Takeover is atomic: a takeover guard (O_EXCL) serialises the processes that judge the lock stale; inside it
the lock is removed only if it still holds the very token that was judged stale.
Ages are measured in the clock that stamps the file system's times (its offset from ours is read off the
temp file each attempt writes), so a node whose clock runs ahead does not take a live lock over. A heartbeat
dated in the future even so (the writer's clock is ahead: clock skew between nodes) cannot be aged by its
mtime; it is said, and the lock is aged by its change time instead, which the file system stamps.
The holder checks its token at every heartbeat: a holder that was suspended past the TTL and taken over finds
another token, stops beating, and `check()` (called by the runner after every epoch and before it writes)
raises LockLost, so that it writes neither record nor state.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import UserError
from .fileio import pid_alive, warn

HEARTBEAT_S = 30.0
TTL_S = 300.0  # 10 missed heartbeats
GARBAGE_GRACE_S = 10.0
SKEW_TOLERANCE_S = 5.0  # a heartbeat dated further in the future than this is clock skew
FIELDS = {"host": str, "pid": int, "token": str, "created": (int, float)}  # and "start": str or None


class LockLost(UserError):
    """Another process took this run's lock over while it ran (it was suspended past the TTL)."""


def lock_problem(info) -> str | None:
    """What makes a parsed lock file unusable, None when it is a lock this module wrote."""
    if not isinstance(info, dict):
        return f"it holds a JSON {type(info).__name__}, not an object"
    for key, kind in FIELDS.items():
        if key not in info:
            return f"its field {key!r} is missing"
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            return f"its field {key!r} is {info[key]!r}"
    if info["pid"] <= 0:
        return f"its pid {info['pid']} is not a process id"
    if info.get("start") is not None and not isinstance(info["start"], str):
        return f"its field 'start' is {info['start']!r}"
    return None


def process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class RunLock:
    """`with RunLock(path) as lock: if lock.acquire(): ...`; `describe()` says who holds it."""

    def __init__(self, path: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S, ttl_s: float = TTL_S):
        self.path = Path(path)
        self.heartbeat_s, self.ttl_s = heartbeat_s, ttl_s
        self.held = False
        self.lost: str | None = None  # why this holder lost its lock (set by the heartbeat)
        self.token = uuid.uuid4().hex
        self._fs_offset = 0.0  # file-system clock minus ours, measured when a lock file is written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------------
    def _read(self) -> tuple[dict | None, float | None, str | None]:
        """(holder info or None when unreadable, age of the heartbeat in seconds or None when absent, what is
        wrong: why it is unreadable, or the clock skew of a heartbeat dated in the future)."""
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None, None
        now = time.time() + self._fs_offset
        age, problem = now - st.st_mtime, None
        if age < -SKEW_TOLERANCE_S:  # the writer's clock is ahead: age the file by the time it last changed
            problem = (f"its heartbeat is dated {-age:.0f} s in the future: clock skew between this node "
                       f"({socket.gethostname()}) and the lock's writer; aged by its change time instead")
            age = now - st.st_ctime
        try:
            info = json.loads(text)
        except ValueError:
            return None, age, "it is empty" if not text.strip() else "it is not JSON"
        unreadable = lock_problem(info)
        return (None, age, unreadable) if unreadable else (info, age, problem)

    def _stale(self, info: dict | None, age: float) -> bool:
        if info is None:
            return age > GARBAGE_GRACE_S
        if age > self.ttl_s:
            return True
        if info["host"] == socket.gethostname():
            if not pid_alive(info["pid"]):
                return True
            start = process_start(info["pid"])
            return start is not None and info.get("start") not in (None, start)  # pid reused
        return False

    def live(self) -> bool:
        """Whether another process holds this lock now (it exists and is not stale)."""
        info, age, _ = self._read()
        return age is not None and not self._stale(info, age)

    def describe(self) -> str:
        info, age, problem = self._read()
        if age is None:
            return f"{self.path} (released)"
        if info is None:
            return (f"{self.path} (unreadable: {problem}; {age:.0f} s old; it is taken over after "
                    f"{GARBAGE_GRACE_S:.0f} s)")
        held_for = time.time() - info["created"]
        skew = f"; {problem}" if problem else ""
        return (f"host {info['host']} pid {info['pid']} (holding it for {held_for:.0f} s, last heartbeat "
                f"{age:.0f} s ago; taken over after {self.ttl_s:.0f} s without one{skew}). If no such process "
                f"runs, delete {self.path}")

    # -- taking --------------------------------------------------------------------------------------
    def _create(self) -> bool:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                "token": self.token, "created": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(info) + "\n")
        # the file system's clock against ours (a network file system stamps with the server's clock): ages of
        # heartbeats are measured in the clock that stamped them
        self._fs_offset = tmp.stat().st_mtime - time.time()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale_token: str | None) -> None:
        """Remove the lock if it still is the one judged stale, under a guard that serialises takeovers."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > GARBAGE_GRACE_S:
                    guard.unlink(missing_ok=True)  # a taker died inside the guard
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            info, age, problem = self._read()
            current = info["token"] if info else None
            if age is not None and current == stale_token and self._stale(info, age):
                if info is None:
                    warn(f"taking over the unreadable run lock {self.path} ({problem}, {age:.0f} s old)")
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return True
            info, age, _ = self._read()
            if age is None:
                continue  # released meanwhile
            if not self._stale(info, age):
                return False
            self._take_over(info["token"] if info else None)
        return False

    def heartbeat(self) -> bool:
        """Refresh the lock's mtime if it still holds this holder's token; otherwise note why it was lost and
        return False (the lock is another's now: never touch it)."""
        info, age, _ = self._read()
        if info is None or info["token"] != self.token:
            whose = f"host {info['host']} pid {info['pid']}" if info else "nobody (removed or unreadable)"
            self.lost = (f"the run lock {self.path} was taken over while this process ran (now held by {whose}); "
                         f"this process was probably suspended for more than {self.ttl_s:.0f} s")
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self.lost = f"the run lock {self.path} was removed while this process ran"
            return False
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.heartbeat():
                    return
            except OSError:  # a file-system hiccup (NFS: ESTALE, EIO): beat again next time
                continue

    def check(self) -> None:
        """Raise LockLost when a heartbeat found the lock taken over: the run must stop without writing."""
        if self.lost:
            raise LockLost(f"{self.lost}; stopped without writing this run's record or state (the other "
                           "process finishes it)")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info, _, _ = self._read()
        if info is not None and info["token"] == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
