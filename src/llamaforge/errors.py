"""The one exception the CLI turns into a one-line message and exit code 2."""

import importlib.util


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


def require_extra(module: str, extra: str) -> None:
    """Refuse, in one line, a feature whose optional dependency (`pip install 'llamaforge[EXTRA]'`) is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"{module} is not installed, and this needs it; pip install 'llamaforge[{extra}]'")
