"""The one exception family of llm_merge."""


class MergeError(Exception):
    """A merge cannot go on: bad input, bad checkpoint or a failed worker.

    The message is one line naming the culprit (flag, file or tensor), what was
    found and what was expected.
    """

    exit_code = 1


class ConfigError(MergeError):
    """A flag or config-file value is invalid (detected before any work)."""

    exit_code = 2
