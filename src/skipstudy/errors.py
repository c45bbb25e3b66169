"""User-facing errors: ``skipstudy.train`` and the other entries print a :class:`ConfigError` as one
line (no traceback) and exit with status 2, before any training starts."""


class ConfigError(ValueError):
    """Bad input; the message names the config key, the bad value and the fix."""
