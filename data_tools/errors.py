"""The one exception type for mistakes a user can fix.

Entry points catch `UserError` and print its message as a single line (no traceback) and exit non-zero.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the thing, what is wrong and how to fix it."""
