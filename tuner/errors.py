"""Error types that decide tuner's exit codes.

`UserError` is for anything the user can fix (bad spec, missing file, unreachable URL): the CLI
prints it as one line `error: ...` and exits with `EXIT_USER_ERROR`. Any other exception is an
internal fault and exits with `EXIT_INTERNAL`.
"""

import reprlib
from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # stopped on SIGTERM after saving a checkpoint: retry the job, it resumes


class UserError(Exception):
    """A problem with the user's input; the message names what is wrong and how to fix it."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.where = where
        self.fix = fix
        parts = [f"{where}: {message}" if where else message]
        if fix:
            parts.append(fix)
        super().__init__("; ".join(parts))


class UserErrors(UserError):
    """Several independent problems found in one pass (a config's every bad value): one line each."""

    def __init__(self, errors: list[UserError]):
        super().__init__(str(errors[0]), where=errors[0].where)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Preempted(SystemExit):
    """Training stopped on SIGTERM after saving a checkpoint; the job should be retried (exit 143)."""

    def __init__(self, step: int, total_steps: int, checkpoint: str):
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint


# A bad value as an error line shows it: repr cut short at every level (a value can be 100 MB,
# and the line goes into a termination message of at most 4 KiB).
_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments (3.12 does)
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def quote(value: Any) -> str:
    """`repr(value)`, with long strings, lists and deep nesting elided (`'aaa...aaa'`, `[1, 2, ...]`)."""
    if isinstance(value, str) and len(value) > 60:
        return f"{_SHORT.repr(value)} ({len(value):,} characters)"
    return _SHORT.repr(value)
