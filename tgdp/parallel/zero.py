"""DeepSpeed ZeRO-2 / ZeRO-3, driven from our code (`deepspeed.initialize`), not accelerate's plugin.

The JSON files in ds_configs/ hold ZeRO knobs only. Precision and batch sizes come from
`ParallelConfig` and the trainer (`ds_config_overrides`), so there is one source of truth for each:
a JSON that sets `bf16` / `fp16` / `torch_autocast` is refused. Two DeepSpeed traps are closed here:
* a misspelt TOP-LEVEL key is silently ignored by DeepSpeed: we refuse keys we do not know
  (keys starting with `_`, e.g. `_comment`, are documentation and are stripped);
* `gradient_clipping` defaults to 1.0 in DeepSpeed (it silently clips): we default it to 0.0
  (no clipping) unless the JSON or the trainer sets it.

Teachers (docs/sharding.md, "ZeRO teacher"): zero2 -> a replicated fp32 module (the student's
parameters are replicated too, so the EMA reads them locally); zero3 -> a ZeRO-3 inference engine
on the same ranks with fp32 partitions and persistence disabled, so teacher and student partitions
line up element for element and the EMA is a local lerp on `param.ds_tensor`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tgdp.config import ConfigError
from tgdp.parallel.config import REPO_ROOT, ParallelConfig

# Top-level DeepSpeed keys tgdp's JSONs may use. Anything else is most likely a typo that
# DeepSpeed would silently ignore (e.g. "zero_optimisation").
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "communication_data_type", "data_types", "steps_per_print", "wall_clock_breakdown",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "optimizer", "scheduler",
    "prescale_gradients", "gradient_predivide_factor", "memory_breakdown", "flops_profiler", "checkpoint",
    "dump_state",
})
PRECISION_KEYS = ("bf16", "fp16", "torch_autocast", "amp")


def _ensure_extensions_dir() -> None:
    """DeepSpeed JIT-compiles a small comm op on first use (~30 s): cache it inside the project."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))


def load_deepspeed_config(cfg: ParallelConfig, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The student's DeepSpeed config: the JSON, validated, plus precision and trainer overrides."""
    path = cfg.deepspeed_config_path()
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"parallel.deepspeed_config: cannot read {path}: {exc}") from exc
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(ds) - KNOWN_KEYS - set(PRECISION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level DeepSpeed keys {unknown} (DeepSpeed would silently ignore "
                          f"them; known: {sorted(KNOWN_KEYS)})")
    set_precision = [k for k in PRECISION_KEYS if k in ds]
    if set_precision:
        raise ConfigError(f"{path}: remove {set_precision}; precision comes from parallel.mixed_precision")
    nvme = [f"zero_optimization.{k}.device" for k in ("offload_optimizer", "offload_param")
            if str(ds.get("zero_optimization", {}).get(k, {}).get("device", "")).lower() == "nvme"]
    if nvme:  # tgdp.parallel.zero_state reads optimizer state from memory; swapped-out state it cannot
        raise ConfigError(f"{path}: {nvme} = nvme: tgdp's ZeRO checkpoints cannot read NVMe-swapped state; "
                          "offload to 'cpu' (or not at all)")
    stage = ds.get("zero_optimization", {}).get("stage")
    want = {"zero2": 2, "zero3": 3}[cfg.backend]
    if stage != want:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage}, but parallel.backend={cfg.backend} needs "
                          f"{want}; use ds_configs/{cfg.backend}.json or fix the stage")
    ds.update(overrides or {})
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed's own default (1.0) would clip silently
    ds.setdefault("steps_per_print", 10**9)  # tgdp.metrics logs; DeepSpeed's prints are noise
    if "train_batch_size" not in ds:
        ds.setdefault("train_micro_batch_size_per_gpu", 1)
        ds.setdefault("gradient_accumulation_steps", 1)
    if cfg.mixed_precision == "bf16":
        # bf16 params for compute, fp32 master partitions. check_grad_overflow (DeepSpeed's default,
        # spelled out because the trainer's non-finite guard relies on it): a NaN/inf gradient norm
        # skips the step and clears ZeRO's gradient partitions.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds.setdefault("communication_data_type", "fp32")  # fp32 gradient reductions
    return ds


