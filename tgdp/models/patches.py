"""Patch layout of the reconstruction targets and the MAE loss (docs/method.md 3.2).

A patch vector is laid out (p_row, p_col, channel), channel fastest, as MAE's `patchify`.
Audio [B, T, F] is first viewed as a one-channel image [B, 1, F, T] (rows = frequency, cols =
time), so audio patch index = f_row * (T / p) + t_col, the same order as the patch embedding.

The MAE loss lives here, not with the other losses, because it is a pure function of this layout:
the mean squared error per patch, averaged over the REMOVED patches of the whole batch (visible
patches do not count), one value per modality.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p) * (W/p), p * p * C]."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, channels: int, grid: tuple[int, int], p: int) -> torch.Tensor:
    """[B, h * w, p * p * C] -> [B, C, h * p, w * p]; the inverse of `patchify`."""
    h, w = grid
    if x.shape[1] != h * w:
        raise ValueError(f"expected {h * w} patches for grid {grid}, got {x.shape[1]}")
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def audio_as_image(audio: torch.Tensor) -> torch.Tensor:
    """fbank [B, T, F] -> [B, 1, F, T] (height = frequency, width = time)."""
    return audio.unsqueeze(1).transpose(2, 3)


def patchify_audio(audio: torch.Tensor, p: int) -> torch.Tensor:
    """[B, T, F] -> [B, (F/p) * (T/p), p * p]."""
    return patchify(audio_as_image(audio), p)


def unpatchify_audio(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """[B, N_a, p * p] -> [B, T, F] for grid (F/p, T/p)."""
    return unpatchify(x, 1, grid, p).squeeze(1).transpose(1, 2)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation with the UNBIASED variance, (t - mean) / sqrt(var + eps) (MAE)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default and MAE
    return (target - mean) / (var + eps) ** 0.5


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar: sum over removed patches of the per-patch MSE / number of removed patches.

    pred, target [B, N, P]; mask [B, N] (1 = removed). Computed in float32 whatever the autocast
    dtype of `pred`. A mask without removed patches gives 0 (the official code would give NaN).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
