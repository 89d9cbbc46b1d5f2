"""What each rank holds: EMA pairs of local shards, sharding checks, full state dicts, memory.

`local_pairs` is the one place that knows where a backend keeps a parameter's local fp32 values:
FSDP2 / HSDP: `p.to_local()` of the sharded DTensor (the fp32 master shard); ZeRO-3: the teacher's
`p.ds_tensor` partition and the student's fp32 master partition (same element range on every
rank); DDP / ZeRO-2 / none: the full tensors. Identical layout on both sides is what lets
`ema_update_` run without any communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from tgdp.parallel import zero
from tgdp.parallel.config import SHARDED_BACKENDS
from tgdp.parallel.dist import DistEnv
from tgdp.parallel.wrap import placement, unwrap


class ShardingError(RuntimeError):
    """The parameters are not laid out over the ranks the way the configured backend promises."""


# ---------------------------------------------------------------------------------------------- EMA
@torch.no_grad()
def local_pairs(student: Any, teacher: Any) -> list[tuple[Tensor, Tensor]]:
    """[(teacher_local, student_local)] for every parameter the student TRAINS, local shards only.

    Frozen student parameters (the sin-cos position tables) and those the model never uses
    (`never_used_parameter_names`) never change and are left out. The
    teacher side is always fp32 storage (written in place by `ema_update_`); the student side is
    the fp32 master where the backend keeps one per element (FSDP2 shards, ZeRO-3 partitions),
    else the parameter itself (bf16 under zero2 + bf16: DeepSpeed's fp32 master is split
    differently from the replicated teacher). Cheap (no communication): call it at every update,
    ZeRO-3's student side may be a fresh view.
    """
    s_mod, t_mod = unwrap(student), unwrap(teacher)
    s_params, t_params = list(s_mod.named_parameters()), list(t_mod.named_parameters())
    if [n for n, _ in s_params] != [n for n, _ in t_params]:
        raise ValueError("student and teacher do not have the same parameters in the same order: the teacher must be "
                         "a deep copy of the student made before sharding")
    if any(zero.is_zero3_param(t) for _, t in t_params):
        zero.release_zero3(t_mod)  # a gathered copy would hide the updated partition from the next forward
    # Parameters the model declares never used are not trained (no optimizer state, so no ZeRO-3
    # fp32 master either); they never change, so their EMA is a no-op and they are left out too.
    never_used = getattr(s_mod, "never_used_parameter_names", lambda: set())()
    pairs = []
    for (name, s), (_, t) in zip(s_params, t_params):
        if not s.requires_grad or name in never_used:
            continue
        if isinstance(s, DTensor) or isinstance(t, DTensor):
            if not (isinstance(s, DTensor) and isinstance(t, DTensor)):
                raise ValueError(f"{name}: a DTensor on one side only; shard teacher and student with the same backend "
                                 "and let the teacher reshard after its forward (tgdp.parallel.reshard)")
            if s.placements != t.placements or s.device_mesh.shape != t.device_mesh.shape:
                raise ValueError(f"{name}: teacher {t.placements} on mesh {t.device_mesh.shape} vs student "
                                 f"{s.placements} on {s.device_mesh.shape}; use the same mesh for both")
            t_local, s_local = t.to_local(), s.to_local()
        elif zero.is_zero3_param(s) or zero.is_zero3_param(t):
            if not (zero.is_zero3_param(s) and zero.is_zero3_param(t)):
                raise ValueError(f"{name}: ZeRO-3 on one side only; a zero3 student needs the partitioned zero3 "
                                 "teacher from shard_teacher")
            master = zero.local_fp32_partition(s)
            t_local, s_local = t.ds_tensor, (s.ds_tensor if master is None else master).view(-1)
        else:
            t_local, s_local = t.detach(), s.detach()
        if t_local.shape != s_local.shape:
            raise ValueError(f"{name}: teacher local shape {tuple(t_local.shape)} vs student {tuple(s_local.shape)}")
        if t_local.dtype != torch.float32:
            raise ValueError(f"{name}: the teacher holds {t_local.dtype}; an EMA with 1 - m ~ 1e-3 needs fp32 storage")
        pairs.append((t_local, s_local))
    return pairs


@torch.no_grad()
def ema_update_(pairs: list[tuple[Tensor, Tensor]], momentum: float, gate: Optional[Tensor] = None) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student on every pair, one fused call.

    `torch._foreach_lerp_(T, S, 1 - m)` is that formula; m = 1 is a no-op, m = 0 a copy (also
    right when the teacher holds garbage, e.g. after a meta-device materialisation). bf16
    student sides are upcast (the accumulation stays fp32). No communication.

    `gate`: a 0-d 0 / 1 tensor on the device (the non-finite guard's device-side verdict, see
    tgdp/nonfinite.py): the weight becomes gate * (1 - m), so a skipped step leaves the teacher
    bitwise unchanged without the host reading the verdict. lerp with a 1-element tensor weight
    is the same formula as with a scalar, so an applied step is bitwise the ungated update.
    Cost: `_foreach_lerp_` has no fast path for a tensor weight, so this queues one small kernel
    per parameter (up to 650 at base) instead of a few; the host does not wait for any of them.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    if not pairs or momentum == 1.0:
        return
    teachers = [t for t, _ in pairs]
    students = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in pairs]
    if gate is not None:
        weight = gate.to(teachers[0].dtype) * (1.0 - momentum)  # a Python scalar: no host-to-device copy
        torch._foreach_lerp_(teachers, students, [weight] * len(teachers))
    elif momentum == 0.0:
        torch._foreach_copy_(teachers, students)
    else:
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)


# ---------------------------------------------------------------------------------------------- checks
def _local_and_full_numel(p: Tensor) -> tuple[int, int]:
    if isinstance(p, DTensor):
        return p.to_local().numel(), p.numel()
    if zero.is_zero3_param(p):
        return p.ds_tensor.numel(), p.ds_numel
    return p.numel(), p.numel()


@dataclass
class ShardingStats:
    backend: str
    world_size: int
    shard_group_size: int  # ranks that share one copy of the parameters
    total_numel: int  # parameters of the full model
    local_numel: list[int] = field(default_factory=list)  # per rank

    @property
    def fractions(self) -> list[float]:
        return [n / self.total_numel for n in self.local_numel]

    @property
    def expected_fraction(self) -> float:
        return 1.0 / self.shard_group_size


def verify_sharding(model: Any, env: DistEnv, backend: Optional[str] = None, shard_group_size: Optional[int] = None,
                    tolerance: float = 0.1) -> ShardingStats:
    """Check every rank holds ~1/S of the parameters (S = ranks sharing a copy); collective.

    `backend` defaults to what shard_student / shard_teacher recorded on the model. This is the
    guard against a launcher that silently did not shard (accelerate's FSDP plugin on CPU): call it
    once after sharding with the CONFIGURED backend. Raises ShardingError naming the fractions.
    """
    module = unwrap(model)
    record = placement(module)
    backend = backend or (record.backend if record else "none")
    if shard_group_size is None:
        shard_group_size = record.shard_group_size if record and record.backend == backend else (
            env.world_size if backend in SHARDED_BACKENDS else 1)
    local = total = 0
    for p in module.parameters():
        n_local, n_full = _local_and_full_numel(p)
        local, total = local + n_local, total + n_full
    counts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        mine = torch.tensor([local], dtype=torch.int64)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        counts = [int(c.item()) for c in gathered]
    stats = ShardingStats(backend, len(counts), shard_group_size, total, counts)
    bad = [(r, f) for r, f in enumerate(stats.fractions) if abs(f - stats.expected_fraction) > tolerance]
    if bad:
        hint = (" The model was NOT sharded: apply tgdp.parallel.shard_student / shard_teacher (accelerate's FSDP "
                "plugin is silently ignored on CPU)." if all(f == 1.0 for _, f in bad) else "")
        raise ShardingError(f"backend {backend} should leave each rank 1/{shard_group_size} = "
                            f"{stats.expected_fraction:.3f} of the {total} parameters, but ranks hold "
                            f"{[round(f, 3) for f in stats.fractions]}.{hint}")
    return stats


# ---------------------------------------------------------------------------------------------- export
def gather_full_state_dict(model: Any) -> dict[str, Tensor]:
    """Full fp32 CPU tensors on rank 0 ({} elsewhere), copies never aliasing the model; collective.

    Trained ZeRO parameters are taken from DeepSpeed's fp32 masters, not from the bf16 copies.
    """
    module = unwrap(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = list(module.named_parameters())
    if any(isinstance(p, DTensor) for _, p in params):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # clone: with one rank per shard group (or on the CPU) the result can alias the live local shard
        return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in full.items()} if rank == 0 else {}
    out: dict[str, Tensor] = {}
    for name, p in params:
        value = zero.full_fp32(p) if hasattr(p, "_hp_mapping") or zero.is_zero3_param(p) else None
        if value is None and zero.is_zero3_param(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                value = p.detach().clone()
        if value is None:
            value = p.detach()
        if rank == 0:
            shape = getattr(p, "ds_shape", p.shape)
            out[name] = value.reshape(shape).float().cpu().clone()
    if rank == 0:
        out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
    return out


# ---------------------------------------------------------------------------------------------- memory
def _tensors_bytes(tensors: Iterable[Optional[Tensor]], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        if t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def model_state_bytes(model: Any, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes THIS rank keeps between steps: params (+ fp32 masters), grads, optimizer state.

    Counts tensors reachable from the module's parameters and the optimizer (DeepSpeed: its inner
    optimizer over flat fp32 partitions), each storage once. Activations and communication
    buffers are not included: compare against torch.cuda.max_memory_allocated for those.
    """
    module = unwrap(model)
    with torch.no_grad():
        seen: set[int] = set()
        params = list(module.parameters())
        local = [p.ds_tensor if zero.is_zero3_param(p) else p for p in params]
        out = {"params": _tensors_bytes(local, seen), "grads": _tensors_bytes([p.grad for p in params], seen)}
        inner = getattr(getattr(model, "optimizer", None), "optimizer", None)  # DeepSpeed engine
        if isinstance(inner, torch.optim.Optimizer):
            masters = [p for g in inner.param_groups for p in g["params"]]
            out["params"] += _tensors_bytes(masters, seen)
            out["grads"] += _tensors_bytes([p.grad for p in masters], seen)
            optimizer = inner
        state: list[Tensor] = []
        if optimizer is not None:
            for s in optimizer.state.values():
                state.extend(v for v in s.values() if isinstance(v, Tensor))
        out["optimizer"] = _tensors_bytes(state, seen)
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out
