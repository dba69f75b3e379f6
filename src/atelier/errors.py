"""The one exception type that means "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: wrong path, unknown name, malformed request."""
