"""The error every layer raises for bad user input (config keys, files, CLI arguments).

Its own module so that low-level modules (prompts, lora, the model families) can raise it without importing
the config machinery; the CLI turns it into a message and exit code 2.
"""


class ConfigError(ValueError):
    """A bad config file, key or value. The message names the key."""
