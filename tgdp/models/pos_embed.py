"""Fixed 2-D sin-cos position tables (docs/method.md 1.4), as in MAE / CAV-MAE `pos_embed.py`.

For token m = i * grid_w + j (i = row, j = column) the FIRST dim/2 channels encode the COLUMN j and
the LAST dim/2 channels the ROW i (MAE's meshgrid puts the column first although its comment says
"h"). Each half is [sin(p * w_0..), cos(p * w_0..)] with w_k = 10000^(-k / (dim/4)): all sines,
then all cosines. For audio the rows are frequency bands and the columns are time, so the first
half encodes time. Computed in float64 (as numpy does) and rounded to float32 once.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] = [sin(p * w), cos(p * w)] with w_k = 10000^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, dim] float32 table; first half = column index, second half = row index."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # i of token m
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # j of token m
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()
