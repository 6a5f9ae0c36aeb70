"""Errors a user can fix. The CLI prints their one-line message and exits with status 2."""


class JaxloraError(ValueError):
    """Base class: bad input, named with the fix, never a traceback at the command line."""


class ConfigError(JaxloraError):
    """A configuration (model config.json or run YAML) that jaxlora cannot honour."""


class DataError(JaxloraError):
    """Training or evaluation data that is missing, malformed or too small for the request."""


class LoRAError(JaxloraError):
    """An adapter configuration that cannot be built for this model."""
