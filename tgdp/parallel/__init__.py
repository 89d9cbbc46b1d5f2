"""tgdp.parallel: the ONLY place that knows DDP, FSDP2 / HSDP and DeepSpeed ZeRO, including the
ZeRO checkpoint adapters (zero_state.py) that `TrainingBackend` hands to tgdp.checkpoint.

    env = init_distributed()                                   # torchrun / accelerate / submitit env
    backend = build_backend(cfg.parallel, env, student, teacher, cfg.optim, micro_batch_size=..., grad_accum=...)
    ... student.encode_masked(...); teacher.teacher_forward(...)  # entry points work on every backend
    backend.backward(loss, last=True); backend.step(losses, guard, grad_clip)
    ema_update_(local_pairs(student, teacher), momentum)       # shard-local, no communication

`build_backend` is imported from tgdp.parallel.backend (it needs tgdp.checkpoint's Statefuls;
this package itself stays importable without them). The functions below are its parts:
shard_student / shard_teacher / verify_sharding, backward / gradient_sync / optimizer_step. docs/sharding.md
explains which backend to pick, the teacher per backend, and the launch configs in ds_configs/.
"""

from tgdp.parallel.config import BACKENDS, ParallelConfig
from tgdp.parallel.dist import DistEnv, destroy_distributed, device_mesh, init_distributed
from tgdp.parallel.state import (ShardingError, ShardingStats, ema_update_, gather_full_state_dict, local_pairs,
                                 model_state_bytes, verify_sharding)
from tgdp.parallel.wrap import (backward, gradient_sync, optimizer_step, reshard, shard_model, shard_student, shard_teacher,
                                shard_units, unwrap)

__all__ = [
    "BACKENDS", "DistEnv", "ParallelConfig", "ShardingError", "ShardingStats", "backward", "destroy_distributed",
    "gradient_sync",
    "device_mesh", "ema_update_", "gather_full_state_dict", "init_distributed", "local_pairs", "model_state_bytes",
    "optimizer_step", "reshard", "shard_model", "shard_student", "shard_teacher", "shard_units", "unwrap",
    "verify_sharding",
]
