"""The errors of loading checkpoints and weight files: tgdp's own checkpoints (tgdp.checkpoint)
and foreign weights (MAE, official CAV-MAE / TG-DP releases, tgdp.models.interop)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects other than tensors; loading it would run arbitrary code."""


class CheckpointMismatchError(CheckpointError):
    """strict=True and the checkpoint's keys or shapes do not match the model."""
