"""The errors every layer raises for bad user input (config keys, files, CLI arguments, checkpoints).

Their own module so that low-level modules (prompts, lora, the model families) can raise them without importing
the config machinery; the CLI turns them into a message and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config file, key or value, or an input a run cannot use. The message names the key.

    Several problems found in one pass travel together (`problems`), so a user fixes them all in one try."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not written by cdm-train)."""
