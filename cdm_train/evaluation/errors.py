"""The error `cdm-train eval` raises for bad input (a ConfigError: the CLI prints it and exits with code 2)."""

from __future__ import annotations

from ..config import ConfigError


class EvalInputError(ConfigError):
    """A missing or unreadable weights file, image folder, statistics file or prompt list."""
