"""The EMA teacher update: theta_T <- m * theta_T + (1 - m) * theta_S, shard-local, fused, in fp32.

Why it is written this way (systems.md B1, the dinov3 pattern):

* Student and teacher are sharded IDENTICALLY (same module tree, same `fully_shard` granularity,
  same mesh), so the i-th parameter of each holds the same slice of the same tensor on every
  rank. The update therefore works on each rank's local shard (`DTensor.to_local()`) and needs
  no communication at all. Unsharded modules go through the same code (plain tensors).
* One fused multi-tensor call, `torch._foreach_lerp_(teacher, student, 1 - m)`, instead of a
  Python loop over ~650 tensors: lerp towards the student with weight 1 - m is exactly
  m * T + (1 - m) * S, and it is exact at the ends (m = 1 leaves T unchanged, m = 0 copies S).
* fp32: the sharded parameters are the fp32 master copies (FSDP2's MixedPrecisionPolicy casts
  to bf16 only for compute), so the EMA accumulates in fp32. With 1 - m ~ 4e-3 a bf16 teacher
  would lose most updates to rounding; parameters stored in a lower precision are therefore
  updated through an fp32 temporary (which still rounds on the way back: keep teachers in fp32).
* Parameters the STUDENT does not train (the frozen sin-cos position tables) are copied, so
  teacher and student stay equal even if a checkpoint load changed one of them. Floating-point
  buffers are averaged like parameters (timm's ModelEmaV3 default), others copied.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["ema_update", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (no communication; under no_grad the storage itself), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def _pairs(teacher: Iterable[tuple[str, torch.Tensor]], student: Iterable[tuple[str, torch.Tensor]],
           kind: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(teacher_local, student_local, student_original)] after checking names and shapes match."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} {kind}s, student {len(student)}: not the same architecture")
    out = []
    for (name_t, t), (name_s, s) in zip(teacher, student):
        if name_t != name_s:
            raise ValueError(f"{kind} order differs: teacher {name_t!r} vs student {name_s!r}")
        if isinstance(t, DTensor) != isinstance(s, DTensor):
            raise ValueError(f"{kind} {name_t!r} is a DTensor on one side only: shard teacher and student "
                             "identically, and reshard the teacher after its forward (FSDPModule.reshard())")
        t_local, s_local = local_tensor(t), local_tensor(s)
        if t_local.shape != s_local.shape:
            raise ValueError(f"{kind} {name_t!r}: teacher shard {tuple(t_local.shape)} vs student "
                             f"{tuple(s_local.shape)}; shard teacher and student identically")
        out.append((t_local, s_local, s))
    return out


def _lerp_fp32(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """targets <- lerp(targets, sources, weight), fused per dtype, accumulated in at least fp32."""
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        groups[t.dtype].append(i)
    for dtype, index in groups.items():
        t_list = [targets[i] for i in index]
        s_list = [sources[i] for i in index]
        if dtype in (torch.float32, torch.float64):
            torch._foreach_lerp_(t_list, [s.to(dtype) for s in s_list], weight)
        else:  # bf16 / fp16 storage: average through fp32 temporaries, then round back once
            t32 = [t.float() for t in t_list]
            torch._foreach_lerp_(t32, [s.float() for s in s_list], weight)
            torch._foreach_copy_(t_list, t32)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_T <- momentum * theta_T + (1 - momentum) * theta_S on every parameter and float buffer.

    `teacher` and `student` must have the same parameters in the same order (a deep copy, sharded
    the same way). Frozen student parameters and non-float buffers are copied.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    params = _pairs(teacher.named_parameters(), student.named_parameters(), "parameter")
    buffers = _pairs(teacher.named_buffers(), student.named_buffers(), "buffer")
    lerp_t, lerp_s, copy_t, copy_s = [], [], [], []
    for t, s, original in params:
        (lerp_t if original.requires_grad else copy_t).append(t)
        (lerp_s if original.requires_grad else copy_s).append(s)
    for t, s, _ in buffers:
        (lerp_t if t.is_floating_point() else copy_t).append(t)
        (lerp_s if t.is_floating_point() else copy_s).append(s)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_s)
    if lerp_t and momentum < 1.0:  # m = 1 is the end of the cosine schedule: nothing to do
        _lerp_fp32(lerp_t, lerp_s, 1.0 - momentum)
