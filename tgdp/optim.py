"""Optimizer and learning-rate schedule of pretraining.

Weight decay applies to matrices only: norms, biases, CLS/register/modality/mask tokens and
position tables are excluded, as in MAE / timm's `param_groups_weight_decay`. The LR is an array
indexed by step (linear warm-up, cosine to `min_lr_ratio * lr`), like the EMA momentum: nothing to
checkpoint beyond the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tgdp.config import ConfigError
from tgdp.schedules import cosine_schedule

# Parameters that are never decayed, matched by name fragment (besides every 1-D tensor).
NO_DECAY_NAMES = ("token", "pos_embed", "modality", "register")


@dataclass
class OptimConfig:
    # CAV-MAE Sync's recipe (docs/method.md 4.2): Adam(W) betas (0.95, 0.999), peak LR 2e-4 at global
    # batch 512, cosine with 10 % linear warm-up down to 0.1 x LR. Scale `lr` linearly with batch.
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 5e-7  # CAV-MAE's value; MAE-style 0.05 is a common alternative
    eps: float = 1e-8
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off (the norm is still logged)
    fused: bool | None = None  # torch's fused AdamW; None: fused when the parameters are on CUDA

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and everything else (trained parameters only: frozen ones and
    those the model says no pass uses, `never_used_parameter_names`, are left out)."""
    never_used = getattr(model, "never_used_parameter_names", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name in never_used:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. On CUDA the fused kernel is the default: the foreach version
    took ~12 ms of a ~120 ms base step on an H200 (torch 2.11; docs/benchmarks.md, "One GPU")."""
    groups = param_groups(model, cfg.weight_decay)
    fused = cfg.fused
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> np.ndarray:
    """LR per step: linear warm-up from 0, then cosine from `lr` to `min_lr_ratio * lr`."""
    warmup = int(cfg.warmup_fraction * total_steps)
    return cosine_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, total_steps, warmup_steps=warmup, warmup_start=0.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
