"""Atomic writes: a file is either absent or complete, never half-written, even after a power loss; temps of
killed writers are removed."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STALE_TEMP_S = 24 * 3600  # a temp from another host is removed after this long without a change
HOST = socket.gethostname().replace(".", "-")  # as it appears in temp names


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True):
    """Yield a temporary path beside `path` (`.<name>.<host>.<pid>.<random>.tmp`); on success it replaces
    `path`, on error it is removed. `durable`: the temp's bytes reach the disk (fsync) before the rename, and
    the rename itself (fsync of the folder) before this returns: without both, a power loss can leave `path`
    empty or truncated under its final name. A writer of many small files (prepare's images) passes False
    and calls os.sync() once before it writes the file that declares them complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{HOST}.{os.getpid()}.",
                               suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk. A folder on a file system that cannot sync
    folders (some network file systems answer EINVAL) is left as it is."""
    folder = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temps that atomic_path left in `folder` when its process was killed: those of a dead
    process on this host, and those of other hosts unchanged for STALE_TEMP_S. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 4)  # [.<name>, host, pid, random, tmp]
        if len(parts) != 5 or not parts[2].isdigit():
            continue
        try:
            stale = (not pid_alive(int(parts[2])) if parts[1] == HOST
                     else time.time() - tmp.stat().st_mtime > STALE_TEMP_S)
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
    return removed


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
