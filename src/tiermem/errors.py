"""The one exception type that means "the user's input is wrong"."""


class TiermemError(ValueError):
    """Bad input from the user: unknown model or policy, impossible budget, unreadable file, too-long prompt.

    The CLI prints the message as one line on stderr and exits with status 2. Library callers can catch it as a
    ``ValueError``. Messages say what was wrong and what would be accepted.
    """
