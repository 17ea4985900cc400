"""The one exception type that reaches users (trainer and controller alike): a single line naming the fix."""


class RELEDError(Exception):
    """A problem the user can fix (bad input, missing file, dead simulator)."""
