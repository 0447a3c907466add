"""Why a checkpoint name cannot be served.

All are `ValueError`s, so a caller that only knows "bad input" still reports them as
such. The HTTP layer maps `CheckpointNotFound` to 404 and the others to 400/409.
They live apart from the checkpoint store so that LoRA parsing can raise them too.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint name that cannot be served (e.g. one that leaves the checkpoint root)."""


class CheckpointNotFound(CheckpointError):
    """No model or checkpoint by that name."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"The model `{name}` does not exist." + (f" ({detail})" if detail else ""))


class CheckpointIncomplete(CheckpointError):
    """The checkpoint exists but is still being written: its directory or archive has no
    `checkpoint_complete` marker yet, or its archive is cut short."""

    def __init__(self, name: str, why: str = "no `checkpoint_complete` marker yet") -> None:
        super().__init__(f"Checkpoint `{name}` is still being written ({why}); try again once "
                         "the training job has finished saving it.")


class CheckpointInvalid(CheckpointError):
    """Corrupt, not a LoRA adapter this engine can merge, or made for another base model."""
