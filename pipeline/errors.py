"""The base of every error that a user fixes in their input (config, data, store, server)."""


class UserError(Exception):
    """Bad input or environment, described for the person who has to fix it; entry points
    print it without a traceback and exit with status 2."""


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the person who wrote the config (pipeline/config.py
    re-exports it)."""
