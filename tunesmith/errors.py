"""The one exception type for mistakes a user can fix.

A bad config, a malformed data row or a missing file raises `UserError`. The CLI
prints its message as one paragraph and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, paths), not with tunesmith."""

    exit_code = 2
