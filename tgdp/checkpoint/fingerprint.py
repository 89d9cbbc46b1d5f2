"""An exact fingerprint of a checkpoint's state that does not depend on how it is sharded.

Why: a checkpoint saved by W ranks is loaded by W' ranks, possibly under another backend (DCP
reshards, the ZeRO adapters regather). A bug anywhere on that path (a wrong offset, a padded shard,
a swapped moment) would silently resume from different weights. Every save records one 64-bit
fingerprint per app-state entry (meta.json, `fingerprint`); a resume recomputes it from what was
loaded and refuses a mismatch, so "model and optimizer exact across world sizes" is checked on
every real resume, not only in tests.

The fingerprint of an entry is the sum, modulo 2**64, over every element of every tensor of
`bits(element) * weight(key, global index)`: integer arithmetic, so the sum is exact and
independent of the order in which shards are added, and the weight makes it depend on where
each value sits (a permutation changes it). A DTensor adds its local shard at its global offset,
once per replica (the ranks at coordinate 0 of every replicated mesh dimension); a plain tensor
is, by DCP's convention, the same on every rank and is added by rank 0. Plain Python values
(step counters, learning rates) are added by rank 0 through a CRC of their key and repr.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

_MASK = (1 << 64) - 1
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: spreads neighbouring indices apart
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}.{i}")
    else:
        yield path, value


def _as_int64(t: torch.Tensor) -> torch.Tensor:
    """The elements' bit patterns as int64 (floats reinterpreted, integers and bools widened)."""
    t = t.detach().contiguous()
    if t.dtype in _BITS:
        return t.view(_BITS[t.dtype]).to(torch.int64)
    if t.is_complex() or t.is_floating_point():
        raise TypeError(f"no fingerprint for dtype {t.dtype}")
    return t.to(torch.int64)


def _local_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]] | None:
    """(local values, global shape, global offset of the local block), or None where another rank
    adds the same values (a replica)."""
    if not isinstance(t, DTensor):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return (t, tuple(t.shape), (0,) * t.dim()) if rank == 0 else None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank holds no part of the mesh
        return None
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate) and coordinate[dim] != 0:
            return None
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(t.shape), tuple(offset)


def _tensor_sum(path: str, t: torch.Tensor) -> int:
    view = _local_view(t)
    if view is None:
        return 0
    local, global_shape, offset = view
    if local.numel() == 0:
        return 0
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    index = torch.zeros((), dtype=torch.int64, device=local.device)
    for d, (size, start) in enumerate(zip(local.shape, offset)):
        shape = [1] * local.dim()
        shape[d] = size
        index = index + (torch.arange(size, device=local.device, dtype=torch.int64) + start).view(shape) * strides[d]
    key = zlib.crc32(path.encode())
    weight = (index * _GOLDEN + key) * 2 + 1  # odd, so no element's bits are multiplied away (mod 2**64)
    return int((_as_int64(local) * weight).sum().item()) & _MASK


def _value_sum(path: str, value: Any) -> int:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return zlib.crc32(f"{path}={value!r}".encode()) if rank == 0 else 0


def fingerprint(states: Mapping[str, Any], device: torch.device | None = None) -> dict[str, str]:
    """One hex fingerprint per top-level entry of `states` (state dicts as DCP saves them).
    Collective when a process group exists: every rank must call it with the same entries."""
    names = sorted(states)
    sums = []
    for name in names:
        total = 0
        for path, leaf in _leaves(states[name], name):
            total += _tensor_sum(path, leaf) if isinstance(leaf, torch.Tensor) else _value_sum(path, leaf)
        sums.append(total & _MASK)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # int64 all-reduce wraps modulo 2**64 like the local sums: the total is the same exact sum.
        signed = [s - (1 << 64) if s >= 1 << 63 else s for s in sums]
        reduced = torch.tensor(signed, dtype=torch.int64, device=device or torch.device("cpu"))
        dist.all_reduce(reduced)
        sums = [int(s) & _MASK for s in reduced.tolist()]
    return {name: f"{s:016x}" for name, s in zip(names, sums)}
