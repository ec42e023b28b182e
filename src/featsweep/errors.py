"""User-facing errors.

``UserError`` derives from Hydra's ``CompactHydraException`` so that, raised inside a Hydra app
(or launcher), Hydra prints just the message and exits non-zero: a user's mistake never shows a
traceback. Command-line tools outside Hydra catch it and print the message themselves.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A mistake in the user's input: the message names the key, the bad value and what is allowed."""


class ConfigError(UserError):
    """A config value that featsweep cannot run with."""


def config_error(key: str, value: object, allowed: str) -> ConfigError:
    """Build the one-paragraph message every config error uses."""
    return ConfigError(f"featsweep: bad config value {key}={value!r}: {allowed}.")
