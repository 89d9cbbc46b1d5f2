"""The two probe heads trained on frozen, cached encoder features (docs/method.md 5.2).

Inputs are per-time-step global vectors `[B, T, D_in]` (T = 16 frame / audio-window pairs): for
the audio-visual probe D_in = 2D, the concatenation [audio CLS_k || visual CLS_k]; audio-only and
visual-only probes use one of the two halves (D_in = D).

* `AttentionProbe` - what the paper calls its "linear probe" (CAV-MAE Sync's
  `aggregate="self_attention_cls"`): a learnable class token prepended to the T steps, 2
  Transformer blocks of width D_in, a LayerNorm and a linear head on the class token.
* `LinearProbe` - a TRUE linear probe: mean over the T steps, a fixed (non-learned)
  standardisation with the training set's per-channel mean and std, one nn.Linear. The whole map
  is affine in the features, which is what "linear probe" means elsewhere (MAE's linprobe uses a
  non-affine BatchNorm for the same reason).
"""

from __future__ import annotations

import torch
from torch import nn

from tgdp.models.blocks import Block


class AttentionProbe(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0,
                 steps: int = 16, temporal_pos_embed: bool = False) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"probe width {in_dim} is not divisible by probe.num_heads={num_heads}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, in_dim))
        # Off by default: the paper's description has none (the blocks then treat the 16 steps as a set).
        self.pos_embed = nn.Parameter(torch.zeros(1, steps, in_dim)) if temporal_pos_embed else None
        self.blocks = nn.ModuleList([Block(in_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(in_dim)
        self.head = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D_in] -> logits [B, C]."""
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, : x.shape[1]]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


class LinearProbe(nn.Module):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.head = nn.Linear(in_dim, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    @torch.no_grad()
    def fit_standardisation(self, x: torch.Tensor) -> None:
        """Per-channel mean / std of the pooled TRAINING features (fixed afterwards)."""
        pooled = x.float().mean(1)
        self.mean.copy_(pooled.mean(0))
        self.std.copy_(pooled.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D_in] -> logits [B, C]."""
        return self.head((x.mean(1) - self.mean) / self.std)
