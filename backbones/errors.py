"""Errors a user can cause, and how every command line reports them.

Every such error derives from `UserError` (a wrong option, a missing or foreign file, a machine that lacks
what was asked for). A CLI's `main` is wrapped by `cli`: a `UserError` or an `OSError` (disk full,
read-only, missing file; torch.save's and safetensors' write failures become OSError through
`write_errors`) prints one line `error: ...` on stderr and exits 2; anything else is a bug (of the suite or
of a user's plugin) and keeps its traceback (exit 1).

It lives in the lowest layer so that backbones/ and vtab_lily/ raise and report the same types;
`vtab_lily.errors` re-exports it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys


class UserError(Exception):
    """A mistake the user can fix; its message is one line that says what to do."""


class UnknownName(UserError, KeyError):
    """A name that is not in its registry (backbone, task, method, adapter site, setting); the message
    lists the known ones."""


# torch.save reports its writer's failures as RuntimeError (caffe2's inline_container.cc): ENOSPC ends in
# "unexpected pos N vs M" or "PytorchStreamWriter failed writing file ...", a missing or unwritable folder
# in "Parent directory ... does not exist." or "File ... cannot be opened.".
_TORCH_WRITE = re.compile(r"unexpected pos|PytorchStreamWriter failed|Parent directory .* does not exist|"
                          r"cannot be opened")
# safetensors' writer (Rust) reports them as SafetensorError "Error while serializing: I/O error: <strerror>
# (os error N)".
_OS_ERROR = re.compile(r"I/O error: (.*?) \(os error (\d+)\)")


@contextlib.contextmanager
def write_errors(path: str | os.PathLike):
    """Around a torch.save or safetensors save_file of `path`: its I/O failures (disk full, read-only, a
    missing folder) become OSError naming `path`, so every CLI reports them in one line; anything else
    (a bug) propagates unchanged."""
    from safetensors import SafetensorError
    try:
        yield
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        raise OSError(int(found.group(2)), found.group(1), str(path)) from e
    except RuntimeError as e:
        if not _TORCH_WRITE.search(str(e)):
            raise
        raise OSError(errno.EIO, f"write failed, is the disk full? (torch: {' '.join(str(e).split())})",
                      str(path)) from e


# errno values that only a write produces: the message says "could not write"
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO}


def error_line(e: BaseException) -> str:
    """An exception's message as one line (KeyError's quotes dropped, inner newlines folded)."""
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split()) or type(e).__name__


def os_error_line(e: OSError) -> str:
    """An I/O error as one line naming the file and the reason."""
    if e.strerror is None and e.filename is None:
        return error_line(e)  # an OSError raised with a message only
    verb = "write" if e.errno in WRITE_ERRNOS else "access"
    return f"could not {verb} {e.filename or 'a file'}: {' '.join((e.strerror or str(e)).split())}"


def cli(main=None, *, os_hint: str = ""):
    """Wrap a CLI's main(argv) -> int: user and I/O errors become one `error:` line and exit code 2
    (`os_hint` is appended to I/O errors' line). Use as @cli or @cli(os_hint=...)."""
    if main is None:
        return functools.partial(cli, os_hint=os_hint)

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {error_line(e)}", file=sys.stderr)
        except OSError as e:
            print(f"error: {os_error_line(e)}{os_hint}", file=sys.stderr)
        return 2
    return wrapped
