"""The one error type for bad configuration: it names the key, the value and what is allowed."""


class ConfigError(ValueError):
    """A config value that reglab cannot run with; raised before any training starts."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
