"""The TG-DP task: the only place that knows what TG-DP is (passes, teacher, losses, EMA, switches).

    config.py  TaskConfig: modes and ablation switches, mask ratios, loss weights, EMA momentum
               (presets in tgdp/configs/task/: tgdp, dual, cavmae)
    task.py    TGDPTask (student + EMA teacher + the step), TaskOutput, Schedules, build_task
    flops.py   analytic training FLOPs per sample, pass by pass (for MFU)

Generic pieces it uses live beside it: tgdp/schedules.py (per-step arrays), tgdp.parallel
(`local_pairs` + `ema_update_`: the shard-local fused EMA update), tgdp/losses.py, tgdp/models/. docs/model.md walks through it all.
"""

from tgdp.task.config import CONTRASTIVE_LOSSES, MODES, TaskConfig
from tgdp.task.flops import flops_breakdown, flops_per_sample
from tgdp.task.task import TEACHER_METHODS, ContrastiveBank, Schedules, TaskOutput, TGDPTask, build_task

__all__ = [
    "CONTRASTIVE_LOSSES", "MODES", "Schedules", "TEACHER_METHODS", "TGDPTask", "TaskConfig", "TaskOutput",
    "build_task", "flops_breakdown", "flops_per_sample",
]
