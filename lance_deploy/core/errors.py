"""Errors that the CLI turns into one-line messages (no traceback without --debug)."""


class LanceError(Exception):
    """A runtime failure the user can act on; exit code 1."""

    exit_code = 1


class LanceUsageError(LanceError):
    """Bad input from the user (an option, a file, a size); exit code 2."""

    exit_code = 2


class CheckpointError(LanceUsageError):
    """A checkpoint file is missing, truncated or does not match the release layout."""


class MediaError(LanceUsageError):
    """An input image or video cannot be decoded or has an unsupported shape."""
