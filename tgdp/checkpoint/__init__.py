"""Training checkpoints: the only code that writes or reads them (docs/checkpoints.md).

    mgr = CheckpointManager(run_dir, cfg.checkpoint, rank, world_size)
    app_state = {"student": student, "teacher": teacher,                # nn.Modules (FSDP2 or plain)
                 "optim": OptimizerState(student, optimizer), "trainer": trainer}   # Statefuls
    if (res := mgr.resume(app_state)) is not None:                       # newest COMPLETE checkpoint
        loader.load_state_dict(res.rank_state["data"] if res.rank_state else res.rank0_state["data"])
        wandb_id = res.extra.get("wandb_run_id")
    for step in ...:
        ...
        if mgr.should_save(step):                                         # steps or wall time, agreed
            mgr.save(step, app_state, extra={"wandb_run_id": wandb_id, "config": to_dict(cfg)},
                     rank_state={"data": loader.state_dict()})

One DCP checkpoint per step folder holds every model, the optimizer and trainer counters; it
reshards onto any world size. Per-rank data-loader and RNG state sit beside it as JSON. Saves are
atomic (`step_<N>.tmp/` renamed after every rank finished), discovery skips and reports broken
folders, and loading never unpickles anything beyond DCP's own metadata classes. DeepSpeed ZeRO
engines get the same name-keyed layout through the adapters in `tgdp.parallel.zero_state`.

Official CAV-MAE / TG-DP weight files (another format) are handled by tgdp/models/interop.py.
"""

from tgdp.checkpoint.config import CheckpointConfig
from tgdp.checkpoint.layout import find_latest_complete, incompleteness, scan
from tgdp.checkpoint.manager import CheckpointManager, CheckpointSaveError, LoadResult
from tgdp.checkpoint.rng import capture_rng, restore_rng
from tgdp.checkpoint.safety import ALLOWED_GLOBALS, RestrictedUnpickler, SafeFileSystemReader, SafeLoadPlanner
from tgdp.checkpoint.stateful import ModelState, OptimizerState
from tgdp.checkpoint.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "ALLOWED_GLOBALS", "CheckpointConfig", "CheckpointError", "CheckpointManager", "CheckpointSaveError",
    "LoadResult", "ModelState", "OptimizerState", "RestrictedUnpickler", "SafeFileSystemReader", "SafeLoadPlanner",
    "UnsafeCheckpointError", "capture_rng", "find_latest_complete", "incompleteness", "restore_rng", "scan",
]