def teacher_deepspeed_config(student_ds: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 inference config for the EMA teacher: same partitioning, fp32 storage, nothing persistent.

    fp32: the EMA adds (1 - m) ~ 1e-3 of the student per step; bf16 storage would round most of that
    away. Persistence 0: DeepSpeed keeps small parameters gathered between forwards ("persistent"),
    so an EMA written into their partitions would not be seen by the next forward.
    """
    zero = copy.deepcopy(student_ds["zero_optimization"])
    for key in ("offload_optimizer", "sub_group_size", "reduce_bucket_size", "reduce_scatter",
                "contiguous_gradients", "overlap_comm", "round_robin_gradients"):
        zero.pop(key, None)
    zero.update(stage=3, stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def zero_student(model: nn.Module, cfg: ParallelConfig, optimizer: Optional[torch.optim.Optimizer],
                 overrides: Optional[dict[str, Any]]) -> Any:
    """`deepspeed.initialize` the student; returns the engine (it owns backward and step)."""
    _ensure_extensions_dir()
    import deepspeed

    ds = load_deepspeed_config(cfg, overrides)
    if optimizer is None and "optimizer" not in ds:
        raise ValueError(f"backend {cfg.backend}: pass optimizer= (built on model.parameters() BEFORE shard_student) "
                         "or give the DeepSpeed JSON an 'optimizer' section")
    if optimizer is not None:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW: fine, just not on DeepSpeed's list
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def zero3_teacher(model: nn.Module, cfg: ParallelConfig, overrides: Optional[dict[str, Any]]) -> Any:
    """A ZeRO-3 inference engine (no optimizer) partitioned exactly like the zero3 student."""
    _ensure_extensions_dir()
    import deepspeed

    ds = teacher_deepspeed_config(load_deepspeed_config(cfg, overrides))
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    return engine


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_id")


def release_zero3(module: nn.Module) -> None:
    """Drop any gathered full copy of ZeRO-3 params so the next forward re-gathers the partitions.

    Needed before an in-place EMA on `ds_tensor`: a parameter left AVAILABLE would keep serving
    its stale gathered copy. Freeing is local (the partition stays authoritative).
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    available = [p for p in module.parameters() if is_zero3_param(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    for p in available:
        p.partition()


def has_fp32_master(p: torch.Tensor) -> bool:
    """Whether DeepSpeed keeps an fp32 master (and optimizer state) for `p`: exactly the parameters
    its optimizer was given (tgdp.optim leaves out frozen and never-used ones). Same on every rank.

    ZeRO-1/2 link `_hp_mapping` to those only; ZeRO-3 sets `_z3_optimizer` on EVERY module parameter,
    so there the optimizer's own groups are asked (a never-used parameter has no master to read).
    """
    if not p.requires_grad:
        return False
    if hasattr(p, "_hp_mapping"):
        return True
    z3 = getattr(p, "_z3_optimizer", None)
    if z3 is None:
        return False
    ids = getattr(z3, "_tgdp_master_ids", None)
    if ids is None:  # once per optimizer: the EMA asks for every parameter at every step
        ids = frozenset(id(q) for group in z3.fp16_groups for q in group)
        z3._tgdp_master_ids = ids
    return id(p) in ids


def local_fp32_partition(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The fp32 master partition of a trainable ZeRO-3 param (aligned with `p.ds_tensor`), or None."""
    from deepspeed.utils import safe_get_local_fp32_param

    if not is_zero3_param(p) or not has_fp32_master(p):
        return None
    return safe_get_local_fp32_param(p)


def full_fp32(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The full fp32 master copy of a ZeRO-trained param (a collective), or None if it has none."""
    from deepspeed.utils import safe_get_full_fp32_param

    if not has_fp32_master(p):
        return None
    return safe_get_full_fp32_param(p)
