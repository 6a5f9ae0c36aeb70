"""Errors a user can fix. The CLI prints their one-line message and exits with status 2."""


class JaxloraError(ValueError):
    """Base class: bad input, named with the fix, never a traceback at the command line."""
