"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (config, checkpoint, data, paths). Printed as one line, exit code 2."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid names, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> UserError:
    choices = sorted(choices)
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, choices)}; valid: {', '.join(choices)}")
