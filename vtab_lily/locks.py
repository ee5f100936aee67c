"""Run locks: an exclusive claim on one run that survives crashes, pid reuse and shared cluster file systems.

A lock file holds one JSON line: host, pid, the pid's start time, a random token and the creation time.
It is created atomically (written to a temporary file, then hard-linked into place, which fails when the
lock exists, on local disks and NFS alike). The holder refreshes the file's mtime every `heartbeat_s`
seconds from a background thread. A lock is stale, and taken over, when
- its holder ran on this host and that process is gone, or its pid now belongs to another process;
- its heartbeat is older than `ttl_s` (a holder on another node that died, or a requeued Slurm job);
- it is empty or unreadable and older than a few seconds (a writer died mid-write).
Takeover is atomic: a takeover guard (O_EXCL) serialises the processes that judge the lock stale; inside it
the lock is removed only if it still holds the very token that was judged stale.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .fileio import pid_alive

HEARTBEAT_S = 30.0
TTL_S = 300.0  # 10 missed heartbeats
GARBAGE_GRACE_S = 10.0


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
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------------
    def _read(self) -> tuple[dict | None, float | None]:
        """(holder info or None when unreadable, age of the heartbeat in seconds or None when absent)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(text)
            if not isinstance(info, dict) or "token" not in info:
                info = None
        except ValueError:
            info = None
        return info, age

    def _stale(self, info: dict | None, age: float) -> bool:
        if info is None:
            return age > GARBAGE_GRACE_S
        if age > self.ttl_s:
            return True
        if info.get("host") == socket.gethostname():
            pid = int(info.get("pid", -1))
            if pid <= 0 or not pid_alive(pid):
                return True
            start = process_start(pid)
            return start is not None and info.get("start") not in (None, start)  # pid reused
        return False

    def describe(self) -> str:
        info, age = self._read()
        if age is None:
            return f"{self.path} (released)"
        if info is None:
            return f"{self.path} (unreadable, {age:.0f} s old; it is taken over after {GARBAGE_GRACE_S:.0f} s)"
        held_for = time.time() - info.get("created", time.time())
        return (f"host {info.get('host')} pid {info.get('pid')} (holding it for {held_for:.0f} s, last heartbeat "
                f"{age:.0f} s ago; taken over after {self.ttl_s:.0f} s without one). If no such process runs, "
                f"delete {self.path}")

    # -- taking --------------------------------------------------------------------------------------
    def _create(self) -> bool:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                "token": self.token, "created": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(info) + "\n")
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
            info, age = self._read()
            current = info.get("token") if info else None
            if age is not None and current == stale_token and self._stale(info, age):
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
            info, age = self._read()
            if age is None:
                continue  # released meanwhile
            if not self._stale(info, age):
                return False
            self._take_over(info.get("token") if info else None)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info, _ = self._read()
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
