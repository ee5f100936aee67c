"""Errors a user can cause, and how every command line reports them.

Every such error derives from `UserError` (defined in backbones/errors.py, the lowest layer, and
re-exported here). A CLI's `main` is wrapped by `cli`: a `UserError` or an `OSError` (disk full, read-only,
missing file) prints one line `error: ...` on stderr and exits 2; anything else is a bug (of the suite or of
a user's plugin) and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys

from backbones.errors import UserError

__all__ = ["UserError", "cli", "error_line", "os_error_line"]


def error_line(e: BaseException) -> str:
    """An exception's message as one line (KeyError's quotes dropped, inner newlines folded)."""
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split())


def os_error_line(e: OSError) -> str:
    """An I/O error as one line naming the file and the reason."""
    where = e.filename or "a file"
    return f"could not access {where}: {e.strerror or error_line(e)}"


def cli(main):
    """Wrap a CLI's main(argv) -> int: user and I/O errors become one `error:` line and exit code 2."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {error_line(e)}", file=sys.stderr)
        except OSError as e:
            print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    return wrapped
