"""The consolidated export: every model's FULL state dict in one safetensors file.

Why safetensors: eval jobs, linear probes and colleagues load it with `safetensors.torch.load_file`
(or `tgdp.models.interop.read_state_dict`) without torch.distributed, without the training world
size, and without unpickling anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tgdp.checkpoint.files import fsync_file


def gather_full_state_dicts(models: Mapping[str, nn.Module], rank: int) -> dict[str, torch.Tensor]:
    """`{"<name>.<param>": full CPU tensor}` on rank 0, `{}` elsewhere. Collective: each model is
    all-gathered (full_state_dict) and offloaded to rank 0's CPU only (cpu_offload), so no rank
    ever holds a full copy on the accelerator and ranks > 0 hold nothing."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(models):  # the gathers are collectives: same order on every rank
        state = get_model_state_dict(models[name], options=options)
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
