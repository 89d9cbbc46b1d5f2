"""The few tiny collectives the checkpoint code needs (flags and one path), no-ops for one process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tgdp.checkpoint.errors import CheckpointError


class Collectives:
    """The few tiny collectives the manager needs; no-ops for a single process."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    @property
    def active(self) -> bool:
        if self.world_size == 1:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            raise CheckpointError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        return True

    def _device(self) -> torch.device:
        backend = str(dist.get_backend())
        if backend == "gloo" or "cpu:" in backend:
            return torch.device("cpu")
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type, torch.accelerator.current_device_index())  # NCCL & co: device tensors

    def failed_ranks(self, failed: bool) -> list[int]:
        """All-reduce of per-rank failure flags: every rank learns WHO failed (doubles as a barrier)."""
        if not self.active:
            return [self.rank] if failed else []
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self._device())
        flags[self.rank] = int(failed)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._device())
        dist.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` everywhere (pickled between OUR processes only: trusted)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
