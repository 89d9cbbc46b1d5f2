"""Stateful adapters that make modules and optimizers checkpoint by parameter NAME.

`module.state_dict()` under FSDP2 already yields name-keyed DTensors, but `optimizer.state_dict()`
keys state by integer parameter ids and is empty before the first step. torch's
`get_model_state_dict` / `get_optimizer_state_dict` (torch.distributed.checkpoint.state_dict)
key both by fully-qualified parameter names, return DTensor shards under FSDP2 and plain tensors
otherwise, and initialise an empty optimizer's state - exactly what DCP needs to reshard a
checkpoint onto another world size or from sharded to unsharded models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class ModelState:
    """A module as a DCP `Stateful` (student, EMA teacher, ...). `CheckpointManager` wraps bare
    `nn.Module` values of the app state in this automatically."""

    def __init__(self, model: nn.Module, options: StateDictOptions | None = None):
        self.model = model
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)

    def full_state_dict(self) -> dict[str, Any]:
        """Every tensor FULL on rank 0's CPU, {} on the other ranks (the export). Collective: all-gathered
        (full_state_dict) and offloaded to rank 0 only (cpu_offload), so no rank holds a full copy on
        the accelerator. Every model adapter has this method (ZeroModelState too)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class OptimizerState:
    """An optimizer as a DCP `Stateful`; needs its model to name the parameters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: StateDictOptions | None = None):
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)
