"""The one base class of every error a user can cause (a wrong option, a missing or foreign file, a
machine that lacks what was asked for). It lives in the lowest layer so that backbones/ and vtab_lily/
raise the same type; `vtab_lily.errors` re-exports it with the benchmark's kinds and the CLI wrapper.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is one line that says what to do."""
