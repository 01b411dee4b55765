"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights (a backbone's or a metric's) that are not on this machine; the
    one-line message names what to fetch and where to put it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or from another method/backbone."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient."""
