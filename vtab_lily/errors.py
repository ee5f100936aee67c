"""Errors a user can cause, and how every command line reports them: backbones/errors.py (the lowest
layer, so that backbones/ raises the same types), re-exported for the benchmark."""
from __future__ import annotations

from backbones.errors import UnknownName, UserError, cli, error_line, os_error_line, write_errors

__all__ = ["UnknownName", "UserError", "cli", "error_line", "os_error_line", "write_errors"]
