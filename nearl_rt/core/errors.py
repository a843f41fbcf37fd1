"""Errors that reach users: each names the problem and the fix."""


class NearlError(Exception):
    """Base class for user-facing errors; CLIs print them without a traceback."""


class CheckpointError(NearlError):
    """A checkpoint file is missing, damaged, of another format, or does not fit the model."""


class BackboneError(NearlError):
    """The frozen CLIP backbone could not be built or its weights could not be loaded."""


class RandomBackboneWarning(UserWarning):
    """The backbone has random weights: outputs are meaningless for real use."""


class ClassNamesWarning(UserWarning):
    """The data does not name its classes: the prompts (the classifier) read placeholders like 'class 0'."""
