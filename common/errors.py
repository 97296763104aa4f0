"""The one exception type for mistakes a user can fix, and the guard every entry point runs under.

Entry points catch `UserError`, print its message as a single line (no traceback) and exit 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's input: the message names the thing, what is wrong and how to fix it."""


class Interrupted(Exception):
    """Work stopped by a signal after saving what it could; the exit code is 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def refuse(problems: list[str]) -> None:
    """Raise one UserError for every problem found (none: return): the config tree and the preflight step report
    all of a run's mistakes in one line, not the first of them."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(
            f"{len(problems)} problems: "
            + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        )


def run_guarded(func: Callable[[], int]) -> int:
    """Run a command: UserError -> one line on stderr, exit 2; an interruption -> its own message, 128+signal."""
    try:
        return func()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
