"""The runtime's errors.

`UserError` is a mistake the user can fix: a bad argument, a broken export folder, a provider this
machine lacks. Its message is one line that names the problem and the fix; the CLIs print it and
exit 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says how, in one line."""


class InvalidArgument(UserError, ValueError):
    """An argument or setting the runtime cannot use (steps, seeds, sizes, scheduler settings, files)."""
