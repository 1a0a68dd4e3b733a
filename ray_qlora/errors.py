"""Errors a user can fix: the CLI prints their message alone and exits 2, no traceback.

Everything else is a bug (or an infrastructure failure) and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["DataError", "StageOrderError", "UserError"]


class UserError(Exception):
    """A mistake in the config, the data or the order of verbs; the message says what to change."""


class DataError(UserError, ValueError):
    """The input data cannot give a training set (nothing usable, a failed pre-flight check...)."""


class StageOrderError(UserError, RuntimeError):
    """A verb run before the stage it needs has succeeded for this run."""
