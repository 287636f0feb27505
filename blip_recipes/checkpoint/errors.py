"""Errors shared by the checkpoint modules."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint is damaged (or no intact checkpoint is left to resume from)."""
