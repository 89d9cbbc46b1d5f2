"""The consolidated export: every model's FULL state dict in one safetensors file.

Why safetensors: eval jobs, linear probes and colleagues load it with `safetensors.torch.load_file`
(or `tgdp.models.interop.read_state_dict`) without torch.distributed, without the training world
size, and without unpickling anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tgdp.checkpoint.files import fsync_file
from tgdp.checkpoint.stateful import ModelState


def gather_full_state_dicts(models: Mapping[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """`{"<name>.<param>": full CPU tensor}` on rank 0, `{}` elsewhere. Collective.

    models: bare modules (wrapped as `ModelState`) or model adapters with `full_state_dict()`:
    `ModelState` all-gathers (full_state_dict) and offloads to rank 0's CPU only (cpu_offload), so
    no rank ever holds a full copy on the accelerator and ranks > 0 hold nothing;
    `ZeroModelState` (ZeRO engines) gathers DeepSpeed's fp32 masters and ZeRO-3 partitions."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(models):  # the gathers are collectives: same order on every rank
        model = models[name]
        state = (ModelState(model) if isinstance(model, nn.Module) else model).full_state_dict()
        if rank == 0:
            tensors.update({f"{name}.{key}": value for key, value in state.items()})
    return tensors


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic write (tmp + fsync + rename): a reader sees the previous file or the whole new one."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    clean: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():  # safetensors refuses tensors sharing storage (tied weights)
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()
        seen.add(ptr)
        clean[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(clean, str(tmp), metadata=metadata)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
