"""tgdp.parallel: the ONLY place that knows DDP, FSDP2 / HSDP and DeepSpeed ZeRO (besides
tgdp.checkpoint.zero_state, which reads and writes ZeRO state for checkpoints).

    env = init_distributed()                                   # torchrun / accelerate / submitit env
    teacher = copy.deepcopy(student)                           # BEFORE sharding: equal start
    wrapped = shard_student(student, cfg.parallel, env)        # zero*: optimizer=... here
    shard_teacher(teacher, cfg.parallel, env)                  # same recipe, inference_only
    verify_sharding(student, env, cfg.parallel.backend)        # refuses a silently unsharded model
    ... student.encode_masked(...); teacher.teacher_forward(...)  # entry points work on every backend
    backward(wrapped, loss); optimizer_step(wrapped, optimizer)
    ema_update_(local_pairs(student, teacher), momentum)       # shard-local, no communication

docs/sharding.md explains which backend to pick, the teacher per backend, and the launch configs
in ds_configs/.
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
