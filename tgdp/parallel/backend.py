"""`TrainingBackend`: the one object through which the trainer trains on any backend.

Built from `cfg.parallel`, it shards the student and the EMA teacher, owns the optimizer the LR
schedule drives, runs each micro-batch's backward with the gradient-sync control accumulation
needs, takes the optimizer step with every skip path, reports the gradient norm, and hands the
checkpoint manager the state to save (modules and `OptimizerState`, or the ZeRO adapters that
read DeepSpeed's masters and partitions). Two implementations, because two owners of the update
exist: torch's optimizer (none / ddp / fsdp2 / hsdp), where tgdp clips, decides and skips, and a
DeepSpeed engine (zero2 / zero3), which clips, decides and skips inside its own `step()`.

    backend = build_backend(cfg.parallel, env, student, make_teacher, cfg.optim, micro_batch_size=..., grad_accum=...)
    task = TGDPTask(student, cfg.task, total_steps, teacher=backend.teacher); task.reset_teacher()
    for micro, loss in ...: backend.backward(loss, last=micro == accum - 1)
    decision = backend.step(losses, guard)       # the norm, and whether the update was applied
    state = backend.checkpoint_state({"student": ..., "teacher": ...})
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from tgdp.checkpoint.stateful import OptimizerState
from tgdp.nonfinite import NonFiniteGuard, supports_device_skip
from tgdp.optim import OptimConfig, build_optimizer
from tgdp.parallel.config import SHARDED_BACKENDS, ParallelConfig
from tgdp.parallel.dist import DistEnv
from tgdp.parallel.state import verify_sharding
from tgdp.parallel.wrap import backward, gradient_sync, optimizer_step, shard_student, shard_teacher
from tgdp.parallel.zero_state import ZeroEngineState, ZeroModelState, ZeroOptimizerState

log = logging.getLogger("tgdp.parallel")


@dataclass
class StepDecision:
    """What an optimizer step did: the global gradient norm before clipping (a device tensor), and
    whether the update was applied (a bool, or under the device-side guard a device flag that
    the host reads a step later, tgdp/nonfinite.py)."""

    norm: torch.Tensor
    applied: Union[bool, torch.Tensor]


class TrainingBackend(ABC):
    """The student and teacher as one backend trains them (see the module docstring)."""

    #: Checkpoint entries of this backend that a checkpoint of another backend may lack, and what
    #: loading without them means (logged as a warning, with the checkpoint's name for `{}`).
    optional_entries: dict[str, str] = {}

    def __init__(self, cfg: ParallelConfig, student: nn.Module, teacher: Optional[nn.Module], wrapped: Any,
                 optimizer: torch.optim.Optimizer):
        self.cfg, self.student, self.teacher, self.wrapped, self.optimizer = cfg, student, teacher, wrapped, optimizer

    @property
    def can_skip_on_device(self) -> bool:
        """Whether the optimizer can skip a non-finite step on the device (nonfinite_guard=device)."""
        return False

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """This micro-batch's backward; gradients are reduced across ranks on the step's last
        micro-batch, or on every one when `parallel.defer_grad_sync` is off."""
        with gradient_sync(self.wrapped, enabled=last or not self.cfg.defer_grad_sync):
            backward(self.wrapped, loss, boundary=last)

    @abstractmethod
    def step(self, losses: list[torch.Tensor], guard: NonFiniteGuard, grad_clip: float) -> StepDecision:
        """Clip, decide apply-or-skip (a non-finite loss or norm skips), update, clear the gradients."""

    def model_states(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """The models as checkpoints and the export read them."""
        return dict(models)

    @abstractmethod
    def checkpoint_state(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """The models plus the optimizer (and engine) state, as checkpoint entries."""

    def drop_missing_entries(self, state: dict[str, Any], saved: set[str], checkpoint: str) -> None:
        """Before loading `checkpoint`, whose entries are `saved`: leave out this backend's optional
        entries that a checkpoint of another backend does not have."""
        for name, meaning in self.optional_entries.items():
            if name in state and name not in saved:
                del state[name]
                log.warning(meaning.format(checkpoint))


class TorchBackend(TrainingBackend):
    """none / ddp / fsdp2 / hsdp: torch's AdamW steps; tgdp clips and decides the skip."""

    @property
    def can_skip_on_device(self) -> bool:
        return supports_device_skip(self.optimizer)

    def step(self, losses: list[torch.Tensor], guard: NonFiniteGuard, grad_clip: float) -> StepDecision:
        norm = global_grad_norm(list(self.student.parameters()), grad_clip)
        if guard.mode == "device":
            applied = guard.decide_on_device(losses + [norm])
            guard.gate_optimizer(self.optimizer, applied)
            optimizer_step(self.wrapped, self.optimizer)
            return StepDecision(norm, applied)
        if guard.decide_on_host(losses + [norm]):  # the step's one host sync
            optimizer_step(self.wrapped, self.optimizer)
            return StepDecision(norm, True)
        self.optimizer.zero_grad(set_to_none=True)  # a non-finite norm made the clip scale them by NaN
        return StepDecision(norm, False)

    def checkpoint_state(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        return {**models, "optim": OptimizerState(self.student, self.optimizer)}


class ZeroBackend(TrainingBackend):
    """zero2 / zero3: the DeepSpeed engine clips, all-reduces the norm, skips a non-finite step and
    clears its gradient partitions inside `step()` (its overflow check, DeepSpeed's default for
    fp32 and bf16), and reports the decision through `was_step_applied()`."""

    # Written by a DDP / FSDP2 / none run: same names and layouts for weights and AdamW, only
    # DeepSpeed's own counters are absent (they restart; the trainer's step does not).
    optional_entries = {"engine": "{} was written without a DeepSpeed engine (backend changed on resume): weights, "
                                  "teacher and AdamW state load by name; DeepSpeed's step counters restart"}

    def step(self, losses: list[torch.Tensor], guard: NonFiniteGuard, grad_clip: float) -> StepDecision:
        optimizer_step(self.wrapped, self.optimizer)
        ds_norm = self.wrapped.get_global_grad_norm()  # a float DeepSpeed already read (None: not computed)
        return StepDecision(torch.tensor(float("nan") if ds_norm is None else float(ds_norm)),
                            bool(self.wrapped.was_step_applied()))

    def model_states(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        return {name: ZeroModelState(m) for name, m in models.items()}

    def checkpoint_state(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        return {**self.model_states(models), "optim": ZeroOptimizerState(self.wrapped),
                "engine": ZeroEngineState(self.wrapped)}


def build_backend(cfg: ParallelConfig, env: DistEnv, student: nn.Module,
                  make_teacher: Optional[Callable[[], nn.Module]], optim: OptimConfig, *, micro_batch_size: int,
                  grad_accum: int) -> TrainingBackend:
    """Shard `student`, then the teacher `make_teacher()` returns (None: no teacher), as `cfg` says,
    and build the optimizer. DeepSpeed takes the optimizer built on the unsharded parameters and
    the batch geometry; torch's is built on the sharded ones.

    The teacher is made only once the student is sharded, so a rank never holds two full fp32
    models (2.5 GB each at the large preset): give a factory that builds a fresh model of the
    student's geometry, and copy the student into it afterwards (`TGDPTask.reset_teacher`: a
    shard-local copy, exact on every backend)."""
    if cfg.engine_owns_step:
        ds = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": optim.grad_clip}
        wrapped = shard_student(student, cfg, env, optimizer=build_optimizer(student, optim), ds_config_overrides=ds)
    else:
        wrapped = shard_student(student, cfg, env)
    teacher = make_teacher() if make_teacher is not None else None
    if teacher is not None:
        shard_teacher(teacher, cfg, env)
    if cfg.backend in SHARDED_BACKENDS:
        verify_sharding(student, env, cfg.backend)
    if cfg.engine_owns_step:  # DeepSpeed wraps the optimizer it was given: the LR is set on its wrapper
        return ZeroBackend(cfg, student, teacher, wrapped, wrapped.optimizer)
    return TorchBackend(cfg, student, teacher, wrapped, build_optimizer(student, optim))


def global_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip (when max_norm > 0) and return the global gradient norm; DTensor-aware under FSDP2."""
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"), foreach=True)
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm
