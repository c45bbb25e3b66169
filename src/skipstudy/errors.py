"""User-facing errors.

A :class:`ConfigError` is the project's way of refusing bad input before any training
starts. Its message names the config key, the bad value and the fix; ``skipstudy.train``
prints it as one short line instead of a traceback.
"""


class ConfigError(ValueError):
    """A user-facing configuration error: message names the key, the bad value and the fix."""
